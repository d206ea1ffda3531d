"""Pretrained files: a zoo entry's record, torch.hub's cache it lives in, and the download.

Files go through torch.hub's downloader into its cache, ``$TORCH_HOME/hub/checkpoints/``, under
the names each framework gives them (frameworks/ say which). Offline, or with
``FPN_EXTRACT_OFFLINE=1``, a missing file is an error that names the URL and the exact path where
a copy makes it work.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fpn_cli.errors import WeightsError
from fpn_cli.inputs.images import Resize
from fpn_cli.models.preprocess import Preprocess

OFFLINE_ENV = "FPN_EXTRACT_OFFLINE"  # set to 1 to never try a download


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def cache_root() -> Path:
    """torch.hub's ``checkpoints`` folder. Until torch is imported, by ``torch.hub.get_dir``'s own
    rule ($TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub), so that
    ``fpn-extract models`` needs no torch; once it is, torch's answer (``torch.hub.set_dir`` wins)."""
    hub = sys.modules.get("torch.hub")
    if hub is not None:
        return Path(hub.get_dir()) / "checkpoints"
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


@dataclass(frozen=True)
class ResizePolicy:
    """A framework's test-time resize: the shorter side to ``short_side``, unless the longer side
    would pass ``max_side`` (then the longer side to ``max_side``), aspect ratio kept. Applied only
    when asked (``Options.framework_resize``); the report records it either way."""

    short_side: int
    max_side: int
    source: str  # where the framework states it, for the docs and the report

    def resize(self) -> Resize:
        return Resize(short_side=self.short_side, max_side=self.max_side)

    def describe(self) -> str:
        return f"short {self.short_side}, max {self.max_side}"  # e.g. "short 800, max 1333"

    def to_json(self) -> dict:
        return {"short_side": self.short_side, "max_side": self.max_side, "source": self.source}


@dataclass(frozen=True)
class ZooEntry:
    """Everything a framework's config says about one pretrained backbone, and where its file is."""

    name: str  # "detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x"
    arch: str
    fpn_style: str
    levels: tuple[str, ...]  # the default levels: the detector's own pyramid
    preprocess: Preprocess
    url: str
    cache_name: str  # the file's path under $TORCH_HOME/hub/checkpoints
    size_mb: float | None  # download size, where the framework states it; else estimated
    read: Callable[[Path, str], object] = field(compare=False, repr=False)  # (path, source) -> Checkpoint
    size_estimated: bool = False
    bn_eps: float = 1e-5
    pad_multiple: int = 1
    md5_prefix: str | None = None  # detectron2 names files by md5, which torch.hub cannot check
    resize: ResizePolicy | None = None  # the detector's test-time resize

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0]

    @staticmethod
    def cache_root() -> Path:
        return cache_root()

    def path(self) -> Path:
        return cache_root() / self.cache_name

    def is_cached(self) -> bool:
        return self.path().is_file()

    def origin(self) -> WeightsOrigin:
        return WeightsOrigin(self.name, self.path(), self.url, self.md5_prefix)

    def load(self):
        """The entry's checkpoint, downloaded first if it is not in the cache."""
        path = fetch(self.url, self.path(), self.name, self.md5_prefix)
        return self.read(path, f"{self.name} ({path.name})")


class WeightsWarning(UserWarning):
    """A weights file that is used, but not the one its name promises."""


def _name_prefix(path: Path) -> str | None:
    """The SHA-256 prefix torch.hub's file names carry (``resnet50-11ad3fa6.pth``), if any."""
    found = re.search(r"-([a-f0-9]{6,})\.", path.name)
    return found.group(1) if found else None


@dataclass(frozen=True)
class WeightsOrigin:
    """The file a run's weights come from: its identity for report.json and the settings record,
    and a check of a downloaded file against the hash its name carries."""

    name: str  # the weights as recorded: a zoo name, "imagenet", a file's absolute path
    path: Path  # the file loaded
    url: str | None = None  # where it is downloaded from (zoo and ImageNet files)
    md5_prefix: str | None = None  # detectron2 names files by MD5; torch.hub's names carry SHA-256

    def identity(self) -> dict | None:
        """``{"name", "url", "file", "sha256"}`` of the file as it is now; None if it is absent. A
        downloaded file whose bytes do not match the hash prefix in its name is used, with a
        :class:`WeightsWarning` that says so and how to download it anew."""
        if not self.path.is_file():
            return None
        stat = self.path.stat()
        sha256, md5 = _digests(self.path, stat.st_size, stat.st_mtime_ns)
        if self.url is not None:
            kind, prefix, digest = (
                ("MD5", self.md5_prefix, md5)
                if self.md5_prefix
                else ("SHA-256", _name_prefix(self.path), sha256)
            )  # noqa: E501
            if prefix is not None and not digest.startswith(prefix):
                _warn_once(
                    self.path, stat.st_size, stat.st_mtime_ns,
                    f"its {kind} begins {digest[: len(prefix)]}, not the {prefix} its name carries, so it is "
                    f"not the file {self.url} serves (cut short, damaged or replaced); it is used as it is: "
                    "delete it and run again to download it anew",
                )  # fmt: skip
        return {"name": self.name, "url": self.url, "file": str(self.path), "sha256": sha256}


@functools.lru_cache(maxsize=8)
def _warn_once(path: Path, size: int, mtime_ns: int, message: str) -> None:
    """One warning per version of a file, however often its identity is asked for; shown as
    ``<file>:0: WeightsWarning: <message>``."""
    warnings.warn_explicit(message, WeightsWarning, str(path), 0)


@functools.lru_cache(maxsize=8)
def _digests(path: Path, size: int, mtime_ns: int) -> tuple[str, str]:
    """(SHA-256, MD5) of the file, once per version of it (size and modification time)."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha256.update(block)
            md5.update(block)
    return sha256.hexdigest(), md5.hexdigest()


def fetch(url: str, path: Path, what: str, md5_prefix: str | None = None) -> Path:
    """``path`` if cached, else downloaded there by torch.hub's own downloader (which checks the
    SHA-256 prefix in the file name, and shows tqdm's bar with elapsed time and ETA on a terminal).
    Offline, or with ``FPN_EXTRACT_OFFLINE=1``, the error names the URL and the exact path."""
    if path.is_file():
        return path
    hint = f"download {url} and place it at {path}"
    if offline():
        raise WeightsError(f"{what} weights are not in the cache and {OFFLINE_ENV} is set: {hint}")
    import torch.hub

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            url, str(path), _name_prefix(path) if md5_prefix is None else None, sys.stderr.isatty()
        )
        if md5_prefix is not None:
            _check_md5(path, md5_prefix)
    except Exception as e:
        path.unlink(missing_ok=True)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"cannot download {what} weights ({reason}): {hint}") from None
    return path


def _check_md5(path: Path, prefix: str) -> None:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(prefix):
        raise RuntimeError(f"md5 {h.hexdigest()[: len(prefix)]} does not match the {prefix} in the file name")
