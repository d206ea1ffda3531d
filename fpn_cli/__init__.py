"""fpn-extract: Feature Pyramid Network features for folders of images."""

from __future__ import annotations

__version__ = "0.1.0"

from .builder import build_fpn  # noqa: E402
from .errors import FPNError, ImageError, UsageError, WeightsError  # noqa: E402
from .pipeline import Options, extract  # noqa: E402

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
