"""--detect end to end: a run's det_* arrays against torchvision's own detector, ``model.eval()(images)``,
on the same cached checkpoint (random weights, non-trivial BatchNorm statistics) and images of odd
sizes, one EXIF-rotated; then how they are stored (both formats, save dtypes), resumed, verified,
read back and exported as COCO results. The heads' exactness on given levels is test_detect.py's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.models import get_model
from torchvision.ops import box_iou

from fpn_cli import extract, open_features
from fpn_cli.errors import UsageError
from fpn_cli.models import zoo
from fpn_cli.run.options import Options

from conftest import randomize_batchnorm, report_of, run
from imagefactory import save_exif_rotated, save_rgb

pytestmark = pytest.mark.filterwarnings("ignore::fpn_cli.models.hub.WeightsWarning")  # random files
NUM_CLASSES = 5  # the heads read the class count from the checkpoint; few classes keep NMS small
SMALL = {"short_side": 128, "max_side": 192}  # the detector's min_size/max_size, small for speed
TWO_STAGE, ONE_STAGE = "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"
DET = ["det_boxes", "det_scores", "det_labels", "det_rois", "det_vectors"]


def _reference(builder: str, **kwargs) -> torch.nn.Module:
    """torchvision's detector as our zoo runs its COCO weights (BatchNorm eps 0: overwrite_eps),
    resizing as --short-side 128 --max-side 192 asks."""
    torch.manual_seed(0)
    small = {"min_size": 128, "max_size": 192}
    model = get_model(
        builder, weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **small, **kwargs
    )
    model = randomize_batchnorm(model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.0
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A $TORCH_HOME with the two detectors cached under their zoo names, three images, and the
    folders of one npy run (two-stage), one shards run in float16 (two-stage) and one npy run
    (one-stage)."""
    root = tmp_path_factory.mktemp("detect_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch_home"))
        mp.setenv("FPN_EXTRACT_OFFLINE", "1")
        models = {}
        for builder in (TWO_STAGE, ONE_STAGE):
            # a random RetinaNet's class prior (0.01) is below its 0.05 threshold: run it at 0
            models[builder] = _reference(builder, **({"score_thresh": 0.0} if builder == ONE_STAGE else {}))
            path = zoo.entry(f"torchvision:{builder}").path()
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(models[builder].state_dict(), path)
        images = root / "images"
        save_rgb(images / "wide.png", 97, 131, seed=1)
        save_rgb(images / "tall.png", 130, 77, seed=2)
        save_exif_rotated(images / "turned.jpg", 60, 90)  # upright: 90 x 60
        base = Options(weights=f"torchvision:{TWO_STAGE}", detect=True, device="cpu", **_resize())
        out = {
            "npy": root / "npy",
            "shards": root / "shards",
            "retina": root / "retina",
        }
        reports = {
            "npy": extract([images], out["npy"], base),
            "shards": extract([images], out["shards"], base, format="shards", save_dtype="float16"),
            "retina": extract(
                [images / "wide.png"],
                out["retina"],
                base,
                weights=f"torchvision:{ONE_STAGE}",
                score_thresh=0.0,
            ),
        }
        yield {
            "root": root,
            "images": images,
            "models": models,
            "out": out,
            "reports": reports,
            "mp": mp,
            "detections": {},
        }


def _resize():
    from fpn_cli.inputs.images import Resize

    return {"resize": Resize(**SMALL)}


def _upright(path: Path) -> torch.Tensor:
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def _matched(arrays: dict, reference: dict) -> tuple[int, int]:
    """(how many of the reference's detections are found among ours at IoU >= 0.999 with the same
    label and the score within 1e-5, how many it has); as many detections as the reference."""
    n = len(reference["boxes"])
    assert n > 0
    boxes = torch.from_numpy(np.array(arrays["det_boxes"]))
    labels = torch.from_numpy(np.array(arrays["det_labels"]))
    scores = torch.from_numpy(np.array(arrays["det_scores"]))
    assert boxes.shape == (n, 4) and labels.dtype == torch.int64 and boxes.dtype == torch.float32
    iou = box_iou(reference["boxes"], boxes)
    same = (reference["labels"][:, None] == labels[None, :]) & (
        (reference["scores"][:, None] - scores[None, :]).abs() <= 1e-5
    )
    return int(((iou >= 0.999) & same).any(dim=1).sum()), n


