"""fpn-extract: Feature Pyramid Network features for folders of images.

The public names are imported on first use (PEP 562), so that the console script can set up its
signal handling before torch is imported (console.py).
"""

from __future__ import annotations

import importlib

from fpn_cli.version import __version__

_PUBLIC = {
    "FPNError": "errors",
    "FeatureDataset": "formats.dataset",
    "ImageError": "errors",
    "Options": "run.options",
    "UsageError": "errors",
    "WeightsError": "errors",
    "build_fpn": "models.builder",
    "collate_features": "formats.dataset",
    "extract": "run.pipeline",
    "open_features": "formats",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fpn_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
