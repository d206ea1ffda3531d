"""The detector heads (fpn_cli/regions/detect.py) against torchvision's own detectors: random weights,
non-trivial BatchNorm statistics, the state dict as the checkpoint, and ``model.eval()(images)`` as
the reference. The levels come from the same model's backbone (their exactness is tested elsewhere);
what is tested here is everything after them."""

from __future__ import annotations

import functools

import pytest
import torch
from torchvision.models import get_model
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

from fpn_cli.errors import UsageError, WeightsError
from fpn_cli.regions.detect import DETECTORS, DetectionHeads, DetectOptions

from conftest import randomize_batchnorm, rel_diff

SIZES = [(97, 131), (130, 77)]  # odd sizes, one landscape, one portrait
NUM_CLASSES = 5  # fewer classes than COCO's 91 keep NMS small; the heads read it from the checkpoint
CAP = 20  # detections per image, in both the reference and ours


def _kwargs(builder: str) -> dict:
    """Small inputs and few candidates, so each detector runs in a fraction of a second."""
    small = {"min_size": 128, "max_size": 192}
    if DETECTORS[builder].kind == "rcnn":
        return small | {
            "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 100,
            "box_detections_per_img": CAP,
            "box_score_thresh": 0.0,
        }
    return small | {"topk_candidates": 100, "detections_per_img": CAP, "score_thresh": 0.0}


class Case:
    """A torchvision detector, its reference output on two images, and the inputs our heads take."""

    def __init__(self, builder: str) -> None:
        torch.manual_seed(0)
        self.builder = builder
        self.kwargs = _kwargs(builder)
        classes = {"num_classes": 2} if builder.startswith("keypoint") else {"num_classes": NUM_CLASSES}
        model = get_model(builder, weights=None, weights_backbone=None, **classes, **self.kwargs)
        self.model = randomize_batchnorm(model).eval()
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, h, w, generator=g) for h, w in SIZES]
        with torch.no_grad():
            self.reference = self.model(images)
            batch, _ = self.model.transform(images)
            features = self.model.backbone(batch.tensors)
        ours = {key: name for name, key in DETECTORS[builder].levels}
        self.levels = {ours[key]: value for key, value in features.items()}
        self.features = features
        self.input_sizes = batch.image_sizes

    def heads(self, **options) -> DetectionHeads:
        return DetectionHeads(
            self.builder, self.model.state_dict(), DetectOptions(**options), builder_kwargs=self.kwargs
        )

    def run(self, levels=None, **options):
        return self.heads(**options)(levels or self.levels, self.input_sizes, SIZES)


@functools.cache
def case(builder: str) -> Case:
    return Case(builder)


def assert_matches(ours, reference) -> None:
    """>= 99% of the reference's detections found among ours at IoU >= 0.999 (boxes of zero area,
    which clipping to the image gives random-weight detectors, where IoU is undefined: all four
    coordinates within 1e-4 pixels), with the same label and the score within 1e-5; and as many."""
    n = len(reference["boxes"])
    assert n > 0
    assert len(ours) == n
    iou = box_iou(reference["boxes"], ours.boxes)
    same_box = (reference["boxes"][:, None, :] - ours.boxes[None, :, :]).abs().amax(dim=2) <= 1e-4
    same = reference["labels"][:, None] == ours.labels[None, :]
    close = (reference["scores"][:, None] - ours.scores[None, :]).abs() <= 1e-5
    matched = (((iou >= 0.999) | same_box) & same & close).any(dim=1)
    assert matched.float().mean() >= 0.99
    assert ours.boxes.dtype == torch.float32 and ours.labels.dtype == torch.int64


@pytest.mark.parametrize(
    "builder",
    ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn"],
)
def test_detections_match_torchvision(builder):
    c = case(builder)
    ours = c.run(score_thresh=0.0)
    assert len(ours) == 2
    for det, ref in zip(ours, c.reference, strict=True):
        assert_matches(det, ref)


def test_two_stage_vectors_and_rois_are_the_box_head_at_the_final_boxes():
    c = case("fasterrcnn_resnet50_fpn")
    roi_heads = c.model.roi_heads
    for i, det in enumerate(c.run(score_thresh=0.0)):
        boxes = resize_boxes(c.reference[i]["boxes"], SIZES[i], c.input_sizes[i])  # to network input
        one = {k: v[i : i + 1] for k, v in c.features.items()}
        with torch.no_grad():
            rois = roi_heads.box_roi_pool(one, [boxes], [c.input_sizes[i]])
            vectors = roi_heads.box_head(rois)
        assert det.rois.shape == (len(boxes), 256, 7, 7)
        assert det.vectors.shape == (len(boxes), 1024)
        assert rel_diff(det.rois, rois) < 1e-4
        assert rel_diff(det.vectors, vectors) < 1e-4


def test_one_stage_rois_pool_p3_to_p5_and_have_no_vectors():
    from torchvision.ops import MultiScaleRoIAlign

    c = case("retinanet_resnet50_fpn")
    det = c.run(score_thresh=0.0)[1]
    boxes = resize_boxes(c.reference[1]["boxes"], SIZES[1], c.input_sizes[1])
    one = {k: v[1:2] for k, v in c.features.items()}
    with torch.no_grad():
        rois = MultiScaleRoIAlign(["0", "1", "2"], 7, 2)(one, [boxes], [c.input_sizes[1]])
    assert det.vectors is None
    assert rel_diff(det.rois, rois) < 1e-4


