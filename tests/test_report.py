"""report.json as written by the Report: valid JSON in every case, and lean in memory."""

from __future__ import annotations

import io
import json
import signal
import tracemalloc

import pytest

from fpn_cli.errors import Interrupted
from fpn_cli.report import ImageResult, Report, dump_report


def result(i: int, status: str = "ok") -> ImageResult:
    key = f"folder/img{i:07d}"
    levels = {
        level: {"shape": [256, 120 // s, 160 // s], "file": f"{key}/{level}.npy"}
        for level, s in (("p2", 1), ("p3", 2), ("p4", 4), ("p5", 8))
    }
    if status == "failed":
        return ImageResult(key + ".jpg", "failed", "truncated or corrupt image: x")
    return ImageResult(
        key + ".jpg", status, input_size=(480, 640), model_input_size=(480, 640), levels=levels
    )


def parsed(report: Report) -> dict:
    buffer = io.BytesIO()
    report.write_json(buffer)
    return json.loads(buffer.getvalue())


def test_report_json_lists_images_sorted_with_counts_and_header():
    report = Report({"version": "x", "model": {"arch": "seed", "levels": ["p2"]}})
    for i in (3, 1, 2):
        report.add(result(i, "failed" if i == 2 else "ok"))
    data = parsed(report)
    assert data["version"] == "x" and data["model"] == {"arch": "seed", "levels": ["p2"]}
    assert [e["path"] for e in data["images"]] == [f"folder/img{i:07d}.jpg" for i in (1, 2, 3)]
    assert data["counts"] == {"ok": 2, "skipped": 0, "failed": 1}
    assert data["images"][1]["error"] == "truncated or corrupt image: x"
    assert "interrupted" not in data


def test_an_empty_or_interrupted_report_is_valid_json():
    report = Report({"version": "x"})
    assert parsed(report)["images"] == []
    report.interrupt(KeyboardInterrupt())
    assert parsed(report)["interrupted"] is True
    buffer = io.BytesIO()
    dump_report(buffer, {}, [], {"ok": 0}, {})
    assert json.loads(buffer.getvalue()) == {"images": [], "counts": {"ok": 0}}


def test_shape_report_groups_by_size_and_names_the_first_three():
    report = Report({})
    for i in range(5):
        report.add(result(i))
    text = report.format_shapes()
    assert "480x640  (5 images: folder/img0000000.jpg, folder/img0000001.jpg, folder/img0000002.jpg" in text
    assert "and 2 more)" in text


def test_a_result_costs_well_under_a_kilobyte_of_memory():
    tracemalloc.start()
    report = Report({})
    before = tracemalloc.get_traced_memory()[0]
    for i in range(5000):
        report.add(result(i))
    per_image = (tracemalloc.get_traced_memory()[0] - before) / 5000
    tracemalloc.stop()
    assert per_image < 800, per_image


@pytest.mark.parametrize(
    "interrupt,status",
    [(KeyboardInterrupt(), 130), (Interrupted(signal.SIGINT), 130), (Interrupted(signal.SIGTERM), 143)],
)
def test_an_interrupted_run_exits_with_its_signals_status(interrupt, status):
    report = Report({})
    report.add(result(1))
    assert report.exit_status == 0
    report.interrupt(interrupt)
    assert report.interrupted and report.exit_status == status
