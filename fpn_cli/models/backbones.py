"""Bottom-up networks and their registry. A backbone declares what it produces, as timm's
``feature_info`` and detectron2's ``output_shape()`` do: ``feature_info`` lists its output levels
(name, channels, stride), finest first, and ``forward(x, count)`` returns the first ``count`` of
them. The FPN is built from that declaration and knows nothing else about the network.

Submodule names follow torchvision's (``conv1``, ``bn1``, ``layer1.0.downsample.0``; MobileNetV3's
``features`` blocks by index) so that its state dicts map onto ours by a short table (weights.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from fpn_cli.errors import UsageError
from fpn_cli.models.choices import TIMM_PREFIX, check_arch
from fpn_cli.models.hub import hf_hub_model
from fpn_cli.models.levels import LEVELS


@dataclass(frozen=True)
class LevelInfo:
    """One output of a network: its level name, channels, and stride in input pixels."""

    name: str
    channels: int
    stride: int


@runtime_checkable
class Backbone(Protocol):
    """What the FPN needs of a bottom-up network (an ``nn.Module``): ``feature_info``, its outputs
    finest first, and ``forward(x, count)``: (N, 3, H, W) -> the first ``count`` outputs (all for
    None), each (N, channels, ⌈H/stride⌉, ⌈W/stride⌉). Stages past ``count`` need not run."""

    feature_info: tuple[LevelInfo, ...]

    def forward(self, x: Tensor, count: int | None = None) -> list[Tensor]: ...


@runtime_checkable
class Arch(Protocol):
    """A registered architecture: it builds its :class:`Backbone` and names the framework
    (frameworks/) whose ImageNet weights it takes."""

    framework: str  # "torchvision", "timm"
    torchvision_name: str | None  # the torchvision builder whose ImageNet weights fit, if any
    imagenet_bn_eps: float  # the BatchNorm eps those weights run with
    init_covered: bool  # every parameter is a conv's or a BatchNorm's (see model.build_model)
    # host bytes a CPU forward takes per input pixel, per float per pixel of the model's levels
    # (run/engine.py's memory guard), measured by benchmarks/memory_guard.py with a margin
    host_bytes_per_level_float: float

    def build(self) -> Backbone: ...


# --- ResNet family -------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). ``groups``, ``base_width`` and ``stride_in_1x1`` exist
    only for a shared constructor signature; anything but the defaults is refused, as torchvision does."""

    expansion = 1
    # peak RSS measured 9.2-9.8 B per level float (resnet18/34, 2000x2000 and 3000x3000): their
    # activations inside the blocks are large beside their 64..512-channel outputs
    host_bytes_per_level_float = 11.0

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64 or stride_in_1x1:
            raise ValueError("BasicBlock supports only groups=1, base_width=64, stride on the 3x3 conv")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    @property
    def branch_norm(self) -> nn.BatchNorm2d:
        """The residual branch's last BatchNorm (scaled by depth in the seeded initialisation)."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, wider for Wide ResNet), 1x1 expand; one class for all."""

    expansion = 4
    host_bytes_per_level_float = 8.0  # measured 6.8-7.3 (seed, resnet50; 2000x2000, 3000x3000)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        # The stride sits on the 3x3 conv (ResNet v1.5) as in torchvision, so its checkpoints load
        # unchanged; MSRA's original ResNets (detectron2's R-50/R-101, mmdetection's caffe style)
        # put it on the first 1x1 conv, and their weights only match that placement.
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride_1x1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride_3x3, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    @property
    def branch_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _shortcut(inplanes: int, outplanes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


@dataclass(frozen=True)
class ResNetArch:
    """A registered ResNet: which block, how many per stage, widths, and where the stride sits."""

    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64  # 128 for Wide ResNet: the 3x3 convs are twice as wide
    torchvision_name: str | None = None  # the torchvision builder whose ImageNet weights fit
    stride_in_1x1: bool = False  # MSRA/caffe-style ResNets
    framework = "torchvision"
    imagenet_bn_eps = 1e-5  # the BatchNorm eps torchvision's ImageNet weights run with
    init_covered = True  # every parameter is a conv's or a BatchNorm's (see model.build_model)

    @property
    def host_bytes_per_level_float(self) -> float:
        """The block's measured figure; grouped or wide 3x3 convs (ResNeXt, Wide ResNet: not
        measured) scaled by how much wider they are, an upper bound."""
        return self.block.host_bytes_per_level_float * max(1.0, self.groups * self.width_per_group / 64)

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """Channels of C2..C5."""
        return tuple(w * self.block.expansion for w in (64, 128, 256, 512))  # type: ignore[return-value]

    def build(self) -> ResNetBody:
        return ResNetBody(self)


class ResNetBody(nn.Module):
    """(N, 3, H, W) -> [C2 (N, c2, ⌈H/4⌉, ⌈W/4⌉), ..., C5 (N, c5, ⌈H/32⌉, ⌈W/32⌉)]."""

    def __init__(self, arch: ResNetArch) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        stages = zip((64, 128, 256, 512), arch.layers, (1, 2, 2, 2), strict=True)
        for i, (planes, blocks, stride) in enumerate(stages):
            stage = []
            for b in range(blocks):
                stage.append(
                    arch.block(
                        inplanes, planes, stride if b == 0 else 1, arch.groups, arch.width_per_group,
                        arch.stride_in_1x1,
                    )
                )  # fmt: skip
                inplanes = planes * arch.block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.feature_info = tuple(
            LevelInfo(f"c{i + 2}", c, LEVELS[f"c{i + 2}"].stride) for i, c in enumerate(arch.channels)
        )

    def forward(self, x: Tensor, count: int | None = None) -> list[Tensor]:
        """Runs the first ``count`` stages only: the rest are not needed for the levels asked."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(4 if count is None else count):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


# --- MobileNetV3 (torchvision's detection backbone) ----------------------------------------------


@dataclass(frozen=True)
class MobileNetV3Arch:
    """torchvision's MobileNetV3-Large ``features`` as its detection FPN uses them: the outputs
    of block 13 (160 channels) and block 16 (960), both at stride 32."""

    torchvision_name: str | None = "mobilenet_v3_large"
    framework = "torchvision"
    imagenet_bn_eps = 1e-3  # torchvision's classifier; its detector runs FrozenBatchNorm2d at 1e-5
    init_covered = True
    # its levels are few (1.7 floats per pixel, all at stride 32) beside its stride-2..16 activations:
    # measured 35.7 and 48.7 B per level float (2000x2000, 3000x3000)
    host_bytes_per_level_float = 60.0
    returned: tuple[tuple[int, str], ...] = ((13, "c5a"), (16, "c5"))

    def build(self) -> MobileNetV3Body:
        return MobileNetV3Body(self)


class MobileNetV3Body(nn.Module):
    """torchvision's own blocks (no copy of their code): ``0``..``16`` as in ``features``."""

    def __init__(self, arch: MobileNetV3Arch) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v3_large

        features = mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d).features
        for i, block in enumerate(features):
            self.add_module(str(i), block)
        self.returned = dict(arch.returned)
        self.feature_info = tuple(
            LevelInfo(name, features[i].out_channels, LEVELS[name].stride) for i, name in arch.returned
        )

    def forward(self, x: Tensor, count: int | None = None) -> list[Tensor]:
        count = len(self.feature_info) if count is None else count
        last = list(self.returned)[count - 1]
        outs = []
        for i, block in enumerate(self.children()):
            x = block(x)
            if i in self.returned:
                outs.append(x)
            if i == last:
                break
        return outs


