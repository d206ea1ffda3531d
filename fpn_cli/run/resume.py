"""What a resume may keep. Each image's features are recorded with a fingerprint of the input they
were made from, in ``OUT/<key>/input.json``, written after every other file of the image (levels,
pooled vectors, rois and boxes, preview), so it also marks them complete::

    {"input": "/abs/path/cat.jpg", "path": "cat.jpg", "size": 48213,
     "mtime_ns": 1732590000123456789, "sha256": "9f86d0...", "input_size": [300, 451],
     "orientation": 1}

``sha256`` only with ``--hash``. An input that is no local file (images.Readable: a member of a
tar shard, an object behind a URL) is fingerprinted by what it offers: a tar member by its size
and the modification time in its tar header, recorded with ``"input"`` the tar and ``"member"``
its name; an object by the size and modification time its store reports and its ``version``
(ETag, generation) where there is one. The storage format keeps the record where its arrays are
(formats/: ``input.json`` beside them, or in a shard's json member).

For an image with stored features, :func:`examine` keeps a level
only if the record is there, the input is the same file (the same name, size in bytes and
modification time, and content hash where asked), and the level's file is a complete ``.npy`` of
exactly the shape the recorded input size and this run's settings give, holding the array
recorded for it (its checksum, recorded with the image by the storage format; an earlier
version's record has none, and its arrays are kept by their shape alone). Anything else is
recomputed, and the report says why. :func:`decide` then settles, per image and in every format,
what is kept, what is deleted and what is written: the levels :func:`examine` trusts, and the
arrays derived from them (regions.outputs.Outputs: complete at exactly their shapes, RoI
features only for the same boxes) only where the record is trusted and no level was wrong.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fpn_cli.errors import FPNError, ImageError
from fpn_cli.formats import codecs
from fpn_cli.inputs.deadline import ordered_map
from fpn_cli.inputs.images import InputImage, Readable, open_input, open_regular

if TYPE_CHECKING:
    from fpn_cli.formats.base import Storage
    from fpn_cli.regions.outputs import Outputs

Shape = tuple[int, ...]
NO_RECORD = "no fingerprint recorded with its features (an earlier version's, or an unfinished image)"


@dataclass(frozen=True)
class Fingerprint:
    """What identifies an input's content: its size and modification time, and a hash if asked."""

    size: int
    mtime_ns: int
    sha256: str | None = None
    version: str | None = None  # an object store's version of an input behind a URL (ETag)


def fingerprint(path: str | Readable, content_hash: bool = False) -> Fingerprint:
    """``path``'s fingerprint, taken before its pixels are read: a file changed meanwhile then
    looks changed to the next run, never the other way round. Opened without blocking; a file
    that is not regular is an :class:`ImageError`. A :class:`~fpn_cli.inputs.images.Readable` tells its
    own (``stat()``)."""
    if not isinstance(path, (str, os.PathLike)):
        size, mtime_ns, version = path.stat()
        digest = None
        if content_hash:
            with open_input(path) as f:
                digest = _sha256(f)
        return Fingerprint(size, mtime_ns, digest, version)
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        digest = _sha256(f) if content_hash else None
    return Fingerprint(st.st_size, st.st_mtime_ns, digest)


def _sha256(f) -> str:
    h = hashlib.sha256()
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()


def source(path: str | Readable) -> dict[str, str]:
    """Where a record says its input is: ``{"input": absolute path}`` for a local file, what a
    Readable says (``{"input": tar, "member": name}``, ``{"input": url}``) for others."""
    if isinstance(path, (str, os.PathLike)):
        return {"input": os.path.abspath(path)}
    return path.locator()


def record(image: InputImage, taken: Fingerprint, input_size: tuple[int, int], orientation: int) -> dict:
    """The record written with ``image``'s features: ``taken`` before its pixels were read,
    ``input_size`` (H, W) as decoded and the EXIF ``orientation`` applied (regions.geometry.Geometry's), so
    that a resume knows the image's geometry without reading the input again."""
    entry: dict = {
        **source(image.path),
        "path": image.rel,
        "size": taken.size,
        "mtime_ns": taken.mtime_ns,
    }
    if taken.version is not None:
        entry["version"] = taken.version
    if taken.sha256 is not None:
        entry["sha256"] = taken.sha256
    entry["input_size"] = list(input_size)
    entry["orientation"] = orientation
    return entry


def recorded_fingerprint(entry: dict) -> Fingerprint | None:
    """The fingerprint of a record that is whole: the input it names (``input``, and ``member``
    where there is one, as strings), its size and modification time; else None. The one test of a
    record, for a resume (which recomputes an image whose record is not whole, so that the record
    is written anew) and for verify (which reports it)."""
    if not isinstance(entry, dict):
        return None
    if not isinstance(entry.get("input"), str) or not isinstance(entry.get("member", ""), str):
        return None
    try:
        return Fingerprint(
            int(entry["size"]), int(entry["mtime_ns"]), entry.get("sha256"), entry.get("version")
        )
    except (KeyError, TypeError, ValueError):
        return None


