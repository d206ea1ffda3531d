"""mmdetection: its Faster/Mask R-CNN and RetinaNet checkpoints with ResNet FPNs, as it runs them.

Keys (-> ours): ``backbone.layer1.0.conv1.weight`` -> ``body.layer1.0.conv1.weight``;
``neck.lateral_convs.0.conv.weight`` -> ``fpn.inner_blocks.0.weight``; ``neck.fpn_convs.3.conv.weight``
(past the laterals: RetinaNet's P6/P7 convs, appended to ``fpn_convs``) -> ``fpn.extra_blocks.p6.weight``;
heads ignored. The file's ``meta.config`` text says the ResNet's style: ``pytorch`` (torchvision's,
RGB) or ``caffe`` (MSRA's: stride on the 1x1 conv, BGR, as detectron2's R-50).

As mmdetection runs them: its data preprocessor's mean/std in 0-255, padded to a multiple of 32,
nearest upsampling to size, P6 max-pool (R-CNN) or P6 from C5 and P7 from P6 with no ReLU between
(RetinaNet, ``relu_before_extra_convs=False``). Test-time resize: ``Resize(scale=(1333, 800),
keep_ratio=True)``: the shorter side to 800 unless the longer would pass 1333.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from torch import Tensor

from fpn_cli.models.frameworks.base import Framework, read_file, register
from fpn_cli.models.frameworks.detectron2 import FAIR_X101, MSRA_BGR
from fpn_cli.models.hub import ResizePolicy, ZooEntry
from fpn_cli.models.preprocess import Preprocess
from fpn_cli.models.pyramid import P6P7, FPNSpec, MaxPool
from fpn_cli.models.weights import Checkpoint, KeyFormat, RawCheckpoint, fpn_shape, has_fpn

PYTORCH_RGB = Preprocess(
    (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "RGB", 1.0, "RGB 0-255, ImageNet mean/std"
)
URL = "https://download.openmmlab.com/mmdetection/v2.0/"
# config: (file path under URL, backbone, estimated MB)
CONFIGS: dict[str, tuple[str, str, float]] = {
    "faster-rcnn_r50_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth",
        "r50",
        167,
    ),
    "faster-rcnn_r50_fpn_2x_coco": (
        "faster_rcnn/faster_rcnn_r50_fpn_2x_coco/faster_rcnn_r50_fpn_2x_coco_bbox_mAP-0.384_20200504_210434-a5d8aa15.pth",
        "r50",
        167,
    ),
    "faster-rcnn_r101_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_r101_fpn_1x_coco/faster_rcnn_r101_fpn_1x_coco_20200130-f513f705.pth",
        "r101",
        243,
    ),
    "faster-rcnn_r101_fpn_2x_coco": (
        "faster_rcnn/faster_rcnn_r101_fpn_2x_coco/faster_rcnn_r101_fpn_2x_coco_bbox_mAP-0.398_20200504_210455-1d2dac9c.pth",
        "r101",
        243,
    ),
    "faster-rcnn_x101-32x4d_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_x101_32x4d_fpn_1x_coco/faster_rcnn_x101_32x4d_fpn_1x_coco_20200203-cff10310.pth",
        "x101-32x4d",
        242,
    ),
    "faster-rcnn_x101-32x4d_fpn_2x_coco": (
        "faster_rcnn/faster_rcnn_x101_32x4d_fpn_2x_coco/faster_rcnn_x101_32x4d_fpn_2x_coco_bbox_mAP-0.412_20200506_041400-64a12c0b.pth",
        "x101-32x4d",
        242,
    ),
    "faster-rcnn_x101-64x4d_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_x101_64x4d_fpn_1x_coco/faster_rcnn_x101_64x4d_fpn_1x_coco_20200204-833ee192.pth",
        "x101-64x4d",
        399,
    ),
    "faster-rcnn_x101-64x4d_fpn_2x_coco": (
        "faster_rcnn/faster_rcnn_x101_64x4d_fpn_2x_coco/faster_rcnn_x101_64x4d_fpn_2x_coco_20200512_161033-5961fa95.pth",
        "x101-64x4d",
        399,
    ),
    "faster-rcnn_r50-caffe_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_r50_caffe_fpn_1x_coco/faster_rcnn_r50_caffe_fpn_1x_coco_bbox_mAP-0.378_20200504_180032-c5925ee5.pth",
        "r50-caffe",
        167,
    ),
    "faster-rcnn_r101-caffe_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_r101_caffe_fpn_1x_coco/faster_rcnn_r101_caffe_fpn_1x_coco_bbox_mAP-0.398_20200504_180057-b269e9dd.pth",
        "r101-caffe",
        243,
    ),
    "mask-rcnn_r50_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_r50_fpn_1x_coco/mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth",
        "r50",
        178,
    ),
    "mask-rcnn_r50_fpn_2x_coco": (
        "mask_rcnn/mask_rcnn_r50_fpn_2x_coco/mask_rcnn_r50_fpn_2x_coco_bbox_mAP-0.392__segm_mAP-0.354_20200505_003907-3e542a40.pth",
        "r50",
        178,
    ),
    "mask-rcnn_r101_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_r101_fpn_1x_coco/mask_rcnn_r101_fpn_1x_coco_20200204-1efe0ed5.pth",
        "r101",
        254,
    ),
    "mask-rcnn_r101_fpn_2x_coco": (
        "mask_rcnn/mask_rcnn_r101_fpn_2x_coco/mask_rcnn_r101_fpn_2x_coco_bbox_mAP-0.408__segm_mAP-0.366_20200505_071027-14b391c7.pth",
        "r101",
        254,
    ),
    "mask-rcnn_x101-32x4d_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_x101_32x4d_fpn_1x_coco/mask_rcnn_x101_32x4d_fpn_1x_coco_20200205-478d0b67.pth",
        "x101-32x4d",
        253,
    ),
    "mask-rcnn_x101-32x4d_fpn_2x_coco": (
        "mask_rcnn/mask_rcnn_x101_32x4d_fpn_2x_coco/mask_rcnn_x101_32x4d_fpn_2x_coco_bbox_mAP-0.422__segm_mAP-0.378_20200506_004702-faef898c.pth",
        "x101-32x4d",
        253,
    ),
    "mask-rcnn_x101-64x4d_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_x101_64x4d_fpn_1x_coco/mask_rcnn_x101_64x4d_fpn_1x_coco_20200201-9352eb0d.pth",
        "x101-64x4d",
        410,
    ),
    "mask-rcnn_x101-64x4d_fpn_2x_coco": (
        "mask_rcnn/mask_rcnn_x101_64x4d_fpn_2x_coco/mask_rcnn_x101_64x4d_fpn_2x_coco_20200509_224208-39d6f70c.pth",
        "x101-64x4d",
        410,
    ),
    "mask-rcnn_x101-32x8d_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_x101_32x8d_fpn_1x_coco/mask_rcnn_x101_32x8d_fpn_1x_coco_20220630_173841-0aaf329e.pth",
        "x101-32x8d",
        431,
    ),
    "mask-rcnn_r50-caffe_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_r50_caffe_fpn_1x_coco/mask_rcnn_r50_caffe_fpn_1x_coco_bbox_mAP-0.38__segm_mAP-0.344_20200504_231812-0ebd1859.pth",
        "r50-caffe",
        178,
    ),
    "mask-rcnn_r101-caffe_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_r101_caffe_fpn_1x_coco/mask_rcnn_r101_caffe_fpn_1x_coco_20200601_095758-805e06c1.pth",
        "r101-caffe",
        254,
    ),
    "retinanet_r50_fpn_1x_coco": (
        "retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth",
        "r50",
        152,
    ),
    "retinanet_r50_fpn_2x_coco": (
        "retinanet/retinanet_r50_fpn_2x_coco/retinanet_r50_fpn_2x_coco_20200131-fdb43119.pth",
        "r50",
        152,
    ),
    "retinanet_r101_fpn_1x_coco": (
        "retinanet/retinanet_r101_fpn_1x_coco/retinanet_r101_fpn_1x_coco_20200130-7a93545f.pth",
        "r101",
        228,
    ),
    "retinanet_r101_fpn_2x_coco": (
        "retinanet/retinanet_r101_fpn_2x_coco/retinanet_r101_fpn_2x_coco_20200131-5560aee8.pth",
        "r101",
        228,
    ),
    "retinanet_x101-32x4d_fpn_1x_coco": (
        "retinanet/retinanet_x101_32x4d_fpn_1x_coco/retinanet_x101_32x4d_fpn_1x_coco_20200130-5c8b7ec4.pth",
        "x101-32x4d",
        227,
    ),
    "retinanet_x101-32x4d_fpn_2x_coco": (
        "retinanet/retinanet_x101_32x4d_fpn_2x_coco/retinanet_x101_32x4d_fpn_2x_coco_20200131-237fc5e1.pth",
        "x101-32x4d",
        227,
    ),
    "retinanet_x101-64x4d_fpn_1x_coco": (
        "retinanet/retinanet_x101_64x4d_fpn_1x_coco/retinanet_x101_64x4d_fpn_1x_coco_20200130-366f5af1.pth",
        "x101-64x4d",
        384,
    ),
    "retinanet_x101-64x4d_fpn_2x_coco": (
        "retinanet/retinanet_x101_64x4d_fpn_2x_coco/retinanet_x101_64x4d_fpn_2x_coco_20200131-bca068ab.pth",
        "x101-64x4d",
        384,
    ),
    "retinanet_r50-caffe_fpn_1x_coco": (
        "retinanet/retinanet_r50_caffe_fpn_1x_coco/retinanet_r50_caffe_fpn_1x_coco_20200531-f11027c5.pth",
        "r50-caffe",
        152,
    ),
    "retinanet_r101-caffe_fpn_1x_coco": (
        "retinanet/retinanet_r101_caffe_fpn_1x_coco/retinanet_r101_caffe_fpn_1x_coco_20200531-b428fa0f.pth",
        "r101-caffe",
        228,
    ),
}
# mmdetection's backbones: arch and preprocessing ("pytorch" style is torchvision's ResNet on RGB)
BACKBONES: dict[str, tuple[str, Preprocess]] = {
    "r50": ("resnet50", PYTORCH_RGB),
    "r101": ("resnet101", PYTORCH_RGB),
    "x101-32x4d": ("resnext101_32x4d", PYTORCH_RGB),
    "x101-64x4d": ("resnext101_64x4d", PYTORCH_RGB),
    "x101-32x8d": ("resnext101_32x8d", FAIR_X101),  # FAIR's C2 weights: BGR, caffe mean
    "r50-caffe": ("resnet50_msra", MSRA_BGR),
    "r101-caffe": ("resnet101_msra", MSRA_BGR),
}
_R_CNN = ("p2", "p3", "p4", "p5")
_ONE_STAGE = ("p3", "p4", "p5", "p6", "p7")


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
    pad_multiple = 32
    resize = ResizePolicy(800, 1333, "Resize(scale=(1333, 800), keep_ratio=True)")

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

    def entries(self) -> list[ZooEntry]:
        entries = []
        for config, (rel, backbone, mb) in CONFIGS.items():
            arch, preprocess = BACKBONES[backbone]
            retinanet = config.startswith("retinanet")
            entries.append(
                ZooEntry(
                    f"mmdet:{config}", arch, "mmdet_retinanet" if retinanet else "mmdet",
                    _ONE_STAGE if retinanet else _R_CNN, preprocess, URL + rel, os.path.basename(rel), mb,
                    read_file, size_estimated=True, pad_multiple=self.pad_multiple, resize=self.resize,
                )
            )  # fmt: skip
        return entries
