"""fpn-extract's own checkpoint format: ``{"fpn_extract": {"arch", "fpn_style", "bn_eps"},
"state_dict": {our keys}}``, written by :func:`save`; the record says the model, the keys are ours."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from fpn_cli.models.frameworks.base import Framework, register
from fpn_cli.models.weights import Checkpoint, KeyFormat, RawCheckpoint

FORMAT_KEY = "fpn_extract"


@register
class Own(Framework):
    name = "fpn-extract"
    keys = KeyFormat(((r"((body|fpn)\..*)", r"\1"),))

    def claims(self, raw: RawCheckpoint) -> bool:
        record = raw.extras.get(FORMAT_KEY)
        return isinstance(record, Mapping) and bool(record.get("arch"))

    def meta(self, raw: RawCheckpoint) -> dict[str, object]:
        return dict(raw.extras[FORMAT_KEY])

    def arch_of(self, ckpt: Checkpoint) -> str | None:
        return str(ckpt.meta["arch"])

    def style_of(self, ckpt: Checkpoint) -> str | None:
        return str(ckpt.meta["fpn_style"]) if ckpt.meta.get("fpn_style") else None

    def bn_eps(self, ckpt: Checkpoint) -> float:
        return float(ckpt.meta.get("bn_eps", 1e-5))


def save(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Writes ``model`` in fpn-extract's own format, readable by ``--weights PATH``."""
    config = model.config
    meta = {"arch": config.arch, "fpn_style": config.fpn_style, "bn_eps": config.bn_eps}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({FORMAT_KEY: meta, "state_dict": state}, path)
