"""Finite outputs: a level with NaN or infinity fails its image, never reaches a file.

The check runs on the device right after the forward: one sum per level (finite only when every
value is), joined into a single host sync per batch; only a batch that fails is examined image by
image with ``isfinite``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fpn_cli.models.numerics import non_finite


class NonFinite(Exception):
    """Some images of a batch have levels with NaN or infinity: ``images`` maps each one's index
    in the batch to why it failed (the engine raises it; the pipeline fails those images)."""

    def __init__(self, images: dict[int, str]) -> None:
        super().__init__(f"{len(images)} image(s) with NaN or infinite levels")
        self.images = images


def check_finite(feats: Mapping[str, torch.Tensor]) -> None:
    """``feats``: {level: (N, C, h, w)} on the device. Returns when every value is finite; otherwise
    raises :class:`NonFinite` naming, per image, the levels that are not."""
    if not non_finite(feats):  # one sum per level clears them, one host sync per batch
        return
    _raise_for({name: torch.isfinite(v).flatten(1).all(1).tolist() for name, v in feats.items()})


def check_finite_scales(scales: Mapping[str, torch.Tensor]) -> None:
    """:func:`check_finite` for int8 outputs, from their scales alone: ``scales`` is {level: (N, C)}
    as codecs.encode_int8 returns them, NaN exactly where a channel of that image held a NaN or an
    infinity. The per-channel peaks that int8 needs have read every value already, so the level is
    read once for both, not twice (docs/compact-storage.md measures int8's output step against
    float16's)."""
    if not non_finite(scales):  # one sum per level's scales, as check_finite's
        return
    _raise_for({name: torch.isfinite(s).all(1).tolist() for name, s in scales.items()})


def _raise_for(per_level: Mapping[str, list[bool]]) -> None:
    """Raises :class:`NonFinite` for the images that have a level whose flag is False."""
    count = len(next(iter(per_level.values())))
    bad = {}
    for i in range(count):
        levels = [name.upper() for name, ok in per_level.items() if not ok[i]]
        if levels:
            bad[i] = (
                f"{', '.join(levels)} came out NaN or infinite (an overflow in the network for this "
                "input: try --dtype float32, or check the weights); nothing of it was stored"
            )
    if bad:
        raise NonFinite(bad)
