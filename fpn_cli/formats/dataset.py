"""Stored features as a torch Dataset, and the collate function that batches them, for training
on them (docs/reading.md)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fpn_cli.formats import Features, open_features


class FeatureDataset(Dataset):
    """The images of an output folder (either ``--format``), in key order: item ``i`` is
    ``{"key": str, name: tensor, ...}`` with the arrays in ``levels`` (every stored array of the
    image when None: levels, and others such as ``rois``), each a tensor of its stored shape
    ((C, h, w) for a level), then passed through ``transform`` if given. Features come in
    ``dtype`` (float32 unless asked otherwise, DESIGN.md §10; None: as stored, e.g. float16);
    float64 boxes and integer arrays as stored. :func:`collate_features` batches the items.

    Safe in DataLoader workers: each process opens the folder itself, at its first item (an
    open folder holds memory maps, which are neither picklable nor to be shared across a fork).

    >>> import tempfile
    >>> from fpn_cli import extract
    >>> from fpn_cli.inputs.images import Resize
    >>> out = tempfile.mkdtemp()
    >>> _ = extract(["examples/chelsea.jpg"], out, arch="seed", device="cpu", resize=Resize((64, 96)))
    >>> item = FeatureDataset(out, levels=["p5"])[0]
    >>> item["key"], item["p5"].shape, item["p5"].dtype
    ('chelsea', torch.Size([256, 2, 3]), torch.float32)
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        levels: Iterable[str] | None = None,
        transform: Callable[[dict], dict] | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch dtype (torch.float32) or None, not {dtype!r}")
        self.out = out
        self.levels = None if levels is None else tuple(levels)
        self.transform = transform
        self.dtype = dtype
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
            self._features = open_features(self.out, dtype=_numpy_dtype(self.dtype))
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
            tensor = torch.from_numpy(np.array(array))  # a copy: maps are read-only, batches own theirs
            if self.dtype == torch.bfloat16 and tensor.dtype == torch.float32:
                tensor = tensor.to(torch.bfloat16)
            item[name] = tensor
        return self.transform(item) if self.transform is not None else item

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_features"] = None  # a worker opens its own
        return state


def _numpy_dtype(dtype: torch.dtype | None) -> np.dtype | None:
    """The dtype the folder is read in: ``dtype``, or float32 for bfloat16, which numpy lacks
    (torch casts those tensors after)."""
    if dtype is None:
        return None
    return torch.empty(0, dtype=torch.float32 if dtype == torch.bfloat16 else dtype).numpy().dtype


def collate_features(items: Sequence[dict]) -> dict:
    """A batch of :class:`FeatureDataset` items, for ``DataLoader(..., collate_fn=collate_features)``:
    ``"key"``: the B keys; an array that every item has in one shape: one stacked tensor
    (B, ...); any other (``rois`` and ``boxes``, which images have in different numbers or not at
    all; levels of images of different sizes): a list of B tensors, where an item without it
    gets an empty (0, ...) tensor shaped and typed as the others' (as torchvision's
    ``roi_align`` takes boxes: a list with one tensor per image).

    >>> a = {"key": "a", "p5": torch.zeros(256, 2, 3), "rois": torch.zeros(4, 256, 7, 7)}
    >>> b = {"key": "b", "p5": torch.ones(256, 2, 3)}
    >>> batch = collate_features([a, b])
    >>> batch["key"], batch["p5"].shape, [tuple(r.shape) for r in batch["rois"]]
    (['a', 'b'], torch.Size([2, 256, 2, 3]), [(4, 256, 7, 7), (0, 256, 7, 7)])
    """
    batch: dict = {"key": [item["key"] for item in items]}
    names = dict.fromkeys(name for item in items for name in item if name != "key")
    for name in names:
        present = [item[name] for item in items if name in item]
        if len(present) == len(items) and len({tuple(t.shape) for t in present}) == 1:
            batch[name] = torch.stack(present)
            continue
        model = present[0]
        empty = model.new_empty((0, *model.shape[1:]))
        batch[name] = [item.get(name, empty) for item in items]
    return batch
