"""The top-down path: lateral 1x1 convs, upsampling, 3x3 smoothing, and the extra levels above.

FPN variants are data (:class:`FPNSpec`): how the coarser level is upsampled, which levels are
smoothed, whether the convs carry a BatchNorm, which backbone levels feed it, and what extra levels
sit on top: an :class:`ExtraBlocks` that builds its module (:class:`MaxPoolP6`, :class:`ConvP6P7`),
as torchvision passes ``LastLevelMaxPool`` or ``LastLevelP6P7`` objects in. Which variants exist
is each framework's business (frameworks/); this module is the mechanism. Module names are
torchvision's ``FeaturePyramidNetwork``'s (``inner_blocks``, ``layer_blocks``, ``extra_blocks.p6``);
``inner_blocks[i]`` and ``layer_blocks[i]`` belong to the i-th input level, finest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from fpn_cli.models.backbones import LevelInfo
from fpn_cli.models.levels import LEVELS, pyramid_of

UPSAMPLE_MODES = ("bilinear", "nearest", "nearest2x")


class ExtraBlocks(Protocol):
    """Levels above the top pyramid level: their names, and the module that makes them from the
    top pyramid level and the top backbone level, ``(P_top, C_top) -> [P6, ...]``."""

    levels: tuple[str, ...]

    def build(self, backbone_channels: int, out_channels: int) -> nn.Module: ...


@dataclass(frozen=True)
class MaxPool:
    """P6 by subsampling P5 (torchvision's ``LastLevelMaxPool``, detectron2's R-CNN ``top_block``)."""

    levels: tuple[str, ...] = ("p6",)

    def build(self, backbone_channels: int, out_channels: int) -> nn.Module:
        return MaxPoolP6()


@dataclass(frozen=True)
class P6P7:
    """P6 and P7 by strided 3x3 convs from C5 (``source="c5"``) or P5, with or without a ReLU
    between them (torchvision and detectron2: with; mmdetection's RetinaNet: without)."""

    source: str = "p5"
    relu_before_p7: bool = True
    levels: tuple[str, ...] = ("p6", "p7")

    def build(self, backbone_channels: int, out_channels: int) -> nn.Module:
        source = backbone_channels if self.source == "c5" else out_channels
        return ConvP6P7(source, out_channels, self.source == "c5", self.relu_before_p7)


@dataclass(frozen=True)
class FPNSpec:
    """One FPN variant."""

    upsample: str  # "bilinear" (align_corners=False) or "nearest" to the lateral's exact size;
    #                "nearest2x": x2 then cropped to the lateral (detectron2, with padded inputs)
    smooth_top: bool = True  # the reference design leaves the top level unsmoothed
    norm: bool = False  # BatchNorm after every FPN conv (torchvision's v2 detectors), convs then bias-free
    first_input: str | None = None  # the finest backbone level fed in ("c3" for RetinaNet); None: all
    extra: ExtraBlocks | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}")


def _conv(cin: int, cout: int, kernel: int, norm: bool) -> nn.Module:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not norm)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if norm else conv


class MaxPoolP6(nn.Module):
    """P6 = P5 subsampled by 2 (a kernel-1, stride-2 max-pool), as ``LastLevelMaxPool``."""

    def forward(self, top_pyramid: Tensor, top_backbone: Tensor) -> list[Tensor]:
        return [F.max_pool2d(top_pyramid, kernel_size=1, stride=2)]


class ConvP6P7(nn.Module):
    """P6 = 3x3 stride-2 conv of C5 or P5; P7 = 3x3 stride-2 conv of P6 (after a ReLU, unless not)."""

    def __init__(
        self, in_channels: int, out_channels: int, from_backbone: bool, relu_before_p7: bool
    ) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        self.from_backbone = from_backbone
        self.relu_before_p7 = relu_before_p7

    def forward(self, top_pyramid: Tensor, top_backbone: Tensor) -> list[Tensor]:
        p6 = self.p6(top_backbone if self.from_backbone else top_pyramid)
        return [p6, self.p7(F.relu(p6) if self.relu_before_p7 else p6)]


class TopDown(nn.Module):
    """[C_first..C_top] -> {P level: (N, 256, C's size)} plus the extra levels above the top."""

    def __init__(self, inputs: Sequence[LevelInfo], spec: FPNSpec, out_channels: int) -> None:
        super().__init__()
        self.spec = spec
        self.inputs = tuple(inputs)
        self.inner_blocks = nn.ModuleList(_conv(f.channels, out_channels, 1, spec.norm) for f in inputs)
        smoothed = len(inputs) if spec.smooth_top else len(inputs) - 1
        self.layer_blocks = nn.ModuleList(
            _conv(out_channels, out_channels, 3, spec.norm) for _ in range(smoothed)
        )
        extra = spec.extra
        self.extra_blocks = extra.build(inputs[-1].channels, out_channels) if extra is not None else None

    def level_info(self, out_channels: int) -> list[LevelInfo]:
        """The levels this path produces, finest first."""
        names = [pyramid_of(f.name) for f in self.inputs]
        names += list(self.spec.extra.levels) if self.spec.extra else []
        return [LevelInfo(n, out_channels, LEVELS[n].stride) for n in names]

    def forward(self, feats: Sequence[Tensor], lowest: int, extras: bool) -> list[Tensor | None]:
        """``feats``: the inputs, finest first. Returns their pyramid levels (None below index
        ``lowest``, which need not be computed), then the extra levels when ``extras``."""
        top = len(feats) - 1
        inner = self.inner_blocks[top](feats[top])
        out: list[Tensor | None] = [None] * len(feats)
        out[top] = self._smooth(inner, top)
        for i in range(top - 1, lowest - 1, -1):
            lateral = self.inner_blocks[i](feats[i])
            inner = lateral + self._upsample(inner, lateral.shape[-2:])
            out[i] = self._smooth(inner, i)
        if extras and self.extra_blocks is not None:
            out += self.extra_blocks(out[top], feats[top])
        return out

    def _upsample(self, x: Tensor, size) -> Tensor:
        mode = self.spec.upsample
        if mode == "bilinear":
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        up = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return up[..., : size[0], : size[1]]  # exact when the input was padded to a multiple of 32

    def _smooth(self, x: Tensor, i: int) -> Tensor:
        return self.layer_blocks[i](x) if i < len(self.layer_blocks) else x
