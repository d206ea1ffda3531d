"""Stored features as a torch Dataset, for training on them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from fpn_cli.formats import Features, open_features


class FeatureDataset(Dataset):
    """The images of an output folder (either ``--format``), in key order: item ``i`` is
    ``{"key": str, name: tensor, ...}`` with the arrays in ``levels`` (every stored array of the
    image when None: levels, and others such as ``rois``), each a (C, h, w) tensor of its stored
    dtype, then passed through ``transform`` if given.

    Safe in DataLoader workers: each process opens the folder itself, at its first item (an
    open folder holds memory maps, which are neither picklable nor to be shared across a fork).

    >>> import tempfile
    >>> from fpn_cli import extract
    >>> from fpn_cli.inputs.images import Resize
    >>> out = tempfile.mkdtemp()
    >>> _ = extract(["examples/chelsea.jpg"], out, arch="seed", device="cpu", resize=Resize((64, 96)))
    >>> item = FeatureDataset(out, levels=["p5"])[0]
    >>> item["key"], item["p5"].shape
    ('chelsea', torch.Size([256, 2, 3]))
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        levels: Iterable[str] | None = None,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        self.out = out
        self.levels = None if levels is None else tuple(levels)
        self.transform = transform
        self._features: Features | None = None
        self._pid: int | None = None
        features = self._open()
        self._length = len(features)
        if self.levels is not None and self._length:  # a misspelt level: now, not in a worker later
            stored = set(features.read(features.key_at(0)))
            unknown = [name for name in self.levels if name not in stored]
            if unknown:
                raise KeyError(
                    f"{out} stores no {', '.join(unknown)} (its first image has {', '.join(sorted(stored))})"
                )

    def _open(self) -> Features:
        if self._features is None or self._pid != os.getpid():
            self._features = open_features(self.out)
            self._pid = os.getpid()
        return self._features

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        features = self._open()
        key = features.key_at(index)
        arrays = features.read(key, self.levels)
        if self.levels is not None and len(arrays) < len(self.levels):
            missing = ", ".join(sorted(set(self.levels) - set(arrays)))
            raise KeyError(f"{key} has no stored {missing}")
        item: dict = {"key": key}
        for name, array in arrays.items():
            item[name] = torch.from_numpy(np.array(array))  # a copy: maps are read-only, batches own theirs
        return self.transform(item) if self.transform is not None else item

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_features"] = None  # a worker opens its own
        return state