def _assert_equals_torchvision(arrays: dict, reference: dict) -> None:
    """>= 98% of one image's detections matched (see _matched); >= 99% over all the images of this
    file is the next test's. (The levels differ from torchvision's by float32 rounding, ~3e-6
    relative, BatchNorm being folded into the convolutions, and at score threshold 0 a random
    detector's near-tied candidates can trade places in NMS: measured 100/100 on each two-stage
    image, 296/300 on the one-stage one; given the same levels the heads match: test_detect.py.)"""
    found, n = _matched(arrays, reference)
    assert found >= 0.98 * n, (found, n)


def _detections(world, builder: str, name: str) -> dict:
    """torchvision's detections of one image by ``builder``'s reference model, computed once per
    module (several tests compare against the same ones)."""
    key = (builder, name)
    if key not in world["detections"]:
        with torch.no_grad():
            world["detections"][key] = world["models"][builder]([_upright(world["images"] / name)])[0]
    return world["detections"][key]


def _cases(world) -> list[tuple[dict, dict]]:
    """(our arrays, torchvision's detections) for every image of the two-stage run, and the
    one-stage run's image."""
    cases = []
    for out, builder, names in (
        ("npy", TWO_STAGE, ("wide.png", "tall.png", "turned.jpg")),
        ("retina", ONE_STAGE, ("wide.png",)),
    ):
        for name in names:
            reference = _detections(world, builder, name)
            cases.append((open_features(world["out"][out])[Path(name).stem], reference))
    return cases


def test_over_every_image_99_percent_of_detections_equal_torchvisions(world):
    counts = [_matched(arrays, reference) for arrays, reference in _cases(world)]
    found, total = (sum(c) for c in zip(*counts, strict=True))
    assert total >= 400 and found >= 0.99 * total, counts


@pytest.mark.parametrize("name", ["wide.png", "tall.png", "turned.jpg"])
def test_two_stage_detections_equal_torchvisions_detector(world, name):
    reference = _detections(world, TWO_STAGE, name)
    arrays = open_features(world["out"]["npy"])[Path(name).stem]
    _assert_equals_torchvision(arrays, reference)


def test_two_stage_rois_and_vectors_are_the_box_heads_at_the_final_boxes(world):
    """det_rois = the box head's RoIAlign (box_roi_pool) at the final boxes, det_vectors =
    box_head of those: computed here from torchvision's own backbone and transform."""
    model = world["models"][TWO_STAGE]
    image = _upright(world["images"] / "wide.png")
    arrays = open_features(world["out"]["npy"])["wide"]
    with torch.no_grad():
        batch, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        (h, w), size = batch.image_sizes[0], image.shape[-2:]
        scale = torch.tensor([w / size[1], h / size[0], w / size[1], h / size[0]])
        boxes = torch.from_numpy(np.array(arrays["det_boxes"])) * scale
        rois = model.roi_heads.box_roi_pool(features, [boxes], batch.image_sizes)
        vectors = model.roi_heads.box_head(rois)
    n = len(boxes)
    assert arrays["det_rois"].shape == (n, 256, 7, 7) and arrays["det_vectors"].shape == (n, 1024)
    assert _rel(arrays["det_rois"], rois) < 1e-4  # measured 2.6e-6
    assert _rel(arrays["det_vectors"], vectors) < 1e-4  # measured 2.3e-6


def _rel(ours, reference: torch.Tensor) -> float:
    ours = torch.from_numpy(np.array(ours, dtype=np.float32))
    return float((ours - reference).abs().max() / reference.abs().max())


def test_one_stage_detections_equal_torchvisions_and_have_no_vectors(world):
    reference = _detections(world, ONE_STAGE, "wide.png")
    arrays = open_features(world["out"]["retina"])["wide"]
    _assert_equals_torchvision(arrays, reference)
    assert "det_vectors" not in arrays
    assert arrays["det_rois"].shape == (len(reference["boxes"]), 256, 7, 7)
    assert not (world["out"]["retina"] / "wide" / "det_vectors.npy").exists()


