"""timm: any ``features_only`` model as the backbone (``--arch timm:<model>``), its ImageNet weights
through timm's own loading and cache (Hugging Face's), its pretrained configuration's mean/std.
No zoo table, no checkpoint layout of its own, no test-time resize (classifiers, not detectors)."""

from __future__ import annotations

import contextlib

from fpn_cli.errors import WeightsError
from fpn_cli.models.backbones import TimmArch, TimmBody, get_arch, import_timm
from fpn_cli.models.frameworks.base import Framework, Pretrained, register
from fpn_cli.models.hub import hf_cached, hf_offline, offline, refuse_unreachable_hf
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
    cached = repo is not None and hf_cached(repo, _hf_files(cfg))
    if repo is not None and not cached:
        refuse_unreachable_hf(f"timm:{model_name} ImageNet weights", repo, _hf_files(cfg)[0])
    try:
        with hf_offline() if offline() or cached else contextlib.nullcontext():
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
