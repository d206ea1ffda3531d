"""Detections in a run (``--detect``) and out of a finished folder (``fpn-extract detections``).

:func:`load_detector` turns the options into a :class:`Detector`: the weights' torchvision detector
heads (regions/detect.py) loaded from the same checkpoint file as the FPN, the test-time resize it
runs with, and the det_* arrays each image gets. The engine runs it on each batch (engine.py).

:func:`coco_results` reads the det_* arrays of a finished folder through ``open_features`` (any
format) and gives them as COCO results: ``[{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}, ...]``, what pycocotools' ``COCO.loadRes`` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpn_cli.errors import UsageError
from fpn_cli.formats import codecs
from fpn_cli.layout import REPORT_FILE
from fpn_cli.models.builder import ModelSpec
from fpn_cli.models.model import resolved_levels
from fpn_cli.models.weights import read_raw
from fpn_cli.regions.detect import (
    DETECTORS,
    ZOO_PREFIX,
    DetectionHeads,
    DetectOptions,
    Detector,
    DetectorResize,
    categories,
    check_extras,
    det_names,
    detector_of,
)
from fpn_cli.run.options import Options, detect_record


def detector_header(detector: Detector, opts: Options) -> dict:
    """report.json's ``detections``: the detector, what it keeps, the label names."""
    return {
        "detector": ZOO_PREFIX + detector.builder,
        "arrays": list(detector.names),
        **detect_record(opts),
        "test_time_resize": None
        if detector.resize is None
        else {"min_size": detector.resize.min_size, "max_size": detector.resize.max_size},
        "score_thresh_used": detector.heads.score_thresh(),
        "max_detections_used": detector.heads.max_detections(),
        "categories": detector.labels,
        **(
            {}
            if detector.labels is not None
            else {"categories_note": "the weights carry no names for these labels"}
        ),
    }


def detector_resize(opts: Options, spec: ModelSpec) -> DetectorResize | None:
    """The resize the detector runs with: its own test-time one (the weights' framework's,
    ``spec.resize``: 800/1333) unless the user resized: ``--short-side N [--max-side M]`` become
    its min_size/max_size (no --max-side: M = N x 1333/800, the detector's ratio); ``--size HxW``
    is done as without --detect, and the detector sees that input unresized (None)."""
    given = opts.resize
    if given.size is not None:
        return None
    policy = spec.resize
    short = given.short_side or policy.short_side
    if given.max_side is not None:
        return DetectorResize(short, given.max_side)
    return DetectorResize(short, round(short * policy.max_side / policy.short_side))


def load_detector(opts: Options, spec: ModelSpec) -> Detector:
    """The heads of ``spec``'s detector, from the file the FPN loads (downloaded by then)."""
    builder = check_detect(opts, spec)
    count = opts.detections_count
    options = DetectOptions(
        score_thresh=opts.score_thresh,
        max_detections=count[1] if count else opts.max_detections,
        min_detections=count[0] if count else 0,
        roi_size=opts.roi_size if isinstance(opts.roi_size, int) else None,
    )
    raw = read_raw(spec.origin.path, spec.weights)
    heads = DetectionHeads(builder, raw.state, options)
    return Detector(
        builder,
        heads,
        detector_resize(opts, spec),
        det_names(builder, opts.detect_extras),
        codecs.derived_dtype(opts.save_dtype),
        categories(builder, heads.num_classes),
    )


def check_detect(opts: Options, spec: ModelSpec) -> str:
    """The builder of ``spec``'s detector, before anything is built or downloaded; a --weights
    that is no torchvision detector, extras it lacks or --levels without the heads' levels are a
    :class:`UsageError`."""
    builder = detector_of(spec.weights)
    if builder is None or spec.origin is None:
        offered = ", ".join(["coco", *(ZOO_PREFIX + b for b in DETECTORS)])
        raise UsageError(
            f"--detect runs a detector's own heads: --weights {spec.weights} ({spec.config.arch}) "
            f"is no detector; choose from {offered}"
        )
    check_extras(builder, opts.detect_extras)
    needed = [level for level, _ in DETECTORS[builder].levels if _needs(builder, level)]
    lacking = [level for level in needed if level not in resolved_levels(spec.config)]
    if lacking:
        raise UsageError(
            f"--detect with {builder} needs the levels {', '.join(needed)}: "
            f"--levels lacks {', '.join(lacking)} (leave --levels out)"
        )
    return builder


