"""fpn-extract: Feature Pyramid Network features for folders of images."""

from __future__ import annotations

from .builder import build_fpn
from .errors import FPNError, ImageError, UsageError, WeightsError

__version__ = "0.1.0"

__all__ = ["FPNError", "ImageError", "UsageError", "WeightsError", "__version__", "build_fpn"]
