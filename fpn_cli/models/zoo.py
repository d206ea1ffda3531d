"""The model zoo: every registered framework's table of pretrained FPNs, by name.

An entry (:class:`~fpn_cli.models.hub.ZooEntry`) is everything a framework's config says about its
backbone: architecture, FPN variant, BatchNorm eps, levels, preprocessing, padding and test-time
resize, plus where its file lives. Choosing one sets them all. The tables are the frameworks'
(frameworks/<name>.py, the built-in ones declared in zoo_table.py); this module only gathers them
and finds one by name. :func:`listing` needs no torch while the frameworks are not loaded.
"""

from __future__ import annotations

import difflib
import functools
import sys

from fpn_cli.errors import UsageError
from fpn_cli.models.hub import ZooEntry
from fpn_cli.models.zoo_table import TABLE

__all__ = ["COCO_ALIAS", "ZooEntry", "entry", "is_zoo_name", "listing", "suggest", "zoo"]

COCO_ALIAS = "coco"
COCO_ENTRY = "torchvision:fasterrcnn_resnet50_fpn"


def zoo() -> dict[str, ZooEntry]:
    """Every entry by name, in the registry's order of frameworks."""
    from fpn_cli.models.frameworks import FRAMEWORKS  # torch: the frameworks read checkpoints

    return _gather(tuple(FRAMEWORKS))


def listing() -> list[ZooEntry]:
    """Every entry, for ``fpn-extract models``: the declared table, read without importing torch;
    once the frameworks are loaded (the API, a test), every registered framework's, as :func:`zoo`."""
    if "fpn_cli.models.frameworks" in sys.modules:
        return list(zoo().values())
    return [e for entries in TABLE.values() for e in entries]


@functools.lru_cache(maxsize=4)
def _gather(names: tuple[str, ...]) -> dict[str, ZooEntry]:
    """Once per set of registered frameworks (a test may register its own)."""
    from fpn_cli.models.frameworks import FRAMEWORKS

    return {e.name: e for name in names for e in FRAMEWORKS[name].entries()}


def is_zoo_name(spec: str) -> bool:
    """``coco``, or ``FAMILY:NAME`` for a framework that has a zoo table."""
    family = spec.split(":", 1)[0]
    if spec == COCO_ALIAS:
        return True
    return ":" in spec and any(e.family == family for e in zoo().values())


def entry(spec: str) -> ZooEntry:
    """The entry named ``spec`` (``coco`` is ``torchvision:fasterrcnn_resnet50_fpn``)."""
    name = COCO_ENTRY if spec == COCO_ALIAS else spec
    found = zoo().get(name)
    if found is None:
        family = name.split(":", 1)[0]
        near = [n for n in zoo() if n.startswith(family + ":")]
        close = difflib.get_close_matches(name, near, n=3, cutoff=0.6)
        if close:
            hint = f"did you mean {' or '.join(close)}?"
        else:
            families = sorted({n.split(":", 1)[0] for n in zoo()})
            hint = f"{family} has {len(near)} models" if near else f"the families are {', '.join(families)}"
        raise UsageError(f"--weights {spec}: no such model in the zoo; {hint} (fpn-extract models lists all)")
    return found


def suggest(spec: str) -> str | None:
    """The zoo name or weight source closest to ``spec`` (a mistyped ``--weights``), if any."""
    names = [COCO_ALIAS, "random", "imagenet", *zoo()]
    close = difflib.get_close_matches(spec, names, n=1, cutoff=0.75)
    return close[0] if close else None
