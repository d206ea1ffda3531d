"""timm: any ``features_only`` model as the backbone (``--arch timm:<model>``), its ImageNet weights
through timm's own loading and cache (Hugging Face's), its pretrained configuration's mean/std.
No zoo table, no checkpoint layout of its own, no test-time resize (classifiers, not detectors)."""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from fpn_cli.errors import WeightsError
from fpn_cli.models.backbones import TimmArch, TimmBody, get_arch, import_timm
from fpn_cli.models.frameworks.base import Framework, Pretrained, register
from fpn_cli.models.hub import OFFLINE_ENV, offline
from fpn_cli.models.preprocess import IMAGENET, Preprocess
from fpn_cli.models.weights import Checkpoint


@register
class Timm(Framework):
    name = "timm"

    def imagenet(self, arch: str) -> Pretrained:
        found = get_arch(arch)
        assert isinstance(found, TimmArch)
        return Pretrained(_preprocess(found.model_name), 1e-5, lambda: _pretrained(found.model_name))


def _preprocess(model_name: str) -> Preprocess:
    """The normalisation timm's pretrained configuration states for the model."""
    cfg = import_timm().get_pretrained_cfg(model_name)
    mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET.mean, IMAGENET.std)
    return Preprocess(tuple(mean), tuple(std))


def _pretrained(model_name: str) -> Checkpoint:
    """timm's own pretrained loading and cache. A file already in the cache loads with Hugging
    Face's offline mode on; a missing one, offline or with the hub's host unresolvable, is a
    one-line error naming the repository and file at once (not a minute of the hub's retries)."""
    cfg = import_timm().get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    cached = repo is not None and _hf_cached(repo, _hf_files(cfg))
    if repo is not None and not cached:
        _refuse_missing(model_name, repo, _hf_files(cfg)[0])
    try:
        with _hub_offline() if offline() or cached else contextlib.nullcontext():
            body = TimmBody(model_name, pretrained=True)
    except Exception as e:  # huggingface_hub's errors are many; all mean "not available here"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(
            f"timm:{model_name} ImageNet weights are not available ({reason}); timm keeps them "
            "in the Hugging Face cache ($HF_HOME, default ~/.cache/huggingface): fetch them once online"
        ) from None
    state = {f"body.{k}": v for k, v in body.state_dict().items()}
    return Checkpoint(state, f"timm:{model_name} (ImageNet)", "timm")


def _hf_files(cfg) -> tuple[str, ...]:
    """The files timm looks for in the model's Hugging Face repository, in its order."""
    named = getattr(cfg, "hf_hub_filename", None)
    return (named,) if named else ("model.safetensors", "pytorch_model.bin")


def _hf_cache() -> Path:
    """The Hugging Face hub cache as a process started now sees it (``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _hf_cached(repo: str, files: tuple[str, ...]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=_hf_cache()), str) for f in files)


def _refuse_missing(model_name: str, repo: str, file: str) -> None:
    """Raises at once when the file is not cached and cannot be downloaded now."""
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if offline():
        why = f"{OFFLINE_ENV} is set"
    else:
        try:
            socket.getaddrinfo(host, 443)
            return  # the hub is reachable: timm downloads it
        except OSError:
            why = f"{host} cannot be reached"
    raise WeightsError(
        f"timm:{model_name} ImageNet weights ({file} of the Hugging Face repository {repo}) are not in "
        f"the cache {_hf_cache()} and {why}: run `huggingface-cli download {repo} {file}` online, "
        f"or copy {_hf_cache() / ('models--' + repo.replace('/', '--'))} from a machine that has it"
    )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
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
