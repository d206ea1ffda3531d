"""What the command line offers and checks about region features, without importing torch: the
pooled vectors' kinds and the bound on the RoI size (pooling.py takes them from here)."""

from __future__ import annotations

from collections.abc import Sequence

from fpn_cli.errors import UsageError
from fpn_cli.formats.base import POOLS

MAX_ROI_SIZE = 64  # detection heads pool 7x7, mask heads 14x14 or 28x28: 64 bounds (N, 256, 64, 64)


def parse_pool(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """``"avg,max"`` or ``("avg",)`` -> ``("avg", "max")``; unknown or repeated kinds are errors."""
    names = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in POOLS]
    if unknown:
        raise UsageError(f"unknown pooling {unknown[0]!r}; choose from {', '.join(POOLS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"a pooling is listed twice in {','.join(names)}")
    return tuple(names)