def test_det_arrays_are_files_of_exact_dtypes_listed_in_the_report(world):
    out = world["out"]["npy"]
    report = report_of(out)
    entry = next(e for e in report["images"] if e["path"] == "tall.png")
    n = entry["detections"]["count"]
    assert set(entry["detections"]["arrays"]) == set(DET)
    stored = {name: np.load(out / "tall" / f"{name}.npy") for name in DET}
    assert {k: v.dtype for k, v in stored.items()} == {
        "det_boxes": np.float32,
        "det_scores": np.float32,
        "det_labels": np.int64,
        "det_rois": np.float32,
        "det_vectors": np.float32,
    }
    assert stored["det_boxes"].shape == (n, 4) and stored["det_rois"].shape == (n, 256, 7, 7)
    # boxes in the upright image's pixels: tall.png is 130 rows by 77 columns
    assert stored["det_boxes"][:, [0, 2]].max() <= 77 and stored["det_boxes"][:, [1, 3]].max() <= 130
    header = report["detections"]
    assert header["detector"] == f"torchvision:{TWO_STAGE}"
    assert header["score_thresh_used"] == 0.05 and header["max_detections_used"] == 100
    assert header["categories"] is None  # 5 classes: COCO's 91 names do not fit
    assert header["test_time_resize"] == {"min_size": 128, "max_size": 192}
    assert world["reports"]["npy"].counts == {"ok": 3, "skipped": 0, "failed": 0}


def test_shards_hold_the_same_detections_with_rois_in_the_save_dtype(world):
    npy, shards = (
        open_features(world["out"]["npy"], dtype=None),
        open_features(world["out"]["shards"], dtype=None),
    )
    assert sorted(shards) == sorted(npy) == ["tall", "turned", "wide"]
    for key in npy:
        a, b = npy[key], shards[key]
        for name in ("det_boxes", "det_scores", "det_labels"):  # exact whatever --save-dtype
            assert b[name].dtype == a[name].dtype and np.array_equal(b[name], a[name]), name
        assert b["det_rois"].dtype == np.float16 and b["det_vectors"].dtype == np.float16
        np.testing.assert_allclose(b["det_vectors"], a["det_vectors"], rtol=2e-3, atol=2e-3)


