"""The output folder: layout, atomic writes, completion and resume, settings, report.json.

    OUT/<key>/p2.npy ...        one (C, H, W) array per level, in the save dtype
    OUT/<key>/preview.png       with --preview: the image beside its levels
    OUT/report.json             what the last run did (all shards merged)
    OUT/.shards/report-I-of-N.json   one shard's part, with --shard or under torchrun
    OUT/.fpn-extract.json       the settings the features were made with (checked on resume)

Every file appears by ``os.replace`` of a temporary sibling named ``.<name>~<host>~<pid>.tmp``, so a
reader never sees a partial file, and an image is complete when each requested level's file is in
place. ``OUT/.lock`` (and ``OUT/.shards/lock-I-of-N``) keep two runs from writing the same images.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import mmap
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import UsageError

SETTINGS_FILE = ".fpn-extract.json"
REPORT_FILE = "report.json"
PREVIEW_FILE = "preview.png"
TRANSPOSE_BLOCK = 32  # positions per block when writing channels-last levels in C order (fastest measured)
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: multiples of the logical block size
LOCK_FILE = ".lock"
OVERWRITE_MARKER = ".overwrite-unfinished"  # -I-of-N for a shard
SHARDS_DIR = ".shards"  # report-I-of-N.json per shard, merged into report.json by the last
TMP_SUFFIX = ".tmp"


HOST = socket.gethostname()


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
    text = (json.dumps(data, indent=2) + "\n").encode()
    atomic_write_bytes(target, lambda f: f.write(text))


def npy_header(array: np.ndarray) -> bytes:
    """The ``.npy`` (version 1.0) header of ``array`` stored in C order."""
    header = io.BytesIO()
    meta = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape}
    np.lib.format.write_array_header_1_0(header, meta)
    return header.getvalue()


def copy_c_order(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for a C-order ``dst``. A channels-last (C, H, W) ``src``, the network's
    layout, is transposed in blocks of positions that stay in cache: 3.0 ms against numpy's
    6.7 ms for a 256x128x128 float32 level (benchmarks/writes.py)."""
    if src.ndim == 3 and not src.flags.c_contiguous and src.transpose(1, 2, 0).flags.c_contiguous:
        channels = src.shape[0]
        positions = src.transpose(1, 2, 0).reshape(-1, channels)  # (H*W, C), a view
        out = dst.reshape(channels, -1)
        for i in range(0, positions.shape[0], TRANSPOSE_BLOCK):
            out[:, i : i + TRANSPOSE_BLOCK] = positions[i : i + TRANSPOSE_BLOCK].T
    else:
        np.copyto(dst, src)


def c_order(array: np.ndarray) -> np.ndarray:
    if array.flags.c_contiguous:
        return array
    out = np.empty(array.shape, array.dtype)
    copy_c_order(out, array)
    return out


def write_npy(f: BinaryIO, array: np.ndarray) -> None:
    """``np.save`` through ``f.write``, so a full disk raises ENOSPC (numpy's ``tofile`` reports
    only a short count). Always C order: a (C, 1, W) slice can be Fortran-contiguous, and readers
    that memory-map the file expect the usual layout."""
    f.write(npy_header(array))
    f.write(memoryview(c_order(array)).cast("B"))


def _no_progress() -> int:
    raise OSError(errno.EIO, "write made no progress")


class DirectWriter:
    """Writes ``.npy`` files with O_DIRECT from one reusable page-aligned buffer, bypassing the
    page cache. Measured by benchmarks/writes.py: 4 ms of CPU for a 16 MB level against 38 ms
    through the page cache, CPU that the network needs on a host whose cores it keeps busy. The
    array's copy into the buffer is the C-order copy that a buffered write makes anyway.
    Filesystems without O_DIRECT (or platforms: macOS) make :meth:`write` return False once, and
    the caller writes buffered."""

    def __init__(self) -> None:
        self.enabled = hasattr(os, "O_DIRECT")
        self._buffer: mmap.mmap | None = None
        self._lock = threading.Lock()

    def write(self, path: Path, array: np.ndarray) -> bool:
        if not self.enabled:
            return False
        header = npy_header(array)
        length = len(header) + array.nbytes
        padded = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
        with self._lock:
            if self._buffer is None or len(self._buffer) < padded:
                if self._buffer is not None:
                    self._buffer.close()
                self._buffer = mmap.mmap(-1, padded)  # page-aligned, as O_DIRECT needs
            buffer = self._buffer
            buffer[: len(header)] = header
            copy_c_order(np.ndarray(array.shape, array.dtype, buffer=buffer, offset=len(header)), array)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.enabled = False  # this filesystem refuses O_DIRECT
                return False
            try:
                with memoryview(buffer)[:padded] as view:
                    try:
                        written = os.write(fd, view)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        written = 0  # cut to an unaligned length (a file size limit): go buffered
                    if written < padded:
                        # a short write ends at no particular boundary: the rest goes buffered,
                        # which writes it or raises the reason (ENOSPC, EFBIG)
                        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                        while written < padded:
                            written += os.write(fd, view[written:]) or _no_progress()
                os.ftruncate(fd, length)  # the padding goes; the file is exactly the .npy
            finally:
                os.close(fd)
        return True


