"""``--format npy`` (the default): one ``.npy`` file per array and image.

    OUT/<key>/p2.npy ...        one (C, H, W) array per level, in the save dtype (npyio.py)
    OUT/<key>/preview.png       with --preview: the image beside its levels
    OUT/<key>/p2_avg.npy, rois.npy, boxes.npy   with --pool, --boxes: derived arrays (regions/)
    OUT/<key>/input.json        the input's fingerprint, size and orientation, and each array's
                                checksum (``"checksums": {"p2": "crc32:..."}``, npyio.py), written
                                last, after every array and the preview: the image is complete
                                (resume.py decides what of it a resume may keep)
    OUT/report.json, OUT/.fpn-extract.json, locks   as every format (layout.py, locks.py)

Every file appears atomically (layout.replacing). :func:`check_layout` refuses, before any work,
inputs whose files would land on each other's (a key against another key's level, derived array,
preview or record file, or the tool's own files). :class:`Store` is the layout; :class:`NpyStore`
the writer a run uses, :class:`NpyFeatures` the reader, :class:`NpyFolder` verify's reader,
:data:`FORMAT` the registry's entry (formats/__init__.py).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fpn_cli.errors import FPNError, UsageError
from fpn_cli.formats import codecs
from fpn_cli.formats.base import Features, Format, Shape, derived_names, npy_size
from fpn_cli.formats.locks import finish_overwrite, lock_folder, record_settings
from fpn_cli.formats.npyio import (
    DirectWriter,
    check_regular,
    file_checksum,
    is_checksum,
    load,
    npy_shape,
    open_regular,
    write_file,
)
from fpn_cli.inputs.urls import Folder, local_path
from fpn_cli.layout import (
    REPORT_FILE,
    SHARDS_DIR,
    atomic_write_bytes,
    atomic_write_json,
    check_reserved,
    is_temporary_name,
    remove_temporary_files,
    replacing,
    sweep_dead_writers,
)
from fpn_cli.models.levels import LEVELS

PREVIEW_FILE = "preview.png"
RECORD_FILE = "input.json"  # the input's fingerprint: written last, so it marks the image complete
CHECKSUMS = "checksums"  # the record's {array name: checksum} of the image's arrays


def remove_layout(root: Path) -> None:
    """Deletes what the npy layout wrote under ``root`` (every image folder's arrays, record and
    preview, then the folders left empty): an --overwrite run into another format must not leave
    the old one beside it for readers to find. Nothing else in the folders is touched (a folder
    is removed only where it is left empty by this)."""
    scales = (codecs.scale_name(level) for level in LEVELS)
    ours = {RECORD_FILE, PREVIEW_FILE, *(f"{name}.npy" for name in (*LEVELS, *scales, *derived_names()))}
    cleared: set[str] = set()  # folders that held our files, or folders that did
    for folder, _, names in os.walk(root, topdown=False):
        if Path(folder) == root:
            continue
        for name in names:
            if name in ours:
                os.unlink(os.path.join(folder, name))
                cleared.add(folder)
        if folder in cleared:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty
                cleared.add(os.path.dirname(folder))


class Store:
    """One output folder, for one set of levels stored in one dtype."""

    def __init__(self, root: Path, levels: Iterable[str], save_dtype: str) -> None:
        self.root = Path(root)
        self.levels = tuple(levels)
        self.save_dtype = codecs.check_save_dtype(save_dtype)
        self.dtype = codecs.code_dtype(save_dtype)  # the levels' own arrays (codes.py's code dtype)
        self._direct = DirectWriter()
        self._written: dict[str, dict[str, str]] = {}  # key -> checksums of what write_levels wrote
        self._writing = threading.Lock()  # writer threads write images at once

    def sweep_dead_runs(self) -> None:
        """Deletes the temporary files that runs on this host left at the top of the folder and
        in ``.shards`` before they died (another run's live ones stay)."""
        for folder in (self.root, self.root / SHARDS_DIR):
            sweep_dead_writers(folder)

    def level_path(self, key: str, level: str) -> Path:
        return self.root / key / f"{level}.npy"

    def existing(self, key: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the requested levels already complete for ``key``."""
        return self.shapes(key, self.levels)

    def shapes(
        self, key: str, names: Iterable[str], dtypes: Mapping[str, np.dtype] | None = None
    ) -> dict[str, tuple[int, ...]]:
        """Shapes of the arrays ``key/<name>.npy`` among ``names`` that are complete: of the save
        dtype's array of that name (codecs.array_dtype), or the one ``dtypes`` gives for the name
        (boxes.npy is float64 in any store)."""
        found = {}
        for name in names:
            dtype = (dtypes or {}).get(name) or codecs.array_dtype(self.save_dtype, name, self.levels)
            shape = self.stored_shape(key, name, dtype)
            if shape is not None and self.content_matches(key, name):
                found[name] = shape
        return found

    def stored_shape(self, key: str, name: str, dtype: np.dtype) -> Shape | None:
        """The shape of ``key/<name>.npy`` if it is a complete ``.npy`` of ``dtype``."""
        return npy_shape(self.level_path(key, name), dtype)

    def content_matches(self, key: str, name: str) -> bool:
        """Whether ``key/<name>.npy``'s array has the checksum ``key``'s record gives it (True
        where the record gives none: an earlier version's, checked by shape alone)."""
        recorded = self.checksum(key, name)
        return recorded is None or file_checksum(self.level_path(key, name)) == recorded

    def checksum(self, key: str, name: str) -> str | None:
        """The checksum ``key``'s record gives array ``name``; None if it gives none."""
        recorded = (self.read_record(key) or {}).get(CHECKSUMS)
        value = recorded.get(name) if isinstance(recorded, dict) else None
        return value if is_checksum(value) else None

    def remove_strays(self, key: str) -> None:
        """Deletes temporary files that a killed run left in ``key``'s folder (the lock makes this
        run the folder's only writer)."""
        remove_temporary_files(self.root / key)

    def write_levels(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes each array to ``key/<name>.npy``, each file atomically, in ``arrays``' order:
        levels, and the arrays derived from them (pooled vectors, rois, boxes; regions/outputs.py)."""
        (self.root / key).mkdir(parents=True, exist_ok=True)
        if self.save_dtype != "int8":  # an int8 run's scales would pair with codes they do not belong to
            self.forget_arrays(key, [codecs.scale_name(name) for name in arrays if name in self.levels])
        written = {}
        for level, array in arrays.items():
            with replacing(self.level_path(key, level)) as tmp:
                written[level] = write_file(tmp, array, self._direct)
        with self._writing:
            self._written.setdefault(key, {}).update(written)

    def preview_path(self, key: str) -> Path:
        return self.root / key / PREVIEW_FILE

    def record_path(self, key: str) -> Path:
        return self.root / key / RECORD_FILE

    def read_record(self, key: str) -> dict | None:
        """``key``'s record (resume.py's), or None if it is absent or unreadable."""
        try:
            with open_regular(self.record_path(key)) as f:
                record = json.loads(f.read())
        except (OSError, ValueError, FPNError):
            return None
        return record if isinstance(record, dict) else None

    def write_record(self, key: str, record: Mapping[str, object]) -> None:
        """Writes ``key``'s record, atomically; call it after the levels: it marks them complete."""
        atomic_write_json(self.record_path(key), dict(record))

    def forget(self, key: str) -> None:
        """Deletes ``key``'s record, every level file, every array derived from them and its
        preview: features of an input that has changed since (or of one never recorded), which
        nothing may keep (the lock makes this run the folder's only writer)."""
        folder = self.root / key
        scales = (codecs.scale_name(level) for level in LEVELS)
        for name in (RECORD_FILE, *(f"{level}.npy" for level in (*LEVELS, *scales))):
            (folder / name).unlink(missing_ok=True)
        self.forget_derived(key)

    def forget_derived(self, key: str) -> None:
        """Deletes what was derived from ``key``'s levels (pooled vectors, RoI features and
        boxes, preview), whatever options made them: a level they came from is not trusted."""
        folder = self.root / key
        for name in (PREVIEW_FILE, *(f"{name}.npy" for name in derived_names())):
            (folder / name).unlink(missing_ok=True)

    def forget_arrays(self, key: str, names: Iterable[str]) -> None:
        """Deletes the arrays ``key/<name>.npy`` among ``names``."""
        for name in names:
            self.level_path(key, name).unlink(missing_ok=True)

    def read_levels(self, key: str) -> dict[str, np.ndarray]:
        """The stored arrays of the requested levels of a complete image (codes, and int8's
        scales), memory-mapped."""
        names = [name for level in self.levels for name in codecs.array_names(level, self.save_dtype)]
        return {name: self.read_array(key, name) for name in names}

    def read_array(self, key: str, name: str) -> np.ndarray:
        """``key/<name>.npy``, memory-mapped."""
        check_regular(self.level_path(key, name))
        return load(self.level_path(key, name), mmap_mode="r")

    def write_preview(self, key: str, picture) -> None:
        """Writes a PIL image as ``key/preview.png``, atomically."""
        atomic_write_bytes(self.preview_path(key), lambda f: picture.save(f, format="PNG"))

    def write_report(self, write: Callable[[BinaryIO], object]) -> None:
        """``write(file)`` makes report.json, atomically."""
        atomic_write_bytes(self.root / REPORT_FILE, write)

    def shard_report_path(self, index: int, count: int) -> Path:
        return self.root / SHARDS_DIR / f"report-{index}-of-{count}.json"

    def write_shard_report(self, index: int, count: int, write: Callable[[BinaryIO], object]) -> None:
        (self.root / SHARDS_DIR).mkdir(exist_ok=True)
        atomic_write_bytes(self.shard_report_path(index, count), write)

    def read_shard_reports(self, count: int) -> list[dict] | None:
        """All ``count`` shards' reports, or None while any is missing."""
        parts = []
        for index in range(count):
            try:
                parts.append(json.loads(self.shard_report_path(index, count).read_text()))
            except (OSError, ValueError):
                return None
        return parts


def files_of_a_key() -> frozenset[str]:
    """The names a run may write in an image's folder, whatever its options: every level's file,
    every derived array's (pooled vectors, rois, boxes), the preview and the record (their
    temporary siblings are :func:`is_temporary_name`)."""
    arrays = (*LEVELS, *(codecs.scale_name(level) for level in LEVELS), *derived_names())
    return frozenset({PREVIEW_FILE, RECORD_FILE, *(f"{name}.npy" for name in arrays)})


def check_layout(keyed: Iterable[tuple[str, str]]) -> None:
    """(key, input path) pairs that would write over each other in the output folder are a
    :class:`UsageError` naming both, before any work: a key whose folder, or a folder above it, is
    a file that another key's folder holds (``k/p2.npy`` from ``k/p2.npy.jpg`` against ``k``'s
    level file), a key with a part named like a temporary file, or one that would leave OUT
    (``..``) or take the tool's own names (layout.check_reserved). Names are compared
    casefolded, as macOS and Windows do; two keys that are one folder are find_images' to refuse."""
    owners: dict[str, str] = {}
    pairs = list(keyed)
    for key, source in pairs:
        owners.setdefault(key.casefold(), source)
    own_files = {name.casefold() for name in files_of_a_key()}
    for key, source in pairs:
        check_reserved(key, source)
        parts = key.split("/")
        for i, part in enumerate(parts):
            if part in ("", ".", ".."):
                raise UsageError(
                    f"{source} would write {key}/, which is not a folder inside the output folder"
                )
            if is_temporary_name(part):
                raise UsageError(f"{source} would write {key}/, named like fpn-extract's temporary files")
            if part.casefold() not in own_files or i == 0:
                continue
            parent = "/".join(parts[:i])
            other = owners.get(parent.casefold())
            if other is not None:
                raise UsageError(
                    f"{other} and {source} would collide in the output folder: {parent}/{part} is a "
                    f"file of {other} and a folder of {source}; rename one or give them separate "
                    "input folders"
                )


def holds(root: Path) -> bool:
    """Whether ``root`` holds an image the npy layout wrote (a folder with its record)."""
    try:
        with os.scandir(root) as entries:
            return any(e.is_dir() and os.path.exists(os.path.join(e.path, RECORD_FILE)) for e in entries)
    except OSError:
        return False


class NpyStore(Store):
    """The npy layout as a run writes it: store.Store with the folder's lock and settings. Each
    array is its own file, so a resume adds or replaces arrays one by one (``in_place``)."""

    format = "npy"
    in_place = True

    def __init__(
        self,
        root: Path,
        levels: Iterable[str],
        save_dtype: str,
        shard: tuple[int, int] | None = None,
        holds_features: Callable[[Path], bool] | None = None,
    ) -> None:
        super().__init__(root, levels, save_dtype)
        self.shard = shard
        # whether the folder holds any format's features (the registry's answer; else the npy's)
        self.holds_features = holds_features or holds

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return lock_folder(self.root, self.shard)

    def record_settings(self, settings: Mapping[str, object], overwrite: bool) -> dict | None:
        return record_settings(self.root, settings, overwrite, self.shard, self.holds_features)

    def finish_overwrite(self) -> None:
        finish_overwrite(self.root, self.shard)

    def present(self, key: str) -> bool:
        return (self.root / key).is_dir()  # a new image: one stat, no more

    def relocate_record(self, key: str, record: Mapping[str, object]) -> None:
        self.write_record(key, record)

    def is_stored(self, key: str, name: str) -> bool:
        return self.level_path(key, name).exists()

    def preview_file(self, key: str) -> str | None:
        return f"{key}/{PREVIEW_FILE}" if self.preview_path(key).is_file() else None

    def location(self, key: str, name: str) -> dict[str, str]:
        return {"file": f"{key}/{name}.npy"}

    def where(self, key: str) -> str:
        return str(self.root / key)

    def finish_image(self, key: str, record: Mapping[str, object] | None, entry: dict) -> None:
        """The record last, which marks the image's files complete (report.json holds ``entry``),
        with the checksum of every array: those written now, and those the old record gives for
        the arrays a resume kept (resume.py checked them against it)."""
        with self._writing:
            written = self._written.pop(key, {})
        if record is None:
            return
        old = (self.read_record(key) or {}).get(CHECKSUMS)
        kept = {
            name: value
            for name, value in (old.items() if isinstance(old, dict) else ())
            if name not in written and is_checksum(value) and self.level_path(key, name).is_file()
        }
        self.write_record(key, {**record, CHECKSUMS: {**kept, **written}})

    def flush(self) -> None:
        pass  # each file is in place once written


class NpyFeatures(Features):
    """The npy layout's reader: keys from report.json (its images that are not failed), every
    ``OUT/<key>/*.npy`` memory-mapped with ``np.load``."""

    format = "npy"

    def __init__(self, root: Path) -> None:
        self.root = root
        path = root / REPORT_FILE
        try:
            with open_regular(path) as f:
                self._report = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise FPNError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        found = []
        offset = 0
        # report.json keeps one image a line (report.dump_report), so it is read a line at a time
        for line in iter(self._report.readline, b""):
            text = line.strip().rstrip(b",")
            if text.startswith(b'{"path"'):
                image = json.loads(text)
                if image["status"] != "failed":
                    found.append((os.path.splitext(image["path"])[0], offset))
            offset += len(line)
        found.sort()
        self._keys = [key for key, _ in found]
        self._offsets = [at for _, at in found]

    def __len__(self) -> int:
        return len(self._keys)

    def key_at(self, index: int) -> str:
        return self._keys[index]

    def _find(self, key: str) -> int | None:
        i = bisect.bisect_left(self._keys, key)
        return i if i < len(self._keys) and self._keys[i] == key else None

    def read(self, key: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        if self._find(key) is None:
            raise KeyError(key)
        wanted = None if names is None else set(names)
        arrays = {}
        with os.scandir(self.root / key) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                name, ext = os.path.splitext(entry.name)
                if ext == ".npy" and (wanted is None or name in wanted):
                    check_regular(entry.path)  # a FIFO in its place would block np.load forever
                    arrays[name] = load(entry.path, mmap_mode="r")
        return arrays

    def entry(self, key: str) -> dict:
        i = self._find(key)
        if i is None:
            raise KeyError(key)
        start = self._offsets[i]
        line = self._report[start : self._report.find(b"\n", start)]  # no seek: threads share the map
        return json.loads(line.strip().rstrip(b","))


class NpyFolder:
    """The npy layout as verify reads it: an array is its file, the record ``<key>/input.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def array(self, key: str, info: dict, dtype: np.dtype) -> tuple[str, str | None, Shape | None]:
        shown = str(info["file"])
        path = self.root / shown
        try:
            check_regular(path)
        except FPNError:
            return shown, f"{shown} is not a regular file", None
        if not path.is_file():
            return shown, f"{shown} is missing", None
        return shown, None, npy_shape(path, dtype)

    def content(self, key: str, info: dict) -> bool | None:
        """Whether the listed file's array has the checksum ``key``'s record gives it (None: the
        record gives none, an earlier version's). The file is ``key``'s own only if it does."""
        shown = str(info["file"])
        name = os.path.basename(shown)[: -len(".npy")]
        recorded = Store(self.root, (), "float32").checksum(key, name)
        if recorded is None:
            return None
        return file_checksum(self.root / shown) == recorded

    def boxes(self, rois: dict) -> dict:
        return {"file": rois["boxes"]}

    def folder_problems(self) -> list[str]:
        return []

    def record(self, key: str) -> tuple[dict | None, str]:
        return Store(self.root, (), "float32").read_record(key), f"{key}/{RECORD_FILE}"


def estimate(
    per_image: Iterable[tuple[int, Mapping[str, Shape]]], save_dtype: str, shard_size: int
) -> tuple[int, int]:
    """(bytes, files) that ``count`` images of each set of array shapes take in the npy layout:
    the arrays' bytes (headers included; the small JSON files are not counted), and the files: one
    per array and image, each image's record, and the run's report.json, settings and lock."""
    total = files = 0
    for count, shapes in per_image:
        total += count * sum(
            npy_size(shape, codecs.array_dtype(save_dtype, name, LEVELS)) for name, shape in shapes.items()
        )
        files += count * (len(shapes) + 1)
    return total, files + 3


def _open_store(
    out: str | os.PathLike[str],
    levels: Iterable[str],
    save_dtype: str,
    shard_size: int,
    shard: tuple[int, int] | None,
    holds_features: Callable[[Path], bool] | None = None,
) -> NpyStore:
    return NpyStore(Path(local_path(str(out))), levels, save_dtype, shard, holds_features)


def _open_features(folder: Folder) -> NpyFeatures:
    if folder.remote:
        raise FPNError(f"{folder.url('')}: the npy layout is read from local folders only")
    return NpyFeatures(Path(folder.root))


def _note(shard_size: int) -> str:
    return "a file per array and image and its record (a folder each), report.json, settings, lock"


FORMAT = Format(
    name="npy",
    open_store=_open_store,
    open_features=_open_features,
    verify_reader=NpyFolder,
    estimate=estimate,
    note=_note,
    check_layout=check_layout,
    holds=holds,
    remove=remove_layout,
)