# --- timm -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimmArch:
    """Any timm model with ``features_only`` whose reductions include 4, 8, 16 and 32."""

    model_name: str
    torchvision_name: str | None = None
    framework = "timm"
    imagenet_bn_eps = 1e-5
    init_covered = False  # LayerNorms, layer scales: timm initialises them
    # measured 8.7 and 8.4 for convnext_tiny (2000x2000, 3000x3000); other timm families are not
    host_bytes_per_level_float = 11.0

    def build(self) -> TimmBody:
        return TimmBody(self.model_name)


def import_timm():
    try:
        import timm
    except ImportError:
        raise UsageError(
            "--arch timm:... needs timm, which is not installed: pip install 'fpn-extract[timm]'"
        ) from None
    return timm


class TimmBody(nn.Module):
    """A timm ``features_only`` network, its stride-4/8/16/32 outputs as C2..C5."""

    def __init__(self, model_name: str, pretrained: bool = False) -> None:
        super().__init__()
        timm = import_timm()
        with hf_hub_model(model_name, pretrained):
            self.net, wanted = self._create(timm, model_name, pretrained)
        channels = self.net.feature_info.channels()
        self.feature_info = tuple(
            LevelInfo(f"c{k}", c, s) for k, c, s in zip((2, 3, 4, 5), channels, wanted, strict=True)
        )

    @staticmethod
    def _create(timm, model_name: str, pretrained: bool) -> tuple[nn.Module, list[int]]:
        """timm's ``features_only`` network with the last output at each stride 4, 8, 16, 32."""
        try:
            probe = timm.create_model(model_name, pretrained=False, features_only=True)
        except (RuntimeError, ValueError) as e:  # timm's "Unknown model", a name it cannot parse
            raise UsageError(f"--arch timm:{model_name}: {str(e).splitlines()[0]}") from None
        reductions = list(probe.feature_info.reduction())
        wanted = [LEVELS[f"c{k}"].stride for k in (2, 3, 4, 5)]
        missing = [r for r in wanted if r not in reductions]
        if missing:
            raise UsageError(
                f"--arch timm:{model_name} has outputs at strides {reductions}, "
                f"not {', '.join(map(str, missing))}: an FPN needs 4, 8, 16 and 32"
            )
        # the last output at each stride: the deepest features of that resolution
        indices = [len(reductions) - 1 - reductions[::-1].index(r) for r in wanted]
        net = timm.create_model(
            model_name, pretrained=pretrained, features_only=True, out_indices=tuple(indices)
        )
        return net, wanted

    def forward(self, x: Tensor, count: int | None = None) -> list[Tensor]:
        outs = self.net(x)
        return outs if count is None else outs[:count]


