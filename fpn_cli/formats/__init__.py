"""Storage formats: how a run's features are laid out, behind one boundary.

    npy      OUT/<key>/<level>.npy, a file per array and image (formats/npy.py)
    shards   WebDataset tar shards under OUT/shards/, with an index (formats/shards.py)

A format is one module that defines its :class:`~fpn_cli.formats.base.Format` (``FORMAT``: its
writer, reader, verify reader, estimate, layout checks and the files it owns) and one line in
:data:`FORMATS`. Everything else asks the registry through the functions below, never a format
by name (docs/adding-a-format.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from fpn_cli.errors import FPNError, UsageError
from fpn_cli.formats import codecs, npy, shards
from fpn_cli.formats.base import Features, Format, Shape, Storage, VerifyReader, human_bytes
from fpn_cli.formats.converted import Converted
from fpn_cli.formats.locks import read_settings
from fpn_cli.formats.shards import DEFAULT_SHARD_SIZE
from fpn_cli.inputs.urls import Folder, is_url, local_path
from fpn_cli.layout import SETTINGS_FILE
from fpn_cli.models.levels import LEVELS

FORMATS: dict[str, Format] = {"npy": npy.FORMAT, "shards": shards.FORMAT}
DEFAULT_FORMAT = "npy"  # what a settings record without "format" was written in

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMATS",
    "Features",
    "Format",
    "Storage",
    "check_layout",
    "format_totals",
    "open_features",
    "open_store",
]


def get_format(name: str) -> Format:
    """The registry's entry for ``name``; an unknown name is a :class:`UsageError`."""
    if name not in FORMATS:
        raise UsageError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[name]


def open_store(
    out: str | os.PathLike[str],
    format: str,
    levels: Iterable[str],
    save_dtype: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard: tuple[int, int] | None = None,
) -> Storage:
    """The writer of ``format`` for the output folder ``out`` (a path, or a URL where the format
    takes one); ``shard`` is the job array's part this run writes."""
    check_destination(out, format)
    return get_format(format).open_store(out, levels, save_dtype, shard_size, shard, holds_features)


def check_destination(out: str | os.PathLike[str], format: str) -> None:
    """A :class:`UsageError` unless ``format`` can be written to ``out``: before any work."""
    if is_url(str(out)) and not get_format(format).urls:
        takes = ", ".join(f"--format {name}" for name, f in FORMATS.items() if f.urls)
        raise UsageError(f"--out {out}: a URL needs {takes} ({format} writes to local folders only)")
    get_format(format)


def check_layout(format: str, keyed: Iterable[tuple[str, str]]) -> None:
    """(key, input path) pairs whose outputs would clash in ``format``, refused before any work
    (each format's own rule: the npy layout's files against folders, a tar's member names)."""
    get_format(format).check_layout(keyed)


def holds_features(root: Path) -> bool:
    """Whether the local folder ``root`` holds files of any format."""
    return any(f.holds(root) for f in FORMATS.values())


def record_settings(store: Storage, out: str | os.PathLike[str], settings: dict, overwrite: bool) -> None:
    """The store records the run's ``settings`` (checked against the folder's); an
    ``overwrite`` run into a folder of another format removes that format's files (the folder's
    previous format owns them and knows them; no format knows another's)."""
    before = store.record_settings(settings, overwrite)
    previous = (before or {}).get("format", DEFAULT_FORMAT)
    if overwrite and previous != store.format and previous in FORMATS and not is_url(str(out)):
        FORMATS[previous].remove(Path(local_path(str(out))))


def folder_settings(out: str | os.PathLike[str]) -> dict:
    """The settings record of the features in ``out`` (format, save dtype, model...)."""
    folder = Folder(out)
    raw = folder.read_bytes(SETTINGS_FILE)
    if raw is None:
        raise FPNError(f"{out} holds no features made by fpn-extract (no {SETTINGS_FILE})")
    try:
        settings = json.loads(raw)
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        raise FPNError(f"{folder.url(SETTINGS_FILE)} is not readable JSON")
    return settings


