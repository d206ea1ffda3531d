"""detectron2: its model zoo's FPN models, as detectron2 runs them.

Keys (-> ours), from the zoo's ``.pkl`` files (``{"model": {key: numpy array}}``):
``backbone.bottom_up.res2.0.conv1.norm.running_var`` -> ``body.layer1.0.bn1.running_var``;
``backbone.bottom_up.res3.0.shortcut.weight`` -> ``body.layer2.0.downsample.0.weight``;
``backbone.fpn_lateral3.weight`` -> ``fpn.inner_blocks.<3 - first level>.weight``;
``backbone.top_block.p6.weight`` -> ``fpn.extra_blocks.p6.weight``; heads and ``pixel_mean/std`` ignored.

As detectron2 runs them: BGR 0-255 minus PIXEL_MEAN over PIXEL_STD (MSRA's R-50/R-101 fold the std
into conv1 and put the stride on the 1x1 conv; FAIR's X-101 is torchvision-like), FrozenBN eps 1e-5,
top-down x2 nearest, P6 max-pool (R-CNN) or P6/P7 from C5 (RetinaNet), input zero-padded at the
bottom/right to a multiple of 32 after normalisation (its ImageList), levels cropped back.
Test-time resize: ``ResizeShortestEdge(800, max_size=1333)`` (INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST).
Files are cached at ``detectron2/<config>/<id>/model_final_<md5>.pkl``, the URL's path. The zoo
table and the preprocessing constants are declared in models/zoo_table.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor

from fpn_cli.models.backbones import get_arch
from fpn_cli.models.frameworks.base import Framework, register
from fpn_cli.models.preprocess import Preprocess
from fpn_cli.models.pyramid import P6P7, FPNSpec, MaxPool
from fpn_cli.models.weights import Checkpoint, KeyFormat, RawCheckpoint, fpn_shape, has_fpn
from fpn_cli.models.zoo_table import DETECTRON2_PAD, DETECTRON2_RESIZE, FAIR_X101, MSRA_BGR


def _stage(m: re.Match, _: Mapping[str, int]) -> str:
    return f"body.layer{int(m[1]) - 1}.{m[2]}"


def _level(kind: str) -> Callable[[re.Match, Mapping[str, int]], str]:
    """detectron2 names FPN convs by level (fpn_lateral3 makes P3); ours count from the first."""
    return lambda m, ctx: f"fpn.{kind}.{int(m[1]) - ctx['first_level']}.{m[2]}"


@register
class Detectron2(Framework):
    name = "detectron2"
    keys = KeyFormat(
        (
            (r"backbone\.bottom_up\.stem\.conv1\.weight", "body.conv1.weight"),
            (r"backbone\.bottom_up\.stem\.conv1\.norm\.(.*)", r"body.bn1.\1"),
            (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight", lambda m, c: f"{_stage(m, c)}.conv{m[3]}.weight"),  # noqa: E501
            (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(.*)", lambda m, c: f"{_stage(m, c)}.bn{m[3]}.{m[4]}"),  # noqa: E501
            (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight", lambda m, c: f"{_stage(m, c)}.downsample.0.weight"),  # noqa: E501
            (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(.*)", lambda m, c: f"{_stage(m, c)}.downsample.1.{m[3]}"),  # noqa: E501
            (r"backbone\.fpn_lateral(\d)\.(.*)", _level("inner_blocks")),
            (r"backbone\.fpn_output(\d)\.(.*)", _level("layer_blocks")),
            (r"backbone\.top_block\.(p6|p7)\.(.*)", r"fpn.extra_blocks.\1.\2"),
        ),
        ignored=r"(proposal_generator|roi_heads|head|anchor_generator)\..*|pixel_(mean|std)",
    )  # fmt: skip
    styles = {
        "detectron2": FPNSpec("nearest2x", extra=MaxPool(), description="x2 nearest upsampling"),
        "detectron2_retinanet": FPNSpec(
            "nearest2x", first_input="c3", extra=P6P7("c5"), description="P6/P7 from C5"
        ),
    }
    preprocess = MSRA_BGR
    pad_multiple = DETECTRON2_PAD
    resize = DETECTRON2_RESIZE

    def claims(self, raw: RawCheckpoint) -> bool:
        return any(k.startswith("backbone.bottom_up.") for k in raw.state)

    def context(self, state: Mapping[str, Tensor]) -> dict[str, int]:
        levels = [int(m[1]) for k in state if (m := re.fullmatch(r"backbone\.fpn_lateral(\d)\.weight", k))]
        return {"first_level": min(levels, default=2)}

    def stride_in_1x1(self, ckpt: Checkpoint, shape: Mapping[str, object]) -> bool:
        return shape["groups"] == 1  # MSRA's; FAIR's grouped X-101 is torchvision-like

    def style_of(self, ckpt: Checkpoint) -> str | None:
        if not has_fpn(ckpt.state):
            return None
        return "detectron2_retinanet" if fpn_shape(ckpt.state)["p6_in"] is not None else "detectron2"

    def file_preprocess(self, ckpt: Checkpoint, arch: str) -> Preprocess:
        return FAIR_X101 if get_arch(arch).groups > 1 else MSRA_BGR
