"""The output folder: layout, atomic writes, completion and resume, report.json.

    OUT/<key>/p2.npy ...        one (C, H, W) array per level, in the save dtype (npyio.py)
    OUT/<key>/preview.png       with --preview: the image beside its levels
    OUT/<key>/p2_avg.npy, rois.npy, boxes.npy   with --pool, --boxes: derived arrays (roi.py)
    OUT/<key>/input.json        the input's fingerprint, size and orientation, written last, after
                                every array and the preview: the image is complete (resume.py
                                decides what of it a resume may keep)
    OUT/report.json             what the last run did (all shards merged)
    OUT/.shards/report-I-of-N.json   one shard's part, with --shard or under torchrun
    OUT/.fpn-extract.json, OUT/.lock, OUT/.shards/lock-I-of-N, OUT/.overwrite-unfinished*
                                who may write here, with which settings (locks.py)

Every file appears by ``os.replace`` of a temporary sibling named ``.<name>~<host>~<pid>.tmp``, so a
reader never sees a partial file. :func:`check_layout` refuses, before any work, inputs whose files
would land on each other's (a key against another key's level, derived array, preview or record
file, or the tool's own files).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fpn_cli.errors import UsageError
from fpn_cli.formats.npyio import DirectWriter, npy_shape, write_file
from fpn_cli.models.levels import LEVELS

SETTINGS_FILE = ".fpn-extract.json"
REPORT_FILE = "report.json"
PREVIEW_FILE = "preview.png"
RECORD_FILE = "input.json"  # the input's fingerprint: written last, so it marks the image complete
ROIS, BOXES = "rois", "boxes"  # with --boxes: RoI features, and the boxes they came from (roi.py)
POOLS = ("avg", "max")  # with --pool: <level>_<kind>.npy, one vector per level
LOCK_FILE = ".lock"
OVERWRITE_MARKER = ".overwrite-unfinished"  # -I-of-N for a shard
TAR_SHARDS_DIR = "shards"  # --format shards: the tars, their index parts and index.jsonl
SHARDS_DIR = ".shards"  # report-I-of-N.json per shard, merged into report.json by the last
TMP_SUFFIX = ".tmp"


HOST = socket.gethostname()


def pool_name(level: str, kind: str) -> str:
    """``p3_avg``: no dot inside, so the name is one WebDataset member suffix."""
    return f"{level}_{kind}"


def remove_npy_layout(root: Path) -> None:
    """Deletes what the npy layout wrote under ``root`` (every image folder's arrays, record and
    preview, then the folders left empty): an --overwrite run into another format must not leave
    the old one beside it for readers to find. Nothing else in the folders is touched."""
    ours = {RECORD_FILE, PREVIEW_FILE, *(f"{name}.npy" for name in (*LEVELS, *derived_names()))}
    for folder, _, names in os.walk(root, topdown=False):
        if Path(folder) == root:
            continue
        for name in names:
            if name in ours:
                os.unlink(os.path.join(folder, name))
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only if empty


def derived_names() -> tuple[str, ...]:
    """Every array a run may derive from an image's levels, whatever its options: each level's
    pooled vectors, the RoI features and their boxes."""
    return (*(pool_name(level, kind) for level in LEVELS for kind in POOLS), ROIS, BOXES)


def _tmp_name(target: Path) -> Path:
    # who wrote it, so that a later run can tell a dead writer's leftovers from a live one's
    return target.with_name(f".{target.name}~{HOST}~{os.getpid()}{TMP_SUFFIX}")


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _writer_is_gone(name: str) -> bool:
    """True for a temporary file whose writer ran on this host and no longer runs."""
    parts = name[: -len(TMP_SUFFIX)].split("~")
    if len(parts) != 3 or parts[1] != HOST or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``target`` to write, then renames it over ``target``. On any
    error the temporary file is removed and the error re-raised: ``target`` is old or new, never
    partial."""
    tmp = _tmp_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(target)  # a failed write() names no file; the user needs one
        raise


