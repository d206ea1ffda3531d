"""``--format shards``: WebDataset-compatible tar shards, an index, exact resume.

    OUT/shards/000000.tar, 000001.tar ...     (I-of-N-000000.tar ... for --shard I/N or a torchrun rank)
        <stem>.p2.npy ... <stem>.json           one image: its arrays (levels, then p3_avg, rois,
                                                boxes ...: regions.outputs), then its report.json entry
                                                with its input's record (resume.py) in ``record``
    OUT/shards/.index/000000.jsonl ...        one index part per shard: a line per image
    OUT/shards/index.jsonl                    every part merged, sorted by key (publish_report)
    OUT/report.json, OUT/.fpn-extract.json     as in the npy layout

**Member names.** WebDataset takes a sample's key to be a member's name up to the first dot of
its base name, and skips a first component like ``__x__/`` as metadata. An image's ``<stem>`` is
its key with ``%`` and, in the base name, ``.`` percent-escaped, and a leading ``__`` escaped as
``%5F_``: every key survives those rules, and ``urllib.parse.unquote(stem)`` gives it back (the
json member holds the real path too).

**Index lines.** ``{"key", "path", "shard", "input_size", "model_input_size", "members", "record",
"record_checksum"}``
(and ``replaces``, below), where ``members`` maps each member's suffix (``p2.npy``, ``json``) to
the ``offset`` of its data in the tar and its ``size``; an ``.npy`` member adds ``shape``,
``dtype`` (each its own: ``boxes.npy`` is float64 whatever the save dtype), ``data``, the
offset of the array's first byte, so a level is memory-mapped with no other read, and
``checksum``, its array's (npyio.py; also in the json member's ``checksums``, so that an index
rebuilt from the tar has them). ``record_checksum`` is the record's (:func:`record_checksum`; in
the json member too): a line whose record does not match it is not trusted (:func:`trusted_record`).
Readers, verify and a resume take a member only where the tar
header just before ``offset`` names it (``<stem>.p2.npy``) with the listed size: a tar swapped for
another, or a member moved, is never read as the image's. ``record`` is
the input's fingerprint the image was made from, as ``OUT/<key>/input.json`` holds it in the npy
layout; it is in the json member too, which is the group's last. Tar data starts on 512-byte
boundaries, and the ``.npy`` header is a multiple of 64 bytes, so arrays are 64-byte aligned.
index.jsonl's first line is a header; the rest are sorted by key, so a reader finds a key by
bisection over line offsets without parsing the file: millions of images cost a reader 8 bytes
each.

**Atomic shards, exact resume.** A shard is written under a temporary name and becomes
complete in two steps: its index part is written, then the tar is renamed into place (uploaded, for
a URL). Complete = a tar with its index part; a tar whose part is missing is scanned and its part
rewritten. A killed run leaves a temporary tar (swept) and perhaps a part without its tar
(deleted): its images are in no complete shard, so the next run computes them again, and every
image is in exactly one shard. Images never straddle shards (WebDataset groups a sample's members
within one tar); a shard closes once it holds ``--shard-size`` bytes. Each writer thread
(``--writers``) appends to a shard of its own, so an image's group is one thread's, written in
order; which shard an image lands in then depends on the threads' timing (with one writer, on
nothing: a rerun writes the same bytes).

**What a resume keeps.** An image in a complete shard is skipped when resume.py trusts its record
(the input is unchanged) and its group holds every array this run asks for, at exactly the
expected shapes (rois only for the same boxes). A complete shard is never rewritten, so any other
image is written whole into a new shard: recomputed, or, where the levels it keeps are trusted,
read back from the old group to derive what is missing (a run adding ``--pool`` or ``--boxes``
needs no network). Its new line (and json member) names the shard it ``replaces``; the index and
every reader take, for a key, the line no other line replaces, so each image is listed once. The
old group stays in its tar, unlisted: WebDataset reading the tars directly sees it too (one
``--overwrite`` run rewrites the shards without them).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import mmap
import os
import queue
import re
import shutil
import sys
import tarfile
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote

import numpy as np

from fpn_cli.errors import FPNError, UsageError
from fpn_cli.formats import codecs, tario
from fpn_cli.formats.base import (
    Features,
    Format,
    Shape,
    derived_names,
    human_bytes,
    npy_size,
)
from fpn_cli.formats.locks import (
    check_settings,
    finish_overwrite,
    lock_folder,
    overwrite_marker_name,
    record_settings,
    settings_to_record,
)
from fpn_cli.formats.npyio import (
    check_regular,
    checksum,
    is_checksum,
    open_regular,
    range_checksum,
    read_header,
)
from fpn_cli.formats.npyio import load as npy_load
from fpn_cli.inputs.keys import shard_of
from fpn_cli.inputs.urls import Folder
from fpn_cli.layout import (
    HOST,
    OVERWRITE_MARKER,
    REPORT_FILE,
    SETTINGS_FILE,
    create_folder,
    sweep_dead_writers,
    temporary_name,
)
from fpn_cli.layout import SHARDS_DIR as REPORTS_DIR  # job arrays' report parts: OUT/.shards
from fpn_cli.models.levels import LEVELS

SHARDS = "shards"  # under OUT: the tars, their index parts and index.jsonl
PARTS = f"{SHARDS}/.index"  # one index part per shard
INDEX = f"{SHARDS}/index.jsonl"
DEFAULT_SHARD_SIZE = 1_000_000_000
INDEX_FORMAT = "fpn-extract shards"
INDEX_VERSION = 1
_SHARD_NAME = re.compile(r"^(?:(\d+)-of-(\d+)-)?(\d{6,})\.tar$")
_LINE_SCAN = 1 << 26  # bytes of index scanned for line ends at a time
_MAPS_KEPT = 64  # shards a reader keeps memory-mapped


def member_stem(key: str) -> str:
    """The name an image's members share in a tar, before their suffixes (module docstring).

    >>> member_stem("x/img.2024.01"), member_stem("__meta__/a"), member_stem("100%")
    ('x/img%2E2024%2E01', '%5F_meta__/a', '100%25')
    """
    folder, slash, base = key.rpartition("/")
    stem = folder.replace("%", "%25") + slash + base.replace("%", "%25").replace(".", "%2E")
    return "%5F" + stem[1:] if stem.startswith("__") else stem


def check_keys(keyed: Iterable[tuple[str, str]]) -> None:
    """(key, input path) pairs whose key is no path inside the output folder (an empty part,
    ``.`` or ``..``) are a :class:`UsageError`: a tar with such member names is unsafe to unpack."""
    for key, source in keyed:
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise UsageError(f"{source} would write {key}, which is not a path inside the output folder")


def key_of(stem: str) -> str:
    return unquote(stem)


def safe_key(stem: str) -> str | None:
    """The key of a member stem that fpn-extract writes (the stem :func:`member_stem` gives it):
    a path inside the output folder. None for any other stem (``../../x``, ``/etc/x``, ``a//b``)."""
    key = key_of(stem)
    if any(part in ("", ".", "..") for part in key.split("/")) or member_stem(key) != stem:
        return None
    return key


def array_suffixes() -> frozenset[str]:
    """The member suffixes an image's group may hold: ``json`` and ``<array>.npy`` for every
    array a run may store (levels, int8 scales, pooled vectors, rois, boxes)."""
    arrays = (*LEVELS, *(codecs.scale_name(level) for level in LEVELS), *derived_names())
    return frozenset({"json", *(f"{name}.npy" for name in arrays)})


def stem_of(member: str) -> tuple[str, str] | None:
    """(stem, suffix) of a member name, by WebDataset's rule; None where it finds no key."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", member)
    return (match.group(1), match.group(2)) if match else None


def _prefix(shard: tuple[int, int] | None) -> str:
    """Shard names of a job array's part (or torchrun rank) start with ``I-of-N-``."""
    if shard is None:
        return ""
    index, count = shard
    return f"{index:0{len(str(count - 1))}d}-of-{count}-"


def _parse(name: str) -> tuple[tuple[int, int] | None, int] | None:
    """(partition or None, sequence number) of a complete shard's file name; None for others."""
    match = _SHARD_NAME.match(name)
    if not match:
        return None
    part = (int(match.group(1)), int(match.group(2))) if match.group(1) else None
    return part, int(match.group(3))


def _part_name(shard_name: str) -> str:
    return f"{PARTS}/{shard_name[: -len('.tar')]}.jsonl"


@dataclass
class _Group:
    """The image being written: where it began (to cut it off if it fails), its members and the
    record of its input (written with the json member, last)."""

    key: str
    start: int
    members: dict[str, dict] = field(default_factory=dict)
    record: dict | None = None


@dataclass
class _OpenShard:
    name: str
    writer: tario.TarWriter
    lines: list[dict] = field(default_factory=list)  # index lines of the finished images
    group: _Group | None = None


class ShardStore:
    """The shard format's writer side (a :class:`~fpn_cli.formats.base.Storage`): ``root`` is a
    local folder or an fsspec URL; ``shard`` the job array's part (or torchrun rank) whose shards
    this run writes. Each writer thread writes its images into an open shard of its own; the
    rest runs before or after them. An image is written whole or kept whole (module docstring):
    not ``in_place``."""

    format = "shards"
    in_place = False

    def __init__(
        self,
        root: str | os.PathLike[str],
        levels: Iterable[str],
        save_dtype: str,
        shard_size: int = DEFAULT_SHARD_SIZE,
        shard: tuple[int, int] | None = None,
        holds_features: Callable[[Path], bool] | None = None,
    ) -> None:
        self.folder = Folder(root)
        # whether a local folder holds any format's features (the registry's answer; else ours)
        self.holds_features = holds_features or holds
        self.levels = tuple(levels)
        self.save_dtype = codecs.check_save_dtype(save_dtype)
        self.dtype = codecs.code_dtype(save_dtype)  # the levels' own arrays (codecs.py's code dtype)
        self.shard_size = shard_size
        self.shard = shard
        self._prefix = _prefix(shard)
        self._complete: dict[str, dict] | None = None  # key -> index line: this run's complete images
        self._reading = threading.Lock()  # the resume check asks from several threads
        self._thread = threading.local()  # .shard: the writer thread's open shard
        self._opened: list[_OpenShard] = []  # every thread's open shard, for flush()
        self._opening = threading.Lock()  # guards _opened, _next and _uploads
        self._next: int | None = None  # the sequence number of the next shard
        self._uploads: _Uploads | None = None
        self._arrays = _Arrays(self.folder)
        self._sizes: dict[str, int | None] = {}  # shard -> its length, for member_shape

    # -- who may write, with which settings --------------------------------------------------

    def lock(self) -> contextlib.AbstractContextManager[None]:
        if self.folder.remote:  # an object store has no locks: two runs on one URL are not stopped
            return contextlib.nullcontext()
        return lock_folder(self.folder.path(""), self.shard)

    def record_settings(self, settings: Mapping[str, object], overwrite: bool) -> dict | None:
        shards = [(name, parsed[0]) for name in self.folder.names(SHARDS) if (parsed := _parse(name))]
        if overwrite:
            self._check_layout(shards)
        if self.folder.remote:
            raw = self.folder.read_bytes(SETTINGS_FILE)
            pending = [n for n in self.folder.names() if n.startswith(OVERWRITE_MARKER)]
            try:
                recorded = json.loads(raw) if raw else None
            except ValueError:
                recorded = None
            recorded = recorded if isinstance(recorded, dict) else None
            wrote = self.folder.names(SHARDS) or REPORT_FILE in self.folder.names()
            unknown = recorded is None and bool(wrote)
            check_settings(self.folder, recorded, settings, pending, overwrite, unknown)
            if overwrite:
                self.folder.write(overwrite_marker_name(self.shard), lambda f: None)
            text = json.dumps(settings_to_record(recorded, settings), indent=2, allow_nan=False).encode()
            self.folder.write(SETTINGS_FILE, lambda f: f.write(text))
        else:
            root = self.folder.path("")
            recorded = record_settings(root, settings, overwrite, self.shard, self.holds_features)
            self.folder.makedirs(PARTS)
        for name, part in shards if overwrite else ():  # this run's part of the shards goes
            if self._owns(part):
                self.folder.remove(_part_name(name))
                self.folder.remove(f"{SHARDS}/{name}")
        return recorded

    def finish_overwrite(self) -> None:
        if self.folder.remote:
            self.folder.remove(overwrite_marker_name(self.shard))
        else:
            finish_overwrite(self.folder.path(""), self.shard)

    def sweep_dead_runs(self) -> None:
        """Deletes what dead runs left, then reads the complete shards once, before the run
        begins: a key that two shards hold (a stray copy of a tar) stops it here, with the
        tars named, and report.json stays as it was."""
        if self.folder.remote:
            sweep_dead_writers(_staging())
        else:
            root = self.folder.path("")
            for rel in ("", REPORTS_DIR, SHARDS, PARTS):
                sweep_dead_writers(root / rel)
        self._completed()

    def _check_layout(self, shards: list[tuple[str, tuple[int, int] | None]]) -> None:
        """``--overwrite`` replaces this run's part of the shards; shards of another ``--shard``
        layout may hold this run's images too, so they are a usage error, before anything changes."""
        for name, part in shards:
            if self.shard is not None and (part is None or part[1] != self.shard[1]):
                raise UsageError(
                    f"{self.folder.url(SHARDS)} holds shards of another --shard layout ({name}), which "
                    "may hold this run's images: --overwrite them with that layout, or remove them"
                )

    def _owns(self, part: tuple[int, int] | None) -> bool:
        """Whether shards of job-array part ``part`` are this run's to replace."""
        return self.shard is None or part == self.shard

    # -- what is stored, for a resume ---------------------------------------------------------

    def present(self, key: str) -> bool:
        return key in self._completed()

    def read_record(self, key: str) -> dict | None:
        line = self._completed().get(key)
        return trusted_record(line) if line is not None else None

    def stored_shape(self, key: str, name: str, dtype: np.dtype) -> Shape | None:
        """The member's shape if it is whole and ``key``'s own (:func:`member_shape`)."""
        member = self._member(key, name)
        if member is None:
            return None
        shard = self._completed()[key]["shard"]
        named = f"{member_stem(key)}.{name}.npy"
        return member_shape(self.folder, shard, member, dtype, self._sizes, named)

    def content_matches(self, key: str, name: str) -> bool:
        """Whether the member's array has the checksum its index line gives (True where the line
        gives none: an earlier version's, checked by shape alone)."""
        member = self._member(key, name)
        if member is None:
            return False
        return member_content(self.folder, self._completed()[key]["shard"], member) is not False

    def is_stored(self, key: str, name: str) -> bool:
        return self._member(key, name) is not None

    def shapes(
        self, key: str, names: Iterable[str], dtypes: Mapping[str, np.dtype] | None = None
    ) -> dict[str, Shape]:
        found = {}
        for name in names:
            dtype = (dtypes or {}).get(name) or codecs.array_dtype(self.save_dtype, name, self.levels)
            shape = self.stored_shape(key, name, dtype)
            if shape is not None and self.content_matches(key, name):
                found[name] = shape
        return found

    def read_array(self, key: str, name: str) -> np.ndarray:
        line = self._completed()[key]
        member = line["members"][f"{name}.npy"]
        return self._arrays.array(line["shard"], member, f"{member_stem(key)}.{name}.npy")

    def read_levels(self, key: str) -> dict[str, np.ndarray]:
        names = [name for level in self.levels for name in codecs.array_names(level, self.save_dtype)]
        return {name: self.read_array(key, name) for name in names}

    def _member(self, key: str, name: str) -> dict | None:
        line = self._completed().get(key)
        return line["members"].get(f"{name}.npy") if line is not None else None

    def _completed(self) -> dict[str, dict]:
        """Index lines of the images this run owns that are in complete shards (the newest line
        of each key), read once."""

        with self._reading:
            if self._complete is None:
                found = complete_lines(self.folder, repair=True, clean=self._owns)
                self._complete = {
                    key: line
                    for key, line in newest(found, self.folder.url(SHARDS)).items()
                    if self.shard is None or shard_of(key, self.shard[1]) == self.shard[0]
                }
            return self._complete

    # -- writing images -------------------------------------------------------------------

    def write_levels(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        shard, group = self._group(key)
        stem = member_stem(key)
        for name, array in arrays.items():
            member = shard.writer.add_array(f"{stem}.{name}.npy", array)
            header = member.size - array.nbytes
            group.members[f"{name}.npy"] = {
                "offset": member.offset,
                "size": member.size,
                "shape": list(array.shape),
                "dtype": array.dtype.str,
                "data": member.offset + header,
                "checksum": member.checksum,
            }

    def write_preview(self, key: str, picture) -> None:
        raise UsageError("--preview is for the npy layout")  # Options refuses it first

    def finish_image(self, key: str, record: Mapping[str, object] | None, entry: dict) -> None:
        shard, group = self._group(key)
        group.record = dict(record) if record is not None else None
        old = self._completed().get(key)
        extra = {}
        if group.record is not None:
            extra = {"record": group.record, "record_checksum": record_checksum(group.record)}
        if old is not None:
            extra["replaces"] = old["shard"]
        sums = {suffix: m["checksum"] for suffix, m in group.members.items() if "checksum" in m}
        member = shard.writer.add_bytes(
            f"{member_stem(key)}.json",
            json.dumps({**entry, **extra, "checksums": sums}, allow_nan=False).encode(),
        )
        group.members["json"] = {"offset": member.offset, "size": member.size}
        shard.writer.flush()  # a write error fails this image, before it is indexed
        shard.lines.append(_line(key, entry, shard.name, group.members, extra))
        shard.group = None
        if shard.writer.position >= self.shard_size:
            self._close_shard()

    def flush(self) -> None:
        """Closes every open shard with its whole images (an image cut short by an error is cut
        off) and waits for the uploads. Called once the writer threads are done."""
        try:
            first: FPNError | None = None
            for shard in list(self._opened):
                try:
                    self._close_shard(shard)
                except FPNError as e:
                    first = first or e
            if first is not None:
                raise first
        finally:
            uploads, self._uploads = self._uploads, None
            if uploads is not None:
                uploads.wait()

    def location(self, key: str, name: str) -> dict[str, str]:
        shard = self._open
        if shard is not None and shard.group is not None and shard.group.key == key:
            file = shard.name
        else:
            file = self._completed()[key]["shard"]
        return {"file": f"{SHARDS}/{file}", "member": f"{member_stem(key)}.{name}.npy"}

    def preview_file(self, key: str) -> str | None:
        return None

    def where(self, key: str) -> str:
        shard = self._open
        return self.folder.url(f"{SHARDS}/{shard.name}" if shard else SHARDS)

    @property
    def _open(self) -> _OpenShard | None:
        """This writer thread's open shard."""
        shard = getattr(self._thread, "shard", None)
        return shard if shard is not None and shard in self._opened else None  # flush() closed it

    def _group(self, key: str) -> tuple[_OpenShard, _Group]:
        """This thread's open shard (opened if need be) and ``key``'s group in it."""
        shard = self._open
        if shard is None:
            shard = self._thread.shard = self._new_shard()
        if shard.group is None or shard.group.key != key:
            if shard.group is not None:  # the last image never finished: cut it off
                shard.writer.rollback(shard.group.start)
            shard.group = _Group(key, shard.writer.position)
        return shard, shard.group

    def _new_shard(self) -> _OpenShard:
        with self._opening:
            if self._next is None:
                names = self.folder.names(SHARDS) + [
                    n[: -len(".jsonl")] + ".tar" for n in self.folder.names(PARTS)
                ]
                mine = [p[1] for p in map(_parse, names) if p is not None and p[0] == self.shard]
                self._next = max(mine, default=-1) + 1
            name = f"{self._prefix}{self._next:06d}.tar"
            self._next += 1
            if self.folder.remote:
                tmp = _staging() / f".{name}~{HOST}~{os.getpid()}.tmp"
            else:
                tmp = temporary_name(self.folder.path(f"{SHARDS}/{name}"))
            shard = _OpenShard(name, tario.TarWriter(tmp))
            self._opened.append(shard)
            return shard

    def _close_shard(self, shard: _OpenShard | None = None) -> None:
        """A shard (by default this thread's open one), with its finished images, becomes
        complete: index part, then tar."""
        shard = shard or self._open
        if shard is None:
            return
        with self._opening:
            self._opened.remove(shard)
        if shard.group is not None:
            shard.writer.rollback(shard.group.start)
        if not shard.lines:
            shard.writer.abort()
            return
        part = "".join(json.dumps(line, allow_nan=False) + "\n" for line in shard.lines).encode()
        try:
            shard.writer.close()
            if not self.folder.remote:
                self.folder.write(_part_name(shard.name), lambda f: f.write(part))
                self.folder.put(shard.writer.path, f"{SHARDS}/{shard.name}")
        except OSError as e:
            shard.writer.abort()
            where = self.folder.url(f"{SHARDS}/{shard.name}")
            raise FPNError(
                f"cannot write {where}: {e.strerror or e}; its {len(shard.lines)} images are computed "
                "again by the next run"
            ) from None
        if self.folder.remote:
            with self._opening:
                if self._uploads is None:
                    self._uploads = _Uploads(self.folder)
                uploads = self._uploads
            uploads.put(shard.writer.path, shard.name, part)

    # -- the run's files --------------------------------------------------------------------

    def write_report(self, write: Callable[[BinaryIO], object]) -> None:
        """report.json, then the index of every complete image, published with it."""
        self.folder.write(REPORT_FILE, write)
        self.publish_index()

    def write_shard_report(self, index: int, count: int, write: Callable[[BinaryIO], object]) -> None:
        self.folder.makedirs(REPORTS_DIR)
        self.folder.write(f"{REPORTS_DIR}/report-{index}-of-{count}.json", write)

    def read_shard_reports(self, count: int) -> list[dict] | None:
        parts = []
        for index in range(count):
            raw = self.folder.read_bytes(f"{REPORTS_DIR}/report-{index}-of-{count}.json")
            try:
                parts.append(json.loads(raw or b""))
            except ValueError:
                return None
        return parts

    def publish_index(self) -> None:
        """index.jsonl from every complete shard's part: a header line, then one line per image,
        sorted by key."""
        chosen = newest(complete_lines(self.folder, repair=True), self.folder.url(SHARDS))
        lines = sorted((key, json.dumps(line, allow_nan=False)) for key, line in chosen.items())
        shards = len({json.loads(text)["shard"] for _, text in lines}) if lines else 0
        header = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "images": len(lines),
            "shards": shards,
            "levels": list(self.levels),
            "save_dtype": self.save_dtype,
        }

        def write(f: BinaryIO) -> None:
            f.write((json.dumps(header, allow_nan=False) + "\n").encode())
            for _, text in lines:
                f.write((text + "\n").encode())

        self.folder.write(INDEX, write)


def holds(root: Path) -> bool:
    """Whether the local folder ``root`` holds shards."""
    return (root / SHARDS).is_dir()


def remove_layout(root: Path) -> None:
    """Deletes the shards (tars, index parts, index) under the local folder ``root``: an
    ``--overwrite`` run into another format must not leave them for readers to find."""
    shutil.rmtree(root / SHARDS, ignore_errors=True)


# bytes before a member's data read beyond fpn-extract's own header: another tool's header for the
# same member may be longer (PAX records beyond the path, such as GNU tar's times)
_FOREIGN_HEADER_SLACK = 2 * tario.BLOCK


def header_span(name: str, size: int) -> int:
    """How many bytes before a member's data :func:`header_names` needs to see."""
    return len(tario.member_header(name, size)) + _FOREIGN_HEADER_SLACK


def header_names(before: bytes, name: str, size: int) -> bool:
    """Whether ``before``, the tar's bytes just before a member's data (:func:`header_span` of
    them, or all there are), end with the header of a regular member ``name`` of ``size`` bytes:
    byte for byte the header fpn-extract writes (tario.member_header, PAX blocks for long names
    included), or else (a tar from another tool) header blocks that tarfile reads as that member,
    its long name from PAX records or GNU's ././@LongLink included, ending where the data begins."""
    header = tario.member_header(name, size)
    if before[-len(header) :] == header:
        return True
    for blocks in range(1, len(before) // tario.BLOCK + 1):  # a long name's blocks precede its ustar block
        region = bytes(before[-blocks * tario.BLOCK :])
        try:
            with tarfile.open(fileobj=io.BytesIO(region), mode="r:") as tar:
                info = tar.firstmember
        except (tarfile.TarError, ValueError, EOFError, UnicodeError):
            continue
        if info is not None and info.offset_data == len(region) and info.isreg():
            if info.name == name and info.size == size:
                return True
    return False


def member_shape(
    folder: Folder,
    shard: str,
    member: Mapping,
    dtype: np.dtype,
    sizes: dict[str, int | None],
    name: str | None = None,
) -> Shape | None:
    """The shape of an index line's ``.npy`` member if it is whole in its tar: its data lies
    within the tar (a cut copy ends short), the tar header before it names it ``name`` with the
    listed size (:func:`header_names`; not checked without ``name``), its ``.npy`` header gives the
    dtype and shape the index lists, and its data starts where the index says; else None.
    ``sizes`` caches each tar's length (None: no regular file). The one check of a member, for a
    resume and for verify (the content is :func:`member_content`'s)."""
    rel = f"{SHARDS}/{shard}"
    if rel not in sizes:
        sizes[rel] = folder.size(rel)
    size = sizes[rel]
    try:
        offset, length, listed = int(member["offset"]), int(member["size"]), tuple(member["shape"])
        if size is None or offset + length > size or np.dtype(member["dtype"]) != dtype:
            return None
        if name is not None:
            before = header_span(name, length)
            start = max(0, offset - before)
            if not header_names(folder.read_range(rel, start, offset - start), name, length):
                return None
        shape, _, found = read_header(io.BytesIO(folder.read_range(rel, offset, min(length, 4096))))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    data = offset + length - int(np.prod(listed)) * dtype.itemsize
    if shape != listed or found != dtype or data != member.get("data"):
        return None
    return shape


def member_content(folder: Folder, shard: str, member: Mapping) -> bool | None:
    """Whether an index line's ``.npy`` member's array bytes have the checksum the line gives
    (None: it gives none, an index of an earlier version)."""
    recorded = member.get("checksum")
    if not is_checksum(recorded):
        return None
    rel = f"{SHARDS}/{shard}"
    try:
        start = int(member["data"])
        length = int(member["offset"]) + int(member["size"]) - start
        if folder.remote:
            return checksum(folder.read_range(rel, start, length)) == recorded
        with open_regular(folder.path(rel)) as f:
            return range_checksum(f, start, length) == recorded
    except (OSError, ValueError, TypeError, KeyError, FPNError):
        return False


def _staging() -> Path:
    """Where shards bound for a URL are written before their upload."""
    folder = Path(tempfile.gettempdir()) / "fpn-extract-staging"
    create_folder(folder)
    return folder


class _Uploads:
    """Uploads finished shards on a thread of its own, one at a time, while the next is written;
    at most one waits, so the staging disk holds at most three shards. The first failure is
    raised by the next :meth:`put` or by :meth:`wait`."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: FPNError | None = None
        self.thread = threading.Thread(target=self._loop, name="fpn-upload", daemon=True)
        self.thread.start()

    def put(self, local: Path, name: str, part: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((local, name, part))

    def wait(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while (task := self.queue.get()) is not None:
            local, name, part = task
            try:
                if self.error is None:
                    self.folder.write(_part_name(name), lambda f, part=part: f.write(part))
                    self.folder.put(local, f"{SHARDS}/{name}")
            except Exception as e:  # the thread must live on: a dead uploader would hang the writer
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.error = FPNError(f"cannot upload {self.folder.url(f'{SHARDS}/{name}')}: {reason}")
            finally:
                local.unlink(missing_ok=True)


def complete_lines(
    folder: Folder, repair: bool = False, clean: Callable[[tuple[int, int] | None], bool] | None = None
) -> Iterator[dict]:
    """The index lines of every complete shard in ``folder``: from its index part or, where that
    is missing, by scanning the tar (and, with ``repair``, writing the part). ``clean(partition)``
    says whose parts without a tar (a killed run's) may be deleted."""
    tars = [n for n in folder.names(SHARDS) if _parse(n) is not None]
    parts = set(folder.names(PARTS))
    for stray in sorted(parts - {_part_name(n).rsplit("/", 1)[1] for n in tars}):
        parsed = _parse(stray[: -len(".jsonl")] + ".tar")
        if clean is not None and parsed is not None and clean(parsed[0]):
            folder.remove(f"{PARTS}/{stray}")
    for name in tars:
        # a part that is no regular file (a FIFO) is not listed: it counts as missing, never read
        part = _part_name(name)
        lines = _read_part(folder.read_bytes(part), name) if part.rsplit("/", 1)[1] in parts else None
        if lines is None:  # no index part, or one that is not ours: the tar is scanned
            try:
                lines = scan_shard(folder, name)
            except (tarfile.TarError, OSError, ValueError, EOFError):
                # unreadable, and nothing says which images it held: none of them is complete
                # (they are computed again); set aside, so that no reader takes it for a shard
                if repair and not folder.remote:
                    os.replace(folder.path(f"{SHARDS}/{name}"), folder.path(f"{SHARDS}/{name}.unreadable"))
                continue
            if repair:
                text = "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines).encode()
                folder.write(_part_name(name), lambda f, text=text: f.write(text))
        yield from lines


def _read_part(raw: bytes | None, shard: str) -> list[dict] | None:
    """An index part's lines; None if there is none or it is damaged (not JSON lines of objects
    with a string key, each of ``shard``: a part copied over another's is not this tar's)."""
    if raw is None:
        return None
    try:
        lines = [json.loads(text) for text in raw.decode().splitlines() if text]
    except ValueError:
        return None
    if not all(_whole_line(line, shard) for line in lines):
        return None
    return lines


def _whole_line(line: object, shard: str) -> bool:
    """Whether an index part's ``line`` is one of ``shard``'s, whole: a string key, the shard's
    name, members that are each an object with an integer offset and size."""
    if not (isinstance(line, dict) and isinstance(line.get("key"), str) and line.get("shard") == shard):
        return False
    members = line.get("members")
    return isinstance(members, dict) and all(
        isinstance(m, dict) and isinstance(m.get("offset"), int) and isinstance(m.get("size"), int)
        for m in members.values()
    )


def scan_shard(folder: Folder, name: str, log: Callable[[str], None] | None = None) -> list[dict]:
    """A shard's index lines, rebuilt from the tar: members grouped by stem, each image's json
    member read for its path and sizes (and its arrays' checksums), each ``.npy`` header for its
    array. A group without its json member was never finished and is left out. Members that no
    run writes are never taken for an image's: a name that is not ``<stem>.<array>.npy`` or
    ``<stem>.json`` of a safe key (:func:`safe_key`: no ``../x.p2.npy``), a group whose json
    member is not the entry of that key; ``log`` (stderr by default) names each one skipped."""
    where = folder.url(f"{SHARDS}/{name}")
    say = log or _warn
    suffixes = array_suffixes()
    with folder.open(f"{SHARDS}/{name}") as f:
        members = list(tario.scan(f))
        groups: dict[str, dict[str, tario.Member]] = {}
        for member in members:
            parsed = stem_of(member.name)
            if parsed is None or safe_key(parsed[0]) is None or parsed[1] not in suffixes:
                say(f"warning: {where}: skipped member {member.name!r}: not a member fpn-extract writes")
                continue
            group = groups.setdefault(parsed[0], {})
            if parsed[1] in group:  # appended after the group: the first is the one written with it
                say(f"warning: {where}: skipped member {member.name!r}: a second member of that name")
                continue
            group[parsed[1]] = member
        lines = []
        for stem, group in groups.items():
            if "json" not in group:
                continue
            f.seek(group["json"].offset)
            try:
                entry = json.loads(f.read(group["json"].size))
            except ValueError:
                entry = None
            key = key_of(stem)
            if not isinstance(entry, dict) or os.path.splitext(str(entry.get("path")))[0] != key:
                say(f"warning: {where}: skipped the members of {stem!r}: its json member is not its entry")
                continue
            sums = entry.get("checksums") if isinstance(entry.get("checksums"), dict) else {}
            described = {}
            for suffix, member in group.items():
                described[suffix] = {"offset": member.offset, "size": member.size}
                if suffix.endswith(".npy"):
                    f.seek(member.offset)
                    shape, _, dtype = read_header(f)
                    described[suffix] |= {
                        "shape": list(shape),
                        "dtype": dtype.str,
                        "data": f.tell(),
                    }
                    if is_checksum(sums.get(suffix)):
                        described[suffix]["checksum"] = sums[suffix]
            extra = {k: entry[k] for k in ("record", "record_checksum", "replaces") if k in entry}
            lines.append(_line(key, entry, name, described, extra))
    return lines


def _warn(line: str) -> None:
    """What an index rebuild skipped, on stderr: one line each."""
    sys.stderr.write(line + "\n")


def record_checksum(record: Mapping[str, object]) -> str:
    """The checksum of an input's record as the index line and the json member hold it (its
    canonical JSON: sorted keys, no spaces)."""
    return checksum(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())


def trusted_record(line: Mapping[str, object]) -> dict | None:
    """An index line's record, or None where it is not a dict or its ``record_checksum`` does
    not match (a damaged line: a resume recomputes the image, verify reports it). A line of an
    earlier version has no checksum: its record is taken as it is."""
    record = line.get("record")
    if not isinstance(record, dict):
        return None
    if "record_checksum" in line and line["record_checksum"] != record_checksum(record):
        return None
    return record


def _line(key: str, entry: dict, shard: str, members: dict[str, dict], extra: dict) -> dict:
    """An image's index line: its key, path and sizes from its report ``entry``, where its
    ``members`` are in ``shard``, and ``extra`` (its ``record``, the shard it ``replaces``)."""
    return {
        "key": key,
        "path": entry.get("path"),
        "shard": shard,
        "input_size": entry.get("input_size"),
        "model_input_size": entry.get("model_input_size"),
        "members": members,
        **extra,
    }


def newest(lines: Iterable[dict], where: str) -> dict[str, dict]:
    """key -> the line of its newest group among ``lines``: the one no other line of the key
    ``replaces`` (a resume writes an image anew into a new shard and names the old one). Two lines
    of a key where neither replaces the other are an :class:`FPNError`: no run writes that."""
    by_key: dict[str, list[dict]] = {}
    for line in lines:
        by_key.setdefault(line["key"], []).append(line)
    chosen = {}
    for key, found in by_key.items():
        if len(found) > 1:
            replaced = {line.get("replaces") for line in found}
            found = [line for line in found if line["shard"] not in replaced]
            if len(found) != 1:
                tars = sorted({str(line["shard"]) for line in found})
                if len(tars) == 1:  # an index part edited by hand: the tar is scanned once it goes
                    raise FPNError(
                        f"image {key!r} is listed twice in the index part of {where}/{tars[0]}: delete "
                        f"{PARTS}/{tars[0][: -len('.tar')]}.jsonl (the tar is indexed again), then run again"
                    )
                raise FPNError(
                    f"image {key!r} is in {len(tars)} shards of {where} ({', '.join(tars)}), none of "
                    "which replaces the other: one is a copy. Move the copy (the tar, and its index "
                    f"part in {PARTS}/) out of {where}, then run again"
                )
        chosen[key] = found[0]
    return chosen


class ShardFeatures(Features):
    """The shard format's reader: index.jsonl (or, before a run has published it, the parts),
    bisected by key over its line offsets; arrays memory-mapped out of local tars, read by range
    out of remote ones."""

    format = "shards"

    def __init__(self, folder: Folder) -> None:
        self.folder = folder
        raw = None
        if not folder.remote:
            # open_regular: a FIFO in the index's place is refused at once, not waited on
            with contextlib.suppress(FileNotFoundError, ValueError), open_regular(folder.path(INDEX)) as f:
                raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            raw = folder.read_bytes(INDEX)
        if raw is None:  # no run has published one yet: what the complete shards hold
            chosen = newest(complete_lines(folder), folder.url(SHARDS))
            lines = sorted((key, json.dumps(line, allow_nan=False)) for key, line in chosen.items())
            header = json.dumps({"format": INDEX_FORMAT, "version": INDEX_VERSION}, allow_nan=False)
            raw = "".join(text + "\n" for text in [header, *(text for _, text in lines)]).encode()
        self._data = raw
        self._starts = _line_starts(raw)
        header = json.loads(bytes(raw[: self._starts[1]]))
        if header.get("format") != INDEX_FORMAT:
            raise FPNError(f"{folder.url(INDEX)} is not an fpn-extract shard index")
        self._arrays = _Arrays(folder)

    def __len__(self) -> int:
        return len(self._starts) - 2

    def line(self, index: int) -> dict:
        """Image ``index``'s index line (module docstring)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        raw = bytes(self._data[self._starts[index + 1] : self._starts[index + 2]])
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not (
            isinstance(line, dict)
            and isinstance(line.get("key"), str)
            and isinstance(line.get("shard"), str)
            and isinstance(line.get("members"), dict)
        ):
            raise FPNError(
                f"{self.folder.url(INDEX)}, line {index + 2}, is damaged: delete the index and run the "
                "extraction again (it rebuilds the index from the shards)"
            )
        return line

    def key_at(self, index: int) -> str:
        return self.line(index)["key"]

    def _find(self, key: str) -> dict | None:
        i = bisect.bisect_left(range(len(self)), key, key=self.key_at)
        if i < len(self):
            line = self.line(i)
            if line["key"] == key:
                return line
        return None

    def line_for(self, key: str) -> dict | None:
        """``key``'s index line, or None if the index has no such image."""
        return self._find(key)

    def _line_of(self, key: str) -> dict:
        line = self._find(key)
        if line is None:
            raise KeyError(key)
        return line

    def read(self, key: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        line = self._line_of(key)
        wanted = None if names is None else set(names)
        arrays = {}
        stem = member_stem(key)
        for suffix, member in line["members"].items():
            name = suffix[: -len(".npy")]
            if suffix.endswith(".npy") and (wanted is None or name in wanted):
                arrays[name] = self._arrays.array(line["shard"], member, f"{stem}.{suffix}")
        return arrays

    def entry(self, key: str) -> dict:
        line = self._line_of(key)
        member = line["members"]["json"]
        return json.loads(
            self.folder.read_range(f"{SHARDS}/{line['shard']}", member["offset"], member["size"])
        )


class _Arrays:
    """Arrays out of complete shards: memory-mapped out of local tars, read by range out of
    remote ones."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()  # a reader may be shared by threads

    def array(self, shard: str, member: dict, name: str) -> np.ndarray:
        """The ``.npy`` member (an index line's entry) of ``shard``, which must be the member
        ``name`` (:func:`header_names`): else an :class:`FPNError`, never another's array."""
        shape, dtype = tuple(member["shape"]), np.dtype(member["dtype"])
        where = self.folder.url(f"{SHARDS}/{shard}")
        offset, size = int(member["offset"]), int(member["size"])
        span = header_span(name, size)
        try:
            if self.folder.remote:  # the header and the data in one request
                start = max(0, offset - span)
                data = self.folder.read_range(f"{SHARDS}/{shard}", start, offset + size - start)
                named = header_names(data[: offset - start], name, size)
                array = npy_load(io.BytesIO(data[offset - start :])) if named else None
            else:
                mapped = self._map(shard)
                named = header_names(mapped[max(0, offset - span) : offset], name, size)
                count = int(np.prod(shape))
                array = np.frombuffer(mapped, dtype, count, member["data"]).reshape(shape) if named else None
        except (ValueError, EOFError) as e:  # the tar ends before the member: a cut copy
            raise FPNError(f"{where} is cut short or damaged where the index puts a member ({e})") from None
        if array is None:
            raise FPNError(
                f"{where} does not hold {name} where the index puts it (a tar swapped, replaced or "
                "edited since it was indexed): verify the folder, or run the extraction again"
            )
        return array

    def _map(self, shard: str) -> mmap.mmap:
        """The shard mapped, from a bounded set (arrays keep their own map alive when it leaves)."""
        with self._lock:
            mapped = self._maps.get(shard)
            if mapped is None:
                with open_regular(self.folder.path(f"{SHARDS}/{shard}")) as f:  # a FIFO: refused
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[shard] = mapped
                if len(self._maps) > _MAPS_KEPT:
                    self._maps.popitem(last=False)
            else:
                self._maps.move_to_end(shard)
            return mapped


def _line_starts(data: bytes | mmap.mmap) -> np.ndarray:
    """Offsets where each line starts, and the end: line i is data[starts[i]:starts[i + 1]]."""
    view = np.frombuffer(data, np.uint8)
    ends = [
        np.flatnonzero(view[s : s + _LINE_SCAN] == ord("\n")) + s + 1 for s in range(0, len(view), _LINE_SCAN)
    ]
    starts = np.concatenate([np.zeros(1, np.int64), *ends]).astype(np.int64)
    if starts[-1] != len(view):  # a last line without its newline
        starts = np.append(starts, len(view))
    return starts


class ShardFolder:
    """A local shards folder as verify reads it: an array is a member of the shard its index line
    names, checked by :func:`member_shape`; the record is the one in the image's index line."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = Folder(root)
        try:
            self.index = ShardFeatures(self.folder)
            for i in range(len(self.index)):  # every line whole: readers iterate them all
                self.index.line(i)
        except (FPNError, OSError, ValueError) as e:
            raise UsageError(f"cannot read the shard index of {root}: {e}") from None
        self._sizes: dict[str, int | None] = {}

    def array(self, key: str, info: dict, dtype: np.dtype) -> tuple[str, str | None, Shape | None]:
        shown = f"{info['file']}:{info.get('member')}"
        line = self.index.line_for(key)
        if line is None:
            return shown, f"{shown}: the image is not in {INDEX}", None
        name = str(info.get("member", "")).removeprefix(f"{member_stem(key)}.")
        member = line["members"].get(name)
        where = f"{SHARDS}/{line['shard']}"
        if member is None or info["file"] != where or not name.endswith(".npy"):
            return shown, f"{shown} is missing (the index has the image in {where})", None
        try:
            check_regular(self.root / where)
        except FPNError:
            return shown, f"{where} is not a regular file", None
        named = f"{member_stem(key)}.{name}"
        shape = member_shape(self.folder, line["shard"], member, dtype, self._sizes, named)
        if shape is None and member_shape(self.folder, line["shard"], member, dtype, self._sizes):
            return shown, f"{where} holds another member where the index puts {named}", None
        return shown, None, shape

    def content(self, key: str, info: dict) -> bool | None:
        """Whether the listed member's array has the checksum the index gives it (None: it
        gives none, an earlier version's index)."""
        line = self.index.line_for(key)
        name = str(info.get("member", "")).removeprefix(f"{member_stem(key)}.")
        member = line["members"].get(name) if line is not None else None
        return member_content(self.folder, line["shard"], member) if member is not None else None

    def boxes(self, rois: dict) -> dict:
        return {"file": rois.get("file"), "member": rois["boxes"]}

    def folder_problems(self) -> list[str]:
        """A key that two complete shards hold (a stray copy of a tar), which the next run
        refuses: found as a run finds it, without writing anything."""
        try:
            newest(complete_lines(self.folder), SHARDS)
        except FPNError as e:
            return [str(e)]
        return []

    def record(self, key: str) -> tuple[dict | None, str]:
        line = self.index.line_for(key)
        return (trusted_record(line) if line is not None else None), f"{member_stem(key)}.json"


def estimate(
    per_image: Sequence[tuple[int, Mapping[str, Shape]]], save_dtype: str, shard_size: int
) -> tuple[int, int]:
    """(bytes, files) that ``count`` images of each set of level shapes take as shards: tar
    headers and padding included; files are the tars (about total / ``shard_size``), an index
    part each, index.jsonl and report.json."""
    total = 0
    for count, shapes in per_image:
        group = 3 * tario.BLOCK  # the json member: a header, and an entry of under 1 kB
        for name, shape in shapes.items():
            dtype = codecs.array_dtype(save_dtype, name, LEVELS)
            group += tario.BLOCK + tario.padded(npy_size(shape, dtype))
        total += count * group
    images = sum(count for count, _ in per_image)
    # a shard closes once it holds shard_size: whole images of the average size to a shard
    per_shard = -(-shard_size * images // total) if total else 1
    shards = -(-images // per_shard)
    return total, 2 * shards + 2


def _open_store(
    out: str | os.PathLike[str],
    levels: Iterable[str],
    save_dtype: str,
    shard_size: int,
    shard: tuple[int, int] | None,
    holds_features: Callable[[Path], bool] | None = None,
) -> ShardStore:
    return ShardStore(out, levels, save_dtype, shard_size, shard, holds_features)


def _note(shard_size: int) -> str:
    return (
        f"tar shards of about {human_bytes(shard_size)} (--shard-size), an index part each, "
        "index.jsonl and report.json"
    )


FORMAT = Format(
    name="shards",
    open_store=_open_store,
    open_features=ShardFeatures,
    verify_reader=ShardFolder,
    estimate=estimate,
    note=_note,
    check_layout=check_keys,
    holds=holds,
    remove=remove_layout,
    urls=True,
)
