"""RoI features (--boxes), pooled vectors (--pool, --no-maps), geometry in report.json and
``fpn-extract roi``, checked against torchvision.ops applied to the stored levels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from fpn_cli import UsageError, open_features
from fpn_cli.inputs.images import Resize, decode_image, probe
from fpn_cli.regions.boxes import ImageBoxes, check, read_boxes
from fpn_cli.run import pipeline

from conftest import SEED, assert_same_arrays, report_of, run
from imagefactory import save_exif_rotated, save_rgb

LEVELS = ("p2", "p3", "p4", "p5")
LOUD = ["--arch", "seed", "--device", "cpu"]  # SEED without -q: notes and the shape report shown


def write_csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("path,x1,y1,x2,y2\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def stored(out: Path, key: str, levels=LEVELS) -> dict[str, torch.Tensor]:
    """The image's levels as files, as the (1, C, h, w) batch torchvision's pooler takes."""
    return {level: torch.from_numpy(np.load(out / key / f"{level}.npy")).float()[None] for level in levels}


def torchvision_rois(out: Path, key: str, boxes, model_input_size, levels=LEVELS, size=7) -> np.ndarray:
    """The reference: torchvision's MultiScaleRoIAlign as Faster R-CNN builds it, on stored levels,
    for boxes already in model-input pixels."""
    pooler = MultiScaleRoIAlign(list(levels), size, 2)
    boxes = torch.tensor(np.asarray(boxes, dtype=np.float64), dtype=torch.float32)
    return pooler(stored(out, key, levels), [boxes], [tuple(model_input_size)]).numpy()


def entry(out: Path, path: str) -> dict:
    return next(e for e in report_of(out)["images"] if e["path"] == path)


def run_ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


# --- RoI features against torchvision --------------------------------------------------------------


def test_rois_at_native_size_equal_torchvision_including_boxes_on_the_border(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 64, 96)
    boxes = [(0, 0, 96, 64), (90, 58, 96, 64), (0, 0, 1, 1), (12.5, 7.25, 60.75, 33), (95, 0, 96, 64)]
    csv = write_csv(tmp_path / "b.csv", [("a.png", *b) for b in boxes])
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", csv)
    rois = np.load(out / "a" / "rois.npy")
    assert rois.shape == (5, 256, 7, 7) and rois.dtype == np.float32
    reference = torchvision_rois(out, "a", boxes, (64, 96))
    assert np.abs(rois - reference).max() <= 1e-5  # measured: 0.0, the same torchvision code
    np.testing.assert_array_equal(np.load(out / "a" / "boxes.npy"), np.array(boxes, dtype=np.float64))
    assert "clipped" not in entry(out, "a.png")["rois"] and "refused" not in entry(out, "a.png")["rois"]


def test_rois_of_a_resized_image_carry_the_boxes_through_each_axis_own_scale(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 40, 60)
    # --size 480x640: x12 down, x10.67 across; boxes chosen so every level P2-P5 gets one
    boxes = [(1, 2, 9, 10), (5, 5, 20, 20), (3, 4, 28, 25), (0, 0, 60, 40), (20, 10, 59.5, 30)]
    csv = write_csv(tmp_path / "b.csv", [("a.png", *b) for b in boxes])
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--size", "480x640", "--boxes", csv)
    sx, sy = 640 / 60, 480 / 40
    scaled = np.array(boxes) * [sx, sy, sx, sy]
    levels = LevelMapper(2, 5)([torch.tensor(scaled, dtype=torch.float32)])
    assert sorted(set(levels.tolist())) == [0, 1, 2, 3]  # the test reaches every level
    reference = torchvision_rois(out, "a", scaled, (480, 640))
    assert np.abs(np.load(out / "a" / "rois.npy") - reference).max() <= 1e-5  # measured: 0.0
    assert entry(out, "a.png")["geometry"]["scale"] == [sy, sx]


def test_rois_of_an_exif_rotated_image_take_boxes_in_the_upright_frame(tmp_path):
    (tmp_path / "in").mkdir()
    save_exif_rotated(tmp_path / "in" / "r.jpg", 40, 64, orientation=6)  # stored 40x64, shown 64x40
    boxes = [(2, 3, 38, 62), (0, 40, 40, 64)]  # inside the upright 64x40 image only
    csv = write_csv(tmp_path / "b.csv", [("r.jpg", *b) for b in boxes])
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", csv)
    e = entry(out, "r.jpg")
    assert e["input_size"] == [64, 40] and e["geometry"]["orientation"] == 6
    assert "clipped" not in e["rois"]
    reference = torchvision_rois(out, "r", boxes, (64, 40))
    assert np.abs(np.load(out / "r" / "rois.npy") - reference).max() <= 1e-5


def test_small_images_pool_at_the_true_stride_where_torchvision_would_infer_another(tmp_path):
    # torchvision infers P5's scale of a 37-row image as 2/37 rounded to a power of two: 1/16
    save_rgb(tmp_path / "in" / "a.png", 37, 53)
    boxes = [(3, 4, 30, 33)]
    csv = write_csv(tmp_path / "b.csv", [("a.png", *boxes[0])])
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", csv, "--roi-levels", "p5", "--roi-size", "3")
    p5 = stored(out, "a", ("p5",))["p5"]
    rois_box = torch.tensor([[0.0, *boxes[0]]])
    reference = roi_align(p5, rois_box, 3, spatial_scale=1 / 32, sampling_ratio=2, aligned=False)
    np.testing.assert_allclose(np.load(out / "a" / "rois.npy"), reference.numpy(), rtol=0, atol=1e-6)
    inferred = torchvision_rois(out, "a", boxes, (37, 53), levels=("p5",), size=3)
    assert np.abs(inferred - reference.numpy()).max() > 1e-3  # the inference would be wrong here


def test_roi_levels_and_size_choose_the_pooler(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 48, 64)
    boxes = [(0, 0, 64, 48), (4, 4, 12, 20)]
    csv = write_csv(tmp_path / "b.csv", [("a.png", *b) for b in boxes])
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", csv, "--roi-levels", "p4,p3", "--roi-size", 5)
    reference = torchvision_rois(out, "a", boxes, (48, 64), levels=("p3", "p4"), size=5)
    assert np.abs(np.load(out / "a" / "rois.npy") - reference).max() <= 1e-5
    assert report_of(out)["regions"]["roi"]["levels"] == ["p3", "p4"]


@pytest.mark.parametrize(
    "roi_levels, message",
    [
        ("p2,p4", "must be consecutive"),
        ("p5,p6", "p6 is not among the levels extracted"),
        ("c4,c5", "not among the levels extracted"),
    ],
)
def test_bad_roi_levels_are_usage_errors(tmp_path, roi_levels, message):
    save_rgb(tmp_path / "a.png", 16, 16)
    csv = write_csv(tmp_path / "b.csv", [("a.png", 0, 0, 8, 8)])
    result = run(
        tmp_path / "a.png", "-o", tmp_path / "out", *SEED, "--boxes", csv, "--roi-levels", roi_levels
    )
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


# --- bad boxes: messages, the rest written -----------------------------------------------------------


def test_images_a_boxes_file_names_without_features_are_a_warning_each_for_the_first_ten(tmp_path):
    """A dataset's COCO file names far more images than a run has: ten warnings, then one line
    counting the rest, in an extraction and in `fpn-extract roi` alike."""
    save_rgb(tmp_path / "in" / "a.png", 24, 32)
    rows = [("a.png", 1, 1, 9, 9)] + [(f"gone{i:02d}.png", 1, 1, 4, 4) for i in range(13)]
    boxes = write_csv(tmp_path / "b.csv", rows)
    out = tmp_path / "out"
    extracted = run(tmp_path / "in", "-o", out, *LOUD, "--boxes", boxes)
    assert extracted.exit_code == 0, extracted.output
    warnings = [line for line in extracted.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 11 and "gone09.png, which is not among the inputs" in warnings[9]
    assert warnings[10] == "warning: ... and 3 more images not among the inputs (report.json)"
    again = run("roi", out, "--boxes", boxes, "--overwrite")
    warnings = [line for line in again.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 11 and warnings[0].startswith("warning: gone00.png: 1 box(es) in ")
    assert warnings[10] == "warning: ... and 3 more images with boxes but no features"


def test_boxes_past_the_edge_are_clipped_bad_ones_refused_and_the_rest_written(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 32, 48)
    save_rgb(tmp_path / "in" / "b.png", 32, 32, seed=1)
    rows = [
        ("a.png", -4, -2, 20, 40),  # past the top-left and the bottom: clipped to the image
        ("a.png", 10, 10, 5, 20),  # empty
        ("a.png", 60, 0, 70, 10),  # wholly outside
        ("a.png", 2, 2, 10, 10),
        ("b.png", 1, 1, 30, 31),
        ("missing.png", 1, 1, 4, 4),  # not among the inputs
    ]
    out = tmp_path / "out"
    result = run(tmp_path / "in", "-o", out, *LOUD, "--boxes", write_csv(tmp_path / "b.csv", rows))
    assert result.exit_code == 1  # refused boxes are failures; the rest is written
    assert "box 1 (line 3) [10, 10, 5, 20]: empty (x2 <= x1)" in result.stderr
    assert "box 2 (line 4) [60, 0, 70, 10]: outside the 32x48 image" in result.stderr
    assert (
        "box 0 (line 2) [-4, -2, 20, 40] reaches past the 32x48 image: clipped to [0, 0, 20, 32]"
        in result.stderr
    )
    assert "missing.png, which is not among the inputs" in result.stderr
    rois = np.load(out / "a" / "rois.npy")
    assert np.isnan(rois[1:3]).all() and not np.isnan(rois[[0, 3]]).any()
    reference = torchvision_rois(out, "a", [(0, 0, 20, 32), (2, 2, 10, 10)], (32, 48))
    assert np.abs(rois[[0, 3]] - reference).max() <= 1e-5
    a = entry(out, "a.png")["rois"]
    assert [r["box"] for r in a["refused"]] == [1, 2] and a["clipped"] == [{"box": 0, "to": [0, 0, 20, 32]}]
    report = report_of(out)
    assert report["counts"] == {"ok": 2, "skipped": 0, "failed": 0}
    assert report["regions"]["boxes"]["not_among_inputs"] == {"missing.png": 1}
    assert np.load(out / "b" / "rois.npy").shape == (1, 256, 7, 7)


def test_boxes_file_formats_csv_with_or_without_header_and_coco(tmp_path):
    (tmp_path / "plain.csv").write_text("./x/a.jpg,1,2,3,4\nx/a.jpg,5,6,7.5,8\n\nb.jpg,0,0,1,1\n")
    (tmp_path / "named.csv").write_text("label,path,y1,x1,x2,y2\ncat,x/a.jpg,2,1,3,4\n")
    coco = {
        "images": [{"id": 7, "file_name": "x/a.jpg"}, {"id": 8, "file_name": "c.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 7, "bbox": [1, 2, 2, 2]},
            {"id": 2, "image_id": 7, "bbox": [5, 6, 2.5, 2]},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    plain = read_boxes(tmp_path / "plain.csv")
    assert plain.of("x/a.jpg").boxes == [(1, 2, 3, 4), (5, 6, 7.5, 8)] and plain.count == 3
    assert plain.of("x/a.jpg").sources == ["line 1", "line 2"]
    assert read_boxes(tmp_path / "named.csv").of("x/a.jpg").boxes == [(1, 2, 3, 4)]
    table = read_boxes(tmp_path / "coco.json")
    assert table.of("x/a.jpg").boxes == plain.of("x/a.jpg").boxes
    assert table.of("c.jpg") is None and table.unknown(["x/a.jpg"]) == {}


def coco(images: list, annotations: list) -> str:
    return json.dumps({"images": images, "annotations": annotations})


A = {"id": 1, "file_name": "a.jpg"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.jpg,1,2,3\n", "line 1: expected path,x1,y1,x2,y2"),
        ("a.jpg,1,2,3,4\nb.jpg,1,two,3,4\n", "line 2: coordinates must be numbers"),
        ('{"images": [], "annotations": [{"image_id": 3, "bbox": [0, 0, 1, 1]}]}', "names image_id 3"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}',
            "needs 'image_id'",
        ),
        ('{"images": [', "not valid JSON"),
        ("a.jpg,1,2,3,4\nb.jpg,1,2,3,4,5\n", "line 2: expected 5 columns"),
        (coco([{"id": [1], "file_name": "a.jpg"}], []), r"images\[0\] needs an 'id'"),
        (coco([A], [5]), r"annotations\[0\] is not an object"),
        (coco([A, {"id": 1, "file_name": "b.jpg"}], []), "two images have id 1"),
        (coco([A], [{"image_id": 1, "bbox": "1234"}]), r"bbox' as \[x, y, width, height\] numbers"),
        (coco([A], [{"image_id": 1, "bbox": [1, 2, True, 4]}]), "numbers"),
        ('{"images": [{"id": 1, "file_name": 7}], "annotations": []}', "a 'file_name'"),
    ],
)
def test_a_malformed_boxes_file_is_a_usage_error_naming_where(tmp_path, text, message):
    (tmp_path / "b.txt").write_text(text)
    with pytest.raises(UsageError, match=message):
        read_boxes(tmp_path / "b.txt")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
COCO_KEYS = st.sampled_from(["id", "file_name", "image_id", "bbox", "images", "annotations"])
COCO_LIKE = st.fixed_dictionaries(
    {
        "images": st.lists(st.dictionaries(COCO_KEYS, JSON, max_size=3), max_size=3),
        "annotations": st.lists(st.dictionaries(COCO_KEYS, JSON, max_size=3) | JSON, max_size=3),
    }
)


@settings(max_examples=150, deadline=None)
@given(data=COCO_LIKE | st.dictionaries(COCO_KEYS, JSON, max_size=3))
def test_any_json_boxes_file_is_read_or_refused_as_a_usage_error(tmp_path_factory, data):
    """Whatever a JSON boxes file holds, reading it gives boxes or a UsageError, nothing else."""
    path = tmp_path_factory.mktemp("coco") / "boxes.json"
    path.write_text(json.dumps(data))
    try:
        table = read_boxes(path)
    except UsageError:
        return
    for rel in table.images:
        assert all(len(box) == 4 and all(isinstance(v, float) for v in box) for box in table.of(rel).boxes)


def test_check_refuses_non_finite_and_keeps_rows_in_order():
    rows = [(0, 0, 4, 4), (float("nan"), 0, 4, 4), (1, 1, 2, float("inf")), (1, 1, 2, 12)]
    checked = check(ImageBoxes(rows, ["l1", "l2", "l3", "l4"]), (10, 10))
    assert checked.pooled.tolist() == [True, False, False, True]
    assert [r["box"] for r in checked.refused] == [1, 2] and "not finite" in checked.refused[1]["error"]
    assert checked.clipped == [{"box": 3, "to": [1, 1, 2, 10]}]
    np.testing.assert_array_equal(checked.boxes[1:3], np.array(rows[1:3]))  # refused rows as given


# --- pooled vectors, --no-maps, geometry -----------------------------------------------------------


def test_pooled_vectors_are_each_levels_mean_and_max_over_its_valid_area(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 37, 53)
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--pool", "avg,max", "--pad-multiple", 32)
    for level, level_map in stored(out, "a").items():
        avg, top = np.load(out / "a" / f"{level}_avg.npy"), np.load(out / "a" / f"{level}_max.npy")
        assert avg.shape == top.shape == (256,) and avg.dtype == np.float32
        np.testing.assert_allclose(avg, level_map[0].double().mean(dim=(1, 2)).numpy(), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(top, level_map[0].amax(dim=(1, 2)).numpy())
    geometry = entry(out, "a.png")["geometry"]
    assert geometry["levels"]["p5"] == {"stride": 32, "size": [2, 2], "padded_size": [2, 2]}
    assert geometry["levels"]["p2"] == {"stride": 4, "size": [10, 14], "padded_size": [16, 16]}
    assert list(entry(out, "a.png")["pooled"]) == [f"{lv}_{k}" for lv in LEVELS for k in ("avg", "max")]


def test_no_maps_stores_only_pooled_vectors_and_rois_and_then_is_complete(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 32, 48)
    save_rgb(tmp_path / "in" / "b.png", 24, 24, seed=1)
    csv = write_csv(tmp_path / "b.csv", [("a.png", 2, 2, 30, 20)])
    full, slim = tmp_path / "full", tmp_path / "slim"
    run_ok(tmp_path / "in", "-o", full, *SEED, "--pool", "avg", "--boxes", csv)
    run_ok(tmp_path / "in", "-o", slim, *SEED, "--pool", "avg", "--boxes", csv, "--no-maps")
    names = sorted(str(p.relative_to(slim)) for p in slim.rglob("*.npy"))
    pooled = [f"{lv}_avg.npy" for lv in LEVELS]
    assert names == sorted(
        [*(f"a/{n}" for n in [*pooled, "rois.npy", "boxes.npy"]), *(f"b/{n}" for n in pooled)]
    )
    for name in names:
        assert (slim / name).read_bytes() == (full / name).read_bytes(), name
    assert entry(slim, "a.png")["levels"] == {} and entry(slim, "a.png")["geometry"]["levels"]["p3"][
        "size"
    ] == [4, 6]
    mtimes = {p: p.stat().st_mtime_ns for p in slim.rglob("*.npy")}
    again = run_ok(tmp_path / "in", "-o", slim, *LOUD, "--pool", "avg", "--boxes", csv, "--no-maps")
    assert "2 already complete" in again.stdout
    assert entry(slim, "b.png")["geometry"]["levels"]["p5"] == {"stride": 32, "size": [1, 1]}  # skipped
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_no_maps_needs_something_to_store(tmp_path):
    save_rgb(tmp_path / "a.png", 16, 16)
    result = run(tmp_path / "a.png", "-o", tmp_path / "out", *SEED, "--no-maps")
    assert result.exit_code == 2 and "add --pool or --boxes" in result.output


def test_decode_reports_the_exif_orientation_it_applied(tmp_path):
    save_exif_rotated(tmp_path / "r.jpg", 24, 40, orientation=8)
    save_rgb(tmp_path / "p.png", 5, 7)
    decoded = decode_image(tmp_path / "r.jpg", Resize(size=(20, 12)))
    assert (decoded.size, decoded.orientation, decoded.rgb.shape) == ((40, 24), 8, (20, 12, 3))
    assert (probe(tmp_path / "r.jpg").size, probe(tmp_path / "r.jpg").orientation) == ((40, 24), 8)
    assert decode_image(tmp_path / "p.png", Resize()).orientation == 1


# --- resume: only what is missing ------------------------------------------------------------------


def test_pools_and_rois_added_to_a_finished_folder_come_from_the_stored_levels(tmp_path, monkeypatch):
    save_rgb(tmp_path / "in" / "a.png", 32, 48)
    save_rgb(tmp_path / "in" / "b.png", 24, 24, seed=1)
    csv = write_csv(tmp_path / "b.csv", [("a.png", 2, 2, 30, 20), ("a.png", 0, 0, 48, 32)])
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    run_ok(tmp_path / "in", "-o", out, *SEED)
    run_ok(tmp_path / "in", "-o", fresh, *SEED, "--pool", "max", "--boxes", csv)
    levels = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.npy")}

    def no_forward(self, batch):
        raise AssertionError("the network ran: the levels were on disk")

    monkeypatch.setattr("fpn_cli.run.pipeline.Forward.__call__", no_forward)
    result = run_ok(tmp_path / "in", "-o", out, *LOUD, "--pool", "max", "--boxes", csv)
    assert "2 written" in result.stdout
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in levels} == levels
    for path in fresh.rglob("*.npy"):
        assert (out / path.relative_to(fresh)).read_bytes() == path.read_bytes(), path
    assert len(list(out.rglob("*.npy"))) == len(list(fresh.rglob("*.npy")))


def test_changed_boxes_recompute_only_that_images_rois(tmp_path):
    for name in ("a", "b"):
        save_rgb(tmp_path / "in" / f"{name}.png", 24, 32, seed=ord(name))
    out = tmp_path / "out"
    first = write_csv(tmp_path / "1.csv", [("a.png", 1, 1, 9, 9), ("b.png", 2, 2, 20, 20)])
    run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", first)
    for path in out.rglob("*.npy"):
        os.utime(path, ns=(1, 1))
    second = write_csv(
        tmp_path / "2.csv", [("a.png", 1, 1, 9, 9), ("b.png", 2, 2, 20, 20), ("b.png", 0, 0, 5, 5)]
    )
    result = run_ok(tmp_path / "in", "-o", out, *LOUD, "--boxes", second)
    assert "1 written, 1 already complete" in result.stdout
    touched = sorted(str(p.relative_to(out)) for p in out.rglob("*.npy") if p.stat().st_mtime_ns != 1)
    assert touched == ["b/boxes.npy", "b/rois.npy"]
    assert np.load(out / "b" / "rois.npy").shape == (2, 256, 7, 7)


def test_roi_settings_are_checked_on_resume_and_kept_by_runs_without_boxes(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 24, 32)
    csv = write_csv(tmp_path / "b.csv", [("a.png", 1, 1, 20, 20)])
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", csv, "--roi-size", 5)
    result = run(tmp_path / "in", "-o", out, *SEED, "--boxes", csv)
    assert result.exit_code == 2 and "roi {" in result.output and "other settings" in result.output
    run_ok(tmp_path / "in", "-o", out, *SEED)  # no boxes: the recorded RoI settings stay
    result = run("roi", out, "--boxes", csv, "--roi-size", 7)
    assert result.exit_code == 2 and "other settings" in result.output
    run_ok("roi", out, "--boxes", csv, "--overwrite")  # the folder's size, 5
    assert np.load(out / "a" / "rois.npy").shape == (1, 256, 5, 5)


# --- fpn-extract roi OUT --boxes FILE --------------------------------------------------------------


def test_roi_subcommand_writes_the_bytes_extraction_writes_from_the_stored_levels(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 40, 60)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    save_exif_rotated(tmp_path / "in" / "sub" / "r.jpg", 24, 40, orientation=6)
    csv = write_csv(
        tmp_path / "b.csv",
        [("a.png", 1, 2, 9, 10), ("a.png", 0, 0, 60, 40), ("sub/r.jpg", 3, 5, 20, 38), ("a.png", 5, 5, 5, 9)],
    )
    common = [*SEED, "--size", "96x120", "--save-dtype", "float16"]
    during, later = tmp_path / "during", tmp_path / "later"
    assert run(tmp_path / "in", "-o", during, *common, "--boxes", csv).exit_code == 1  # a refused box
    run_ok(tmp_path / "in", "-o", later, *common)
    proc = run("roi", later, "--boxes", csv)
    assert proc.exit_code == 1, proc.stderr  # box 2 of a.png is empty
    assert "2 images with boxes: 2 written, 0 already complete, 0 failed; 4 boxes (1 refused" in proc.stdout
    assert "failed: a.png: box 2 (line 5) [5, 5, 5, 9]: empty (x2 <= x1)" in proc.stderr
    for key in ("a", "sub/r"):
        for name in ("rois.npy", "boxes.npy"):
            assert (later / key / name).read_bytes() == (during / key / name).read_bytes(), (key, name)
    assert np.load(later / "a" / "rois.npy").dtype == np.float16
    assert entry(later, "a.png")["rois"] == entry(during, "a.png")["rois"]
    assert report_of(later)["regions"]["roi"] == report_of(during)["regions"]["roi"]


def test_roi_subcommand_needs_an_extracted_folder(tmp_path):
    csv = write_csv(tmp_path / "b.csv", [("a.png", 1, 1, 4, 4)])
    (tmp_path / "empty").mkdir()
    result = run("roi", tmp_path / "empty", "--boxes", csv)
    assert result.exit_code == 2 and "holds no finished extraction" in result.output


def test_roi_subcommand_fails_only_the_images_whose_levels_are_not_stored(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 24, 32)
    save_rgb(tmp_path / "in" / "b.png", 24, 32, seed=1)
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED)
    (out / "b" / "p3.npy").unlink()
    csv = write_csv(tmp_path / "b.csv", [("a.png", 1, 1, 20, 20), ("b.png", 1, 1, 20, 20)])
    result = run("roi", out, "--boxes", csv)
    assert result.exit_code == 1
    assert "failed: b.png: b/p3.npy is missing or incomplete: extract it first" in result.stderr
    assert (out / "a" / "rois.npy").is_file() and not (out / "b" / "rois.npy").exists()
    assert "rois" in entry(out, "a.png") and "rois" not in entry(out, "b.png")


def test_roi_command_on_a_shards_folder_equals_it_on_an_npy_folder(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 37, 53)
    save_rgb(tmp_path / "in" / "b.png", 30, 24, seed=1)
    first = write_csv(
        tmp_path / "first.csv", [("a.png", 2, 2, 30, 20), ("a.png", 1, 1, 60, 40), ("b.png", 0, 0, 9, 9)]
    )
    second = write_csv(tmp_path / "second.csv", [("b.png", 3, 3, 20, 20)])
    outs = {f: tmp_path / f for f in ("npy", "shards")}
    for format, out in outs.items():
        run_ok(tmp_path / "in", "-o", out, *SEED, "--format", format, "--pool", "avg")
        result = run_ok("roi", out, "--boxes", first)
        assert "2 written, 0 already complete, 0 failed; 3 boxes" in result.output
        assert run("verify", out).exit_code == 0
    assert_same_arrays(outs["npy"], outs["shards"])
    shards = open_features(outs["shards"])
    assert shards["a"]["rois"].shape == (2, 256, 7, 7) and shards["a"]["boxes"].shape == (2, 4)
    assert "p2_avg" in shards["a"]  # the arrays the image kept were written again with it
    again = run_ok("roi", outs["shards"], "--boxes", first)
    assert "0 written, 2 already complete" in again.output
    for out in outs.values():  # another boxes file: a's rois (of the first file) go
        run_ok("roi", out, "--boxes", second)
        assert run("verify", out).exit_code == 0
    assert_same_arrays(outs["npy"], outs["shards"])
    assert "rois" not in open_features(outs["shards"])["a"] and "p2" in open_features(outs["shards"])["a"]
    assert entry(outs["shards"], "b.png")["rois"]["shape"] == [1, 256, 7, 7]


def entries(out: Path) -> dict[str, dict]:
    return {e["path"]: e for e in report_of(out)["images"]}


def test_a_changed_input_recomputes_its_pools_and_rois_and_drops_every_stale_file(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 40, 60, seed=1)
    save_rgb(tmp_path / "in" / "b.png", 24, 32, seed=2)
    csv = write_csv(tmp_path / "b.csv", [("a.png", 2, 2, 30, 20), ("b.png", 1, 1, 20, 20)])
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--pool", "avg,max", "--boxes", csv, "--preview")
    b_files = {p: p.stat().st_mtime_ns for p in (out / "b").iterdir()}
    save_rgb(tmp_path / "in" / "a.png", 48, 64, seed=3)  # new pixels, new size
    result = run_ok(tmp_path / "in", "-o", out, *LOUD, "--pool", "avg", "--boxes", csv)
    assert f"recomputing {tmp_path / 'in' / 'a.png'}: input changed: " in result.stderr
    listed = entries(out)
    assert listed["a.png"]["status"] == "ok" and listed["a.png"]["recomputed"].startswith("input changed: ")
    assert listed["b.png"]["status"] == "skipped"
    # made from the old pixels and not asked for now: deleted, not left for the new record to vouch for
    assert sorted(p.name for p in (out / "a").iterdir()) == sorted(
        [
            *(f"{lv}.npy" for lv in LEVELS),
            *(f"{lv}_avg.npy" for lv in LEVELS),
            "rois.npy",
            "boxes.npy",
            "input.json",
        ]
    )
    run_ok(tmp_path / "in", "-o", fresh, *SEED, "--pool", "avg", "--boxes", csv)
    for path in (fresh / "a").glob("*.npy"):
        assert (out / "a" / path.name).read_bytes() == path.read_bytes(), path.name
    assert listed["a.png"]["geometry"]["levels"]["p2"]["size"] == [12, 16]
    assert {p: p.stat().st_mtime_ns for p in (out / "b").iterdir()} == b_files  # b's _max and preview stay
    assert run("verify", out).exit_code == 0


def test_an_image_with_pools_and_rois_is_skipped_only_with_its_record(tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        save_rgb(tmp_path / "in" / f"{name}.png", 24, 32, seed=ord(name))
    csv = write_csv(tmp_path / "b.csv", [(f"{n}.png", 1, 1, 20, 20) for n in "abc"])
    out = tmp_path / "out"
    args = [tmp_path / "in", "-o", out, *LOUD, "--pool", "avg", "--boxes", csv]
    run_ok(*args)
    clean = {p: p.read_bytes() for p in out.rglob("*.npy")}
    (out / "a" / "input.json").unlink()  # a crash before the record, or an earlier version
    np.save(out / "b" / "p3_avg.npy", np.zeros(3, np.float32))  # complete, but not (256,)
    forwarded = []
    real_call = pipeline.Forward.__call__

    def forward(self, batch):
        forwarded.extend(job.image.rel for job in batch)
        return real_call(self, batch)

    monkeypatch.setattr(pipeline.Forward, "__call__", forward)
    result = run_ok(*args)
    assert "note: recomputing 1 images whose features carry no fingerprint" in result.stderr
    listed = entries(out)
    assert listed["a.png"]["status"] == "ok" and listed["a.png"]["recomputed"].startswith("no fingerprint")
    assert listed["b.png"]["status"] == "ok" and "recomputed" not in listed["b.png"]  # from its stored levels
    assert listed["c.png"]["status"] == "skipped"
    assert forwarded == ["a.png"]
    assert (out / "a" / "input.json").is_file()
    assert {p: p.read_bytes() for p in out.rglob("*.npy")} == clean


def test_a_wrong_level_is_recomputed_with_everything_derived_from_the_levels(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 24, 32)
    csv = write_csv(tmp_path / "b.csv", [("a.png", 1, 1, 20, 20)])
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--pool", "avg,max", "--boxes", csv, "--preview")
    clean = {p: p.read_bytes() for p in out.rglob("*.npy")}
    np.save(out / "a" / "p4.npy", np.zeros((256, 3, 3), np.float32))  # as if p4_avg, rois came from it
    result = run_ok(tmp_path / "in", "-o", out, *LOUD, "--pool", "avg", "--boxes", csv)
    assert entries(out)["a.png"]["recomputed"] == "p4.npy is 256x3x3, not 256x2x2"
    assert f"recomputing {tmp_path / 'in' / 'a.png'}: p4.npy is 256x3x3" in result.stderr
    assert not (out / "a" / "preview.png").exists() and not (out / "a" / "p4_max.npy").exists()
    assert {p: p.read_bytes() for p in out.rglob("*.npy")} == {
        p: b for p, b in clean.items() if not p.name.endswith("_max.npy")
    }
    assert run("verify", out).exit_code == 0


def test_the_record_is_written_after_every_other_file_of_its_image(tmp_path, monkeypatch):
    """input.json marks the whole image complete: levels, pooled vectors, rois, then boxes (which
    mark the rois current), the preview, and last the record; in a run that computes them, in one
    that derives them from stored levels, and in ``fpn-extract roi``."""
    from fpn_cli.formats.npy import Store

    writes: list[tuple[str, str]] = []
    real = {name: getattr(Store, name) for name in ("write_levels", "write_preview", "write_record")}

    def write_levels(self, key, arrays):
        writes.extend((key, name) for name in arrays)
        return real["write_levels"](self, key, arrays)

    def write_preview(self, key, picture):
        writes.append((key, "preview"))
        return real["write_preview"](self, key, picture)

    def write_record(self, key, record):
        writes.append((key, "input.json"))
        return real["write_record"](self, key, record)

    monkeypatch.setattr(Store, "write_levels", write_levels)
    monkeypatch.setattr(Store, "write_preview", write_preview)
    monkeypatch.setattr(Store, "write_record", write_record)
    save_rgb(tmp_path / "in" / "a.png", 24, 32)
    csv = write_csv(tmp_path / "b.csv", [("a.png", 1, 1, 20, 20)])
    out = tmp_path / "out"

    def order() -> list[str]:
        names = [name for key, name in writes if key == "a"]
        writes.clear()
        return names

    run_ok(tmp_path / "in", "-o", out, *SEED, "--pool", "avg", "--boxes", csv, "--preview")
    pooled = [f"{level}_avg" for level in LEVELS]
    assert order() == [*LEVELS, *pooled, "rois", "boxes", "preview", "input.json"]
    run_ok(tmp_path / "in", "-o", out, *SEED, "--pool", "avg,max", "--boxes", csv)  # from the files
    assert order() == [*(f"{level}_max" for level in LEVELS), "input.json"]
    run_ok("roi", out, "--boxes", csv, "--overwrite")
    assert order() == ["rois", "boxes", "input.json"]
    assert run("verify", out).exit_code == 0


def test_verify_checks_pooled_vectors_rois_and_boxes_as_listed(tmp_path):
    for name in ("a", "b", "c"):
        save_rgb(tmp_path / "in" / f"{name}.png", 24, 32, seed=ord(name))
    csv = write_csv(tmp_path / "b.csv", [(f"{n}.png", 1, 1, 20, 20) for n in "abc"] + [("c.png", 0, 0, 9, 9)])
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--pool", "avg", "--boxes", csv, "--no-maps")
    passed = run("verify", out)
    assert passed.exit_code == 0 and passed.stdout == "", passed.output  # no levels listed: --no-maps
    (out / "a" / "p3_avg.npy").unlink()
    (out / "b" / "rois.npy").write_bytes((out / "b" / "rois.npy").read_bytes()[:-8])
    np.save(out / "c" / "boxes.npy", np.zeros((3, 4)))
    result = run("verify", out)
    assert result.exit_code == 1
    assert sorted(result.stdout.splitlines()) == [
        "a.png: a/p3_avg.npy is missing",
        "b.png: b/rois.npy is not a complete float32 .npy file (header, dtype or length)",
        "c.png: c/boxes.npy has shape 3x4, not 2x4 for the RoIs listed",
    ]


def test_an_interrupted_roi_subcommand_says_so_and_exits_130(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fpn_cli.run.rois.rois_from_folder", interrupted)  # cli imports it when run
    csv = write_csv(tmp_path / "b.csv", [("a.png", 1, 1, 4, 4)])
    result = run("roi", tmp_path, "--boxes", csv)
    assert result.exit_code == 130
    assert (
        result.stderr
        == f"Interrupted: {tmp_path}/report.json is as it was; run the command again to finish\n"
    )


def test_verify_passes_a_no_maps_folder_whose_images_without_boxes_store_nothing(tmp_path):
    """--no-maps --boxes: an image the boxes file does not name stores nothing and gets no
    record; verify has nothing of it to check (it failed such folders right after a clean run)."""
    for i in range(3):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24, 32, seed=i)
    boxes = write_csv(tmp_path / "boxes.csv", [("im0.png", 1, 1, 20, 16)])
    for fmt in ("npy", "shards"):
        out = tmp_path / fmt
        run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", boxes, "--no-maps", "--format", fmt)
        result = run("verify", out)
        assert result.exit_code == 0, result.output
        assert set(entries(out)) == {"im0.png", "im1.png", "im2.png"}


def test_rois_exist_exactly_for_the_images_the_last_boxes_file_names(tmp_path):
    """Extracting again with another boxes file, or `roi --overwrite` with other RoI settings:
    an image the new file does not name loses the RoI features made for the old one, in both
    formats, so report.json, the readers and the settings never disagree with the files."""
    from fpn_cli import open_features

    for i in range(3):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24, 32, seed=i)
    old = write_csv(tmp_path / "old.csv", [("im1.png", 2, 2, 20, 16), ("im2.png", 1, 1, 9, 9)])
    new = write_csv(tmp_path / "new.csv", [("im0.png", 1, 1, 20, 16)])
    for fmt in ("npy", "shards"):
        out = tmp_path / fmt
        run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", old, "--format", fmt)
        run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", new, "--format", fmt)
        features = open_features(out)
        assert [key for key in features if "rois" in features[key]] == ["im0"]
        assert [path for path, entry in entries(out).items() if "rois" in entry] == ["im0.png"]
        assert run("verify", out).exit_code == 0
    out = tmp_path / "npy"
    run_ok("roi", out, "--boxes", old, "--roi-size", 5, "--overwrite")
    assert sorted(p.parent.name for p in out.glob("*/rois.npy")) == ["im1", "im2"]
    assert {np.load(p).shape[2:] for p in out.glob("*/rois.npy")} == {(5, 5)}
    assert run("verify", out).exit_code == 0


def test_roi_and_boxes_runs_say_which_images_lose_rois_of_an_earlier_boxes_file(tmp_path):
    """The images an earlier boxes file gave rois.npy that the new file names no box of lose
    them: the roi command and a --boxes run say how many and which (the first three), on stderr."""
    for i in range(5):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24, 32, seed=i)
    old = write_csv(tmp_path / "old.csv", [(f"im{i}.png", 1, 1, 9, 9) for i in (1, 2, 3, 4)])
    new = write_csv(tmp_path / "new.csv", [("im0.png", 1, 1, 20, 16)])
    out = tmp_path / "out"
    run_ok(tmp_path / "in", "-o", out, *SEED, "--boxes", old)
    result = run_ok("roi", out, "--boxes", new)
    lost = "RoI features of an earlier boxes file and have none in the new one"
    assert f"roi: 4 images had {lost}: im1.png, im2.png, im3.png and 1 more\n" in result.stderr
    assert sorted(p.parent.name for p in out.glob("*/rois.npy")) == ["im0"]
    again = run_ok(tmp_path / "in", "-o", out, *LOUD, "--boxes", old)
    assert f"--boxes {old}: 1 image had {lost}: im0.png\n" in again.stderr
    assert sorted(p.parent.name for p in out.glob("*/rois.npy")) == ["im1", "im2", "im3", "im4"]
    quiet = run_ok("roi", out, "--boxes", old)  # nothing lost: nothing said
    assert "earlier boxes file" not in quiet.output


def test_rois_are_pooled_and_written_a_bounded_chunk_at_a_time_with_the_same_bytes(tmp_path, monkeypatch):
    """With chunks of 3 boxes, no pooling call takes more, a refused box's row stays NaN in
    place, and rois.npy holds the bytes of pooling every box at once (npy and shards alike)."""
    from fpn_cli.regions import outputs, pooling

    save_rgb(tmp_path / "in" / "a.png", 48, 64, seed=3)
    rows = [("a.png", i, i, 20 + 2 * i, 16 + i) for i in range(7)] + [("a.png", 5, 5, 5, 9)]  # last: empty
    boxes = write_csv(tmp_path / "boxes.csv", rows)
    assert run(tmp_path / "in", "-o", tmp_path / "whole", *SEED, "--boxes", boxes).exit_code == 1  # refused
    calls: list[int] = []
    into = pooling.RoiPooler.into
    monkeypatch.setattr(
        pooling.RoiPooler,
        "into",
        lambda self, out, b, rows=None: calls.append(len(b)) or into(self, out, b, rows),
    )
    monkeypatch.setattr(outputs, "ROI_CHUNK_BYTES", 3 * 256 * 7 * 7 * 4)
    for fmt in ("npy", "shards"):
        calls.clear()
        assert (
            run(tmp_path / "in", "-o", tmp_path / fmt, *SEED, "--boxes", boxes, "--format", fmt).exit_code
            == 1
        )
        assert calls == [3, 3, 1], fmt  # 8 rows in chunks of 3; the refused one is not pooled
        got = open_features(tmp_path / fmt)["a"]["rois"]
        assert got.shape == (8, 256, 7, 7) and np.isnan(got[7]).all()
        assert np.array_equal(got, np.load(tmp_path / "whole" / "a" / "rois.npy"), equal_nan=True)
        verified = run("verify", tmp_path / fmt)  # the checksum summed chunk by chunk is the file's
        assert verified.exit_code == 0 and "checked by shape only" not in verified.output, verified.output
    assert (tmp_path / "npy" / "a" / "rois.npy").read_bytes() == (
        tmp_path / "whole" / "a" / "rois.npy"
    ).read_bytes()
