"""A level's size has one owner, the model (models.model.output_shapes): report.json's geometry,
verify, --summary and the run all ask it. ConvNeXt's stem (a 4x4 conv of stride 4) rounds down,
so its levels are not ⌈H/stride⌉ x ⌈W/stride⌉: the report must say what is stored."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import report_of, run
from imagefactory import save_rgb

pytest.importorskip("timm")
CONVNEXT = ["--arch", "timm:convnext_atto", "--device", "cpu", "-q"]


def entries(out) -> dict[str, dict]:
    return {e["path"]: e for e in report_of(out)["images"]}


def test_a_backbone_that_rounds_down_is_reported_as_stored_and_verify_passes(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 70, 131)
    save_rgb(tmp_path / "in" / "b.png", 45, 93, seed=1)
    out = tmp_path / "out"
    result = run(tmp_path / "in", "-o", out, *CONVNEXT)
    assert result.exit_code == 0, result.output
    listed = entries(out)
    # floor(70/4) = 17, not ceil's 18: the stem's arithmetic, not an assumed rounding
    assert listed["a.png"]["geometry"]["levels"]["p2"] == {"stride": 4, "size": [17, 32]}
    for path, key in (("a.png", "a"), ("b.png", "b")):
        for level, info in listed[path]["geometry"]["levels"].items():
            stored = np.load(out / key / f"{level}.npy", mmap_mode="r").shape
            assert list(stored[1:]) == info["size"], (path, level)
            assert list(stored) == listed[path]["levels"][level]["shape"], (path, level)
    checked = run("verify", out)
    assert checked.exit_code == 0 and "all as reported" in checked.output, checked.output


def test_verify_catches_a_geometry_that_is_not_the_models(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 70, 131)
    out = tmp_path / "out"
    assert run(tmp_path / "in", "-o", out, *CONVNEXT).exit_code == 0
    report = report_of(out)
    report["images"][0]["geometry"]["levels"]["p2"]["size"] = [18, 33]  # what a ceil rule says
    (out / "report.json").write_text(json.dumps(report))
    checked = run("verify", out)
    assert checked.exit_code == 1
    assert "a.png: its geometry gives p2 as 18x33, but the model gives 17x32" in checked.output


def test_an_input_too_small_for_the_network_is_a_failed_image_and_others_are_written(tmp_path):
    save_rgb(tmp_path / "in" / "tiny.png", 30, 30)
    save_rgb(tmp_path / "in" / "ok.png", 40, 36, seed=1)
    out = tmp_path / "out"
    result = run(tmp_path / "in", "-o", out, *CONVNEXT)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    failures = [line for line in result.stderr.splitlines() if "tiny.png" in line]
    assert len(failures) == 1 and "the network cannot take a 30x30 input" in failures[0]
    listed = entries(out)
    assert listed["tiny.png"]["status"] == "failed"
    assert listed["tiny.png"]["error"].startswith("the network cannot take a 30x30 input: ")
    assert listed["ok.png"]["status"] == "ok"
    assert np.load(out / "ok" / "p2.npy").shape == (256, 10, 9)
    assert not (out / "tiny").exists()
    assert report_of(out)["counts"] == {"ok": 1, "skipped": 0, "failed": 1}


def test_summary_of_a_size_too_small_for_the_network_is_one_line_exit_2():
    result = run("--summary", "--input-size", "30x30", *CONVNEXT)
    assert result.exit_code == 2
    assert "--input-size 30x30: the network cannot take a 30x30 input" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_summary_gives_the_models_sizes_for_a_backbone_that_rounds_down():
    result = run("--summary", "--input-size", "70x131", *CONVNEXT)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines() if line[:1] == "P"}
    assert rows["P2"] == ["4", "256", "17", "32"]
    assert rows["P5"] == ["32", "256", "2", "4"]
