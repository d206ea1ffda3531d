"""mmdetection: its Faster/Mask R-CNN and RetinaNet checkpoints with ResNet FPNs, as it runs them.

Keys (-> ours): ``backbone.layer1.0.conv1.weight`` -> ``body.layer1.0.conv1.weight``;
``neck.lateral_convs.0.conv.weight`` -> ``fpn.inner_blocks.0.weight``; ``neck.fpn_convs.3.conv.weight``
(past the laterals: RetinaNet's P6/P7 convs, appended to ``fpn_convs``) -> ``fpn.extra_blocks.p6.weight``;
heads ignored. The file's ``meta.config`` text says the ResNet's style: ``pytorch`` (torchvision's,
RGB) or ``caffe`` (MSRA's: stride on the 1x1 conv, BGR, as detectron2's R-50).

As mmdetection runs them: its data preprocessor's mean/std in 0-255, padded to a multiple of 32,
nearest upsampling to size, P6 max-pool (R-CNN) or P6 from C5 and P7 from P6 with no ReLU between
(RetinaNet, ``relu_before_extra_convs=False``). Test-time resize: ``Resize(scale=(1333, 800),
keep_ratio=True)``: the shorter side to 800 unless the longer would pass 1333. The zoo table is
declared in models/zoo_table.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from fpn_cli.models.frameworks.base import Framework, register
from fpn_cli.models.preprocess import Preprocess
from fpn_cli.models.pyramid import P6P7, FPNSpec, MaxPool
from fpn_cli.models.weights import Checkpoint, KeyFormat, RawCheckpoint, fpn_shape, has_fpn
from fpn_cli.models.zoo_table import MMDET_PAD, MMDET_RESIZE, MSRA_BGR, PYTORCH_RGB


def _fpn_conv(m: re.Match, ctx: Mapping[str, int]) -> str:
    """mmdetection appends RetinaNet's P6/P7 convs to ``fpn_convs`` after the smoothing convs."""
    j, laterals = int(m[1]), ctx["laterals"]
    if j < laterals:
        return f"fpn.layer_blocks.{j}.{m[2]}"
    return f"fpn.extra_blocks.p{6 + j - laterals}.{m[2]}"


def _caffe(ckpt: Checkpoint) -> bool:
    config = str(ckpt.meta.get("config", ""))
    return "style='caffe'" in config or 'style="caffe"' in config


@register
class MMDet(Framework):
    name = "mmdet"
    keys = KeyFormat(
        (
            (r"backbone\.(.*)", r"body.\1"),
            (r"neck\.lateral_convs\.(\d+)\.conv\.(.*)", r"fpn.inner_blocks.\1.\2"),
            (r"neck\.fpn_convs\.(\d+)\.conv\.(.*)", _fpn_conv),
        ),
        ignored=r"(rpn_head|roi_head|bbox_head|mask_head|data_preprocessor)\..*",
    )
    styles = {
        "mmdet": FPNSpec("nearest", extra=MaxPool(), description="mmdetection's FPN, P6 by max-pool"),
        "mmdet_retinanet": FPNSpec(
            "nearest",
            first_input="c3",
            extra=P6P7("c5", relu_before_p7=False),
            description="P6/P7 from C5, no ReLU before P7",
        ),
    }
    preprocess = PYTORCH_RGB
    pad_multiple = MMDET_PAD
    resize = MMDET_RESIZE

    def claims(self, raw: RawCheckpoint) -> bool:
        # mmdetection keeps torchvision's names under "backbone." with no "body."
        return any(k.startswith(("neck.", "backbone.layer1.")) for k in raw.state)

    def context(self, state: Mapping[str, Tensor]) -> dict[str, int]:
        laterals = [k for k in state if re.fullmatch(r"neck\.lateral_convs\.(\d+)\.conv\.weight", k)]
        return {"laterals": len(laterals)}

    def meta(self, raw: RawCheckpoint) -> dict[str, object]:
        meta = raw.extras.get("meta")
        config = (meta.get("config") or meta.get("cfg")) if isinstance(meta, Mapping) else None
        return {"config": config} if isinstance(config, str) else {}

    def stride_in_1x1(self, ckpt: Checkpoint, shape: Mapping[str, object]) -> bool:
        return _caffe(ckpt)

    def style_of(self, ckpt: Checkpoint) -> str | None:
        if not has_fpn(ckpt.state):
            return None
        return "mmdet_retinanet" if fpn_shape(ckpt.state)["p6_in"] is not None else "mmdet"

    def file_preprocess(self, ckpt: Checkpoint, arch: str) -> Preprocess:
        return MSRA_BGR if _caffe(ckpt) else PYTORCH_RGB