def _needs(builder: str, level: str) -> bool:
    """R-CNNs derive p6 from p5 (torchvision's LastLevelMaxPool) when the run does not store it."""
    return not (DETECTORS[builder].kind == "rcnn" and level == "p6")


def estimated_shapes(
    weights: str, count: int, roi_size: int, extras: tuple[str, ...], size: tuple[int, int]
) -> dict[str, tuple[int, ...]]:
    """--summary's estimate of an image's det_* arrays: ``count`` detections (the most a run keeps:
    --max-detections, M of --detections-count, else the detector's 100) for an input of ``size``."""
    builder = detector_of(weights)
    if builder is None:
        raise UsageError(f"--detect runs a detector's own heads: --weights {weights} is no detector")
    check_extras(builder, extras)
    shapes = {
        "det_boxes": (count, 4),
        "det_scores": (count,),
        "det_labels": (count,),
        "det_rois": (count, 256, roi_size, roi_size),
        "det_vectors": (count, 1024),
        "det_masks": (count, 1, *size),
        "det_keypoints": (count, 17, 3),
        "det_keypoint_scores": (count, 17),
    }
    return {name: shapes[name] for name in det_names(builder, extras)}


# ---- fpn-extract detections OUT --coco FILE ----


@dataclass
class CocoExport:
    """What :func:`write_coco` wrote: images, detections, and images a COCO file did not name."""

    images: int
    detections: int
    unmatched: list[str]

    def describe(self) -> str:
        return f"{self.detections} detections of {self.images} images"


def coco_results(
    out: str | os.PathLike[str], images: str | os.PathLike[str] | None = None
) -> tuple[list[dict], CocoExport]:
    """The det_* arrays of the folder ``out`` as COCO results, images in key order. Image ids:
    from the COCO annotations file ``images`` (its ``images[].file_name`` equal to the image's
    path as in report.json, or to its file name alone), else 1..n in key order. An image the file
    does not name is left out and listed in ``unmatched``. ``category_id`` is the stored label
    (torchvision's COCO labels are COCO's category ids); ``bbox`` is [x, y, w, h] in original pixels."""
    from fpn_cli.formats import open_features

    paths = _report_paths(Path(out))
    features = open_features(out)
    keys = [key for key in features if "det_boxes" in features[key]]
    if not keys:
        raise UsageError(f"{out} holds no detections: extract with --detect first")
    ids = _coco_ids(images) if images is not None else None
    results, unmatched = [], []
    for number, key in enumerate(keys, start=1):
        path = paths.get(key, key)
        image_id = number if ids is None else ids(path)
        if image_id is None:
            unmatched.append(path)
            continue
        arrays = features[key]
        boxes = np.asarray(arrays["det_boxes"], dtype=np.float64)
        for box, score, label in zip(boxes, arrays["det_scores"], arrays["det_labels"], strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return results, CocoExport(len(keys) - len(unmatched), len(results), unmatched)


def write_coco(
    out: str | os.PathLike[str], coco: str | os.PathLike[str], images: str | os.PathLike[str] | None = None
) -> CocoExport:
    """:func:`coco_results` written to the file ``coco`` as JSON."""
    results, export = coco_results(out, images)
    try:
        Path(coco).write_text(json.dumps(results, allow_nan=False))
    except OSError as e:
        raise UsageError(f"cannot write --coco {coco}: {e.strerror or e}") from None
    return export


def _report_paths(out: Path) -> dict[str, str]:
    """key -> the image's path as report.json lists it (relative to its input root)."""
    from fpn_cli.inputs.keys import output_key

    try:
        report = json.loads((out / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {output_key(e["path"]): e["path"] for e in report.get("images", ()) if isinstance(e, dict)}


def _coco_ids(path: str | os.PathLike[str]) -> Callable[[str], int | None]:
    """The image ids of a COCO annotations file, by file name: the image's path, else its base name."""
    try:
        data = json.loads(Path(path).read_text())
        table = {str(image["file_name"]): int(image["id"]) for image in data["images"]}
    except OSError as e:
        raise UsageError(f"cannot read --images {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(
            f"--images {path} is not a COCO annotations file (images[].file_name and id)"
        ) from None
    by_name: Mapping[str, int] = {Path(name).name: i for name, i in table.items()}

    def image_id(rel: str) -> int | None:
        return table.get(rel, by_name.get(Path(rel).name))

    return image_id
