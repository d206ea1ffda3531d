"""A torchvision detector's own heads, run on our FPN's levels: boxes, scores, labels and the
detector's view of each object (box-head vectors, RoI features, masks, keypoints).

    heads = DetectionHeads("fasterrcnn_resnet50_fpn", checkpoint_state)   # eval mode, CPU
    dets = heads(levels, input_sizes, original_sizes)                     # one Detections per image

Everything is torchvision's: the builder is called with ``weights=None, weights_backbone=None``
(nothing is downloaded), its backbone is dropped, and the heads it built (RPN and RoIHeads, or the
RetinaNet/FCOS head with its anchor generator and box coder) load the checkpoint's head keys as
torchvision saved them (``rpn.*``, ``roi_heads.*``, ``head.*``); ``backbone.*`` keys are the FPN's
business and are ignored here. Boxes go back to original pixels through the detector's own
``GeneralizedRCNNTransform.postprocess`` (which also pastes masks and rescales keypoints).

The levels must be the ones the detector's backbone produces for its own input: the batch
zero-padded at the bottom/right to a multiple of ``size_divisible`` (32), because torchvision's
anchor generator infers each level's stride as padded size // level size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor, nn

from fpn_cli.errors import UsageError, WeightsError
from fpn_cli.formats import codecs
from fpn_cli.formats.base import DETECTIONS

SHOWN_KEYS = 5  # missing or unexpected keys named in an error, before "and N more"
NO_THRESHOLD = -1.0  # below every probability: the fixed-count mode's pass keeps every candidate


@dataclass(frozen=True)
class DetectorSpec:
    kind: str  # "rcnn" (RPN + RoIHeads), "retinanet" or "fcos" (one dense head)
    levels: tuple[tuple[str, str], ...]  # (our level name, torchvision's feature key), finest first
    anchors_per_location: int = 1  # rows of the class logits per class (one-stage heads)


_RCNN = (("p2", "0"), ("p3", "1"), ("p4", "2"), ("p5", "3"), ("p6", "pool"))
_ONE_STAGE = (("p3", "0"), ("p4", "1"), ("p5", "2"), ("p6", "p6"), ("p7", "p7"))

# torchvision builder -> how its heads are called and which of our levels feed them
DETECTORS: dict[str, DetectorSpec] = {
    "fasterrcnn_resnet50_fpn": DetectorSpec("rcnn", _RCNN),
    "fasterrcnn_resnet50_fpn_v2": DetectorSpec("rcnn", _RCNN),
    "fasterrcnn_mobilenet_v3_large_fpn": DetectorSpec("rcnn", (("p5a", "0"), ("p5", "1"), ("p6", "pool"))),
    "maskrcnn_resnet50_fpn": DetectorSpec("rcnn", _RCNN),
    "maskrcnn_resnet50_fpn_v2": DetectorSpec("rcnn", _RCNN),
    "keypointrcnn_resnet50_fpn": DetectorSpec("rcnn", _RCNN),
    "retinanet_resnet50_fpn": DetectorSpec("retinanet", _ONE_STAGE, anchors_per_location=9),
    "retinanet_resnet50_fpn_v2": DetectorSpec("retinanet", _ONE_STAGE, anchors_per_location=9),
    "fcos_resnet50_fpn": DetectorSpec("fcos", _ONE_STAGE),
}

# the checkpoint tensor whose first dimension gives the number of classes (background included)
_CLASS_KEYS = {
    "rcnn": "roi_heads.box_predictor.cls_score.weight",
    "retinanet": "head.classification_head.cls_logits.weight",
    "fcos": "head.classification_head.cls_logits.weight",
}
_KEYPOINT_KEY = "roi_heads.keypoint_predictor.kps_score_lowres.weight"  # (C, K, 4, 4)
_ONE_STAGE_ROI_LEVELS = ("0", "1", "2")  # p3-p5: the pyramid levels RoIAlign pools from, R-CNN-like


@dataclass(frozen=True)
class DetectOptions:
    """What to keep. ``None`` means the detector's own setting (torchvision's builder defaults)."""

    score_thresh: float | None = None  # keep scores above this; 0.05 (FCOS: 0.2)
    max_detections: int | None = None  # at most this many per image, best first; 100
    min_detections: int = 0  # fixed-count mode: at least this many per image (see select_fixed_count)
    roi_size: int | None = None  # S of ``rois``; the box head's pooler's (7)


@dataclass
class Detections:
    """One image's detections, best score first; N may be 0. Boxes are in original (upright) pixels.

    - ``boxes`` (N, 4) float32, x1 y1 x2 y2; ``scores`` (N,) float32; ``labels`` (N,) int64
      (the detector's class ids: COCO's 1..90 with gaps; keypoint R-CNN: 1 = person);
    - ``rois`` (N, 256, S, S): the levels RoIAligned at the boxes (network-input coordinates) by the
      box head's own ``MultiScaleRoIAlign`` (one-stage detectors: the same over p3-p5);
    - ``vectors`` (N, 1024), two-stage only: ``roi_heads.box_head(rois)``, the representation the
      classifier and box regressor read;
    - ``masks`` (N, 1, H, W) float probabilities in original pixels (Mask R-CNN);
    - ``keypoints`` (N, K, 3) x, y, visibility in original pixels, and ``keypoint_scores`` (N, K)
      (Keypoint R-CNN, K = 17).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    rois: Tensor | None = None
    vectors: Tensor | None = None
    masks: Tensor | None = None
    keypoints: Tensor | None = None
    keypoint_scores: Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The outputs present, as CPU numpy arrays named ``det_<field>`` (``det_boxes``, ...)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f"det_{f.name}"] = value.detach().cpu().numpy()
        return out


