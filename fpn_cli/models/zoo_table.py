"""The model zoo's facts, declared: every pretrained FPN's name, backbone, FPN variant, BatchNorm
eps, levels, preprocessing, padding, test-time resize, URL, cache file name (with the hash it
carries), download size and, for torchvision's, its categories. Plain data, no torch: ``fpn-extract
models`` lists the zoo from here at once, and the frameworks (frameworks/<name>.py) take their
entries, preprocessing, padding and resize from here, so each fact has one home.

torchvision's rows restate what its weights enums say (``get_model_weights(builder).DEFAULT``: url,
``_file_size``, ``categories``) and its detectors' test-time resize (``GeneralizedRCNNTransform``'s
``min_size=800, max_size=1333``); tests/test_zoo.py checks each against torchvision, so the table
cannot drift from it. detectron2's and mmdetection's come from their model zoos' pages.
"""

from __future__ import annotations

import os
from pathlib import Path

from fpn_cli.models.hub import ResizePolicy, ZooEntry
from fpn_cli.models.preprocess import IMAGENET, Preprocess

_R_CNN = ("p2", "p3", "p4", "p5")
_ONE_STAGE = ("p3", "p4", "p5", "p6", "p7")


def _read_file(path: Path, source: str) -> object:
    """A zoo file of any framework's layout, under our keys (the frameworks, and torch, load here)."""
    from fpn_cli.models.frameworks import read_file

    return read_file(path, source)


# --- torchvision ---------------------------------------------------------------------------------

TORCHVISION_RESIZE = ResizePolicy(800, 1333, "GeneralizedRCNNTransform(min_size=800, max_size=1333)")
TORCHVISION_URL = "https://download.pytorch.org/models/"
# builder: (arch, FPN style, BatchNorm eps as the builder runs its default weights, levels,
#           file name under TORCHVISION_URL, MB as torchvision states it, categories incl. background)
TORCHVISION: dict[str, tuple[str, str, float, tuple[str, ...], str, float, int]] = {
    # the v1 builders call overwrite_eps(model, 0.0) for their COCO weights; FCOS's does not
    "fasterrcnn_resnet50_fpn": (
        "resnet50", "torchvision", 0.0, _R_CNN,
        "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth", 159.743, 91,
    ),
    "fasterrcnn_resnet50_fpn_v2": (
        "resnet50", "torchvision_v2", 1e-5, _R_CNN,
        "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth", 167.104, 91,
    ),
    "maskrcnn_resnet50_fpn": (
        "resnet50", "torchvision", 0.0, _R_CNN,
        "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", 169.84, 91,
    ),
    "maskrcnn_resnet50_fpn_v2": (
        "resnet50", "torchvision_v2", 1e-5, _R_CNN,
        "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth", 177.219, 91,
    ),
    "retinanet_resnet50_fpn": (
        "resnet50", "torchvision_retinanet", 0.0, _ONE_STAGE,
        "retinanet_resnet50_fpn_coco-eeacb38b.pth", 130.267, 91,
    ),
    "retinanet_resnet50_fpn_v2": (
        "resnet50", "torchvision_retinanet_v2", 1e-5, _ONE_STAGE,
        "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth", 146.037, 91,
    ),
    "keypointrcnn_resnet50_fpn": (
        "resnet50", "torchvision", 0.0, _R_CNN,
        "keypointrcnn_resnet50_fpn_coco-fc266e95.pth", 226.054, 2,  # background and person
    ),
    "fcos_resnet50_fpn": (
        "resnet50", "torchvision_retinanet", 1e-5, _ONE_STAGE,
        "fcos_resnet50_fpn_coco-99b0c9b7.pth", 123.608, 91,
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        "mobilenet_v3_large", "torchvision", 1e-5, ("p5a", "p5", "p6"),
        "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth", 74.239, 91,
    ),
}  # fmt: skip

# --- detectron2 ----------------------------------------------------------------------------------

