"""`fpn-extract verify`: a folder checked against its report, its model and its inputs."""

from __future__ import annotations

import json

import numpy as np

from conftest import FINISHED_SIZES, run
from imagefactory import save_rgb


def test_verify_passes_a_finished_folder(finished):
    result = run("verify", finished[1])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"verified {len(FINISHED_SIZES)} images: all as reported" in result.stderr


def test_verify_prints_one_line_per_problem(copied):
    src, out = copied
    for record in out.glob("*/input.json"):  # as a run on the copies would update them
        entry = json.loads(record.read_text())
        record.write_text(json.dumps({**entry, "input": str(src / entry["path"])}))
    (out / "a" / "p2.npy").unlink()
    (out / "b" / "p3.npy").write_bytes((out / "b" / "p3.npy").read_bytes()[:-4])
    np.save(out / "c" / "p4.npy", np.zeros((256, 3, 3), np.float16))
    np.save(out / "d" / "p5.npy", np.zeros((256, 9, 9), np.float32))
    (src / "e.png").unlink()
    size_then = (src / "f.png").stat().st_size
    save_rgb(src / "f.png", 10, 10)
    size_now = (src / "f.png").stat().st_size
    (out / "g" / "input.json").unlink()
    result = run("verify", out)
    assert result.exit_code == 1
    assert sorted(result.stdout.splitlines()) == [
        "a.png: a/p2.npy is missing",
        "b.png: b/p3.npy is not a complete float32 .npy file (header, dtype or length)",
        "c.png: c/p4.npy is not a complete float32 .npy file (header, dtype or length)",
        "d.png: d/p5.npy has shape 256x9x9, the report lists 256x2x3",
        f"e.png: its input {src / 'e.png'} no longer exists",
        f"f.png: its input {src / 'f.png'}: input changed: {size_then:,} bytes then, {size_now:,} now",
        "g.png: no record of its input (g/input.json)",
    ]
    assert "verified 7 images: 7 problems" in result.stderr


def test_verify_of_a_folder_without_a_report_is_a_usage_error(tmp_path):
    result = run("verify", tmp_path)
    assert result.exit_code == 2 and "has no report.json" in result.stderr
