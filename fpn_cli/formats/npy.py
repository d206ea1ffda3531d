"""``--format npy`` (the default): one ``.npy`` file per array and image, ``OUT/<key>/<name>.npy``.
The layout itself, its atomic writes and completion checks are store.py's; this module makes it a
:class:`~fpn_cli.formats.base.Storage` and reads it back."""

from __future__ import annotations

import bisect
import contextlib
import json
import mmap
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from fpn_cli.errors import FPNError
from fpn_cli.formats.base import Features, Shape, npy_size
from fpn_cli.formats.locks import finish_overwrite, lock_folder, record_settings
from fpn_cli.formats.npyio import npy_shape
from fpn_cli.formats.store import PREVIEW_FILE, REPORT_FILE, TAR_SHARDS_DIR, Store


class NpyStore(Store):
    """The npy layout as a run writes it: store.Store with the folder's lock and settings. Each
    array is its own file, so a resume adds or replaces arrays one by one (``in_place``)."""

    format = "npy"
    in_place = True

    def __init__(
        self, root: Path, levels: Iterable[str], save_dtype: str, shard: tuple[int, int] | None = None
    ) -> None:
        super().__init__(root, levels, save_dtype)
        self.shard = shard

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return lock_folder(self.root, self.shard)

    def record_settings(self, settings: Mapping[str, object], overwrite: bool) -> None:
        before = record_settings(self.root, settings, overwrite, self.shard) or {}
        if overwrite and before.get("format", "npy") == "shards":  # the other format's files go too
            shutil.rmtree(self.root / TAR_SHARDS_DIR, ignore_errors=True)

    def finish_overwrite(self) -> None:
        finish_overwrite(self.root, self.shard)

    def present(self, key: str) -> bool:
        return (self.root / key).is_dir()  # a new image: one stat, no more

    def relocate_record(self, key: str, record: Mapping[str, object]) -> None:
        self.write_record(key, record)

    def stored_shape(self, key: str, name: str, dtype: np.dtype) -> Shape | None:
        return npy_shape(self.level_path(key, name), dtype)

    def is_stored(self, key: str, name: str) -> bool:
        return self.level_path(key, name).exists()

    def preview_file(self, key: str) -> str | None:
        return f"{key}/{PREVIEW_FILE}" if self.preview_path(key).is_file() else None

    def location(self, key: str, name: str) -> dict[str, str]:
        return {"file": f"{key}/{name}.npy"}

    def where(self, key: str) -> str:
        return str(self.root / key)

    def finish_image(self, key: str, entry: dict) -> None:
        pass  # report.json holds the entries

    def flush(self) -> None:
        pass  # each file is in place once written

    def publish_index(self) -> None:
        pass  # the folder tree is the index


class NpyFeatures(Features):
    """The npy layout's reader: keys from report.json (its images that are not failed), every
    ``OUT/<key>/*.npy`` memory-mapped with ``np.load``."""

    format = "npy"

    def __init__(self, root: Path) -> None:
        self.root = root
        path = root / REPORT_FILE
        try:
            with open(path, "rb") as f:
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
                if ext == ".npy" and (wanted is None or name in wanted) and entry.is_file():
                    arrays[name] = np.load(entry.path, mmap_mode="r")
        return arrays

    def entry(self, key: str) -> dict:
        i = self._find(key)
        if i is None:
            raise KeyError(key)
        start = self._offsets[i]
        line = self._report[start : self._report.find(b"\n", start)]  # no seek: threads share the map
        return json.loads(line.strip().rstrip(b","))


def estimate(
    per_image: Iterable[tuple[int, Mapping[str, Shape]]], dtype: np.dtype, shard_size: int
) -> tuple[int, int]:
    """(bytes, files) that ``count`` images of each set of array shapes take in the npy layout:
    the arrays' bytes (headers included; the small JSON files are not counted), and the files: one
    per array and image, each image's record, and the run's report.json, settings and lock."""
    total = files = 0
    for count, shapes in per_image:
        total += count * sum(npy_size(shape, dtype) for shape in shapes.values())
        files += count * (len(shapes) + 1)
    return total, files + 3