def test_verify_passes_then_names_a_damaged_det_array(world, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(world["out"]["npy"], out)
    assert run("verify", out).exit_code == 0
    damaged = out / "wide" / "det_scores.npy"
    damaged.write_bytes(damaged.read_bytes()[:-4])
    result = run("verify", out)
    assert result.exit_code == 1
    assert "wide/det_scores.npy" in result.output


def test_a_resume_keeps_the_detections_and_a_changed_score_thresh_is_refused(world, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(world["out"]["npy"], out)
    before = {p: p.read_bytes() for p in out.rglob("det_*.npy")}
    (out / "wide" / "det_labels.npy").unlink()  # an incomplete image: its detections recomputed
    args = [
        world["images"],
        "-o",
        out,
        "--weights",
        f"torchvision:{TWO_STAGE}",
        "--detect",
        "--device",
        "cpu",
    ]
    args += ["--short-side", "128", "--max-side", "192", "-q"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert report_of(out)["counts"] == {"ok": 1, "skipped": 2, "failed": 0}
    assert {p: p.read_bytes() for p in out.rglob("det_*.npy")} == before
    refused = run(*args, "--score-thresh", "0.3")
    assert refused.exit_code == 2
    assert "detect" in refused.output and "--overwrite" in refused.output


def test_detections_command_writes_coco_results(world, tmp_path):
    out, coco = world["out"]["shards"], tmp_path / "results.json"
    result = run("detections", out, "--coco", coco)
    assert result.exit_code == 0, result.output
    results = json.loads(coco.read_text())
    feats = open_features(out)
    keys = sorted(feats)  # ids 1..n in key order: tall, turned, wide
    assert {r["image_id"] for r in results} == {1, 2, 3}
    first = [r for r in results if r["image_id"] == 3]
    boxes, scores, labels = (feats["wide"][n] for n in ("det_boxes", "det_scores", "det_labels"))
    assert len(first) == len(boxes) and keys[2] == "wide"
    x1, y1, x2, y2 = boxes[0].astype(float)
    assert first[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert first[0]["score"] == pytest.approx(float(scores[0]))
    assert first[0]["category_id"] == int(labels[0])
    assert set(first[0]) == {"image_id", "category_id", "bbox", "score"}


def test_detections_command_takes_image_ids_from_a_coco_file(world, tmp_path):
    annotations = tmp_path / "instances.json"
    images = [{"id": 42, "file_name": "wide.png"}, {"id": 7, "file_name": "tall.png"}]
    annotations.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    coco = tmp_path / "results.json"
    result = run("detections", world["out"]["npy"], "--coco", coco, "--images", annotations)
    assert result.exit_code == 0
    assert {r["image_id"] for r in json.loads(coco.read_text())} == {42, 7}
    warnings = [line for line in result.output.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "turned.jpg" in warnings[0]


def test_detections_command_refuses_a_folder_without_detections(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 40, 48)
    assert (
        run(tmp_path / "in", "-o", tmp_path / "out", "--arch", "seed", "--device", "cpu", "-q").exit_code == 0
    )
    result = run("detections", tmp_path / "out", "--coco", tmp_path / "r.json")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and "--detect" in result.output


def test_detect_with_a_non_detector_is_one_line_exit_2(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 40, 48)
    result = run(tmp_path / "in", "-o", tmp_path / "out", "--arch", "seed", "--detect", "--device", "cpu")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "random (seed)" in lines[0] and f"torchvision:{ONE_STAGE}" in lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--score-thresh", "0.3"], "add --detect"),
        (["--detect", "--detections-count", "5:2"], "K:M"),
        (["--detect", "--detections-count", "1:5", "--max-detections", "3"], "--max-detections"),
        (["--detect", "--detect-extras", "masks"], "maskrcnn_resnet50_fpn"),
    ],
)
def test_detection_options_are_checked_in_one_line(world, tmp_path, args, message):
    result = run(world["images"], "-o", tmp_path / "o", "--weights", "coco", "--device", "cpu", *args)
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]  # after click's usage lines, where click checks
    assert last.startswith("Error: ") and message in last


def test_fixed_count_and_thresholds_reach_the_heads(world):
    from fpn_cli.models.builder import resolve
    from fpn_cli.run.detections import load_detector

    opts = Options(weights="coco", detect=True, detections_count=(3, 5), score_thresh=0.5)
    detector = load_detector(opts, resolve(weights="coco"))
    options = detector.heads.options
    assert (options.min_detections, options.max_detections, options.score_thresh) == (3, 5, 0.5)
    assert detector.resize.min_size == 800 and detector.resize.max_size == 1333  # the detector's own
    with pytest.raises(UsageError, match="K:M"):
        Options(weights="coco", detect=True, detections_count="10")


def test_an_image_without_detections_gets_empty_arrays_of_the_right_shapes():
    """N = 0: (0, 4) boxes, (0,) scores and labels, (0, 256, S, S) rois, (0, 1024) vectors."""
    from fpn_cli.regions.detect import Detections, Detector

    detector = Detector(TWO_STAGE, None, None, tuple(DET), np.dtype(np.float16), None)
    empty = Detections(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 256, 7, 7),
        torch.zeros(0, 1024),
    )  # fmt: skip
    arrays = detector.arrays(empty)
    assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {
        "det_boxes": ((0, 4), np.float32),
        "det_scores": ((0,), np.float32),
        "det_labels": ((0,), np.int64),
        "det_rois": ((0, 256, 7, 7), np.float16),
        "det_vectors": ((0, 1024), np.float16),
    }


def test_summary_counts_the_detections_at_their_most():
    result = run(
        "--summary", "--weights", "coco", "--detect", "--max-detections", "10", "--input-size", "480x640"
    )
    assert result.exit_code == 0, result.output
    assert "(as the detector does: shorter side 800, longer side at most 1333)" in result.output
    assert "input 800x1066" in result.output  # 480x640 as the detector resizes it
    line = next(line for line in result.output.splitlines() if line.startswith("detections per image"))
    # boxes 10x4 + scores 10 (float32), labels 10 (int64), rois 10x256x7x7 and vectors 10x1024 (float32)
    # plus five .npy headers of 128 bytes
    expected = (40 * 4 + 10 * 4 + 10 * 8 + 10 * 256 * 49 * 4 + 10 * 1024 * 4 + 5 * 128) / 1e3
    assert line.startswith(f"detections per image, at most 10 boxes: {expected:.1f} kB float32")


def test_mask_rcnn_masks_through_a_run_are_torchvisions(tmp_path, monkeypatch):
    """--detect-extras masks with a Mask R-CNN checkpoint: det_masks (N, 1, H, W) in the upright
    image's pixels, torchvision's own pasted probabilities for the boxes it shares with ours."""
    builder = "maskrcnn_resnet50_fpn"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("FPN_EXTRACT_OFFLINE", "1")
    model = _reference(builder, box_detections_per_img=20)
    path = zoo.entry(f"torchvision:{builder}").path()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    save_rgb(tmp_path / "in" / "odd.png", 97, 131, seed=3)
    options = dict(detect=True, detect_extras=("masks",), max_detections=20, device="cpu", **_resize())
    report = extract([tmp_path / "in"], tmp_path / "out", weights=f"torchvision:{builder}", **options)
    assert report.exit_status == 0
    arrays = open_features(tmp_path / "out")["odd"]
    with torch.no_grad():
        reference = model([_upright(tmp_path / "in" / "odd.png")])[0]
    n = len(arrays["det_boxes"])
    assert n > 0 and arrays["det_masks"].shape == (n, 1, 97, 131)
    masks = np.asarray(arrays["det_masks"], dtype=np.float32)
    assert masks.min() >= 0 and masks.max() <= 1
    iou = box_iou(reference["boxes"], torch.from_numpy(np.array(arrays["det_boxes"])))
    pairs = [(i, int(iou[i].argmax())) for i in range(len(reference["boxes"])) if iou[i].max() >= 0.999]
    assert len(pairs) >= 0.9 * n
    for i, j in pairs:
        assert np.abs(masks[j] - reference["masks"][i].numpy()).max() < 1e-3


def test_keypoint_rcnn_keypoints_through_a_run_are_torchvisions(tmp_path, monkeypatch):
    """--detect-extras keypoints with a Keypoint R-CNN checkpoint: det_keypoints (N, 17, 3) float32
    (x, y, visibility) in the upright image's pixels and det_keypoint_scores (N, 17), torchvision's
    own for the boxes it shares with ours."""
    builder = "keypointrcnn_resnet50_fpn"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("FPN_EXTRACT_OFFLINE", "1")
    torch.manual_seed(0)
    model = get_model(
        builder,
        weights=None,
        weights_backbone=None,
        num_classes=2,
        min_size=128,
        max_size=192,
        box_detections_per_img=10,
        box_score_thresh=0.0,
    )
    model = randomize_batchnorm(model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.0
    model = model.eval()
    path = zoo.entry(f"torchvision:{builder}").path()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    (tmp_path / "in").mkdir()
    save_exif_rotated(tmp_path / "in" / "turned.jpg", 60, 90)
    options = dict(detect=True, detect_extras=("keypoints",), max_detections=10, score_thresh=0.0)
    options["device"] = "cpu"
    weights = f"torchvision:{builder}"
    report = extract([tmp_path / "in"], tmp_path / "out", weights=weights, **options, **_resize())
    assert report.exit_status == 0
    arrays = open_features(tmp_path / "out")["turned"]
    with torch.no_grad():
        reference = model([_upright(tmp_path / "in" / "turned.jpg")])[0]
    n = len(arrays["det_boxes"])
    assert n > 0 and arrays["det_keypoints"].shape == (n, 17, 3)
    assert arrays["det_keypoint_scores"].shape == (n, 17)
    assert arrays["det_keypoints"].dtype == np.float32
    iou = box_iou(reference["boxes"], torch.from_numpy(np.array(arrays["det_boxes"])))
    pairs = [(i, int(iou[i].argmax())) for i in range(len(reference["boxes"])) if iou[i].max() >= 0.999]
    assert len(pairs) >= 0.7 * n  # which boxes match is the tests above's: here, their keypoints
    for i, j in pairs:
        assert np.abs(arrays["det_keypoints"][j] - reference["keypoints"][i].numpy()).max() < 1e-2
