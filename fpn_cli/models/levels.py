"""Level names: the table of every level a model can produce, and the parsing of ``--levels``.

A level is a backbone stage output (``c2``..``c5``) or a pyramid output (``p2``..``p7``); its
stride, the input pixels per feature along each side, is part of its name's meaning. Which levels
exist, and their channels, is the model's business (``FPN.level_info``); this table only says
what a name means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fpn_cli.errors import UsageError


@dataclass(frozen=True)
class Level:
    """What a level name means."""

    name: str
    kind: str  # "pyramid" (an FPN output) or "backbone" (a stage output)
    stride: int
    source: str | None = None  # a pyramid level's lateral input ("c4" for p4); None for extra levels


def _table(*levels: Level) -> dict[str, Level]:
    return {level.name: level for level in levels}


LEVELS: dict[str, Level] = _table(
    Level("c2", "backbone", 4),
    Level("c3", "backbone", 8),
    Level("c4", "backbone", 16),
    Level("c5", "backbone", 32),
    # MobileNetV3's detection FPN takes two stride-32 outputs: block 13's (c5a) and the last (c5)
    Level("c5a", "backbone", 32),
    Level("p2", "pyramid", 4, "c2"),
    Level("p3", "pyramid", 8, "c3"),
    Level("p4", "pyramid", 16, "c4"),
    Level("p5", "pyramid", 32, "c5"),
    Level("p5a", "pyramid", 32, "c5a"),
    Level("p6", "pyramid", 64),
    Level("p7", "pyramid", 128),
)
DEFAULT_LEVELS = ("p2", "p3", "p4", "p5")


def pyramid_of(backbone_level: str) -> str:
    """The pyramid level an FPN makes from a backbone level: ``c4`` -> ``p4``."""
    return next(level.name for level in LEVELS.values() if level.source == backbone_level)


def parse_levels(levels: str | Sequence[str]) -> tuple[str, ...]:
    """``"p2,p3"`` or ``("P2", "p3")`` -> ``("p2", "p3")``; unknown or repeated names are errors.
    Whether a model has a level is checked when the model is built."""
    names = levels.split(",") if isinstance(levels, str) else list(levels)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in LEVELS]
    if unknown:
        raise UsageError(f"unknown level {unknown[0]!r}; choose from {', '.join(LEVELS)}")
    if not names:
        raise UsageError("no levels requested")
    if len(set(names)) != len(names):
        raise UsageError(f"a level is listed twice in {','.join(names)}")
    return tuple(names)
