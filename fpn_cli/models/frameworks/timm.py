"""timm: any ``features_only`` model as the backbone (``--arch timm:<model>``), its ImageNet weights
through timm's own loading and cache (Hugging Face's), its pretrained configuration's mean/std.
No zoo table, no checkpoint layout of its own, no test-time resize (classifiers, not detectors)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fpn_cli.errors import WeightsError
from fpn_cli.models.backbones import TimmArch, TimmBody, get_arch, import_timm
from fpn_cli.models.frameworks.base import Framework, Pretrained, register
from fpn_cli.models.hub import offline
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
    """timm's own pretrained loading and cache; offline, a one-line error."""
    try:
        with _hub_offline() if offline() else contextlib.nullcontext():
            body = TimmBody(model_name, pretrained=True)
    except Exception as e:  # huggingface_hub's errors are many; all mean "not available here"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(
            f"timm:{model_name} ImageNet weights are not available ({reason}); timm keeps them "
            "in the Hugging Face cache ($HF_HOME, default ~/.cache/huggingface): fetch them once online"
        ) from None
    state = {f"body.{k}": v for k, v in body.state_dict().items()}
    return Checkpoint(state, f"timm:{model_name} (ImageNet)", "timm")


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