class DetectionHeads(nn.Module):
    """A torchvision detector without its backbone: levels in, :class:`Detections` out.

    ``state`` is the detector's state dict as torchvision saves it; its ``backbone.*`` keys are
    ignored, every other key must be one the heads have, and every head key must be present.
    ``builder_kwargs`` go to torchvision's builder as they are (``rpn_post_nms_top_n_test=300``,
    ``box_nms_thresh=0.5``, ...); the number of classes (and keypoints) is read from ``state``.
    """

    def __init__(
        self,
        builder: str,
        state: Mapping[str, Tensor],
        options: DetectOptions | None = None,
        builder_kwargs: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        if builder not in DETECTORS:
            raise UsageError(f"no detection heads for {builder!r}; choose from {', '.join(DETECTORS)}")
        self.builder = builder
        self.spec = DETECTORS[builder]
        self.options = options or DetectOptions()
        _check_options(self.options)
        self.detector = _build(builder, self.spec, state, dict(builder_kwargs or {}))
        _load_heads(self.detector, state, builder)
        self.detector.eval()
        self.size_divisible = int(self.detector.transform.size_divisible)
        self.roi_pool = self._roi_pool()

    @property
    def num_classes(self) -> int:
        """Classes of the heads, background included where the detector has one (R-CNNs)."""
        if self.spec.kind == "rcnn":
            return int(self.detector.roi_heads.box_predictor.cls_score.out_features)
        return int(self.detector.head.classification_head.num_classes)

    @property
    def levels(self) -> tuple[str, ...]:
        """Our level names the heads read, finest first (R-CNN's p6 may be left out: see forward)."""
        return tuple(ours for ours, _ in self.spec.levels)

    def _roi_pool(self) -> nn.Module:
        from torchvision.ops import MultiScaleRoIAlign

        if self.spec.kind == "rcnn":
            pool = self.detector.roi_heads.box_roi_pool
            if self.options.roi_size is None:
                return pool
            return MultiScaleRoIAlign(pool.featmap_names, self.options.roi_size, pool.sampling_ratio)
        return MultiScaleRoIAlign(list(_ONE_STAGE_ROI_LEVELS), self.options.roi_size or 7, 2)

    @torch.no_grad()
    def forward(
        self,
        levels: Mapping[str, Tensor],
        input_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
    ) -> list[Detections]:
        """Detections for a batch of N images.

        - ``levels``: our level name -> (N, 256, h, w), computed on the batch padded at the
          bottom/right to a multiple of 32 (so p2 is (N, 256, Hp/4, Wp/4)); R-CNNs read p2-p6 and
          derive p6 from p5 (torchvision's ``LastLevelMaxPool``) when it is absent; RetinaNet/FCOS
          read p3-p7. Cast to the heads' dtype (float32).
        - ``input_sizes``: each image's (H, W) at the network's input, after resize, before padding;
        - ``original_sizes``: each image's (H, W) in original (upright) pixels.
        """
        features, padded = self._features(levels, input_sizes, original_sizes)
        from torchvision.models.detection.image_list import ImageList

        sizes = [(int(h), int(w)) for h, w in input_sizes]
        # the anchor generators read only the padded batch's shape from images.tensors
        batch = torch.empty((len(sizes), 0, *padded), device=features["0"].device)
        images = ImageList(batch, sizes)
        with _thresholds(self.detector, self.spec.kind, self.options):
            if self.spec.kind == "rcnn":
                results = self._two_stage(images, features)
            else:
                results = self._one_stage(images, features)
        results = [
            select_fixed_count(r, self.score_thresh(), self.max_detections(), self.options) for r in results
        ]
        pooled = self._pool(features, [r["boxes"] for r in results], sizes)
        results = self.detector.transform.postprocess(results, sizes, [tuple(s) for s in original_sizes])
        return [_detections(r, rois, vectors) for r, (rois, vectors) in zip(results, pooled, strict=True)]

    def _features(
        self, levels: Mapping[str, Tensor], input_sizes: Sequence, original_sizes: Sequence
    ) -> tuple[OrderedDict[str, Tensor], tuple[int, int]]:
        levels = dict(levels)
        if self.spec.kind == "rcnn" and "p6" not in levels and "p5" in levels:
            from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

            levels["p6"] = LastLevelMaxPool()([levels["p5"]], [], ["p5"])[0][-1]
        missing = [ours for ours in self.levels if ours not in levels]
        if missing:
            raise UsageError(
                f"{self.builder} heads need the levels {', '.join(self.levels)}; missing {', '.join(missing)}"
            )
        dtype = next(self.detector.parameters()).dtype
        features = OrderedDict((key, levels[ours].to(dtype)) for ours, key in self.spec.levels)
        first = features["0"]
        n = first.shape[0]
        if len(input_sizes) != n or len(original_sizes) != n:
            raise UsageError(
                f"{n} images in the levels, but {len(input_sizes)} input sizes "
                f"and {len(original_sizes)} original sizes"
            )
        stride = _finest_stride(self.spec)
        padded = (first.shape[-2] * stride, first.shape[-1] * stride)
        if padded[0] % self.size_divisible or padded[1] % self.size_divisible:
            raise UsageError(
                f"{self.spec.levels[0][0]} is {first.shape[-2]}x{first.shape[-1]}: the detector's levels "
                f"come from an input padded to a multiple of {self.size_divisible}, "
                f"not {padded[0]}x{padded[1]}"
            )
        too_big = [s for s in input_sizes if s[0] > padded[0] or s[1] > padded[1]]
        if too_big:
            raise UsageError(
                f"input size {too_big[0][0]}x{too_big[0][1]} exceeds the levels' {padded[0]}x{padded[1]}"
            )
        return features, padded

    def _two_stage(self, images, features: OrderedDict[str, Tensor]) -> list[dict[str, Tensor]]:
        proposals, _ = self.detector.rpn(images, features)
        results, _ = self.detector.roi_heads(features, proposals, images.image_sizes)
        return results

    def _one_stage(self, images, features: OrderedDict[str, Tensor]) -> list[dict[str, Tensor]]:
        # RetinaNet.forward / FCOS.forward after the backbone, eval branch, with torchvision's methods
        maps = list(features.values())
        outputs = self.detector.head(maps)
        anchors = self.detector.anchor_generator(images, maps)
        per_level = [x.size(2) * x.size(3) for x in maps]
        if self.spec.kind == "retinanet":
            per_location = outputs["cls_logits"].size(1) // sum(per_level)
            per_level = [hw * per_location for hw in per_level]
        split = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return self.detector.postprocess_detections(split, split_anchors, images.image_sizes)

    def _pool(
        self, features: OrderedDict[str, Tensor], boxes: list[Tensor], sizes: list[tuple[int, int]]
    ) -> list[tuple[Tensor, Tensor | None]]:
        """(rois, vectors) per image at its final boxes, in network-input coordinates."""
        rois = self.roi_pool(features, boxes, sizes)
        vectors = self.detector.roi_heads.box_head(rois) if self.spec.kind == "rcnn" else None
        counts = [len(b) for b in boxes]
        split_rois = rois.split(counts)
        split_vectors = vectors.split(counts) if vectors is not None else [None] * len(counts)
        return list(zip(split_rois, split_vectors, strict=True))

    def score_thresh(self) -> float:
        """The score threshold applied: the option, else the detector's own."""
        if self.options.score_thresh is not None:
            return self.options.score_thresh
        return _default(self.detector, self.spec.kind, "score_thresh")

    def max_detections(self) -> int:
        """The most detections kept per image: the option, else the detector's own."""
        if self.options.max_detections is not None:
            return self.options.max_detections
        return _default(self.detector, self.spec.kind, "detections_per_img")


def select_fixed_count(
    result: dict[str, Tensor], score_thresh: float, max_detections: int, options: DetectOptions
) -> dict[str, Tensor]:
    """The fixed-count mode (bottom-up attention's "10 to 100 boxes"), on one image's detections.

    With ``min_detections`` K > 0 the detector ran without its score threshold, keeping its best
    max(K, M) boxes after its per-class NMS, best first. This keeps those scoring above the
    threshold, at most M; when fewer than K do, the best K whatever their scores (fewer only when
    the detector has fewer candidates). With K = 0 the detector applied the threshold itself.
    """
    if options.min_detections <= 0:
        return result
    passing = int((result["scores"] > score_thresh).sum())
    n = min(passing, max_detections) if passing >= options.min_detections else options.min_detections
    # batched_nms returns its survivors by decreasing score, so the first n are the best n
    return {k: v[:n] for k, v in result.items()}


class _thresholds:
    """Sets the detector's score threshold and per-image cap from the options for one call."""

    def __init__(self, detector: nn.Module, kind: str, options: DetectOptions) -> None:
        self.owner = detector.roi_heads if kind == "rcnn" else detector
        self.options = options
        self.saved = (self.owner.score_thresh, self.owner.detections_per_img)

    def __enter__(self) -> None:
        thresh, cap = self.saved
        if self.options.score_thresh is not None:
            thresh = self.options.score_thresh
        if self.options.max_detections is not None:
            cap = self.options.max_detections
        if self.options.min_detections > 0:
            thresh, cap = NO_THRESHOLD, max(cap, self.options.min_detections)
        self.owner.score_thresh, self.owner.detections_per_img = thresh, cap

    def __exit__(self, *exc: object) -> None:
        self.owner.score_thresh, self.owner.detections_per_img = self.saved


def _default(detector: nn.Module, kind: str, name: str):
    return getattr(detector.roi_heads if kind == "rcnn" else detector, name)


def _check_options(options: DetectOptions) -> None:
    if options.max_detections is not None and options.max_detections < 1:
        raise UsageError(f"max detections must be at least 1, not {options.max_detections}")
    if options.min_detections < 0:
        raise UsageError(f"min detections must be 0 or more, not {options.min_detections}")
    if options.max_detections is not None and options.min_detections > options.max_detections:
        raise UsageError(
            f"min detections {options.min_detections} exceeds max detections {options.max_detections}"
        )
    if options.roi_size is not None and options.roi_size < 1:
        raise UsageError(f"RoI size must be at least 1, not {options.roi_size}")


def _finest_stride(spec: DetectorSpec) -> int:
    # p2 has stride 4, p3 8; mobilenet's p5a and p5 both have stride 32
    return 2 ** int(spec.levels[0][0].removeprefix("p").rstrip("a"))


def _build(builder: str, spec: DetectorSpec, state: Mapping[str, Tensor], kwargs: dict) -> nn.Module:
    """torchvision's own builder, no weights downloaded, sized for the checkpoint's classes; the
    backbone is dropped (the FPN computes the levels). Built on the meta device, then given
    uninitialised memory for what remains: every head key is loaded from ``state`` strictly."""
    from torchvision.models import get_model

    class_key = _CLASS_KEYS[spec.kind]
    if class_key in state:
        kwargs["num_classes"] = int(state[class_key].shape[0]) // spec.anchors_per_location
    if builder.startswith("keypoint") and _KEYPOINT_KEY in state:
        kwargs["num_keypoints"] = int(state[_KEYPOINT_KEY].shape[1])
    with torch.device("meta"):  # no random initialisation of a ResNet-50 only to drop it (~1 s)
        model = get_model(builder, weights=None, weights_backbone=None, **kwargs)
    model.backbone = None
    # the heads' memory, uninitialised: _load_heads fills every parameter and buffer strictly
    return model.to_empty(device="cpu")


def _load_heads(detector: nn.Module, state: Mapping[str, Tensor], builder: str) -> None:
    """Loads the non-backbone keys strictly; a missing or unexpected head key is a one-line error."""
    heads = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    expected = set(detector.state_dict())
    missing = sorted(expected - heads.keys())
    unexpected = sorted(heads.keys() - expected)
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if problems:
        raise WeightsError(f"checkpoint does not fit {builder}'s heads: {'; '.join(problems)}")
    try:
        detector.load_state_dict(heads, strict=True)
    except RuntimeError as e:  # a shape that does not fit: torchvision's message, on one line
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise WeightsError(f"checkpoint does not fit {builder}'s heads: {first}") from None


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def _detections(result: dict[str, Tensor], rois: Tensor, vectors: Tensor | None) -> Detections:
    return Detections(
        boxes=result["boxes"].float(),
        scores=result["scores"],
        labels=result["labels"].long(),
        rois=rois,
        vectors=vectors,
        masks=result.get("masks"),
        keypoints=result.get("keypoints"),
        keypoint_scores=result.get("keypoints_scores"),
    )


# the arrays a run stores per image, in the order written, and their stored dtypes where fixed
# (det_rois and det_vectors follow --save-dtype as RoI features do: codecs.derived_dtype)
DET_ARRAYS = DETECTIONS[:5]  # det_boxes, det_scores, det_labels, det_rois, det_vectors
DET_EXTRAS = {"masks": DETECTIONS[5:6], "keypoints": DETECTIONS[6:]}
ZOO_PREFIX = "torchvision:"


def detector_of(weights: str) -> str | None:
    """The torchvision builder whose heads ``--weights`` carries (``coco`` is Faster R-CNN's), or None."""
    name = "torchvision:fasterrcnn_resnet50_fpn" if weights == "coco" else weights
    builder = name.removeprefix(ZOO_PREFIX)
    return builder if name.startswith(ZOO_PREFIX) and builder in DETECTORS else None


def det_names(builder: str, extras: Sequence[str] = ()) -> tuple[str, ...]:
    """The det_* arrays a run with ``builder``'s heads stores: vectors for two-stage detectors only."""
    names = [n for n in DET_ARRAYS if n != "det_vectors" or DETECTORS[builder].kind == "rcnn"]
    for extra in extras:
        names += DET_EXTRAS[extra]
    return tuple(names)


def check_extras(builder: str, extras: Sequence[str]) -> None:
    """masks only from Mask R-CNN, keypoints only from Keypoint R-CNN: else a :class:`UsageError`."""
    for extra in extras:
        if extra not in DET_EXTRAS:
            raise UsageError(f"--detect-extras {extra!r}: choose from {', '.join(DET_EXTRAS)}")
        family = "maskrcnn" if extra == "masks" else "keypointrcnn"
        if not builder.startswith(family):
            offered = ", ".join(ZOO_PREFIX + b for b in DETECTORS if b.startswith(family))
            raise UsageError(f"--detect-extras {extra}: {builder} has no {extra}; {offered} do")


@dataclass
class Detector:
    """A run's detection step: ``heads`` on the levels of each batch, which the engine computes on
    the input resized by ``resize`` (None: the decoded input as it is, --size) and padded to a
    multiple of ``heads.size_divisible``; ``names`` the det_* arrays stored, ``dtype`` that of
    det_rois, det_vectors and det_masks (codecs.derived_dtype, as RoI features)."""

    builder: str
    heads: DetectionHeads
    resize: DetectorResize | None
    names: tuple[str, ...]
    dtype: np.dtype
    labels: list[str] | None  # label id -> name, from the weights' categories; None if unknown

    def to(self, device: torch.device) -> Detector:
        self.heads = self.heads.to(device)
        return self

    def arrays(self, detections: Detections) -> dict[str, np.ndarray]:
        """One image's :class:`~fpn_cli.regions.detect.Detections` as the stored arrays."""
        arrays = detections.arrays()
        return {
            name: arrays[name].astype(codecs.EXACT_DTYPES.get(name, self.dtype), copy=False)
            for name in self.names
        }


@dataclass(frozen=True)
class DetectorResize:
    """The detector's test-time resize as ``GeneralizedRCNNTransform.resize`` does it: the scale
    min(min_size / shorter side, max_size / longer side), bilinear on the normalised float image,
    no antialiasing, output size floor(side x scale) (``recompute_scale_factor=True``)."""

    min_size: int
    max_size: int

    def describe(self) -> str:
        """How images are resized, for messages (as :meth:`Resize.describe`)."""
        return f"as the detector does: shorter side {self.min_size}, longer side at most {self.max_size}"

    def scale(self, height: int, width: int) -> float:
        return min(self.min_size / min(height, width), self.max_size / max(height, width))

    def target(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) the detector feeds its backbone for an image of ``height`` x ``width``."""
        scale = self.scale(height, width)
        return int(np.floor(height * scale)), int(np.floor(width * scale))

    def __call__(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) normalised float -> (N, 3, *target(H, W)), exactly torchvision's call."""
        scale = self.scale(*x.shape[-2:])
        return torch.nn.functional.interpolate(
            x, scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
        )


def categories(builder: str, num_classes: int) -> list[str] | None:
    """The label names of ``builder``'s default COCO weights (weights enum ``meta["categories"]``,
    index = label id), when the heads have that many classes; None otherwise."""
    from torchvision.models import get_model_weights

    names = list(get_model_weights(builder).DEFAULT.meta.get("categories") or ())
    return names if len(names) == num_classes else None


def pad_to(x: Tensor, multiple: int) -> Tensor:
    """Zeros at the bottom/right up to a multiple of ``multiple``, as torchvision's batch_images."""
    height, width = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, -width % multiple, 0, -height % multiple))
