"""fpn-extract: Feature Pyramid Network features for folders of images."""

from __future__ import annotations

from .builder import build_fpn
from .dataset import FeatureDataset
from .errors import FPNError, ImageError, UsageError, WeightsError
from .formats import open_features
from .options import Options
from .pipeline import extract
from .version import __version__

__all__ = [
    "FPNError",
    "FeatureDataset",
    "ImageError",
    "Options",
    "UsageError",
    "WeightsError",
    "__version__",
    "build_fpn",
    "extract",
    "open_features",
]
