"""The network: residual blocks, the bottom-up ResNet, the top-down FPN and the architecture registry.

Submodule names follow torchvision's ``ResNet`` and ``FeaturePyramidNetwork`` so that their state
dicts map onto ours by the short table in ``weights.py``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UsageError

FPN_STYLES = ("reference", "torchvision")
LEVELS = ("p2", "p3", "p4", "p5", "p6", "c2", "c3", "c4", "c5")
DEFAULT_LEVELS = ("p2", "p3", "p4", "p5")
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32, "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). ``groups`` and ``base_width`` exist only for a shared
    constructor signature; torchvision rejects anything but the defaults, and so do we."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, wider for Wide ResNet), 1x1 expand; one class for all three."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # stride on the 3x3 conv (ResNet v1.5), as torchvision, so its checkpoints load unchanged
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

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
class Arch:
    """One registered bottom-up network: which block, how many per stage, and its widths."""

    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64  # 128 for Wide ResNet: the 3x3 convs are twice as wide
    torchvision_name: str | None = None  # the torchvision builder whose ImageNet weights fit

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """Channels of C2..C5."""
        return tuple(w * self.block.expansion for w in (64, 128, 256, 512))  # type: ignore[return-value]


def _tv(block: type[BasicBlock] | type[Bottleneck], layers, name: str, **kw) -> Arch:
    return Arch(block, layers, torchvision_name=name, **kw)


ARCHS: dict[str, Arch] = {
    # what the original code built, despite calling it "FPN101"; no pretrained weights exist for it
    "seed": Arch(Bottleneck, (2, 2, 2, 2)),
    "resnet18": _tv(BasicBlock, (2, 2, 2, 2), "resnet18"),
    "resnet34": _tv(BasicBlock, (3, 4, 6, 3), "resnet34"),
    "resnet50": _tv(Bottleneck, (3, 4, 6, 3), "resnet50"),
    "resnet101": _tv(Bottleneck, (3, 4, 23, 3), "resnet101"),
    "resnet152": _tv(Bottleneck, (3, 8, 36, 3), "resnet152"),
    "resnext50_32x4d": _tv(Bottleneck, (3, 4, 6, 3), "resnext50_32x4d", groups=32, width_per_group=4),
    "resnext101_32x8d": _tv(Bottleneck, (3, 4, 23, 3), "resnext101_32x8d", groups=32, width_per_group=8),
    "resnext101_64x4d": _tv(Bottleneck, (3, 4, 23, 3), "resnext101_64x4d", groups=64, width_per_group=4),
    "wide_resnet50_2": _tv(Bottleneck, (3, 4, 6, 3), "wide_resnet50_2", width_per_group=128),
    "wide_resnet101_2": _tv(Bottleneck, (3, 4, 23, 3), "wide_resnet101_2", width_per_group=128),
}


@dataclass(frozen=True)
class FPNConfig:
    """Everything that decides the network's structure and initial weights."""

    arch: str = "resnet50"
    fpn_style: str = "reference"
    levels: tuple[str, ...] = DEFAULT_LEVELS
    out_channels: int = 256  # d in the FPN paper
    bn_eps: float = 1e-5  # 0.0 for torchvision's v1 COCO detector weights

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UsageError(f"unknown arch {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.fpn_style not in FPN_STYLES:
            raise UsageError(f"unknown fpn style {self.fpn_style!r}; choose from {', '.join(FPN_STYLES)}")
        object.__setattr__(self, "levels", parse_levels(self.levels))

    def channels(self, level: str) -> int:
        if level.startswith("c"):
            return ARCHS[self.arch].channels[int(level[1]) - 2]
        return self.out_channels


def parse_levels(levels: str | Sequence[str]) -> tuple[str, ...]:
    """``"p2,p3"`` or ``("P2", "p3")`` -> ``("p2", "p3")``; unknown or repeated names are errors."""
    names = levels.split(",") if isinstance(levels, str) else list(levels)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in LEVELS]
    if unknown:
        raise UsageError(f"unknown level {unknown[0]!r}; choose from {', '.join(LEVELS)}")
    if not names:
        raise UsageError("no levels requested")
    if len(set(names)) != len(names):
        raise UsageError(f"a level is listed twice in {','.join(names)}")
    return tuple(names)


class ResNetBody(nn.Module):
    """Bottom-up path: (N, 3, H, W) -> [C2 (N, c2, ⌈H/4⌉, ⌈W/4⌉), ..., C5 (N, c5, ⌈H/32⌉, ⌈W/32⌉)]."""

    def __init__(self, arch: Arch) -> None:
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
                    arch.block(inplanes, planes, stride if b == 0 else 1, arch.groups, arch.width_per_group)
                )
                inplanes = planes * arch.block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))

    def forward(self, x: Tensor, stages: int = 4) -> list[Tensor]:
        """Runs the first ``stages`` stages only: the rest are not needed for the levels asked."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(stages):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


class TopDown(nn.Module):
    """Top-down path with lateral connections: [C2..C5] -> [P2..P5], each (N, 256, Ck's size).

    ``reference``: bilinear upsampling, P2..P4 smoothed by a 3x3 conv, P5 is the lateral alone.
    ``torchvision``: nearest upsampling and every level smoothed, as ``FeaturePyramidNetwork``.
    ``inner_blocks[i]`` and ``layer_blocks[i]`` belong to level P(i+2).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, style: str) -> None:
        super().__init__()
        self.style = style
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        n_smoothed = 4 if style == "torchvision" else 3
        self.layer_blocks = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in range(n_smoothed)
        )

    def forward(self, feats: Sequence[Tensor], wanted: frozenset[int]) -> dict[int, Tensor]:
        """``feats`` = [C2..C5]; returns {i: P(i+2)} for each index in ``wanted`` (0..3)."""
        lowest = min(wanted)
        inner = self.inner_blocks[3](feats[3])
        out = {3: self._smooth(inner, 3)} if 3 in wanted else {}
        mode = "nearest" if self.style == "torchvision" else "bilinear"
        for i in range(2, lowest - 1, -1):
            lateral = self.inner_blocks[i](feats[i])
            if mode == "bilinear":
                up = F.interpolate(inner, size=lateral.shape[-2:], mode=mode, align_corners=False)
            else:
                up = F.interpolate(inner, size=lateral.shape[-2:], mode=mode)
            inner = lateral + up
            if i in wanted:
                out[i] = self._smooth(inner, i)
        return out

    def _smooth(self, x: Tensor, i: int) -> Tensor:
        return self.layer_blocks[i](x) if i < len(self.layer_blocks) else x


