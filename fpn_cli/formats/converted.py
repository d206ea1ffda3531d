"""Stored features read in another dtype: what ``open_features(out, dtype=...)`` returns.

DESIGN.md §10: readers return float32 unless asked otherwise. The features (levels, pooled
vectors, RoI features) are converted; arrays stored in float64 (the ``boxes`` beside RoI
features, kept exact) and integer arrays come back as stored.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import DTypeLike

from fpn_cli.formats.base import Features


def convert(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` in ``dtype`` if it is a float array below 64 bits, else as it is; an array
    already in ``dtype`` is not copied (a memory map stays one)."""
    if array.dtype.kind == "f" and array.dtype.itemsize < 8 and array.dtype != dtype:
        return array.astype(dtype)
    return array


class Converted(Features):
    """``features`` with each array read through :func:`convert` to ``dtype``."""

    def __init__(self, features: Features, dtype: DTypeLike) -> None:
        self.features = features
        self.dtype = np.dtype(dtype)
        self.format = features.format

    def __len__(self) -> int:
        return len(self.features)

    def key_at(self, index: int) -> str:
        return self.features.key_at(index)

    def read(self, key: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        return {name: convert(array, self.dtype) for name, array in self.features.read(key, names).items()}

    def entry(self, key: str) -> dict:
        return self.features.entry(key)

    def _find(self, key: str) -> object | None:
        return self.features._find(key)