def change(recorded: Fingerprint, path: str | Readable, content_hash: bool) -> str | None:
    """How the file at ``path`` differs from ``recorded``; None when it is the same. Compares the
    content hash when ``content_hash`` (a record without one then counts as changed: it cannot be
    shown to be the same), and whenever the record holds one (a folder made with --hash stays
    checked by content, as verify checks it). With ``content_hash`` and a recorded hash, content
    wins: a copy of the input (``cp -r`` gives it a new modification time) of the same bytes is
    the same input. Raises :class:`ImageError` if the file cannot be read now."""
    now = fingerprint(path)
    if now.size != recorded.size:
        return f"input changed: {recorded.size:,} bytes then, {now.size:,} now"
    if content_hash and recorded.sha256 is not None:
        if fingerprint(path, content_hash=True).sha256 != recorded.sha256:
            return "input changed: different content (sha256)"
        return None
    if now.mtime_ns != recorded.mtime_ns:
        return "input changed: modified since its features were written"
    if now.version != recorded.version:
        return f"input changed: version {recorded.version} then, {now.version} now"
    if content_hash or recorded.sha256 is not None:
        if recorded.sha256 is None:
            return "no content hash recorded (--hash): it cannot be shown to be the same input"
        if fingerprint(path, content_hash=True).sha256 != recorded.sha256:
            return "input changed: different content (sha256)"
    return None


@dataclass(frozen=True)
class Verdict:
    """What a resume may keep of an image whose folder exists."""

    kept: dict[str, Shape] = field(default_factory=dict)  # levels exactly as the input and settings give
    input_size: tuple[int, int] | None = None  # (H, W) as recorded
    recomputed: str | None = None  # why stored features were not trusted
    stale: bool = False  # the input changed: every stored file of the image is stale
    error: str | None = None  # the input cannot be read now: a failed input
    orientation: int = 1  # the EXIF orientation recorded
    fingerprint: Fingerprint | None = None  # as recorded, and found to be the input's now
    wrong: tuple[str, ...] = ()  # levels whose files are there but not as the input and settings give

    @property
    def trusted(self) -> bool:
        """The record is there and the input is the one it names: the image's files were made
        from this input (each still to be checked for its shape)."""
        return self.fingerprint is not None


def examine(
    image: InputImage, store: Storage, shapes: Callable[[int, int], dict[str, Shape]], content_hash: bool
) -> Verdict:
    """What of ``image``'s stored features a resume may keep; ``shapes(H, W)`` gives each level's
    (C, h, w) for an input of H x W as decoded, under this run's settings. A record that names
    the same input at another place (the input folder was moved) is updated to name it here."""
    entry = store.read_record(image.key)
    recorded = recorded_fingerprint(entry) if entry is not None else None
    size = _input_size(entry) if entry is not None else None
    orientation = _orientation(entry) if entry is not None else None
    if recorded is None or size is None or orientation is None:
        return Verdict(recomputed=NO_RECORD)
    try:
        if entry.get("path") != image.rel:
            changed = f"input changed: was {entry.get('path')}"
        else:
            changed = change(recorded, image.path, content_hash)
    except ImageError as e:
        return Verdict(error=str(e))
    if changed:
        return Verdict(recomputed=changed, stale=True)
    where = source(image.path)
    if content_hash:  # the same content, perhaps a copy with another modification time
        now = fingerprint(image.path)
        where = {**where, "mtime_ns": now.mtime_ns, **({"version": now.version} if now.version else {})}
        recorded = Fingerprint(recorded.size, now.mtime_ns, recorded.sha256, now.version)
    if store.in_place and any(entry.get(k) != v for k, v in where.items()):
        store.relocate_record(image.key, {**entry, **where})
    try:
        expected = shapes(*size)
    except FPNError as e:  # a recorded size the network cannot take (too small for it)
        return Verdict(error=str(e))
    kept, wrong, reasons = {}, [], []
    for level in store.levels:
        shape = store.stored_shape(image.key, level, store.dtype)
        if shape == expected[level] and not store.content_matches(image.key, level):
            reasons.append(f"{level}.npy does not hold the array recorded for it (its checksum differs)")
        elif shape == expected[level]:
            scales = _scales(image.key, level, store, shape[0])
            if isinstance(scales, dict):
                kept.update({level: shape, **scales})
                continue
            reasons.append(scales)
        elif shape is not None:
            reasons.append(f"{level}.npy is {_shape_text(shape)}, not {_shape_text(expected[level])}")
        elif store.is_stored(image.key, level):
            reasons.append(f"{level}.npy is not a complete {store.dtype} .npy file")
        else:
            continue  # not stored (yet, or --no-maps): what came from it came from this same input
        wrong.append(level)
    reason = "; ".join(reasons) or None
    return Verdict(kept, size, reason, orientation=orientation, fingerprint=recorded, wrong=tuple(wrong))


