"""fsspec URLs (``s3://``, ``gs://``, ``https://``, ``memory://`` ...): telling them from local
paths, their filesystems, and :class:`Folder`, a folder on the local disk or behind a URL as the
shard format reads and writes it.

fsspec and its backends are optional: each protocol names the extra that installs it
(``pip install 'fpn-extract[s3]'``), and a missing one is a one-line :class:`UsageError`.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote

from fpn_cli.errors import UsageError
from fpn_cli.layout import atomic_write_bytes

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# protocol -> the extra of pyproject.toml that installs its fsspec backend
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "http": "http",
    "https": "http",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
}


def is_url(spec: object) -> bool:
    """True for ``protocol://...`` other than ``file://`` (which is a local path)."""
    return isinstance(spec, str) and bool(_URL.match(spec)) and spec[:7].lower() != "file://"


def local_path(spec: str) -> str:
    """``file:///x`` (or ``file://localhost/x``, percent-escapes decoded) -> ``/x``; any other spec
    unchanged. A ``file://`` URL of another host, or of no absolute path, is a :class:`UsageError`:
    it never becomes a folder named ``file:``."""
    if not spec[:7].lower() == "file://":
        return spec
    host, slash, path = spec[7:].partition("/")
    if host.lower() not in ("", "localhost") or not slash:
        raise UsageError(f"{spec}: a file:// URL names a local absolute path, file:///path (no host)")
    return unquote("/" + path)


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for ``url``; a missing backend is a :class:`UsageError`
    naming the extra that installs it."""
    extra = EXTRAS.get(protocol(url))
    install = f"pip install 'fpn-extract[{extra}]'" if extra else None
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: URLs need fsspec: {install or 'pip install fsspec'}") from None
    hint = install or f"install fsspec's backend for {protocol(url)}://"
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        raise UsageError(f"{url}: {protocol(url)}:// needs a package that is not installed: {hint}") from None
    except ValueError as e:
        raise UsageError(f"{url}: {str(e).splitlines()[0]}") from None


def join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if rel else base


class Folder:
    """A folder on the local disk or behind an fsspec URL, with the few operations the shard
    format needs. Names are relative, ``/``-separated. Local writes are atomic by rename
    (layout.atomic_write_bytes); remote ones are single uploads, which object stores publish whole
    or not at all."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.remote = is_url(root)
        self.root = str(root).rstrip("/") if self.remote else local_path(str(root))
        if self.remote:
            self.fs, self.base = filesystem(self.root)
            self.base = self.base.rstrip("/")

    def __str__(self) -> str:
        return self.root

    def url(self, rel: str) -> str:
        """``rel`` as the user would name it: a path or a URL."""
        return join(self.root, rel) if self.remote else os.path.join(self.root, rel)

    def path(self, rel: str) -> Path:
        """The local path of ``rel`` (local folders only)."""
        assert not self.remote
        return Path(self.root, rel)

    def _remote(self, rel: str) -> str:
        return join(self.base, rel)

    def write(self, rel: str, write: Callable[[BinaryIO], object]) -> None:
        """``write(file)`` makes ``rel``, atomically."""
        if not self.remote:
            atomic_write_bytes(self.path(rel), write)
            return
        buffer = io.BytesIO()
        write(buffer)
        self.fs.pipe_file(self._remote(rel), buffer.getvalue())

    def put(self, local: Path, rel: str) -> None:
        """Moves the finished local file ``local`` to ``rel``: a rename here, an upload there."""
        if not self.remote:
            os.replace(local, self.path(rel))
            return
        self.fs.put_file(str(local), self._remote(rel))
        local.unlink()

    def read_bytes(self, rel: str) -> bytes | None:
        """The content of ``rel``, or None when there is none."""
        try:
            if not self.remote:
                return self.path(rel).read_bytes()
            return self.fs.cat_file(self._remote(rel))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_range(self, rel: str, offset: int, size: int) -> bytes:
        if not self.remote:
            with open(self.path(rel), "rb") as f:
                return os.pread(f.fileno(), size, offset)
        return self.fs.cat_file(self._remote(rel), start=offset, end=offset + size)

    def size(self, rel: str) -> int | None:
        """The length of the file ``rel`` in bytes, or None when there is none."""
        try:
            if not self.remote:
                path = self.path(rel)
                return path.stat().st_size if path.is_file() else None
            return int(self.fs.size(self._remote(rel)))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def open(self, rel: str) -> BinaryIO:
        """``rel`` opened for reading (seekable; remote files read by ranges)."""
        if not self.remote:
            return open(self.path(rel), "rb")
        return self.fs.open(self._remote(rel), "rb")

    def names(self, rel: str = "") -> list[str]:
        """The names of the files directly in the folder ``rel``; [] if there is none."""
        try:
            if not self.remote:
                return sorted(e.name for e in os.scandir(self.path(rel)) if e.is_file(follow_symlinks=False))
            entries = self.fs.ls(self._remote(rel), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file")

    def remove(self, rel: str) -> None:
        if not self.remote:
            self.path(rel).unlink(missing_ok=True)
            return
        try:
            self.fs.rm_file(self._remote(rel))
        except FileNotFoundError:
            pass

    def makedirs(self, rel: str) -> None:
        """Makes the folder ``rel`` here; object stores have no folders to make."""
        if not self.remote:
            self.path(rel).mkdir(parents=True, exist_ok=True)