class FPN(nn.Module):
    """ResNet + FPN: (N, 3, H, W) normalised -> {level: (N, C, ⌈H/stride⌉, ⌈W/stride⌉)}.

    Only the stages and top-down steps that the requested levels need are run.
    """

    def __init__(self, config: FPNConfig) -> None:
        super().__init__()
        self.config = config
        arch = ARCHS[config.arch]
        self.body = ResNetBody(arch)
        self.fpn = TopDown(arch.channels, config.out_channels, config.fpn_style)
        levels = config.levels
        wanted = {int(n[1]) - 2 for n in levels if n.startswith("p") and n != "p6"}
        if "p6" in levels:
            wanted.add(3)
        self._wanted_p = frozenset(wanted)
        self._stages = 4 if wanted else max(int(n[1]) - 1 for n in levels)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        c = self.body(x, self._stages)
        p = self.fpn(c, self._wanted_p) if self._wanted_p else {}
        out = {}
        for name in self.config.levels:
            if name == "p6":
                # LastLevelMaxPool: a kernel-1, stride-2 max-pool is plain subsampling of P5
                out[name] = F.max_pool2d(p[3], kernel_size=1, stride=2)
            elif name.startswith("p"):
                out[name] = p[int(name[1]) - 2]
            else:
                out[name] = c[int(name[1]) - 2]
        return out


def build_model(config: FPNConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> FPN:
    """An FPN in eval mode; ``seed`` gives the same weights on every machine, ``None`` leaves them
    uninitialised (for a checkpoint to fill, or on the meta device for shapes alone)."""
    with torch.device("meta"):
        model = FPN(config)
    if torch.device(device).type != "meta":
        model = model.to_empty(device="cpu")
        _reset_buffers(model, config.bn_eps)
        if seed is not None:
            seeded_init(model, seed)
        model = model.to(device)
    return model.eval().requires_grad_(False)


def _reset_buffers(model: nn.Module, eps: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.num_batches_tracked.zero_()


@torch.no_grad()
def seeded_init(model: FPN, seed: int) -> None:
    """Initialise every parameter from one CPU generator, in module order, so the result is
    identical on every machine: torchvision's schemes (Kaiming normal for the ResNet, Kaiming
    uniform with a=1 for the FPN, unit BatchNorm) plus depth scaling of the residual branches."""
    g = torch.Generator().manual_seed(seed)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = torch.empty(m.weight.shape)
            if name.startswith("fpn."):
                nn.init.kaiming_uniform_(w, a=1, generator=g)
            else:
                nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=g)
            m.weight.copy_(w)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1.0)
            m.bias.zero_()
    # Eval-mode BatchNorm with unit statistics does not normalise, so the residual stream grows
    # with depth (ResNet-152 reached 1e8, past float16's range). Scaling each branch's last
    # BatchNorm by 1/sqrt(blocks), as Fixup-style depth scaling does, keeps features O(1).
    scale = len(blocks) ** -0.5
    for block in blocks:
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        last_bn.weight.fill_(scale)


def output_shapes(config: FPNConfig, height: int, width: int) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) per requested level for one H x W image, by a forward pass on the meta device:
    the real layer arithmetic, no feature memory."""
    with torch.no_grad():
        out = _meta_model(config)(torch.empty(1, 3, height, width, device="meta"))
    return {k: tuple(v.shape[1:]) for k, v in out.items()}


def parameter_count(config: FPNConfig) -> int:
    """Parameters of the whole network (every level's layers), counted on the meta device."""
    return sum(p.numel() for p in _meta_model(config).parameters())


@functools.lru_cache(maxsize=4)
def _meta_model(config: FPNConfig) -> FPN:
    """One shapes-only model per configuration: a summary of many image sizes builds it once."""
    return build_model(config, device="meta")


@torch.no_grad()
def fold_batchnorm(model: FPN) -> FPN:
    """A copy of ``model`` for inference with every BatchNorm folded into the convolution before
    it (w' = w * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps), computed in float64): one
    pass over each activation instead of two. Outputs agree with ``model`` to float rounding."""
    folded = copy.deepcopy(model)
    pairs = [(folded.body, "conv1", "bn1")]
    for block in folded.body.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            names = ("1", "2", "3") if isinstance(block, Bottleneck) else ("1", "2")
            pairs += [(block, f"conv{n}", f"bn{n}") for n in names]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        fused = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            groups=conv.groups, bias=True, device=conv.weight.device,
        )  # fmt: skip
        fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias.double() - bn.running_mean.double() * scale)
        setattr(parent, conv_name, fused)
        setattr(parent, bn_name, nn.Identity())
    return folded.eval().requires_grad_(False)
