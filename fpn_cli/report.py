"""What a run produced, and its human-readable renderings: the summary table and the shape report."""

from __future__ import annotations

from collections.abc import Sequence

from .model import STRIDES, FPNConfig

Shapes = dict[str, tuple[int, int, int]]


def format_summary(config: FPNConfig, params: int, sizes: Sequence[tuple[tuple[int, int], Shapes]]) -> str:
    """One block per input size: a row per level with stride, channels, height and width."""
    lines = [f"{config.arch}, {config.fpn_style} FPN, {params:,} parameters"]
    for (h, w), shapes in sizes:
        lines += ["", f"input {h}x{w}", f"{'level':<6}{'stride':>7}{'channels':>10}{'height':>8}{'width':>7}"]
        for name, (c, lh, lw) in shapes.items():
            lines.append(f"{name.upper():<6}{STRIDES[name]:>7}{c:>10}{lh:>8}{lw:>7}")
    return "\n".join(lines)
