"""Storage formats: how a run's features are laid out, behind one interface.

    npy      OUT/<key>/<level>.npy, a file per level and image (formats/npy.py over store.py)
    shards   WebDataset tar shards under OUT/shards/, with an index (formats/shards.py)

Each format is one writer, a :class:`~fpn_cli.formats.base.Storage` the run's steps write through
(:func:`open_store`), and one reader, a :class:`~fpn_cli.formats.base.Features` mapping
(:func:`open_features`), plus an ``estimate`` of its bytes and files for ``--summary``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from fpn_cli.errors import FPNError, UsageError
from fpn_cli.formats import npy, shards, store
from fpn_cli.formats.base import Features, Shape, Storage
from fpn_cli.formats.converted import Converted
from fpn_cli.formats.npy import NpyFeatures, NpyStore
from fpn_cli.formats.shards import DEFAULT_SHARD_SIZE, ShardFeatures, ShardStore
from fpn_cli.formats.store import SETTINGS_FILE
from fpn_cli.inputs.urls import Folder, is_url, local_path

FORMATS = ("npy", "shards")
_ESTIMATES = {"npy": npy.estimate, "shards": shards.estimate}

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMATS",
    "Features",
    "Storage",
    "check_layout",
    "format_totals",
    "open_features",
    "open_store",
]


def open_store(
    out: str | os.PathLike[str],
    format: str,
    levels: Iterable[str],
    save_dtype: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard: tuple[int, int] | None = None,
) -> Storage:
    """The writer of ``format`` for the output folder ``out`` (a path, or a URL for shards);
    ``shard`` is the job array's part this run writes."""
    check_destination(out, format)
    if format == "npy":
        return NpyStore(Path(local_path(str(out))), levels, save_dtype, shard)
    return ShardStore(out, levels, save_dtype, shard_size, shard)


def check_destination(out: str | os.PathLike[str], format: str) -> None:
    """A :class:`UsageError` unless ``format`` can be written to ``out``: before any work."""
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if format == "npy" and is_url(str(out)):
        raise UsageError(f"--out {out}: a URL needs --format shards (npy writes a file per level and image)")


def check_layout(format: str, keyed: Iterable[tuple[str, str]]) -> None:
    """(key, input path) pairs whose outputs would clash in ``format``, refused before any work:
    in the npy layout a key against another key's files or the tool's own (store.check_layout);
    in shards, whose members share no folder, only keys that are no path inside the output."""
    if format == "npy":
        store.check_layout(keyed)
    else:
        shards.check_keys(keyed)


def open_features(out: str | os.PathLike[str], dtype: DTypeLike | None = np.float32) -> Features:
    """The features in the output folder ``out`` (a path or, for shards, a URL), read-only and in
    either format: key -> {name: array}, memory-mapped where possible. Features come back in
    ``dtype`` (float32 unless asked otherwise; None: as stored), float64 boxes as stored
    (converted.py).

    >>> import tempfile
    >>> from fpn_cli import extract
    >>> from fpn_cli.inputs.images import Resize
    >>> out = tempfile.mkdtemp()
    >>> _ = extract(["examples/chelsea.jpg"], out, arch="seed", device="cpu", format="shards")
    >>> feats = open_features(out)
    >>> list(feats), feats["chelsea"]["p3"].shape
    (['chelsea'], (256, 38, 57))
    """
    folder = Folder(out)
    raw = folder.read_bytes(SETTINGS_FILE)
    if raw is None:
        raise FPNError(f"{out} holds no features made by fpn-extract (no {SETTINGS_FILE})")
    try:
        format = json.loads(raw).get("format", "npy")
    except (ValueError, AttributeError):
        raise FPNError(f"{folder.url(SETTINGS_FILE)} is not readable JSON") from None
    if format == "shards":
        features: Features = ShardFeatures(folder)
    elif folder.remote:
        raise FPNError(f"{out}: the npy layout is read from local folders only")
    else:
        features = NpyFeatures(Path(folder.root))
    return features if dtype is None else Converted(features, dtype)


def format_totals(
    per_size: Mapping[tuple[int, int], int],
    shapes: Mapping[tuple[int, int], Mapping[str, Shape]],
    unreadable: int,
    save_dtypes: Sequence[str],
    shard_size: int,
) -> str:
    """``--summary``'s dataset totals: the images, and the bytes and files of each format in each
    save dtype, for ``per_size[size]`` images of each network input size."""
    images = sum(per_size.values())
    sizes = f"{len(per_size)} size{'s' if len(per_size) != 1 else ''}"
    skipped = f"; {unreadable:,} unreadable, not counted" if unreadable else ""
    counted = [(count, shapes[size]) for size, count in sorted(per_size.items())]
    notes = {
        "npy": "a file per array and image and its record (a folder each), report.json, settings, lock",
        "shards": f"tar shards of about {_bytes(shard_size)} (--shard-size), an index part each, "
        "index.jsonl and report.json",
    }
    lines = [f"dataset: {images:,} images ({sizes}{skipped})", "format  save dtype       bytes    files"]
    for name in FORMATS:
        for i, dtype in enumerate(save_dtypes):
            total, files = _ESTIMATES[name](counted, np.dtype(dtype), shard_size)
            note = f"  {notes[name]}" if i == 0 else ""
            lines.append(f"{name:<8}{dtype:<10}{_bytes(total):>12}{files:>9,}{note}")
    return "\n".join(lines)


def _bytes(count: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"
