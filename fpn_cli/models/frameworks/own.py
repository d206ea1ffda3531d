"""fpn-extract's own checkpoint format: ``{"fpn_extract": {"arch", "fpn_style", "bn_eps"},
"state_dict": {our keys}}``, written by :func:`save`; the record says the model, the keys are ours."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

from fpn_cli.errors import FPNError, WeightsError
from fpn_cli.models.backbones import ARCHS, get_arch
from fpn_cli.models.frameworks.base import Framework, fpn_styles, register
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
        return check_meta(raw.extras[FORMAT_KEY], raw.source)

    def arch_of(self, ckpt: Checkpoint) -> str | None:
        return str(ckpt.meta["arch"])

    def style_of(self, ckpt: Checkpoint) -> str | None:
        return str(ckpt.meta["fpn_style"]) if ckpt.meta.get("fpn_style") else None

    def bn_eps(self, ckpt: Checkpoint) -> float:
        return float(ckpt.meta.get("bn_eps", 1e-5))


MAX_BN_EPS = 0.1  # BatchNorm eps is 0 to 1e-3 in every framework; far above, the file is damaged


def check_meta(record: Mapping, source: str) -> dict[str, object]:
    """The ``fpn_extract`` record of a file, each field checked (type, range, finite): a bad one is
    a :class:`WeightsError` naming the field, before any model is built or anything recorded."""

    def bad(name: str, why: str) -> WeightsError:
        return WeightsError(f"weights file {source}: {FORMAT_KEY}.{name} = {record.get(name)!r} {why}")

    meta = dict(record)
    arch = meta.get("arch")
    if not isinstance(arch, str):
        raise bad("arch", "is not an architecture name")
    try:
        get_arch(arch)
    except FPNError:
        raise bad("arch", f"is no known architecture (see {', '.join(list(ARCHS)[:3])}, ...)") from None
    style = meta.get("fpn_style")
    if style is not None and style not in fpn_styles():
        raise bad("fpn_style", f"is no known FPN style ({', '.join(fpn_styles())})")
    eps = meta.get("bn_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise bad("bn_eps", "is not a number")
    if not math.isfinite(eps) or not 0 <= eps <= MAX_BN_EPS:
        raise bad("bn_eps", f"is out of range (a finite number from 0 to {MAX_BN_EPS})")
    return meta


def save(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Writes ``model`` in fpn-extract's own format, readable by ``--weights PATH``."""
    config = model.config
    meta = {"arch": config.arch, "fpn_style": config.fpn_style, "bn_eps": config.bn_eps}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({FORMAT_KEY: meta, "state_dict": state}, path)
