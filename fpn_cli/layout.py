"""The output folder's base: the names fpn-extract keeps for itself at the top of it, and how
every file appears there (atomically). Every storage format (formats/) and the inputs (which must
not take the output folder for an input) build on this; it imports nothing of the package's but
its errors.

    OUT/report.json                  what the last run did (all shards merged)
    OUT/.fpn-extract.json            the settings the features were made with (formats/locks.py)
    OUT/.lock, OUT/.shards/lock-I-of-N, OUT/.overwrite-unfinished*   who may write here
    OUT/.shards/report-I-of-N.json   one shard's part of report.json, with --shard or under torchrun

Every file appears by ``os.replace`` of a temporary sibling named ``.<name>~<host>~<pid>.tmp``, so a
reader never sees a partial file, and a later run tells a dead writer's leftovers from a live one's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from fpn_cli.errors import UsageError

SETTINGS_FILE = ".fpn-extract.json"
REPORT_FILE = "report.json"
LOCK_FILE = ".lock"
OVERWRITE_MARKER = ".overwrite-unfinished"  # -I-of-N for a shard
SHARDS_DIR = ".shards"  # report-I-of-N.json per shard, merged into report.json by the last
TMP_SUFFIX = ".tmp"

HOST = socket.gethostname()


def check_reserved(key: str, source: str) -> None:
    """An image whose output (folder, or member path) would start with one of the names above is
    a :class:`UsageError`, in every format."""
    top = key.split("/", 1)[0]
    if top in (REPORT_FILE, SETTINGS_FILE, LOCK_FILE, SHARDS_DIR) or top.startswith(OVERWRITE_MARKER):
        raise UsageError(
            f"{source} would write {key}/, a name fpn-extract keeps for itself in the output folder"
        )


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
    remove_temporary_files(folder, _writer_is_gone)


def remove_temporary_files(folder: Path, stale: Callable[[str], bool] | None = None) -> None:
    """Deletes the temporary files directly in ``folder`` (those ``stale`` says, or all)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not _is_tmp(entry.name) or (stale is not None and not stale(entry.name)):
            continue
        if entry.is_file(follow_symlinks=False):
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


def is_temporary_name(name: str) -> bool:
    """A name of the kind :func:`replacing` gives its temporary files (``.p2.npy~HOST~PID.tmp``)."""
    return _is_tmp(name) and "~" in name


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"
