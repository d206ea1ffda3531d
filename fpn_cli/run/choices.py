"""What the command line offers and checks about a run, without importing torch: precision names
and the read timeout's default and bound (engine.py and options.py take them from here)."""

from __future__ import annotations

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # --dtype: compute precision (autocast below float32)
SAVE_DTYPES = ("float32", "float16", "bfloat16", "int8")  # --save-dtype: formats/codecs.py's (a test checks)
DEFAULT_TIMEOUT = 300.0  # a local read takes milliseconds, the largest decode seconds; a hung mount forever
MAX_TIMEOUT = 1_000_000.0  # 11.6 days; the platform's timers overflow far beyond


def shard_problem(index: object, count: object) -> str | None:
    """What is wrong with shard ``index`` of ``count``, or None: the rule the CLI's ``--shard I/N``
    and the Python API's ``shard=(I, N)`` share."""
    whole = all(isinstance(n, int) and not isinstance(n, bool) for n in (index, count))
    return None if whole and 0 <= index < count else "need 0 <= I < N"  # type: ignore[operator]
