"""Pretrained files: a zoo entry's record, torch.hub's cache it lives in, and the download.

Files go through torch.hub's downloader into its cache, ``$TORCH_HOME/hub/checkpoints/``, under
the names each framework gives them (frameworks/ say which). Offline, or with
``FPN_EXTRACT_OFFLINE=1``, a missing file is an error that names the URL and the exact path where
a copy makes it work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import sys
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
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
        try:
            if not self.path.is_file():
                return None
            stat = self.path.stat()
            sha256, md5 = _digests(self.path, stat.st_size, stat.st_mtime_ns)
        except OSError as e:
            raise WeightsError(f"cannot read the weights file {self.path}: {e.strerror or e}") from None
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
    check_cache_path(path, what)
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
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"cannot download {what} weights ({reason}): {hint}") from None
    return path


def check_cache_path(path: Path, what: str) -> None:
    """A :class:`WeightsError` saying which, when ``path`` (a file not yet in the cache) cannot be
    made: a folder stands at ``path`` itself, or a file where one of its folders belongs (such as
    ``$TORCH_HOME/hub``), or the cache cannot be looked at."""
    fix = "remove it, or set $TORCH_HOME to another folder"
    try:
        if path.is_dir():
            raise WeightsError(f"{what} weights cannot be cached: {path} is a folder, not a file: {fix}")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise WeightsError(
                        f"{what} weights cannot be cached at {path}: {parent} is a file, not a folder: {fix}"
                    )
                return
    except OSError as e:
        raise WeightsError(f"{what} weights: cannot look at the cache {path}: {e.strerror or e}") from None


def _check_md5(path: Path, prefix: str) -> None:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(prefix):
        raise RuntimeError(f"md5 {h.hexdigest()[: len(prefix)]} does not match the {prefix} in the file name")


# --- the Hugging Face hub (timm's weights, and timm's hf-hub: models' configurations) ----------------


def hf_cache() -> Path:
    """The Hugging Face hub cache as a process started now sees it (``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def hf_cached(repo: str, files: tuple[str, ...]) -> bool:
    """Whether one of ``files`` of the repository ``repo`` is in the cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=hf_cache()), str) for f in files)
    except (OSError, ValueError):  # a cache path that is a file, a repository id it refuses
        return False


def refuse_unreachable_hf(what: str, repo: str, file: str) -> None:
    """Raises a one-line :class:`WeightsError` at once when ``file`` of the repository ``repo``
    (not in the cache) cannot be downloaded now: offline, or the hub's host does not resolve
    (Hugging Face's client would retry for half a minute, then raise a traceback's worth)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return  # timm says so itself
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if offline():
        why = f"{OFFLINE_ENV} is set"
    else:
        try:
            socket.getaddrinfo(host, 443)
            return  # the hub is reachable: the download is tried
        except OSError:
            why = f"{host} cannot be reached"
    raise WeightsError(
        f"{what} ({file} of the Hugging Face repository {repo}) are not in the cache {hf_cache()} and "
        f"{why}: run `huggingface-cli download {repo} {file}` online, or copy "
        f"{hf_cache() / ('models--' + repo.replace('/', '--'))} from a machine that has it"
    )


HF_HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # timm's names of a model that lives in a hub repository


@contextlib.contextmanager
def hf_hub_model(model_name: str, pretrained: bool) -> Iterator[None]:
    """Around timm's ``create_model`` of ``model_name``: for an ``hf-hub:ORG/REPO`` model, whose
    configuration (and weights) timm reads from the hub even for random weights, a file not in
    the cache that cannot be downloaded now is one line at once (:func:`refuse_unreachable_hf`),
    and with every file cached the hub is not asked. Other names pass through."""
    prefix = next((p for p in HF_HUB_PREFIXES if model_name.startswith(p)), None)
    if prefix is None:
        yield
        return
    repo = model_name[len(prefix) :].split("@", 1)[0]
    needed = [("config.json",)] + ([("model.safetensors", "pytorch_model.bin")] if pretrained else [])
    missing = [files for files in needed if not hf_cached(repo, files)]
    for files in missing:
        refuse_unreachable_hf(f"timm:{model_name} model files", repo, files[0])
    with hf_offline() if offline() or not missing else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Hugging Face's offline mode, which it reads from the environment only when first imported."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
