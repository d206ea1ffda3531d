"""How an image's pixels relate to its stored levels.

- :class:`Geometry`: how the image's pixels reach the network (EXIF orientation, resize), so how
  a box in original pixels maps onto the network's input.
- :class:`LevelSizes`: each level's (C, h, w) for a network input, asked of the model
  (``models.model.output_shapes``, the one owner of that answer: probed or declared, never an
  assumed rounding). report.json's ``geometry``, the run, resume and ``verify`` all ask it; a
  backbone whose stem rounds down (ConvNeXt's 4x4 stride-4 patchify) is reported as it stores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fpn_cli.errors import FPNError
from fpn_cli.models.levels import LEVELS
from fpn_cli.models.model import FPNConfig, output_shapes

Shape = tuple[int, ...]


class InputTooSmall(FPNError):
    """The network cannot take an input of this size (a kernel larger than what is left of it)."""


@dataclass(frozen=True)
class Geometry:
    """How an image's pixels reach the network, and so how a box maps onto each level: a point
    (x, y) of the image, after EXIF orientation, is (x * sx / stride, y * sy / stride) on a level."""

    input_size: tuple[int, int]  # (H, W) as decoded, EXIF orientation applied
    model_input_size: tuple[int, int]  # (H', W') after --size / --short-side
    orientation: int = 1  # the EXIF orientation applied, 1 (none) to 8

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): original pixels to model-input pixels, each axis on its own."""
        (h, w), (mh, mw) = self.input_size, self.model_input_size
        return mh / h, mw / w

    def to_model_input(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) x1, y1, x2, y2 in original pixels -> the same boxes in model-input pixels."""
        sy, sx = self.scale
        return boxes * np.array([sx, sy, sx, sy])


class LevelSizes:
    """The model's answer to "what (C, h, w) is each level of an H x W network input": the levels
    a run of ``config`` computes, as ``output_shapes`` gives them."""

    def __init__(self, config: FPNConfig) -> None:
        self.config = config

    def __call__(self, height: int, width: int) -> dict[str, Shape]:
        """{level: (C, h, w)} for an ``height`` x ``width`` network input; an input the network
        cannot take is an :class:`InputTooSmall` with the reason in one line."""
        return _shapes(self.config, height, width)

    def refusal(self, height: int, width: int) -> str | None:
        """Why the network cannot take an ``height`` x ``width`` input, or None if it can."""
        try:
            self(height, width)
        except InputTooSmall as e:
            return str(e)
        return None

    def geometry_json(self, geometry: Geometry) -> dict:
        """report.json's ``geometry``: orientation, scale, and per level its stride and valid size
        (the stored level's h x w, as the model gives it); with padding, also the size of the
        padded input's level, of which the stored level is the top-left crop."""
        h, w = geometry.model_input_size
        shapes = self(h, w)
        multiple = self.config.pad_multiple
        padded = self(-(-h // multiple) * multiple, -(-w // multiple) * multiple) if multiple > 1 else {}
        per_level = {}
        for name, (_, lh, lw) in shapes.items():
            entry: dict = {"stride": LEVELS[name].stride, "size": [lh, lw]}
            if name in padded:
                entry["padded_size"] = list(padded[name][1:])
            per_level[name] = entry
        return {"orientation": geometry.orientation, "scale": list(geometry.scale), "levels": per_level}


@functools.lru_cache(maxsize=1024)
def _shapes(config: FPNConfig, height: int, width: int) -> dict[str, Shape]:
    try:
        return output_shapes(config, height, width)
    except RuntimeError as e:  # the layer arithmetic of a probing forward pass (models/model.py)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputTooSmall(f"the network cannot take a {height}x{width} input: {reason}") from None
