"""fpn-extract: Feature Pyramid Network features for folders of images."""

from __future__ import annotations

from .builder import build_fpn
from .errors import FPNError, ImageError, UsageError, WeightsError
from .options import Options
from .pipeline import extract
from .version import __version__

__all__ = [
    "FPNError",
    "ImageError",
    "Options",
    "UsageError",
    "WeightsError",
    "__version__",
    "build_fpn",
    "extract",
]
