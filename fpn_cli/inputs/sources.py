"""Inputs beyond local files, folders and globs: list files, WebDataset tar shards of images,
and fsspec URLs. Each becomes :class:`~fpn_cli.inputs.images.InputImage` objects like any other input;
an image that is not a local file has a :class:`TarMember` or :class:`RemoteFile` as its
``path``, which images.decode reads through its ``open()``.

    --list FILE          text (one path a line), CSV/TSV (a header row, the path in --list-column),
                         parquet (pyarrow); each path is taken as a line of stdin is
    data/shard-{000000..000099}.tar
                         braces expand (``{a,b}``, ``{000..099}``); each image member of a tar is an
                         input whose path relative to its root is the member's name (key + ext)
    s3://b/imgs/, gs://..., https://host/x.jpg, memory://...
                         a URL is a file, a tar, a folder (searched recursively) or a glob

Each tells its fingerprint for resume.py (``stat()``): a tar member its size and the modification
time its tar header gives, as the tar was listed by this run; an object what its store reports
(size, modification time, ETag or generation), asked again each time.
"""

from __future__ import annotations

import csv
import datetime
import email.utils
import io
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote

from fpn_cli.errors import ImageError, UsageError
from fpn_cli.inputs.deadline import bounded
from fpn_cli.inputs.images import (
    InputImage,
    expand_local,
    input_specs,
    is_image_name,
    names_one_file,
    open_regular,
    share_root,
    unique_images,
)
from fpn_cli.inputs.urls import filesystem, is_url, local_path

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = frozenset("*?[")
TAR_SUFFIX = ".tar"


def find_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    stdin_lines: Iterable[str] = (),
    exclude: Path | None = None,
    lists: Sequence[str | os.PathLike[str]] = (),
    list_column: str | None = None,
    root: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> list[InputImage]:
    """Every input image of a run, sorted by key: what images.find_images finds in files, folders,
    globs and stdin (``-``), plus the lines of each list file, the members of tar shards and URLs.
    Files and URLs named one by one share ``root`` or else their deepest common folder (keys.py).
    Clashing keys are a :class:`UsageError` (images.unique_images).

    ``timeout``: seconds that listing one URL (or reading a list file behind one) may take; a URL
    past it is a failed input, a list file a :class:`UsageError` (a server that accepts and never
    answers would otherwise hold the run for the backend's own timeout)."""
    inputs, lists = as_list(inputs), as_list(lists)
    specs: list[tuple[str, bool]] = []  # (spec, listed): a listed path is taken verbatim
    for spec, listed in input_specs(inputs, stdin_lines):
        if listed or os.path.lexists(spec):  # a name with braces in it is that name
            specs.append((spec, listed))
        else:  # a pattern's shards, like a list's lines: one missing is a failed input, not the run's end
            expanded = expand_braces(spec)
            specs += [(one, len(expanded) > 1) for one in expanded]
    for listing in map(str, lists):
        specs += [(line, True) for line in read_list(listing, list_column, timeout)]
    exclude = exclude.resolve() if exclude is not None else None
    found = [pair for spec, listed in specs for pair in _expand(spec, exclude, listed, timeout)]
    return unique_images(share_root(found, root))