def test_mask_rcnn_masks_are_torchvisions_pasted_in_original_pixels():
    c = case("maskrcnn_resnet50_fpn")
    for det, ref, (h, w) in zip(c.run(score_thresh=0.0), c.reference, SIZES, strict=True):
        assert det.masks.shape == (len(det), 1, h, w)
        assert (det.masks - ref["masks"]).abs().max() < 1e-5


def test_arrays_are_named_det_and_numpy():
    arrays = case("maskrcnn_resnet50_fpn").run(score_thresh=0.0)[0].arrays()
    assert sorted(arrays) == ["det_boxes", "det_labels", "det_masks", "det_rois", "det_scores", "det_vectors"]
    assert arrays["det_boxes"].shape == (CAP, 4) and arrays["det_masks"].shape == (CAP, 1, 97, 131)


def test_rcnn_p6_is_derived_from_p5_when_absent():
    c = case("fasterrcnn_resnet50_fpn")
    without = {k: v for k, v in c.levels.items() if k != "p6"}
    for det, ref in zip(c.run(without, score_thresh=0.0), c.reference, strict=True):
        assert_matches(det, ref)


def test_score_threshold_keeps_only_higher_scores():
    c = case("fasterrcnn_resnet50_fpn")
    scores = c.reference[0]["scores"]
    thresh = float(scores[5])  # the 6th best: five pass
    det = c.run(score_thresh=thresh)[0]
    assert len(det) == 5
    assert torch.equal(det.scores, scores[:5])


def test_fixed_count_mode_fills_up_to_the_minimum_with_the_best_below_the_threshold():
    c = case("fasterrcnn_resnet50_fpn")
    scores = c.reference[0]["scores"]
    thresh = float(scores[2])  # two pass the threshold
    det = c.run(score_thresh=thresh, min_detections=7, max_detections=15)[0]
    assert len(det) == 7
    assert torch.allclose(det.scores, scores[:7], atol=1e-6)
    assert (box_iou(det.boxes, c.reference[0]["boxes"][:7]).diagonal() > 0.999).all()


def test_fixed_count_mode_caps_at_the_maximum_when_many_pass():
    c = case("retinanet_resnet50_fpn")
    det = c.run(score_thresh=0.0, min_detections=3, max_detections=8)[1]
    assert len(det) == 8
    assert torch.allclose(det.scores, c.reference[1]["scores"][:8], atol=1e-6)


def test_max_detections_caps_the_count():
    det = case("fcos_resnet50_fpn").run(score_thresh=0.0, max_detections=4)[0]
    assert len(det) == 4
    assert torch.allclose(det.scores, case("fcos_resnet50_fpn").reference[0]["scores"][:4], atol=1e-6)


def test_missing_and_unexpected_head_keys_are_named_in_one_line():
    c = case("fasterrcnn_resnet50_fpn")
    state = dict(c.model.state_dict())
    del state["roi_heads.box_head.fc6.weight"]
    state["rpn.head.extra.weight"] = torch.zeros(1)
    state["backbone.anything"] = torch.zeros(1)  # backbone keys are the FPN's, ignored here
    with pytest.raises(WeightsError) as e:
        DetectionHeads("fasterrcnn_resnet50_fpn", state, builder_kwargs=c.kwargs)
    message = str(e.value)
    assert "\n" not in message
    assert "missing roi_heads.box_head.fc6.weight" in message
    assert "unexpected rpn.head.extra.weight" in message
    assert "backbone.anything" not in message


def test_a_head_tensor_of_the_wrong_shape_is_a_one_line_error():
    c = case("fasterrcnn_resnet50_fpn")
    state = dict(c.model.state_dict())
    state["roi_heads.box_head.fc7.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match=r"^checkpoint does not fit .*fc7\.weight[^\n]*$"):
        DetectionHeads("fasterrcnn_resnet50_fpn", state, builder_kwargs=c.kwargs)


def test_unknown_builder_is_a_usage_error():
    with pytest.raises(UsageError, match="no detection heads for 'yolo'"):
        DetectionHeads("yolo", {})


def test_levels_of_an_unpadded_input_are_refused():
    c = case("fasterrcnn_resnet50_fpn")
    cropped = {k: v[..., :-1, :] for k, v in c.levels.items()}  # p2 47 rows: 188 pixels, not 32k
    with pytest.raises(UsageError, match="padded to a multiple of 32"):
        c.heads()(cropped, c.input_sizes, SIZES)


def test_a_missing_level_is_named():
    c = case("retinanet_resnet50_fpn")
    levels = {k: v for k, v in c.levels.items() if k != "p7"}
    with pytest.raises(UsageError, match="missing p7"):
        c.heads()(levels, c.input_sizes, SIZES)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_detections": 5, "max_detections": 3}, "min detections 5 exceeds max detections 3"),
        ({"max_detections": 0}, "max detections must be at least 1"),
        ({"min_detections": -1}, "min detections must be 0 or more"),
    ],
)
def test_bad_options_are_usage_errors(options, message):
    c = case("fasterrcnn_resnet50_fpn")
    with pytest.raises(UsageError, match=message):
        c.heads(**options)


@pytest.mark.parametrize("builder", sorted(DETECTORS))
def test_every_tensor_of_the_heads_is_loaded_from_the_checkpoint(builder):
    """The heads are built on the meta device and given uninitialised memory: that is safe only
    because every parameter and buffer they keep is a state-dict key, which the load fills."""
    with torch.device("meta"):
        model = get_model(builder, weights=None, weights_backbone=None)
    model.backbone = None
    tensors = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    assert tensors and tensors <= set(model.state_dict())
