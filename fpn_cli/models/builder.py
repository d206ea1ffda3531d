"""The one place that decides what model a run uses: :func:`resolve` turns ``--arch``,
``--weights``, ``--fpn-style``, ``--levels`` and ``--pad-multiple`` into a :class:`ModelSpec`
(configuration, preprocessing, where the weights come from) without downloading anything;
:func:`build_fpn` builds it. ``--summary``, the run and the report all ask :func:`resolve`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fpn_cli.errors import UsageError, WeightsError
from fpn_cli.models import weights as wts
from fpn_cli.models import zoo
from fpn_cli.models.backbones import ResNetArch, TimmArch, get_arch, import_timm
from fpn_cli.models.choices import IMAGENET_WEIGHTS, RANDOM, SEED_RANGE, USER_STYLES
from fpn_cli.models.frameworks import framework, read_file
from fpn_cli.models.hub import ResizePolicy, WeightsOrigin
from fpn_cli.models.levels import parse_levels
from fpn_cli.models.model import FPN, FPNConfig, build_model
from fpn_cli.models.preprocess import IMAGENET, Preprocess

DEFAULT_ARCH = "resnet50"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: what to build, how to feed it, and how to fill it."""

    config: FPNConfig
    weights: str  # as recorded: random, imagenet, a zoo name, or a file's absolute path
    preprocess: Preprocess
    seed: int = 0
    load: Callable[[], wts.Checkpoint | None] = field(default=lambda: None, compare=False, repr=False)
    fpn_from_weights: bool = False  # the FPN's layers come from the weights, not the seed
    resize: ResizePolicy | None = None  # the weights' framework's test-time resize, applied if asked
    origin: WeightsOrigin | None = None  # the weights' file, for its identity (none: random, timm)

    @property
    def random(self) -> bool:
        return self.weights == RANDOM

    def describe(self) -> str:
        return f"{self.config.arch}, {self.config.fpn_style} FPN, weights {self.weights}"

    def identity(self) -> dict | None:
        """The loaded weights file's name, URL, path and SHA-256 (hub.WeightsOrigin); None for
        weights without a file of ours (random, timm's), or before a download."""
        return self.origin.identity() if self.origin is not None else None


def resolve(
    arch: str | None = None,
    weights: str | os.PathLike[str] = RANDOM,
    fpn_style: str | None = None,
    levels: str | Sequence[str] | None = None,
    seed: int = 0,
    pad_multiple: int | None = None,
) -> ModelSpec:
    """Everything the options decide about the model; nothing is downloaded. ``None`` means "what
    the weights need, else the default" (resnet50, reference FPN, P2-P5, no padding). An option
    that contradicts the weights is a :class:`UsageError` naming both."""
    weights = str(weights)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"seed {seed} is out of range: use an integer from 0 to 2**64-1")
    if arch is not None and isinstance(get_arch(arch), TimmArch):
        import_timm()  # here, not only when a model is first built: shapes are cached per config
    if weights in (RANDOM, IMAGENET_WEIGHTS):
        return _plain(arch or DEFAULT_ARCH, weights, fpn_style, levels, seed, pad_multiple)
    if zoo.is_zoo_name(weights):
        return _from_zoo(zoo.entry(weights), weights, arch, fpn_style, levels, seed, pad_multiple)
    if not Path(weights).exists() and (close := zoo.suggest(weights)) is not None:
        raise WeightsError(f"--weights {weights}: no such file, source or zoo model; did you mean {close}?")
    return _from_file(Path(weights), arch, fpn_style, levels, seed, pad_multiple)


def _check_style(style: str | None) -> None:
    if style is not None and style not in USER_STYLES:
        raise UsageError(f"unknown fpn style {style!r}; choose from {', '.join(USER_STYLES)}")


def _plain(arch, weights, fpn_style, levels, seed, pad_multiple) -> ModelSpec:
    _check_style(fpn_style)
    config = FPNConfig(arch, fpn_style or "reference", _levels(levels), pad_multiple=pad_multiple or 1)
    if weights == RANDOM:
        return ModelSpec(config, RANDOM, IMAGENET, seed)
    pretrained = framework(get_arch(arch).framework).imagenet(arch)
    config = replace(config, bn_eps=pretrained.bn_eps)
    return ModelSpec(
        config, weights, pretrained.preprocess, seed, load=pretrained.load, origin=pretrained.origin
    )


def _contradiction(option: str, given: str, needed: str, entry: zoo.ZooEntry, spec: str) -> WeightsError:
    named = spec if spec == entry.name else f"{spec} ({entry.name})"
    return WeightsError(
        f"--{option} {given} contradicts --weights {named}, which needs {needed}: leave --{option} out"
    )