def as_list(specs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list:
    """``specs`` as a list: a single string or path is one input, never its characters."""
    if isinstance(specs, (str, bytes, os.PathLike)):
        return [os.fsdecode(specs)]
    return list(specs)


def _expand(
    spec: str, exclude: Path | None, listed: bool, timeout: float | None = None
) -> list[tuple[InputImage, bool]]:
    """The images of one input, each with whether it was named one by one (keys.py); a URL
    still listing after ``timeout`` seconds is one failed input."""
    if is_url(spec):
        in_time, expanded = bounded(lambda: _expand_url(spec, listed), timeout, "fpn-list")
        if not in_time:
            reason = f"timed out after {timeout:g} s listing it (--timeout)"
            return [(InputImage(RemoteFile(spec), _url_name(spec), error=reason), True)]
        images, one = expanded
        return [(image, one) for image in images]
    spec = local_path(spec)
    if spec.lower().endswith(TAR_SUFFIX) and os.path.isfile(spec):
        return [(image, False) for image in tar_members(spec, open(spec, "rb"), spec, listed)]
    one = names_one_file(spec, listed)
    return [(image, one) for image in expand_local(spec, exclude, listed)]


def expand_braces(spec: str) -> list[str]:
    """Shell-style braces: ``a{0..2}b`` -> a0b a1b a2b (zero-padded as written), ``{x,y}`` -> x y.

    >>> expand_braces("data/shard-{000..002}.tar")
    ['data/shard-000.tar', 'data/shard-001.tar', 'data/shard-002.tar']
    >>> expand_braces("s3://b/{train,val}/x.jpg")
    ['s3://b/train/x.jpg', 's3://b/val/x.jpg']
    """
    match = _BRACES.search(spec)
    if match is None:
        return [spec]
    head, body, tail = spec[: match.start()], match.group(1), spec[match.end() :]
    numbers = _RANGE.match(body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [f"{i:0{width}d}" for i in range(int(first), int(last) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [head + "{" + body + "}" + one for one in expand_braces(tail)]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def read_list(listing: str, column: str | None = None, timeout: float | None = None) -> list[str]:
    """The paths in a list file: text (one a line, verbatim; a file whose every line ends in CRLF
    loses the CRs), CSV or TSV (``column`` of a header row, ``path`` unless given), parquet
    (``column``, through pyarrow); a UTF-8 byte-order mark is dropped. ``listing`` may be a URL,
    read within ``timeout`` seconds."""
    suffix = listing.lower().rsplit(".", 1)[-1] if "." in listing else ""
    column = column or "path"
    if suffix == "parquet":
        return _parquet_column(listing, column, timeout)
    raw = _read_all(listing, timeout).removeprefix(b"\xef\xbb\xbf")  # the byte-order mark Excel writes
    text = raw.decode("utf-8", "surrogateescape")
    if suffix in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == "tsv" else ",")
        if column not in (reader.fieldnames or []):
            found = ", ".join(reader.fieldnames or []) or "none"
            raise UsageError(f"--list {listing}: no column {column!r} (columns: {found}); see --list-column")
        return [row[column] for row in reader if row[column]]
    lines = [line for line in text.split("\n") if line]
    if lines and all(line.endswith("\r") for line in lines):  # written on Windows: CRLF line ends
        lines = [line[:-1] for line in lines]
    return [line for line in lines if line]


def _read_all(path: str, timeout: float | None = None) -> bytes:
    try:
        if is_url(path):
            fs, inner = filesystem(path)
            in_time, data = bounded(lambda: fs.cat_file(inner), timeout, "fpn-list")
            if not in_time:
                raise UsageError(f"cannot read --list {path}: timed out after {timeout:g} s (--timeout)")
            return data
        with open(local_path(path), "rb") as f:
            return f.read()
    except UsageError:
        raise
    except OSError as e:
        raise UsageError(f"cannot read --list {path}: {e.strerror or e}") from None
    except Exception as e:  # a backend's own error (no credentials, no network)
        raise UsageError(f"cannot read --list {path}: {_reason(e)}") from None


def _parquet_column(listing: str, column: str, timeout: float | None = None) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        hint = "pip install 'fpn-extract[parquet]'"
        raise UsageError(f"--list {listing}: parquet lists need pyarrow: {hint}") from None
    try:
        data = _read_all(listing, timeout)
        schema = pq.read_schema(io.BytesIO(data))
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--list {listing}: not a readable parquet file: {_reason(e)}") from None
    if column not in schema.names:
        raise UsageError(
            f"--list {listing}: no column {column!r} (columns: {', '.join(schema.names)}); see --list-column"
        )
    table = pq.read_table(io.BytesIO(data), columns=[column])
    return [str(value) for value in table.column(column).to_pylist() if value]


@dataclass(frozen=True)
class TarMember:
    """An image inside a tar shard: ``tar`` (a local path or a URL), the member's ``name``, and
    where its data is (``offset``, ``size``) and its header's modification time, found when the
    tar was listed."""

    tar: str
    name: str
    offset: int
    size: int
    mtime_ns: int = 0

    def __str__(self) -> str:
        return f"{self.tar}#{self.name}"

    def stat(self) -> tuple[int, int, str | None]:
        return self.size, self.mtime_ns, None

    def locator(self) -> dict[str, str]:
        return {"input": self.tar if is_url(self.tar) else os.path.abspath(self.tar), "member": self.name}

    def open(self) -> BinaryIO:
        try:
            if is_url(self.tar):
                fs, inner = filesystem(self.tar)
                data = fs.cat_file(inner, start=self.offset, end=self.offset + self.size)
            else:
                with open_regular(self.tar) as f:
                    data = os.pread(f.fileno(), self.size, self.offset)
        except (ImageError, UsageError):
            raise
        except FileNotFoundError:
            raise ImageError("its tar file disappeared before it could be read") from None
        except Exception as e:
            raise ImageError(f"cannot read from its tar file: {_reason(e)}") from None
        if len(data) < self.size:
            raise ImageError("its tar file is shorter than when it was listed")
        if len(data) > self.size:  # an HTTP server that ignores byte ranges sends the whole tar
            raise ImageError(f"asked for {self.size} bytes of its tar file, got {len(data)}")
        return io.BytesIO(data)


@dataclass(frozen=True)
class Refused:
    """An input that listing found unusable (a name that would leave the output folder): reading
    it fails with ``reason``, so it is a failed input like any unreadable image."""

    source: TarMember | RemoteFile
    reason: str

    def __str__(self) -> str:
        return str(self.source)

    def open(self) -> BinaryIO:
        raise ImageError(self.reason)

    def stat(self) -> tuple[int, int, str | None]:
        raise ImageError(self.reason)

    def locator(self) -> dict[str, str]:
        return self.source.locator()


def _checked(source: TarMember | RemoteFile, rel: str) -> InputImage:
    """``source`` as an input at ``rel``, or refused if ``rel`` would leave the output folder
    (``..``, absolute): tar members and object keys may be named anything."""
    name = posixpath.normpath(rel)
    if name.startswith("/") or name == ".." or name.startswith("../"):
        reason = "unsafe name: it would be written outside the output folder"
        return InputImage(Refused(source, reason), rel, error=reason)
    return InputImage(source, name)


@dataclass(frozen=True)
class RemoteFile:
    """An image behind an fsspec URL."""

    url: str

    def __str__(self) -> str:
        return self.url

    def open(self) -> BinaryIO:
        fs, inner = filesystem(self.url)
        try:
            return io.BytesIO(fs.cat_file(inner))
        except FileNotFoundError as e:
            raise ImageError(_not_found(e)) from None
        except Exception as e:  # a backend's own error (access denied, network)
            raise ImageError(f"cannot read: {_reason(e)}") from None

    def stat(self) -> tuple[int, int, str | None]:
        fs, inner = filesystem(self.url)
        try:
            info = fs.info(inner)
        except FileNotFoundError as e:
            raise ImageError(_not_found(e)) from None
        except Exception as e:
            raise ImageError(f"cannot read: {_reason(e)}") from None
        modified = next((info[k] for k in _MODIFIED if info.get(k) is not None), None)
        version = next((str(info[k]) for k in _VERSIONS if info.get(k)), None)
        return int(info.get("size") or 0), _nanoseconds(modified), version

    def locator(self) -> dict[str, str]:
        return {"input": self.url}


# what fsspec backends call an object's modification time (s3, gcs, http, local, memory) and version
_MODIFIED = ("mtime", "LastModified", "last_modified", "updated", "Last-Modified", "created")
_VERSIONS = ("ETag", "etag", "generation", "VersionId", "version_id", "md5Hash", "Content-MD5", "Digest")


def _nanoseconds(value: object) -> int:
    """A backend's modification time (a datetime, seconds, ISO or HTTP date text) in ns; 0 if
    none can be read from it."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            try:
                value = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return 0
    if isinstance(value, datetime.datetime):
        value = value.timestamp()
    if isinstance(value, (int, float)):
        return int(round(value * 1e9))
    return 0


def tar_members(tar: str, f: BinaryIO, shown: str, listed: bool = False) -> list[InputImage]:
    """The image members of the tar ``f`` (from ``tar``), each an input whose path relative to
    its root is the member's name. Names that would leave the output folder (absolute, ``..``)
    are failed inputs, as is the rest of a tar cut short, and, when ``listed`` (one of many: a
    list's line, a brace pattern's shard), a tar that cannot be read at all."""
    import tarfile

    found: list[InputImage] = []
    try:
        with f, tarfile.open(fileobj=f, mode="r:") as archive:
            for info in archive:
                if not is_image_name(info.name):
                    continue
                member = TarMember(tar, info.name, info.offset_data, info.size, int(info.mtime * 1e9))
                if not info.isreg():  # a link or device named like an image: said, not dropped
                    kind = "link" if info.issym() or info.islnk() else "member that is no file"
                    reason = f"a {kind} in its tar, not read"
                    found.append(InputImage(Refused(member, reason), info.name, error=reason))
                    continue
                found.append(_checked(member, info.name))
    except tarfile.ReadError as e:
        if not found:
            reason = f"not a readable tar file ({_reason(e)}); only uncompressed tars are read"
            if listed:
                return [InputImage(shown, os.path.basename(shown) + "/", error=reason)]
            raise UsageError(f"{shown}: {reason}") from None
        found.append(InputImage(shown, os.path.basename(shown) + "/", error=f"tar cut short: {_reason(e)}"))
    except OSError as e:
        raise UsageError(f"cannot read {shown}: {e.strerror or e}") from None
    return found


def _expand_url(url: str, listed: bool) -> tuple[list[InputImage], bool]:
    """A URL: one file (listed URLs always; their existence is checked when read), a tar, a glob,
    or a folder searched recursively; and whether it named one file (keys.py)."""
    web = url.lower().startswith(("http://", "https://"))
    name = _url_name(url)
    if url.lower().endswith(TAR_SUFFIX):
        fs, inner = filesystem(url)
        try:
            f = fs.open(inner, "rb")
        except FileNotFoundError:
            if listed:
                return [InputImage(RemoteFile(url), name, error="does not exist")], True
            raise UsageError(f"input {url} does not exist") from None
        except Exception as e:
            raise UsageError(f"cannot read {url}: {_reason(e)}") from None
        return tar_members(url, f, url, listed), False
    if listed:
        return [InputImage(RemoteFile(url), name)], True
    fs, inner = filesystem(url)
    try:
        if _GLOB_CHARS & set(inner) and not web:
            root = inner[: min(inner.index(c) for c in _GLOB_CHARS if c in inner)].rsplit("/", 1)[0]
            found = _remote_images(fs, fs.glob(inner, detail=True), root)
            if not found:
                raise UsageError(f"pattern {url!r} matches no image files")
            return found, False
        # an http server's pages are not folders that can be trusted to list
        if not web and fs.isdir(inner):
            return _remote_images(fs, fs.find(inner, detail=True), inner.rstrip("/")), False
        if fs.exists(inner):
            return [InputImage(RemoteFile(url), name)], True
    except UsageError:
        raise
    except Exception as e:  # a backend's own error (no credentials, no network)
        raise UsageError(f"cannot list {url}: {_reason(e)}") from None
    raise UsageError(f"input {url} does not exist")


def _url_name(url: str) -> str:
    """The file name a URL ends in: a web URL's path is percent-encoded (the key is the file's
    own name), and "?" starts its query (a signed URL's), no glob."""
    name = posixpath.basename(url.split("?", 1)[0].rstrip("/"))
    return unquote(name) if url.lower().startswith(("http://", "https://")) else name


def _remote_images(fs: Any, listing: Mapping[str, dict], root: str) -> list[InputImage]:
    """The image files of an fsspec listing (path -> info), relative to ``root``."""
    found = []
    for path, info in sorted(listing.items()):
        if is_image_name(path) and info.get("type") == "file":
            rel = path[len(root) :].lstrip("/") if path.startswith(root) else posixpath.basename(path)
            found.append(_checked(RemoteFile(fs.unstrip_protocol(path)), rel))
    return found


def _not_found(e: FileNotFoundError) -> str:
    """Why a URL "does not exist": fsspec's HTTP backend says so of any failed request (a 500, a
    403, a refused connection), keeping the failure as the cause; that, where there is one."""
    cause = e.__cause__
    if cause is None or (getattr(cause, "status", None) == 404):
        return "does not exist"
    return f"cannot read: {_reason(cause)}"


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text or type(e).__name__
