"""``build_fpn``: a configured network with its weights, the library's front door to the model."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import weights as wts
from .errors import WeightsError
from .model import DEFAULT_LEVELS, FPN, FPNConfig, build_model


def build_fpn(
    arch: str = "resnet50",
    weights: str | os.PathLike[str] = "random",
    fpn_style: str | None = None,
    levels: str | Sequence[str] = DEFAULT_LEVELS,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FPN:
    """A ResNet-FPN in eval mode: (N, 3, H, W) normalised -> {level: (N, C, ⌈H/s⌉, ⌈W/s⌉)}.

    ``weights``: ``"random"`` (seeded), ``"imagenet"``, ``"coco"`` or a checkpoint path.
    ``fpn_style``: ``"reference"`` or ``"torchvision"``; None picks what the weights need
    (torchvision for COCO and detector checkpoints, reference otherwise).
    ``levels``: any of p2..p6, c2..c5, returned in the order given; s is 4, 8, 16, 32, 64 for
    p2..p6 and 4..32 for c2..c5, and C is 256 for P levels, the stage width for C levels.

    >>> import torch
    >>> from fpn_cli import build_fpn
    >>> model = build_fpn(arch="seed")
    >>> feats = model(torch.zeros(1, 3, 600, 900))
    >>> for name, f in feats.items():
    ...     print(name, tuple(f.shape))
    p2 (1, 256, 150, 225)
    p3 (1, 256, 75, 113)
    p4 (1, 256, 38, 57)
    p5 (1, 256, 19, 29)
    """
    ckpt = wts.resolve(weights, arch)
    style = fpn_style or (ckpt.fpn_style if ckpt and ckpt.fpn_style else "reference")
    if ckpt is not None:
        if ckpt.arch is not None and ckpt.arch != arch:
            raise WeightsError(
                f"{ckpt.source} was saved for arch {ckpt.arch!r}, not {arch!r}: pass --arch {ckpt.arch}"
            )
        if ckpt.fpn_style is not None and ckpt.fpn_style != style:
            raise WeightsError(
                f"{ckpt.source} holds a {ckpt.fpn_style}-style FPN but --fpn-style {style} was asked for: "
                f"leave --fpn-style out to use the checkpoint's"
            )
    config = FPNConfig(arch, style, levels, bn_eps=ckpt.bn_eps if ckpt else 1e-5)
    model = build_model(config, seed=seed)
    if ckpt is not None:
        wts.load_into(model, ckpt)
    return model.to(device)
