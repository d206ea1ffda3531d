"""The seed project: the small PyTorch FPN this project grew from, and its checkpoints.

Keys (-> ours): ``layer1.0.shortcut.0.weight`` -> ``body.layer1.0.downsample.0.weight``;
``toplayer.weight`` -> ``fpn.inner_blocks.3.weight``; ``latlayer1`` (C4) -> ``fpn.inner_blocks.2``;
``smooth1`` (P4) -> ``fpn.layer_blocks.2``. Its FPN is the reference design (``--fpn-style
reference``, the default): bilinear upsampling, P5 not smoothed. RGB / 255 with ImageNet mean/std,
native size, no padding.
"""

from __future__ import annotations

from fpn_cli.models.frameworks.base import Framework, register
from fpn_cli.models.pyramid import FPNSpec, MaxPool
from fpn_cli.models.weights import Checkpoint, KeyFormat, RawCheckpoint, has_fpn


@register
class Seed(Framework):
    name = "seed"
    keys = KeyFormat(
        (
            (r"(conv1|bn1)\.(.*)", r"body.\1.\2"),
            (r"(layer\d\.\d+)\.shortcut\.(\d)\.(.*)", r"body.\1.downsample.\2.\3"),
            (r"(layer\d\.\d+\..*)", r"body.\1"),
            (r"toplayer\.(.*)", r"fpn.inner_blocks.3.\1"),
            (r"latlayer(\d)\.(.*)", lambda m, _: f"fpn.inner_blocks.{3 - int(m[1])}.{m[2]}"),
            (r"smooth(\d)\.(.*)", lambda m, _: f"fpn.layer_blocks.{3 - int(m[1])}.{m[2]}"),
        )
    )
    styles = {
        "reference": FPNSpec(
            "bilinear", smooth_top=False, extra=MaxPool(), description="bilinear, P5 unsmoothed"
        ),
    }

    def claims(self, raw: RawCheckpoint) -> bool:
        return "toplayer.weight" in raw.state

    def style_of(self, ckpt: Checkpoint) -> str | None:
        return "reference" if has_fpn(ckpt.state) else None
