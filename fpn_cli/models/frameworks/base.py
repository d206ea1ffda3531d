"""What a framework is to fpn-extract, and the registry of them.

A :class:`Framework` owns one framework's knowledge: its checkpoint key layout (a
:class:`~fpn_cli.models.weights.KeyFormat`) and the migration of its older keys, the FPN variants
its detectors run (:class:`~fpn_cli.models.pyramid.FPNSpec` by name), its preprocessing (channel
order, mean/std, padding), its detectors' test-time resize, what a file of its layout says about
the model it needs, and its zoo table. The rest of the code asks the registry; it never branches
on a framework's name. A new framework is one module with a registered subclass::

    @register
    class Mine(Framework):
        name = "mine"
        keys = KeyFormat(((r"trunk\\.(.*)", r"body.\\1"),))
        def claims(self, raw): return any(k.startswith("trunk.") for k in raw.state)

plus its name in the import line of ``frameworks/__init__.py`` (docs/adding-a-framework.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fpn_cli.errors import UsageError, WeightsError
from fpn_cli.models.backbones import ARCHS, Bottleneck, ResNetArch
from fpn_cli.models.choices import USER_STYLES
from fpn_cli.models.hub import ResizePolicy, WeightsOrigin, ZooEntry
from fpn_cli.models.preprocess import IMAGENET, Preprocess
from fpn_cli.models.pyramid import FPNSpec
from fpn_cli.models.weights import (
    Checkpoint,
    KeyFormat,
    RawCheckpoint,
    map_keys,
    name_keys,
    read_raw,
    resnet_shape,
)
from fpn_cli.models.zoo_table import TABLE


@dataclass(frozen=True)
class Pretrained:
    """Classification weights for a backbone: its preprocessing, BatchNorm eps, and the loader of
    a checkpoint under our keys (``body.*`` only: the FPN keeps its seeded initialisation)."""

    preprocess: Preprocess
    bn_eps: float
    load: Callable[[], Checkpoint]
    origin: WeightsOrigin | None = None  # the file, where the framework keeps one (not timm's)


class Framework:
    """One framework. Subclasses set the class attributes and override the methods whose default
    does not fit; an instance is registered with :func:`register`."""

    name: ClassVar[str] = ""  # the zoo family (``detectron2:<config>``) and Checkpoint.format
    keys: ClassVar[KeyFormat | None] = None  # its checkpoint layout; None: it has no files of its own
    styles: ClassVar[Mapping[str, FPNSpec]] = {}  # the FPN variants its models run, by name
    preprocess: ClassVar[Preprocess] = IMAGENET  # what its files' models expect
    pad_multiple: ClassVar[int] = 1  # zero-padding of the input (detectron2, mmdetection: 32)
    resize: ClassVar[ResizePolicy | None] = None  # its detectors' test-time resize
    fallback: ClassVar[bool] = False  # claims what no other framework claims (torchvision)

    # --- checkpoint files ---

    def claims(self, raw: RawCheckpoint) -> bool:
        """Whether ``raw`` (keys as in the file) is in this framework's layout."""
        return False

    def context(self, state: Mapping[str, Tensor]) -> dict[str, int]:
        """What the key rules need to know of the whole state dict (e.g. the first FPN level)."""
        return {}

    def migrate(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Our keys from an older layout of this framework's to the current one; default: none."""
        return state

    def meta(self, raw: RawCheckpoint) -> dict[str, object]:
        """What the file records about its model beside the state dict (mmdetection's config)."""
        return {}

    def read(self, raw: RawCheckpoint) -> Checkpoint:
        """``raw`` under our keys; a key that fits no rule is an error naming it."""
        assert self.keys is not None, f"{self.name} has no checkpoint layout"
        state, unknown = map_keys(raw.state, self.keys, self.context(raw.state))
        if unknown:
            raise WeightsError(
                f"weights file {raw.source} has keys that fit no known format: {name_keys(unknown)}"
            )
        return Checkpoint(self.migrate(state), raw.source, self.name, self.meta(raw))

    # --- what a file says about its model ---

    def arch_of(self, ckpt: Checkpoint) -> str | None:
        """The registered architecture whose shapes the checkpoint's body has; None: not a
        registered kind. A ResNet's stride placement is the framework's (:meth:`stride_in_1x1`)."""
        shape = resnet_shape(ckpt.state)
        if shape is None:
            return None
        msra = self.stride_in_1x1(ckpt, shape)
        for name, arch in ARCHS.items():
            if (
                isinstance(arch, ResNetArch)
                and arch.stride_in_1x1 == msra
                and (arch.block is Bottleneck) == shape["bottleneck"]
                and arch.layers == shape["layers"]
                and arch.groups == shape["groups"]
                and (not shape["bottleneck"] or arch.width_per_group == shape["width_per_group"])
            ):
                return name
        return None

    def stride_in_1x1(self, ckpt: Checkpoint, shape: Mapping[str, object]) -> bool:
        """Whether the file's ResNet is MSRA's (stride on the first 1x1 conv); default: no."""
        return False

    def style_of(self, ckpt: Checkpoint) -> str | None:
        """The FPN variant the checkpoint's layers need; None: it has no FPN."""
        return None

    def file_preprocess(self, ckpt: Checkpoint, arch: str) -> Preprocess:
        """What a model of this framework's file expects of its input."""
        return self.preprocess

    def bn_eps(self, ckpt: Checkpoint) -> float:
        """BatchNorm eps a file's model runs with (torchvision's default, for files)."""
        return 1e-5

    def imagenet(self, arch: str) -> Pretrained:
        """The framework's ImageNet weights for the backbone ``arch`` (``--weights imagenet``)."""
        raise WeightsError(f"arch {arch!r} has no ImageNet weights in {self.name}")

    # --- the zoo ---

    def entries(self) -> list[ZooEntry]:
        """The framework's zoo table; names start with ``<name>:``. Default: its rows of the
        declared table (models/zoo_table.py), which ``fpn-extract models`` reads without torch."""
        return list(TABLE.get(self.name, ()))


FRAMEWORKS: dict[str, Framework] = {}


def read_file(path: str | os.PathLike[str], source: str | None = None) -> Checkpoint:
    """A checkpoint file of any registered framework's layout, under our keys; nothing in it runs."""
    raw = read_raw(path, source)
    return detect(raw).read(raw)


def register(cls: type[Framework]) -> type[Framework]:
    """Class decorator: registers one instance of ``cls`` under ``cls.name``."""
    if not cls.name or cls.name in FRAMEWORKS:
        raise ValueError(f"framework name {cls.name!r} is empty or taken")
    taken = {style for fw in FRAMEWORKS.values() for style in fw.styles}
    if taken & set(cls.styles):
        raise ValueError(f"{cls.name}: FPN style {sorted(taken & set(cls.styles))[0]} is another framework's")
    FRAMEWORKS[cls.name] = cls()
    return cls


def framework(name: str) -> Framework:
    return FRAMEWORKS[name]


def detect(raw: RawCheckpoint) -> Framework:
    """The framework whose layout ``raw`` is in: the one that claims it, else the fallback."""
    claiming = [fw for fw in FRAMEWORKS.values() if not fw.fallback and fw.claims(raw)]
    if len(claiming) > 1:
        names = ", ".join(fw.name for fw in claiming)
        raise WeightsError(f"weights file {raw.source} fits several formats ({names}); convert it to one")
    if claiming:
        return claiming[0]
    return next(fw for fw in FRAMEWORKS.values() if fw.fallback)


def fpn_styles() -> list[str]:
    """Every FPN variant's name, of every framework."""
    return [name for fw in FRAMEWORKS.values() for name in fw.styles]


def fpn_spec(style: str | FPNSpec) -> FPNSpec:
    """The FPN variant named ``style``, from the framework that owns it."""
    if isinstance(style, FPNSpec):
        return style
    for fw in FRAMEWORKS.values():
        if style in fw.styles:
            return fw.styles[style]
    raise UsageError(f"unknown fpn style {style!r}; choose from {', '.join(USER_STYLES)}")