def folder_format(out: str | os.PathLike[str], settings: dict | None = None) -> Format:
    """The format of the features in ``out`` (its settings record, ``settings`` if read, says which)."""
    name = (settings or folder_settings(out)).get("format", DEFAULT_FORMAT)
    if name not in FORMATS:
        raise FPNError(f"{out} holds features of a format this version does not know ({name!r})")
    return FORMATS[name]


def open_features(out: str | os.PathLike[str], dtype: DTypeLike | None = np.float32) -> Features:
    """The features in the output folder ``out`` (a path or, for shards, a URL), read-only and in
    any format: key -> {name: array}, memory-mapped where possible. Features come back in
    ``dtype`` (float32 unless asked otherwise), float64 boxes as stored (converted.py): levels
    stored as bfloat16 or int8 are decoded (formats/codecs.py), int8 with their scales, which
    then are not among the arrays. ``dtype=None``: every array as stored, the raw codes (uint16
    bfloat16 bits, int8 codes) and int8's scales (``p2_scale``, (C,) float32) among them.

    >>> import tempfile
    >>> from fpn_cli import extract
    >>> from fpn_cli.inputs.images import Resize
    >>> out = tempfile.mkdtemp()
    >>> _ = extract(["examples/chelsea.jpg"], out, arch="seed", device="cpu", format="shards")
    >>> feats = open_features(out)
    >>> list(feats), feats["chelsea"]["p3"].shape
    (['chelsea'], (256, 38, 57))
    """
    settings = folder_settings(out)
    features = folder_format(out, settings).open_features(Folder(out))
    if dtype is None:
        return features
    return Converted(features, dtype, codecs.check_save_dtype(settings.get("save_dtype", "float32")))


def verify_reader(root: Path) -> VerifyReader:
    """``fpn-extract verify``'s reader of the local folder ``root``, in its format."""
    name = (read_settings(root) or {}).get("format", DEFAULT_FORMAT)
    if name not in FORMATS:
        raise UsageError(f"{root} holds features of a format this version does not know ({name!r})")
    return FORMATS[name].verify_reader(root)


def format_totals(
    per_size: Mapping[tuple[int, int], int],
    shapes: Mapping[tuple[int, int], Mapping[str, Shape]],
    unreadable: int,
    save_dtypes: Sequence[str],
    shard_size: int,
) -> str:
    """``--summary``'s dataset totals: the images, and the bytes and files of each format in each
    save dtype, for ``per_size[size]`` images of each network input size whose arrays (levels,
    pooled vectors) have the ``shapes[size]``: each level stored as codecs.stored_arrays says."""
    images = sum(per_size.values())
    sizes = f"{len(per_size)} size{'s' if len(per_size) != 1 else ''}"
    skipped = f"; {unreadable:,} unreadable, not counted" if unreadable else ""
    lines = [f"dataset: {images:,} images ({sizes}{skipped})", "format  save dtype       bytes    files"]
    for name, format in FORMATS.items():
        for i, dtype in enumerate(save_dtypes):
            counted = [(count, _stored(shapes[size], dtype)) for size, count in sorted(per_size.items())]
            total, files = format.estimate(counted, dtype, shard_size)
            note = f"  {format.note(shard_size)}" if i == 0 else ""
            lines.append(f"{name:<8}{dtype:<10}{human_bytes(total):>12}{files:>9,}{note}")
    return "\n".join(lines)


def _stored(shapes: Mapping[str, Shape], save_dtype: str) -> dict[str, Shape]:
    """An image's arrays {name: shape} as a ``save_dtype`` run stores them: each level as the
    codec's arrays (int8: its codes and scales), the rest as they are."""
    out: dict[str, Shape] = {}
    for name, shape in shapes.items():
        arrays = codecs.stored_arrays(name, save_dtype, shape) if name in LEVELS else ()
        out.update({a.name: a.shape for a in arrays} if arrays else {name: shape})
    return out