def _from_zoo(entry: zoo.ZooEntry, given: str, arch, fpn_style, levels, seed, pad_multiple) -> ModelSpec:
    if arch is not None and arch != entry.arch:
        raise _contradiction("arch", arch, entry.arch, entry, given)
    _check_style(fpn_style)
    if fpn_style is not None and fpn_style != entry.fpn_style:
        raise _contradiction("fpn-style", fpn_style, entry.fpn_style, entry, given)
    config = FPNConfig(
        entry.arch, entry.fpn_style, _levels(levels) or entry.levels, bn_eps=entry.bn_eps,
        pad_multiple=entry.pad_multiple if pad_multiple is None else pad_multiple,
    )  # fmt: skip
    return ModelSpec(
        config,
        entry.name,
        entry.preprocess,
        seed,
        load=entry.load,
        fpn_from_weights=True,
        resize=entry.resize,
        origin=entry.origin(),
    )


def _from_file(path: Path, arch, fpn_style, levels, seed, pad_multiple) -> ModelSpec:
    """A checkpoint file: its framework (the registry's detection) says the rest."""
    ckpt = read_file(path)
    owner = framework(ckpt.format)
    found = owner.arch_of(ckpt)
    if arch is not None and found is not None and arch != found and not _same_shape(arch, found):
        raise WeightsError(
            f"{path} holds a {found} backbone, not {arch}: pass --arch {found}, or leave --arch out"
        )
    arch = arch or found or DEFAULT_ARCH
    style = owner.style_of(ckpt)
    _check_style(fpn_style)
    if style is not None and fpn_style is not None and fpn_style != style:
        raise WeightsError(
            f"{path} holds a {style}-style FPN but --fpn-style {fpn_style} was asked for: "
            "leave --fpn-style out to use the checkpoint's"
        )
    config = FPNConfig(
        arch, style or fpn_style or "reference", _levels(levels), bn_eps=owner.bn_eps(ckpt),
        pad_multiple=owner.pad_multiple if pad_multiple is None else pad_multiple,
    )  # fmt: skip
    return ModelSpec(
        config, str(path.resolve()), owner.file_preprocess(ckpt, arch), seed, load=lambda: ckpt,
        fpn_from_weights=style is not None, resize=owner.resize if style is not None else None,
        origin=WeightsOrigin(str(path.resolve()), path.resolve()),
    )  # fmt: skip


def _levels(levels: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The levels asked for; None lets the model choose (P2-P5, or its pyramid)."""
    return None if levels is None else parse_levels(levels)


def _same_shape(a: str, b: str) -> bool:
    """Two registry names with the same parameters (resnet50 and resnet50_msra differ only in
    where the stride sits, which the weights cannot show)."""
    fa, fb = get_arch(a), get_arch(b)
    if not (isinstance(fa, ResNetArch) and isinstance(fb, ResNetArch)):
        return False
    return (fa.block, fa.layers, fa.groups, fa.width_per_group) == (
        fb.block,
        fb.layers,
        fb.groups,
        fb.width_per_group,
    )


def build(spec: ModelSpec, device: str | torch.device = "cpu") -> FPN:
    """The model ``spec`` describes, weights loaded, in eval mode on ``device``."""
    model = build_model(spec.config, seed=spec.seed)
    ckpt = spec.load()
    if ckpt is not None:
        wts.load_into(model, ckpt, fpn_required=spec.fpn_from_weights)
    return model.to(device)


def build_fpn(
    arch: str | None = None,
    weights: str | os.PathLike[str] = RANDOM,
    fpn_style: str | None = None,
    levels: str | Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    pad_multiple: int | None = None,
) -> FPN:
    """A backbone with its FPN, in eval mode: (N, 3, H, W) normalised -> {level: (N, C, ⌈H/s⌉, ⌈W/s⌉)}.

    ``weights``: ``"random"`` (seeded), ``"imagenet"``, a zoo name (``"coco"``,
    ``"torchvision:retinanet_resnet50_fpn"``, ``"detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x"``,
    ``"mmdet:faster-rcnn_r50_fpn_1x_coco"``) or a checkpoint path. ``arch``, ``fpn_style`` and
    ``levels`` default to what the weights need (resnet50, reference, P2-P5 otherwise).
    ``levels``: any of p2..p7, c2..c5 the model has, returned in the order given; s is the level's
    stride (4 for p2 and c2, doubling per level), C is 256 for P levels, the stage width for C levels.
    Normalise ``x`` as :func:`resolve`'s ``preprocess`` says (ImageNet mean/std for torchvision weights).

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
    return build(resolve(arch, weights, fpn_style, levels, seed, pad_multiple), device)
