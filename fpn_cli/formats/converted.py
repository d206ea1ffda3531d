"""Stored features read in another dtype: what ``open_features(out, dtype=...)`` returns.

DESIGN.md §10: readers return float32 unless asked otherwise. The features (levels, pooled
vectors, RoI features) are converted; levels stored as bfloat16 bits or int8 codes are decoded
(formats/codecs.py; int8 with its scales, which are then left out); arrays stored in float64 (the
``boxes`` beside RoI features, kept exact) and other integer arrays come back as stored.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import DTypeLike

from fpn_cli.formats import codecs
from fpn_cli.formats.base import Features
from fpn_cli.models.levels import LEVELS


def convert(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` in ``dtype`` if it is a float array below 64 bits, else as it is; an array
    already in ``dtype`` is not copied (a memory map stays one)."""
    if array.dtype.kind == "f" and array.dtype.itemsize < 8 and array.dtype != dtype:
        return array.astype(dtype)
    return array


class Converted(Features):
    """``features`` with each array read through :func:`convert` to ``dtype``."""

    def __init__(self, features: Features, dtype: DTypeLike, save_dtype: str = "float32") -> None:
        self.features = features
        self.dtype = np.dtype(dtype)
        self.save_dtype = save_dtype
        self.format = features.format

    def __len__(self) -> int:
        return len(self.features)

    def key_at(self, index: int) -> str:
        return self.features.key_at(index)

    def read(self, key: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        if self.save_dtype in ("float32", "float16"):
            return {
                name: convert(array, self.dtype) for name, array in self.features.read(key, names).items()
            }
        wanted = None if names is None else list(names)
        asked = None if wanted is None else [n for name in wanted for n in self._arrays_of(name)]
        stored = self.features.read(key, asked)
        levels = [name for name in stored if name in LEVELS]
        decoded = codecs.decode_levels(self.save_dtype, stored, levels, self.dtype)
        scales = {codecs.scale_name(level) for level in levels}
        return {
            name: decoded[name] if name in decoded else convert(array, self.dtype)
            for name, array in stored.items()
            if name not in scales or (wanted is not None and name in wanted)
        }

    def _arrays_of(self, name: str) -> tuple[str, ...]:
        """The stored arrays that reading ``name`` takes: a level's codes and scales."""
        return codecs.array_names(name, self.save_dtype) if name in LEVELS else (name,)

    def entry(self, key: str) -> dict:
        return self.features.entry(key)

    def _find(self, key: str) -> object | None:
        return self.features._find(key)