# MSRA's R-50/R-101 (detectron2; mmdetection's caffe style): the std is folded into conv1
MSRA_BGR = Preprocess((103.530, 116.280, 123.675), (1.0, 1.0, 1.0), "BGR", 1.0, "BGR 0-255, minus mean")
# FAIR's X-101 (converted from Caffe2): BGR with the std applied
FAIR_X101 = Preprocess(
    (103.530, 116.280, 123.675), (57.375, 57.120, 58.395), "BGR", 1.0, "BGR 0-255, mean/std"
)
DETECTRON2_PAD = 32  # its ImageList pads to SIZE_DIVISIBILITY
DETECTRON2_RESIZE = ResizePolicy(800, 1333, "ResizeShortestEdge(800, max_size=1333)")
DETECTRON2_URL = "https://dl.fbaipublicfiles.com/detectron2/"
# config: (model id, file md5 prefix, backbone "R50" | "R101" | "X101", RetinaNet?, estimated MB)
DETECTRON2_CONFIGS: dict[str, tuple[str, str, str, bool, float]] = {
    "COCO-Detection/faster_rcnn_R_50_FPN_1x": ("137257794", "b275ba", "R50", False, 167),
    "COCO-Detection/faster_rcnn_R_50_FPN_3x": ("137849458", "280758", "R50", False, 167),
    "COCO-Detection/faster_rcnn_R_101_FPN_3x": ("137851257", "f6e8b1", "R101", False, 243),
    "COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x": ("139173657", "68b088", "X101", False, 421),
    "COCO-Detection/retinanet_R_50_FPN_1x": ("190397773", "bfca0b", "R50", True, 152),
    "COCO-Detection/retinanet_R_50_FPN_3x": ("190397829", "5bd44e", "R50", True, 152),
    "COCO-Detection/retinanet_R_101_FPN_3x": ("190397697", "971ab9", "R101", True, 228),
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x": ("137849600", "f10217", "R50", False, 178),
    "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x": ("138205316", "a3ec72", "R101", False, 254),
    "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x": ("139653917", "2d9806", "X101", False, 431),
    "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x": ("137849621", "a6e10b", "R50", False, 237),
}
DETECTRON2_BACKBONES = {
    "R50": ("resnet50_msra", MSRA_BGR),
    "R101": ("resnet101_msra", MSRA_BGR),
    "X101": ("resnext101_32x8d", FAIR_X101),
}

# --- mmdetection ---------------------------------------------------------------------------------

PYTORCH_RGB = Preprocess(
    (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "RGB", 1.0, "RGB 0-255, ImageNet mean/std"
)
MMDET_PAD = 32  # its data preprocessor's pad_size_divisor
MMDET_RESIZE = ResizePolicy(800, 1333, "Resize(scale=(1333, 800), keep_ratio=True)")
MMDET_URL = "https://download.openmmlab.com/mmdetection/v2.0/"
# config: (file path under URL, backbone, estimated MB)
MMDET_CONFIGS: dict[str, tuple[str, str, float]] = {
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
MMDET_BACKBONES: dict[str, tuple[str, Preprocess]] = {
    "r50": ("resnet50", PYTORCH_RGB),
    "r101": ("resnet101", PYTORCH_RGB),
    "x101-32x4d": ("resnext101_32x4d", PYTORCH_RGB),
    "x101-64x4d": ("resnext101_64x4d", PYTORCH_RGB),
    "x101-32x8d": ("resnext101_32x8d", FAIR_X101),  # FAIR's C2 weights: BGR, caffe mean
    "r50-caffe": ("resnet50_msra", MSRA_BGR),
    "r101-caffe": ("resnet101_msra", MSRA_BGR),
}


def _torchvision() -> list[ZooEntry]:
    return [
        ZooEntry(
            f"torchvision:{builder}", arch, style, levels, IMAGENET, TORCHVISION_URL + file, file, mb,
            _read_file, bn_eps=eps, resize=TORCHVISION_RESIZE,
        )
        for builder, (arch, style, eps, levels, file, mb, _) in TORCHVISION.items()
    ]  # fmt: skip


def _detectron2() -> list[ZooEntry]:
    entries = []
    for config, (model_id, md5, backbone, retinanet, mb) in DETECTRON2_CONFIGS.items():
        arch, preprocess = DETECTRON2_BACKBONES[backbone]
        rel = f"{config}/{model_id}/model_final_{md5}.pkl"
        entries.append(
            ZooEntry(
                f"detectron2:{config}", arch, "detectron2_retinanet" if retinanet else "detectron2",
                _ONE_STAGE if retinanet else _R_CNN, preprocess, DETECTRON2_URL + rel,
                f"detectron2/{rel}", mb, _read_file, size_estimated=True, pad_multiple=DETECTRON2_PAD,
                md5_prefix=md5, resize=DETECTRON2_RESIZE,
            )
        )  # fmt: skip
    return entries


def _mmdet() -> list[ZooEntry]:
    entries = []
    for config, (rel, backbone, mb) in MMDET_CONFIGS.items():
        arch, preprocess = MMDET_BACKBONES[backbone]
        retinanet = config.startswith("retinanet")
        entries.append(
            ZooEntry(
                f"mmdet:{config}", arch, "mmdet_retinanet" if retinanet else "mmdet",
                _ONE_STAGE if retinanet else _R_CNN, preprocess, MMDET_URL + rel, os.path.basename(rel), mb,
                _read_file, size_estimated=True, pad_multiple=MMDET_PAD, resize=MMDET_RESIZE,
            )
        )  # fmt: skip
    return entries


# every declared entry by family, in the registry's order of frameworks (frameworks/__init__.py)
TABLE: dict[str, tuple[ZooEntry, ...]] = {
    "torchvision": tuple(_torchvision()),
    "detectron2": tuple(_detectron2()),
    "mmdet": tuple(_mmdet()),
}
