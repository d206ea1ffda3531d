"""The model zoo: pretrained FPNs as their frameworks run them, and the cache they download into.

An entry is everything a framework's config says about its backbone: architecture, FPN variant,
BatchNorm eps, levels, preprocessing and padding, plus where its file lives. Choosing one sets them
all. Files go through torch.hub's downloader into its cache, ``$TORCH_HOME/hub/checkpoints/``:

- ``torchvision:<builder>``: torchvision's own file names (``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``);
- ``detectron2:<config>``: ``detectron2/<config>/<id>/model_final_<md5>.pkl``, the URL's path;
- ``mmdet:<config>``: mmdetection's file names.

A new family is a table here plus its key format in weights.py.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fpn_cli.errors import UsageError, WeightsError
from fpn_cli.models.preprocess import DETECTRON2_BGR, DETECTRON2_X101, IMAGENET, MMDET_PYTORCH, Preprocess
from fpn_cli.models.weights import Checkpoint, read_file

OFFLINE_ENV = "FPN_EXTRACT_OFFLINE"  # set to 1 to never try a download
COCO_ALIAS = "coco"


@dataclass(frozen=True)
class ZooEntry:
    name: str  # "detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x"
    arch: str
    fpn_style: str
    levels: tuple[str, ...]  # the default levels: the detector's own pyramid
    preprocess: Preprocess
    url: str
    cache_name: str  # the file's path under $TORCH_HOME/hub/checkpoints
    size_mb: float | None  # download size, where the framework states it; else estimated
    size_estimated: bool = False
    bn_eps: float = 1e-5
    pad_multiple: int = 1
    md5_prefix: str | None = None  # detectron2 names files by md5, which torch.hub cannot check

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0]

    @staticmethod
    def cache_root() -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints"

    def path(self) -> Path:
        return self.cache_root() / self.cache_name

    def is_cached(self) -> bool:
        return self.path().is_file()

    def load(self) -> Checkpoint:
        path = fetch(self.url, self.path(), self.name, self.md5_prefix)
        return read_file(path, source=f"{self.name} ({path.name})")


# --- downloads -------------------------------------------------------------------------------------


def fetch(url: str, path: Path, what: str, md5_prefix: str | None = None) -> Path:
    """``path`` if cached, else downloaded there by torch.hub's own downloader (which checks the
    SHA-256 prefix in the file name, and shows tqdm's bar with elapsed time and ETA on a terminal).
    Offline, or with ``FPN_EXTRACT_OFFLINE=1``, the error names the URL and the exact path."""
    if path.is_file():
        return path
    hint = f"download {url} and place it at {path}"
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise WeightsError(f"{what} weights are not in the cache and {OFFLINE_ENV} is set: {hint}")
    digest = re.search(r"-([a-f0-9]{6,})\.", path.name) if md5_prefix is None else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            url, str(path), digest.group(1) if digest else None, sys.stderr.isatty()
        )
        if md5_prefix is not None:
            _check_md5(path, md5_prefix)
    except Exception as e:
        path.unlink(missing_ok=True)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"cannot download {what} weights ({reason}): {hint}") from None
    return path


def _check_md5(path: Path, prefix: str) -> None:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(prefix):
        raise RuntimeError(f"md5 {h.hexdigest()[: len(prefix)]} does not match the {prefix} in the file name")


# --- torchvision -----------------------------------------------------------------------------------

_R_CNN = ("p2", "p3", "p4", "p5")
_ONE_STAGE = ("p3", "p4", "p5", "p6", "p7")

# builder: (arch, FPN style, BatchNorm eps as the builder runs its default weights, levels)
TORCHVISION_DETECTORS: dict[str, tuple[str, str, float, tuple[str, ...]]] = {
    # the v1 builders call overwrite_eps(model, 0.0) for their COCO weights
    "fasterrcnn_resnet50_fpn": ("resnet50", "torchvision", 0.0, _R_CNN),
    "fasterrcnn_resnet50_fpn_v2": ("resnet50", "torchvision_v2", 1e-5, _R_CNN),
    "maskrcnn_resnet50_fpn": ("resnet50", "torchvision", 0.0, _R_CNN),
    "maskrcnn_resnet50_fpn_v2": ("resnet50", "torchvision_v2", 1e-5, _R_CNN),
    "retinanet_resnet50_fpn": ("resnet50", "torchvision_retinanet", 0.0, _ONE_STAGE),
    "retinanet_resnet50_fpn_v2": ("resnet50", "torchvision_retinanet_v2", 1e-5, _ONE_STAGE),
    "keypointrcnn_resnet50_fpn": ("resnet50", "torchvision", 0.0, _R_CNN),
    "fcos_resnet50_fpn": ("resnet50", "torchvision_retinanet", 1e-5, _ONE_STAGE),  # no overwrite_eps
    "fasterrcnn_mobilenet_v3_large_fpn": ("mobilenet_v3_large", "torchvision", 1e-5, ("p5a", "p5", "p6")),
}


def _torchvision_entries() -> list[ZooEntry]:
    from torchvision.models import get_model_weights

    entries = []
    for builder, (arch, style, eps, levels) in TORCHVISION_DETECTORS.items():
        weights = get_model_weights(builder).DEFAULT
        entries.append(
            ZooEntry(
                f"torchvision:{builder}", arch, style, levels, IMAGENET, weights.url,
                os.path.basename(weights.url), weights.meta.get("_file_size"), bn_eps=eps,
            )
        )  # fmt: skip
    return entries


# --- detectron2 ------------------------------------------------------------------------------------

D2_URL = "https://dl.fbaipublicfiles.com/detectron2/"
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
# MSRA's R-50/R-101 (stride on the 1x1 conv, std folded into conv1); FAIR's X-101 is torchvision-like
_D2_BACKBONES = {
    "R50": ("resnet50_msra", DETECTRON2_BGR),
    "R101": ("resnet101_msra", DETECTRON2_BGR),
    "X101": ("resnext101_32x8d", DETECTRON2_X101),
}


def _detectron2_entries() -> list[ZooEntry]:
    entries = []
    for config, (model_id, md5, backbone, retinanet, mb) in DETECTRON2_CONFIGS.items():
        arch, preprocess = _D2_BACKBONES[backbone]
        rel = f"{config}/{model_id}/model_final_{md5}.pkl"
        entries.append(
            ZooEntry(
                f"detectron2:{config}", arch, "detectron2_retinanet" if retinanet else "detectron2",
                _ONE_STAGE if retinanet else _R_CNN, preprocess, D2_URL + rel, f"detectron2/{rel}", mb,
                size_estimated=True, pad_multiple=32, md5_prefix=md5,
            )
        )  # fmt: skip
    return entries


# --- mmdetection -----------------------------------------------------------------------------------

MMDET_URL = "https://download.openmmlab.com/mmdetection/v2.0/"
# config: (file path under MMDET_URL, backbone, estimated MB)
MMDET_CONFIGS: dict[str, tuple[str, str, float]] = {
    "faster-rcnn_r50_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth",
        "r50",
        167,
    ),  # noqa: E501
    "faster-rcnn_r50_fpn_2x_coco": (
        "faster_rcnn/faster_rcnn_r50_fpn_2x_coco/faster_rcnn_r50_fpn_2x_coco_bbox_mAP-0.384_20200504_210434-a5d8aa15.pth",
        "r50",
        167,
    ),  # noqa: E501
    "faster-rcnn_r101_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_r101_fpn_1x_coco/faster_rcnn_r101_fpn_1x_coco_20200130-f513f705.pth",
        "r101",
        243,
    ),  # noqa: E501
    "faster-rcnn_r101_fpn_2x_coco": (
        "faster_rcnn/faster_rcnn_r101_fpn_2x_coco/faster_rcnn_r101_fpn_2x_coco_bbox_mAP-0.398_20200504_210455-1d2dac9c.pth",
        "r101",
        243,
    ),  # noqa: E501
    "faster-rcnn_x101-32x4d_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_x101_32x4d_fpn_1x_coco/faster_rcnn_x101_32x4d_fpn_1x_coco_20200203-cff10310.pth",
        "x101-32x4d",
        242,
    ),  # noqa: E501
    "faster-rcnn_x101-32x4d_fpn_2x_coco": (
        "faster_rcnn/faster_rcnn_x101_32x4d_fpn_2x_coco/faster_rcnn_x101_32x4d_fpn_2x_coco_bbox_mAP-0.412_20200506_041400-64a12c0b.pth",
        "x101-32x4d",
        242,
    ),  # noqa: E501
    "faster-rcnn_x101-64x4d_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_x101_64x4d_fpn_1x_coco/faster_rcnn_x101_64x4d_fpn_1x_coco_20200204-833ee192.pth",
        "x101-64x4d",
        399,
    ),  # noqa: E501
    "faster-rcnn_x101-64x4d_fpn_2x_coco": (
        "faster_rcnn/faster_rcnn_x101_64x4d_fpn_2x_coco/faster_rcnn_x101_64x4d_fpn_2x_coco_20200512_161033-5961fa95.pth",
        "x101-64x4d",
        399,
    ),  # noqa: E501
    "faster-rcnn_r50-caffe_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_r50_caffe_fpn_1x_coco/faster_rcnn_r50_caffe_fpn_1x_coco_bbox_mAP-0.378_20200504_180032-c5925ee5.pth",
        "r50-caffe",
        167,
    ),  # noqa: E501
    "faster-rcnn_r101-caffe_fpn_1x_coco": (
        "faster_rcnn/faster_rcnn_r101_caffe_fpn_1x_coco/faster_rcnn_r101_caffe_fpn_1x_coco_bbox_mAP-0.398_20200504_180057-b269e9dd.pth",
        "r101-caffe",
        243,
    ),  # noqa: E501
    "mask-rcnn_r50_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_r50_fpn_1x_coco/mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth",
        "r50",
        178,
    ),  # noqa: E501
    "mask-rcnn_r50_fpn_2x_coco": (
        "mask_rcnn/mask_rcnn_r50_fpn_2x_coco/mask_rcnn_r50_fpn_2x_coco_bbox_mAP-0.392__segm_mAP-0.354_20200505_003907-3e542a40.pth",
        "r50",
        178,
    ),  # noqa: E501
    "mask-rcnn_r101_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_r101_fpn_1x_coco/mask_rcnn_r101_fpn_1x_coco_20200204-1efe0ed5.pth",
        "r101",
        254,
    ),  # noqa: E501
    "mask-rcnn_r101_fpn_2x_coco": (
        "mask_rcnn/mask_rcnn_r101_fpn_2x_coco/mask_rcnn_r101_fpn_2x_coco_bbox_mAP-0.408__segm_mAP-0.366_20200505_071027-14b391c7.pth",
        "r101",
        254,
    ),  # noqa: E501
    "mask-rcnn_x101-32x4d_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_x101_32x4d_fpn_1x_coco/mask_rcnn_x101_32x4d_fpn_1x_coco_20200205-478d0b67.pth",
        "x101-32x4d",
        253,
    ),  # noqa: E501
    "mask-rcnn_x101-32x4d_fpn_2x_coco": (
        "mask_rcnn/mask_rcnn_x101_32x4d_fpn_2x_coco/mask_rcnn_x101_32x4d_fpn_2x_coco_bbox_mAP-0.422__segm_mAP-0.378_20200506_004702-faef898c.pth",
        "x101-32x4d",
        253,
    ),  # noqa: E501
    "mask-rcnn_x101-64x4d_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_x101_64x4d_fpn_1x_coco/mask_rcnn_x101_64x4d_fpn_1x_coco_20200201-9352eb0d.pth",
        "x101-64x4d",
        410,
    ),  # noqa: E501
    "mask-rcnn_x101-64x4d_fpn_2x_coco": (
        "mask_rcnn/mask_rcnn_x101_64x4d_fpn_2x_coco/mask_rcnn_x101_64x4d_fpn_2x_coco_20200509_224208-39d6f70c.pth",
        "x101-64x4d",
        410,
    ),  # noqa: E501
    "mask-rcnn_x101-32x8d_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_x101_32x8d_fpn_1x_coco/mask_rcnn_x101_32x8d_fpn_1x_coco_20220630_173841-0aaf329e.pth",
        "x101-32x8d",
        431,
    ),  # noqa: E501
    "mask-rcnn_r50-caffe_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_r50_caffe_fpn_1x_coco/mask_rcnn_r50_caffe_fpn_1x_coco_bbox_mAP-0.38__segm_mAP-0.344_20200504_231812-0ebd1859.pth",
        "r50-caffe",
        178,
    ),  # noqa: E501
    "mask-rcnn_r101-caffe_fpn_1x_coco": (
        "mask_rcnn/mask_rcnn_r101_caffe_fpn_1x_coco/mask_rcnn_r101_caffe_fpn_1x_coco_20200601_095758-805e06c1.pth",
        "r101-caffe",
        254,
    ),  # noqa: E501
    "retinanet_r50_fpn_1x_coco": (
        "retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth",
        "r50",
        152,
    ),  # noqa: E501
    "retinanet_r50_fpn_2x_coco": (
        "retinanet/retinanet_r50_fpn_2x_coco/retinanet_r50_fpn_2x_coco_20200131-fdb43119.pth",
        "r50",
        152,
    ),  # noqa: E501
    "retinanet_r101_fpn_1x_coco": (
        "retinanet/retinanet_r101_fpn_1x_coco/retinanet_r101_fpn_1x_coco_20200130-7a93545f.pth",
        "r101",
        228,
    ),  # noqa: E501
    "retinanet_r101_fpn_2x_coco": (
        "retinanet/retinanet_r101_fpn_2x_coco/retinanet_r101_fpn_2x_coco_20200131-5560aee8.pth",
        "r101",
        228,
    ),  # noqa: E501
    "retinanet_x101-32x4d_fpn_1x_coco": (
        "retinanet/retinanet_x101_32x4d_fpn_1x_coco/retinanet_x101_32x4d_fpn_1x_coco_20200130-5c8b7ec4.pth",
        "x101-32x4d",
        227,
    ),  # noqa: E501
    "retinanet_x101-32x4d_fpn_2x_coco": (
        "retinanet/retinanet_x101_32x4d_fpn_2x_coco/retinanet_x101_32x4d_fpn_2x_coco_20200131-237fc5e1.pth",
        "x101-32x4d",
        227,
    ),  # noqa: E501
    "retinanet_x101-64x4d_fpn_1x_coco": (
        "retinanet/retinanet_x101_64x4d_fpn_1x_coco/retinanet_x101_64x4d_fpn_1x_coco_20200130-366f5af1.pth",
        "x101-64x4d",
        384,
    ),  # noqa: E501
    "retinanet_x101-64x4d_fpn_2x_coco": (
        "retinanet/retinanet_x101_64x4d_fpn_2x_coco/retinanet_x101_64x4d_fpn_2x_coco_20200131-bca068ab.pth",
        "x101-64x4d",
        384,
    ),  # noqa: E501
    "retinanet_r50-caffe_fpn_1x_coco": (
        "retinanet/retinanet_r50_caffe_fpn_1x_coco/retinanet_r50_caffe_fpn_1x_coco_20200531-f11027c5.pth",
        "r50-caffe",
        152,
    ),  # noqa: E501
    "retinanet_r101-caffe_fpn_1x_coco": (
        "retinanet/retinanet_r101_caffe_fpn_1x_coco/retinanet_r101_caffe_fpn_1x_coco_20200531-b428fa0f.pth",
        "r101-caffe",
        228,
    ),  # noqa: E501
}
# mmdetection's backbones: arch and preprocessing ("pytorch" style is torchvision's ResNet on RGB)
MMDET_BACKBONES: dict[str, tuple[str, Preprocess]] = {
    "r50": ("resnet50", MMDET_PYTORCH),
    "r101": ("resnet101", MMDET_PYTORCH),
    "x101-32x4d": ("resnext101_32x4d", MMDET_PYTORCH),
    "x101-64x4d": ("resnext101_64x4d", MMDET_PYTORCH),
    "x101-32x8d": ("resnext101_32x8d", DETECTRON2_X101),  # FAIR's C2 weights: BGR, caffe mean
    "r50-caffe": ("resnet50_msra", DETECTRON2_BGR),
    "r101-caffe": ("resnet101_msra", DETECTRON2_BGR),
}


def _mmdet_entries() -> list[ZooEntry]:
    entries = []
    for config, (rel, backbone, mb) in MMDET_CONFIGS.items():
        arch, preprocess = MMDET_BACKBONES[backbone]
        retinanet = config.startswith("retinanet")
        entries.append(
            ZooEntry(
                f"mmdet:{config}", arch, "mmdet_retinanet" if retinanet else "mmdet",
                _ONE_STAGE if retinanet else _R_CNN, preprocess, MMDET_URL + rel, os.path.basename(rel), mb,
                size_estimated=True, pad_multiple=32,
            )
        )  # fmt: skip
    return entries


@functools.lru_cache(maxsize=1)
def zoo() -> dict[str, ZooEntry]:
    """Every entry by name."""
    entries = _torchvision_entries() + _detectron2_entries() + _mmdet_entries()
    return {e.name: e for e in entries}


def is_zoo_name(spec: str) -> bool:
    return spec == COCO_ALIAS or any(spec.startswith(f + ":") for f in ("torchvision", "detectron2", "mmdet"))


def entry(spec: str) -> ZooEntry:
    """The entry named ``spec`` (``coco`` is ``torchvision:fasterrcnn_resnet50_fpn``)."""
    name = "torchvision:fasterrcnn_resnet50_fpn" if spec == COCO_ALIAS else spec
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


# --- ImageNet classifiers: a backbone without an FPN -----------------------------------------------


def imagenet_checkpoint(torchvision_name: str | None, arch: str) -> Checkpoint:
    """torchvision's default ImageNet weights for ``arch``, from its cache (downloaded if absent)."""
    import torchvision

    if torchvision_name is None:
        raise WeightsError(
            f"arch {arch!r} has no ImageNet weights in torchvision; use --weights random or a file"
        )
    url = torchvision.models.get_model_weights(torchvision_name).DEFAULT.url
    path = fetch(
        url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), f"ImageNet {torchvision_name}"
    )
    return read_file(path, source=f"imagenet ({path.name})")