# --- the registry ---------------------------------------------------------------------------------


def _tv(block: type[BasicBlock] | type[Bottleneck], layers, name: str, **kw) -> ResNetArch:
    return ResNetArch(block, layers, torchvision_name=name, **kw)


ARCHS: dict[str, Arch] = {
    # what the original code built, despite calling it "FPN101"; no pretrained weights exist for it
    "seed": ResNetArch(Bottleneck, (2, 2, 2, 2)),
    "resnet18": _tv(BasicBlock, (2, 2, 2, 2), "resnet18"),
    "resnet34": _tv(BasicBlock, (3, 4, 6, 3), "resnet34"),
    "resnet50": _tv(Bottleneck, (3, 4, 6, 3), "resnet50"),
    "resnet101": _tv(Bottleneck, (3, 4, 23, 3), "resnet101"),
    "resnet152": _tv(Bottleneck, (3, 8, 36, 3), "resnet152"),
    "resnext50_32x4d": _tv(Bottleneck, (3, 4, 6, 3), "resnext50_32x4d", groups=32, width_per_group=4),
    "resnext101_32x8d": _tv(Bottleneck, (3, 4, 23, 3), "resnext101_32x8d", groups=32, width_per_group=8),
    "resnext101_32x4d": ResNetArch(Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=4),  # mmdetection's
    "resnext101_64x4d": _tv(Bottleneck, (3, 4, 23, 3), "resnext101_64x4d", groups=64, width_per_group=4),
    "wide_resnet50_2": _tv(Bottleneck, (3, 4, 6, 3), "wide_resnet50_2", width_per_group=128),
    "wide_resnet101_2": _tv(Bottleneck, (3, 4, 23, 3), "wide_resnet101_2", width_per_group=128),
    # MSRA's original ResNets (stride on the 1x1 conv), as detectron2 and mmdetection's caffe style
    "resnet50_msra": ResNetArch(Bottleneck, (3, 4, 6, 3), stride_in_1x1=True),
    "resnet101_msra": ResNetArch(Bottleneck, (3, 4, 23, 3), stride_in_1x1=True),
    "mobilenet_v3_large": MobileNetV3Arch(),
}


@functools.lru_cache(maxsize=64)
def get_arch(name: str) -> Arch:
    """A registered architecture, or ``timm:<model>`` for any timm model."""
    if check_arch(name).startswith(TIMM_PREFIX):
        return TimmArch(name[len(TIMM_PREFIX) :])
    return ARCHS[name]