def npy_shape(path: Path, dtype: np.dtype) -> tuple[int, ...] | None:
    """The shape stored in a complete ``.npy`` of ``dtype``; None if absent, of another dtype, or short."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, stored = read_header(f)
            data_start = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return None
    if stored != dtype or fortran or size != data_start + int(np.prod(shape)) * dtype.itemsize:
        return None
    return tuple(shape)


def _remove_tmp_files(folder: Path, stale: Callable[[str], bool]) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if _is_tmp(entry.name) and stale(entry.name) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)


class Store:
    """One output folder, for one set of levels stored in one dtype."""

    def __init__(self, root: Path, levels: Iterable[str], save_dtype: str) -> None:
        self.root = Path(root)
        self.levels = tuple(levels)
        self.dtype = np.dtype(save_dtype)
        self._direct = DirectWriter()

    def _create(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"output path {self.root} exists and is not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output folder {self.root}: {e.strerror}") from None

    def prepare(self, settings: Mapping[str, object], overwrite: bool, shard: tuple[int, int] | None) -> None:
        """Records ``settings`` (under :meth:`lock`); features made with other settings are a
        usage error unless ``overwrite`` (then they are recomputed). An ``overwrite`` run leaves a
        marker until it finishes: until then the folder may mix old and new features, so a run
        without ``overwrite`` is refused. Sweeps dead runs' leftovers."""
        pending = sorted(p.name for p in self.root.glob(OVERWRITE_MARKER + "*"))
        if pending and not overwrite:
            raise UsageError(
                f"{self.root} holds an unfinished --overwrite run ({', '.join(pending)}), so old and new "
                "features may be mixed: run it again with --overwrite to finish it"
            )
        recorded = self._recorded_settings()
        if recorded is not None and recorded != dict(settings) and not overwrite:
            diff = ", ".join(
                f"{k} {recorded.get(k)!r} -> {settings.get(k)!r}"
                for k in sorted(set(recorded) | set(settings))
                if recorded.get(k) != settings.get(k)
            )
            raise UsageError(
                f"{self.root} holds features made with other settings ({diff}); "
                "pass --overwrite to recompute them, or choose another --out"
            )
        try:
            if overwrite:
                self._overwrite_marker(shard).touch()
            atomic_write_json(self.root / SETTINGS_FILE, dict(settings))
        except OSError as e:
            raise UsageError(f"output folder {self.root} is not writable: {e.strerror or e}") from None
        for folder in (self.root, self.root / SHARDS_DIR):
            _remove_tmp_files(folder, _writer_is_gone)

    def _overwrite_marker(self, shard: tuple[int, int] | None) -> Path:
        suffix = f"-{shard[0]}-of-{shard[1]}" if shard else ""
        return self.root / f"{OVERWRITE_MARKER}{suffix}"

    def finish(self, shard: tuple[int, int] | None) -> None:
        """Marks this run (or shard) as finished: an ``overwrite`` is complete."""
        self._overwrite_marker(shard).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, shard: tuple[int, int] | None) -> Iterator[None]:
        """Holds the output folder against other runs: a whole run locks it exclusively; a shard
        locks it shared (other shards may run beside it) and its own shard exclusively. A run that
        finds it taken is refused with a :class:`UsageError`; locks end with the process."""
        self._create()
        files = []
        try:
            files.append(self._take(self.root / LOCK_FILE, exclusive=shard is None))
            if shard is not None:
                (self.root / SHARDS_DIR).mkdir(exist_ok=True)
                files.append(self._take(self.root / SHARDS_DIR / f"lock-{shard[0]}-of-{shard[1]}", True))
            yield
        finally:
            for f in files:
                f.close()

    def _take(self, path: Path, exclusive: bool):
        try:
            f = open(path, "a+")
        except OSError as e:
            raise UsageError(f"output folder {self.root} is not writable: {e.strerror or e}") from None
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UsageError(
                f"another fpn-extract run ({holder}) is writing to {self.root}; "
                "wait for it to finish, or choose another --out"
            ) from None
        if exclusive:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {HOST}")
            f.flush()
        return f

    def _recorded_settings(self) -> dict | None:
        try:
            return json.loads((self.root / SETTINGS_FILE).read_text())
        except (OSError, ValueError):
            return None

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
        found = {}
        for level in self.levels:
            shape = npy_shape(self.level_path(key, level), self.dtype)
            if shape is not None:
                found[level] = shape
        return found

    def remove_strays(self, key: str) -> None:
        """Deletes temporary files that a killed run left in ``key``'s folder (the lock makes this
        run the folder's only writer)."""
        _remove_tmp_files(self.root / key, lambda name: True)

    def write_levels(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes each array to ``key/<level>.npy``, each file atomically."""
        (self.root / key).mkdir(parents=True, exist_ok=True)
        for level, array in arrays.items():
            with replacing(self.level_path(key, level)) as tmp:
                if not self._direct.write(tmp, array):
                    with open(tmp, "wb") as f:
                        write_npy(f, array)

    def preview_path(self, key: str) -> Path:
        return self.root / key / PREVIEW_FILE

    def read_levels(self, key: str) -> dict[str, np.ndarray]:
        """The requested levels of a complete image, memory-mapped."""
        return {level: np.load(self.level_path(key, level), mmap_mode="r") for level in self.levels}

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