def _scales(key: str, level: str, store: Storage, channels: int) -> dict[str, Shape] | str:
    """The shapes of ``level``'s other stored arrays (int8: its scales, (C,) float32), or why they
    do not count: a level counts only with its codes and its scales, each at its exact shape."""
    found = {}
    for name in codecs.array_names(level, store.save_dtype)[1:]:
        shape = store.stored_shape(key, name, codecs.array_dtype(store.save_dtype, name, store.levels))
        if shape != (channels,):
            return f"{name}.npy is not a complete ({channels},) float32 .npy file"
        if not store.content_matches(key, name):
            return f"{name}.npy does not hold the array recorded for it (its checksum differs)"
        found[name] = shape
    return found


def _input_size(entry: dict) -> tuple[int, int] | None:
    try:
        h, w = (int(n) for n in entry["input_size"])
    except (KeyError, TypeError, ValueError):
        return None
    return h, w


def _orientation(entry: dict) -> int | None:
    value = entry.get("orientation")
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def examine_all(
    images: Sequence[InputImage],
    store: Storage,
    shapes: Callable[[int, int], dict[str, Shape]],
    content_hash: bool,
    workers: int,
    timeout: float | None,
) -> Iterator[Verdict]:
    """:func:`examine` for each of ``images``, in order, on ``workers`` threads; an input whose
    check runs past ``timeout`` seconds (a hung mount) is a failed input."""

    def late(image: InputImage) -> Verdict:
        return Verdict(error=f"timed out after {timeout:g} s reading it (--timeout)")

    return ordered_map(
        lambda image: examine(image, store, shapes, content_hash),
        images,
        workers=workers,
        lookahead=4 * workers,
        timeout=timeout,
        late=late,
        name="fpn-resume",
    )


def _shape_text(shape: Shape) -> str:
    return "x".join(map(str, shape))


@dataclass(frozen=True)
class Decision:
    """What a resume does with an image whose features are stored."""

    have: dict[str, Shape]  # the arrays kept (their shapes): not written again
    missing: tuple[str, ...]  # the arrays to write, in order
    from_disk: bool  # every level is kept: the rest is derived from the files, no forward pass


def decide(
    image: InputImage,
    names: tuple[str, ...],
    verdict: Verdict,
    store: Storage,
    outputs: Outputs,
    shapes: Callable[[int, int], dict[str, Shape]],
) -> Decision:
    """The one decision, per image, of what a resume keeps, deletes and recomputes of the image's
    arrays ``names`` (levels, pooled vectors, rois and boxes), given :func:`examine`'s
    ``verdict``. Kept: the levels the verdict trusts, and the derived arrays complete at exactly
    the shapes the levels give (rois only with boxes equal to the file's). Deleted, here: every
    file of the image when its input changed or its record is missing (the record written next
    must not vouch for them), every derived file when a stored level was wrong (they were made
    from it), RoI features of another boxes file. A store that writes an image whole (not
    ``in_place``: shards) writes every array again when anything is missing, the kept ones read
    back, and drops what may not stay by leaving it out."""
    have = _kept(image, verdict, store, outputs, shapes)
    missing = tuple(name for name in names if name not in have)
    from_disk = all(level in have for level in store.levels)
    unwanted = [name for name in outputs.unwanted(image.rel) if store.is_stored(image.key, name)]
    if unwanted:  # RoI features of another boxes file
        if store.in_place:
            store.forget_arrays(image.key, unwanted)
        else:
            missing = missing or names  # the image written again, without them
    if missing and not store.in_place:
        missing, have = names, {}
    return Decision(have, missing, from_disk)


def _kept(
    image: InputImage,
    verdict: Verdict,
    store: Storage,
    outputs: Outputs,
    shapes: Callable[[int, int], dict[str, Shape]],
) -> dict[str, Shape]:
    """Shapes of the image's arrays that may stay; what may not is deleted (:func:`decide`)."""
    if not verdict.trusted:
        if store.in_place:  # a whole-image store leaves them out of the image's new group
            store.forget(image.key)
        return {}
    if verdict.wrong:
        if store.in_place:
            store.forget_derived(image.key)
        return dict(verdict.kept)
    checked = _Examined(store, image.key, verdict.kept)  # the kept levels are not read again
    derived = outputs.complete(checked, image.key, image.rel, shapes(*verdict.input_size))
    return {**verdict.kept, **{n: s for n, s in derived.items() if n not in store.levels}}


class _Examined:
    """``store`` as :func:`decide` asks it about one image, after :func:`examine`: the arrays it
    kept (``kept``: shape and recorded checksum checked, nothing changed since under the lock)
    are answered from the verdict, so a resume reads each kept level's bytes once, not twice."""

    def __init__(self, store: Storage, key: str, kept: dict[str, Shape]) -> None:
        self._store, self._key, self._kept = store, key, kept

    def shapes(self, key: str, names, dtypes=None) -> dict[str, Shape]:
        names = list(names)
        known = self._kept if key == self._key else {}
        found = self._store.shapes(key, [n for n in names if n not in known], dtypes)
        return {n: known[n] if n in known else found[n] for n in names if n in known or n in found}

    def __getattr__(self, name: str):
        return getattr(self._store, name)
