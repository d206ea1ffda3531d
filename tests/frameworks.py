"""Checkpoints in other frameworks' exact file formats and key layouts, and functional references
of how those frameworks run them, written from their sources' semantics (detectron2's
``modeling/backbone/{resnet,fpn}.py``, mmdetection's ``backbones/resnet.py`` and ``necks/fpn.py``,
the seed project's ``FPN``), independent of fpn_cli's modules.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

STAGE_WIDTHS = (64, 128, 256, 512)


def resnet_convs(layers, groups=1, width_per_group=64):
    """(stage 0..3, block, name, shape) of every conv of a Bottleneck ResNet body, stem first
    (stage -1). ``name`` is conv1/conv2/conv3/shortcut."""
    yield -1, 0, "conv1", (64, 3, 7, 7)
    inplanes = 64
    for s, (planes, blocks) in enumerate(zip(STAGE_WIDTHS, layers, strict=True)):
        width = planes * width_per_group // 64 * groups
        for b in range(blocks):
            yield s, b, "conv1", (width, inplanes, 1, 1)
            yield s, b, "conv2", (width, width // groups, 3, 3)
            yield s, b, "conv3", (planes * 4, width, 1, 1)
            if b == 0:
                yield s, b, "shortcut", (planes * 4, inplanes, 1, 1)
            inplanes = planes * 4


def random_conv(shape, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape, generator=g) * (scale * (2.0 / fan_in) ** 0.5)


def random_bn(n: int, g: torch.Generator, last: bool = False) -> dict[str, torch.Tensor]:
    """Non-trivial statistics, so a BatchNorm mapped or applied wrongly shows."""
    return {
        "weight": torch.rand(n, generator=g) * (0.2 if last else 0.5) + (0.1 if last else 0.5),
        "bias": torch.randn(n, generator=g) * 0.1,
        "running_mean": torch.randn(n, generator=g) * 0.1,
        "running_var": torch.rand(n, generator=g) + 0.5,
    }


# --- detectron2 -----------------------------------------------------------------------------------


def _makers(seed: int, meta: bool):
    """(conv, bn, vector) makers: random tensors from one generator, or shapes alone on the meta device."""
    if meta:
        empty = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
        bn = lambda n, last=False: {k: empty(n) for k in ("weight", "bias", "running_mean", "running_var")}  # noqa: E731
        return (lambda shape: empty(*shape)), bn, (lambda n: empty(n))
    g = torch.Generator().manual_seed(seed)
    return (
        lambda shape: random_conv(shape, g),
        lambda n, last=False: random_bn(n, g, last),
        lambda n: torch.randn(n, generator=g) * 0.1,
    )


def d2_state(
    layers, groups=1, width_per_group=64, retinanet=False, seed=0, meta=False
) -> dict[str, torch.Tensor]:
    """A detectron2 ResNet-FPN detector's state dict (backbone + FPN + a few head keys); with
    ``meta``, the same keys and shapes on the meta device (for heavy architectures)."""
    conv, bn, vector = _makers(seed, meta)
    sd: dict[str, torch.Tensor] = {}
    for s, b, name, shape in resnet_convs(layers, groups, width_per_group):
        prefix = "backbone.bottom_up.stem.conv1" if s < 0 else f"backbone.bottom_up.res{s + 2}.{b}.{name}"
        sd[prefix + ".weight"] = conv(shape)
        for k, v in bn(shape[0], last=name == "conv3").items():
            sd[f"{prefix}.norm.{k}"] = v
    first = 3 if retinanet else 2
    for level in range(first, 6):
        cin = 256 * 2 ** (level - 2)
        sd[f"backbone.fpn_lateral{level}.weight"] = conv((256, cin, 1, 1))
        sd[f"backbone.fpn_lateral{level}.bias"] = vector(256)
        sd[f"backbone.fpn_output{level}.weight"] = conv((256, 256, 3, 3))
        sd[f"backbone.fpn_output{level}.bias"] = vector(256)
    if retinanet:
        sd["backbone.top_block.p6.weight"] = conv((256, 2048, 3, 3))
        sd["backbone.top_block.p6.bias"] = vector(256)
        sd["backbone.top_block.p7.weight"] = conv((256, 256, 3, 3))
        sd["backbone.top_block.p7.bias"] = vector(256)
        sd["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
        sd["pixel_std"] = torch.ones(3, 1, 1)
        sd["head.cls_score.weight"] = torch.zeros(720, 256, 3, 3)
        sd["anchor_generator.cell_anchors.0"] = torch.zeros(9, 4)
    else:
        sd["proposal_generator.rpn_head.conv.weight"] = torch.zeros(256, 256, 3, 3)
        sd["roi_heads.box_head.fc1.weight"] = torch.zeros(1024, 12544)
    return sd


def write_d2_pkl(sd: dict[str, torch.Tensor], path: Path, protocol: int = 3, old_numpy: bool = True) -> None:
    """The model zoo's file: a plain pickle of ``{"model": OrderedDict of float32 numpy arrays,
    "__author__": ...}``, as written by numpy < 2 when ``old_numpy`` (its module paths)."""
    model = collections.OrderedDict((k, v.numpy().astype(np.float32)) for k, v in sd.items())
    data = pickle.dumps({"model": model, "__author__": "Detectron2 Model Zoo"}, protocol=protocol)
    if old_numpy:  # numpy 2 writes numpy._core; the zoo's files were written as numpy.core
        data = data.replace(b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray")
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        data = data.replace(
            b"X\x16\x00\x00\x00numpy._core.multiarray", b"X\x15\x00\x00\x00numpy.core.multiarray"
        )
        assert b"numpy._core" not in data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --- mmdetection ----------------------------------------------------------------------------------


def mmdet_state(
    layers, groups=1, width_per_group=64, retinanet=False, seed=0, meta=False
) -> dict[str, torch.Tensor]:
    """An mmdetection ResNet-FPN detector's state dict; with ``meta``, keys and shapes only."""
    conv, bn, vector = _makers(seed, meta)
    sd: dict[str, torch.Tensor] = {}
    for s, b, name, shape in resnet_convs(layers, groups, width_per_group):
        if s < 0:
            cname, norm = "backbone.conv1", "backbone.bn1"
        elif name == "shortcut":
            cname, norm = f"backbone.layer{s + 1}.{b}.downsample.0", f"backbone.layer{s + 1}.{b}.downsample.1"
        else:
            cname, norm = f"backbone.layer{s + 1}.{b}.{name}", f"backbone.layer{s + 1}.{b}.bn{name[-1]}"
        sd[cname + ".weight"] = conv(shape)
        for k, v in bn(shape[0], last=name == "conv3").items():
            sd[f"{norm}.{k}"] = v
        sd[f"{norm}.num_batches_tracked"] = (
            torch.empty((), dtype=torch.long, device="meta") if meta else torch.tensor(1000)
        )
    start = 1 if retinanet else 0
    for j, level in enumerate(range(start + 2, 6)):
        cin = 256 * 2 ** (level - 2)
        sd[f"neck.lateral_convs.{j}.conv.weight"] = conv((256, cin, 1, 1))
        sd[f"neck.lateral_convs.{j}.conv.bias"] = vector(256)
        sd[f"neck.fpn_convs.{j}.conv.weight"] = conv((256, 256, 3, 3))
        sd[f"neck.fpn_convs.{j}.conv.bias"] = vector(256)
    if retinanet:
        n = 4 - start
        sd[f"neck.fpn_convs.{n}.conv.weight"] = conv((256, 2048, 3, 3))
        sd[f"neck.fpn_convs.{n}.conv.bias"] = vector(256)
        sd[f"neck.fpn_convs.{n + 1}.conv.weight"] = conv((256, 256, 3, 3))
        sd[f"neck.fpn_convs.{n + 1}.conv.bias"] = vector(256)
        sd["bbox_head.retina_cls.weight"] = torch.zeros(720, 256, 3, 3)
    else:
        sd["rpn_head.rpn_conv.weight"] = torch.zeros(256, 256, 3, 3)
        sd["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(81, 1024)
    return sd


def write_mmdet_pth(sd: dict[str, torch.Tensor], path: Path, config: str = "") -> None:
    """mmdetection's published file: legacy (non-zip) torch.save of {"meta", "state_dict"}."""
    meta = {"mmdet_version": "2.0.0", "config": config, "CLASSES": ("person", "bicycle"), "epoch": 12}
    path.parent.mkdir(parents=True, exist_ok=True)
    state = collections.OrderedDict(sd)
    torch.save({"meta": meta, "state_dict": state}, path, _use_new_zipfile_serialization=False)


# --- the functional references --------------------------------------------------------------------


def _bn(x, p: Callable[[str], torch.Tensor], eps: float = 1e-5):
    return F.batch_norm(x, p("running_mean"), p("running_var"), p("weight"), p("bias"), False, 0.0, eps)


def resnet_forward(
    get: Callable[[str], torch.Tensor],
    conv_key: Callable[[int, int, str], tuple[str, str]],
    x: torch.Tensor,
    layers,
    groups: int,
    stride_in_1x1: bool,
) -> list[torch.Tensor]:
    """C2..C5 of a Bottleneck ResNet: ``conv_key(stage, block, name)`` -> (conv weight key, norm prefix)."""

    def conv_bn(x, s, b, name, stride=1, padding=0, groups_=1, relu=True):
        wkey, norm = conv_key(s, b, name)
        y = _bn(
            F.conv2d(x, get(wkey), stride=stride, padding=padding, groups=groups_),
            lambda k: get(f"{norm}.{k}"),
        )
        return F.relu(y) if relu else y

    x = conv_bn(x, -1, 0, "conv1", stride=2, padding=3)
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for s, blocks in enumerate(layers):
        for b in range(blocks):
            stride = 2 if (b == 0 and s > 0) else 1
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            y = conv_bn(x, s, b, "conv1", stride=s1)
            y = conv_bn(y, s, b, "conv2", stride=s3, padding=1, groups_=groups)
            y = conv_bn(y, s, b, "conv3", relu=False)
            short = conv_bn(x, s, b, "shortcut", stride=stride, relu=False) if b == 0 else x
            x = F.relu(y + short)
        outs.append(x)
    return outs


def d2_forward(sd, x, layers, groups, stride_in_1x1, retinanet) -> dict[str, torch.Tensor]:
    """detectron2's backbone on an already normalised, padded (multiple of 32) batch."""

    def key(s, b, name):
        p = "backbone.bottom_up.stem.conv1" if s < 0 else f"backbone.bottom_up.res{s + 2}.{b}.{name}"
        return p + ".weight", p + ".norm"

    c = resnet_forward(sd.__getitem__, key, x, layers, groups, stride_in_1x1)
    first = 3 if retinanet else 2
    prev = None
    out = {}
    for level in range(5, first - 1, -1):
        lat = F.conv2d(
            c[level - 2], sd[f"backbone.fpn_lateral{level}.weight"], sd[f"backbone.fpn_lateral{level}.bias"]
        )
        prev = lat if prev is None else lat + F.interpolate(prev, scale_factor=2.0, mode="nearest")
        w, bias = sd[f"backbone.fpn_output{level}.weight"], sd[f"backbone.fpn_output{level}.bias"]
        out[f"p{level}"] = F.conv2d(prev, w, bias, padding=1)
    if retinanet:
        p6 = F.conv2d(
            c[3], sd["backbone.top_block.p6.weight"], sd["backbone.top_block.p6.bias"], stride=2, padding=1
        )
        w, bias = sd["backbone.top_block.p7.weight"], sd["backbone.top_block.p7.bias"]
        out["p6"], out["p7"] = p6, F.conv2d(F.relu(p6), w, bias, stride=2, padding=1)
    else:
        out["p6"] = F.max_pool2d(out["p5"], kernel_size=1, stride=2)
    return out


def mmdet_forward(sd, x, layers, groups, stride_in_1x1, retinanet) -> dict[str, torch.Tensor]:
    """mmdetection's backbone + neck on an already normalised, padded batch."""

    def key(s, b, name):
        if s < 0:
            return "backbone.conv1.weight", "backbone.bn1"
        if name == "shortcut":
            return f"backbone.layer{s + 1}.{b}.downsample.0.weight", f"backbone.layer{s + 1}.{b}.downsample.1"
        return f"backbone.layer{s + 1}.{b}.{name}.weight", f"backbone.layer{s + 1}.{b}.bn{name[-1]}"

    c = resnet_forward(sd.__getitem__, key, x, layers, groups, stride_in_1x1)
    start = 1 if retinanet else 0
    inputs = c[start:]
    laterals = [
        F.conv2d(t, sd[f"neck.lateral_convs.{j}.conv.weight"], sd[f"neck.lateral_convs.{j}.conv.bias"])
        for j, t in enumerate(inputs)
    ]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(
            laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
        )
    outs = [
        F.conv2d(t, sd[f"neck.fpn_convs.{j}.conv.weight"], sd[f"neck.fpn_convs.{j}.conv.bias"], padding=1)
        for j, t in enumerate(laterals)
    ]
    if retinanet:
        n = len(laterals)
        p6 = F.conv2d(
            inputs[-1], sd[f"neck.fpn_convs.{n}.conv.weight"], sd[f"neck.fpn_convs.{n}.conv.bias"], 2, 1
        )
        w, bias = sd[f"neck.fpn_convs.{n + 1}.conv.weight"], sd[f"neck.fpn_convs.{n + 1}.conv.bias"]
        outs += [p6, F.conv2d(p6, w, bias, stride=2, padding=1)]  # relu_before_extra_convs=False
    else:
        outs.append(F.max_pool2d(outs[-1], 1, stride=2))
    first = 3 if retinanet else 2
    return {f"p{first + i}": t for i, t in enumerate(outs)}


# --- the seed project's FPN -----------------------------------------------------------------------


class SeedBottleneck(torch.nn.Module):
    """The original project's block: 1x1, 3x3 (stride), 1x1 expansion 4; ``shortcut`` Sequential."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class SeedFPN(torch.nn.Module):
    """The seed code's FPN ("FPN101", Bottleneck [2, 2, 2, 2]), by its keys and forward."""

    def __init__(self, num_blocks=(2, 2, 2, 2)) -> None:
        super().__init__()
        nn = torch.nn
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.toplayer = nn.Conv2d(2048, 256, kernel_size=1, stride=1, padding=0)
        self.smooth1 = nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1)
        self.smooth2 = nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1)
        self.smooth3 = nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1)
        self.latlayer1 = nn.Conv2d(1024, 256, kernel_size=1, stride=1, padding=0)
        self.latlayer2 = nn.Conv2d(512, 256, kernel_size=1, stride=1, padding=0)
        self.latlayer3 = nn.Conv2d(256, 256, kernel_size=1, stride=1, padding=0)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(SeedBottleneck(self.in_planes, planes, s))
            self.in_planes = planes * SeedBottleneck.expansion
        return torch.nn.Sequential(*layers)

    @staticmethod
    def _upsample_add(x, y):
        return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False) + y

    def forward(self, x):
        c1 = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        c2 = self.layer1(c1)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        p5 = self.toplayer(c5)
        p4 = self._upsample_add(p5, self.latlayer1(c4))
        p3 = self._upsample_add(p4, self.latlayer2(c3))
        p2 = self._upsample_add(p3, self.latlayer3(c2))
        return self.smooth3(p2), self.smooth2(p3), self.smooth1(p4), p5