def atomic_write_bytes(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write(file)`` on a temporary sibling, then renames it over ``target``."""
    with replacing(target) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_json(target: Path, data: object) -> None:
    text = (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()
    atomic_write_bytes(target, lambda f: f.write(text))


def temporary_name(target: Path) -> Path:
    """The name a file being written as ``target`` has until it is complete."""
    return _tmp_name(target)


def sweep_dead_writers(folder: Path) -> None:
    """Deletes the temporary files in ``folder`` whose writer ran on this host and is gone."""
    _remove_tmp_files(folder, _writer_is_gone)


def _remove_tmp_files(folder: Path, stale: Callable[[str], bool]) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if _is_tmp(entry.name) and stale(entry.name) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)


def create_folder(root: Path) -> None:
    """Makes the output folder; a path that is a file, or a place where none can be made, is a
    :class:`UsageError`."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"output path {root} exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {root}: {e.strerror}") from None


class Store:
    """One output folder, for one set of levels stored in one dtype."""

    def __init__(self, root: Path, levels: Iterable[str], save_dtype: str) -> None:
        self.root = Path(root)
        self.levels = tuple(levels)
        self.dtype = np.dtype(save_dtype)
        self._direct = DirectWriter()

    def sweep_dead_runs(self) -> None:
        """Deletes the temporary files that runs on this host left at the top of the folder and
        in ``.shards`` before they died (another run's live ones stay)."""
        for folder in (self.root, self.root / SHARDS_DIR):
            sweep_dead_writers(folder)

    @staticmethod
    def check_key(key: str, source: str) -> None:
        """An image whose output folder would be one of the store's own files is a usage error."""
        top = key.split("/", 1)[0]
        if top in (REPORT_FILE, SETTINGS_FILE, LOCK_FILE, SHARDS_DIR) or top.startswith(OVERWRITE_MARKER):
            raise UsageError(
                f"{source} would write {key}/, a name fpn-extract keeps for itself in the output folder"
            )

    def level_path(self, key: str, level: str) -> Path:
        return self.root / key / f"{level}.npy"

    def existing(self, key: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the requested levels already complete for ``key``."""
        return self.shapes(key, self.levels)

    def shapes(
        self, key: str, names: Iterable[str], dtypes: Mapping[str, np.dtype] | None = None
    ) -> dict[str, tuple[int, ...]]:
        """Shapes of the arrays ``key/<name>.npy`` among ``names`` that are complete: of the save
        dtype, or the one ``dtypes`` gives for the name (boxes.npy is float64 in any store)."""
        found = {}
        for name in names:
            shape = npy_shape(self.level_path(key, name), (dtypes or {}).get(name, self.dtype))
            if shape is not None:
                found[name] = shape
        return found

    def remove_strays(self, key: str) -> None:
        """Deletes temporary files that a killed run left in ``key``'s folder (the lock makes this
        run the folder's only writer)."""
        _remove_tmp_files(self.root / key, lambda name: True)

    def write_levels(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes each array to ``key/<name>.npy``, each file atomically, in ``arrays``' order:
        levels, and the arrays derived from them (pooled vectors, rois, boxes; roi.py)."""
        (self.root / key).mkdir(parents=True, exist_ok=True)
        for level, array in arrays.items():
            with replacing(self.level_path(key, level)) as tmp:
                write_file(tmp, array, self._direct)

    def preview_path(self, key: str) -> Path:
        return self.root / key / PREVIEW_FILE

    def record_path(self, key: str) -> Path:
        return self.root / key / RECORD_FILE

    def read_record(self, key: str) -> dict | None:
        """``key``'s record (resume.py's), or None if it is absent or unreadable."""
        try:
            record = json.loads(self.record_path(key).read_bytes())
        except (OSError, ValueError):
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
        for name in (RECORD_FILE, *(f"{level}.npy" for level in LEVELS)):
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
        """The requested levels of a complete image, memory-mapped."""
        return {level: self.read_array(key, level) for level in self.levels}

    def read_array(self, key: str, name: str) -> np.ndarray:
        """``key/<name>.npy``, memory-mapped."""
        return np.load(self.level_path(key, name), mmap_mode="r")

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
    arrays = (*LEVELS, *derived_names())
    return frozenset({PREVIEW_FILE, RECORD_FILE, *(f"{name}.npy" for name in arrays)})


def is_temporary_name(name: str) -> bool:
    """A name of the kind :func:`replacing` gives its temporary files (``.p2.npy~HOST~PID.tmp``)."""
    return _is_tmp(name) and "~" in name


def check_layout(keyed: Iterable[tuple[str, str]]) -> None:
    """(key, input path) pairs that would write over each other in the output folder are a
    :class:`UsageError` naming both, before any work: a key whose folder, or a folder above it, is
    a file that another key's folder holds (``k/p2.npy`` from ``k/p2.npy.jpg`` against ``k``'s
    level file), a key with a part named like a temporary file, or one that would leave OUT
    (``..``) or take the tool's own names (:meth:`Store.check_key`). Names are compared
    casefolded, as macOS and Windows do; two keys that are one folder are find_images' to refuse."""
    owners: dict[str, str] = {}
    pairs = list(keyed)
    for key, source in pairs:
        owners.setdefault(key.casefold(), source)
    own_files = {name.casefold() for name in files_of_a_key()}
    for key, source in pairs:
        Store.check_key(key, source)
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
