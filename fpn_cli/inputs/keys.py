"""Keys: the one rule that names an image in the output (its folder under OUT, its members in
shards, its ``path`` in report.json and in boxes files). DESIGN.md §9; docs/inputs.md.

An image's key is its path relative to a root, without the extension. A folder input's root is
that folder, a glob's the pattern's part before its first wildcard, a tar's members are named as
in the tar. Paths named one by one (file arguments, ``--list`` lines, ``-`` on stdin) share one
root: ``--root DIR`` when given, else their deepest common folder, so that two images with one base
name in different folders never collide, and a single file keeps its base name.
"""

from __future__ import annotations

import os
import posixpath
import re
import zlib
from collections.abc import Sequence
from urllib.parse import unquote

from fpn_cli.errors import UsageError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)([^?#]*)")


def output_key(rel: str) -> str:
    """An image's folder under OUT (its key): its path relative to its input root, without the
    extension. Where a report.json path is turned back into a key, this is the rule too.

    >>> output_key("x/cat.jpg")
    'x/cat'
    """
    return os.path.splitext(rel)[0]


def relative_paths(names: Sequence[str], root: str | None = None) -> list[str]:
    """Each of ``names`` (local paths or URLs) relative to ``root``, or, with no root, to the
    deepest folder common to them: posix, extension kept. Local paths are compared as absolute
    paths (lexically: symbolic links are not followed); URLs by their path, percent-decoded for
    http(s), without a query. URLs on different hosts or buckets, and local paths beside URLs,
    have no folder in common: each group has its own. A name outside ``root`` is a
    :class:`UsageError` naming it.

    >>> relative_paths(["data/cats/x.jpg", "data/dogs/x.jpg"])
    ['cats/x.jpg', 'dogs/x.jpg']
    >>> relative_paths(["a/b/cat.jpg"])
    ['cat.jpg']
    >>> relative_paths(["sub/coffee.jpg", "tea.jpg"])
    ['sub/coffee.jpg', 'tea.jpg']
    >>> relative_paths(["data/cats/x.jpg"], root="data")
    ['cats/x.jpg']
    >>> relative_paths(["s3://b/train/a.jpg", "s3://b/val/a.jpg", "https://h/p/b%20c.jpg?sig=1"])
    ['train/a.jpg', 'val/a.jpg', 'b c.jpg']
    """
    places = [_place(name) for name in names]
    if root is not None:
        origin, base = _place(root)
        rels = []
        for name, (where, parts) in zip(names, places, strict=True):
            if where != origin or len(parts) <= len(base) or parts[: len(base)] != base:
                raise UsageError(f"{name} is outside --root {root}: give a --root that holds every input")
            rels.append("/".join(parts[len(base) :]))
        return rels
    common: dict[str, tuple[str, ...]] = {}
    for where, parts in places:
        folder = parts[:-1]
        known = common.setdefault(where, folder)
        if known != folder:
            common[where] = _common_prefix(known, folder)
    return ["/".join(parts[len(common[where]) :]) for where, parts in places]


def _place(name: str) -> tuple[str, tuple[str, ...]]:
    """(origin, path parts): ``""`` and the absolute path's parts for a local path;
    ``scheme://host`` and the decoded path's parts for a URL."""
    match = _URL.match(name)
    if match is None or name.startswith("file://"):
        local = name[len("file://") :] if name.startswith("file://") else name
        parts = os.path.abspath(local).split(os.sep)
        return "", tuple(part for part in parts if part)
    origin, path = match.groups()
    web = origin.lower().startswith(("http://", "https://"))
    # decoded, then normalised: no name (``%2E%2E`` neither) leaves the output folder
    parts = posixpath.normpath("/" + (unquote(path) if web else path)).split("/")
    return origin, tuple(part for part in parts if part)


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) that owns the image with output key ``key``. A hash of the key, not a
    position in the list, so an image keeps its shard when other images are added or removed. A
    name that is not UTF-8 hashes as its bytes on disk (held as surrogates, os.fsdecode's way)."""
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % count
