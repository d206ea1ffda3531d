"""Timing shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, this folder on
the import path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int = 5, warmup: bool = True) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds; after one untimed call when
    ``warmup`` (lazy initialisation, caches, oneDNN's kernel choice)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
