"""One module per framework, each a registered :class:`~fpn_cli.models.frameworks.base.Framework`
(base.py says what one owns). Importing this package registers the built-in ones: a new framework
is its module plus its name in the line below (docs/adding-a-framework.md)."""

from __future__ import annotations

# isort: off
# the registry's order: the zoo's (and `fpn-extract models`') order of families
from fpn_cli.models.frameworks import torchvision, detectron2, mmdet, timm, seed, own  # noqa: F401

# isort: on
from fpn_cli.models.frameworks.base import (
    FRAMEWORKS,
    Framework,
    Pretrained,
    detect,
    fpn_spec,
    framework,
    read_file,
    register,
)

__all__ = [
    "FRAMEWORKS",
    "Framework",
    "Pretrained",
    "detect",
    "fpn_spec",
    "framework",
    "read_file",
    "register",
]
