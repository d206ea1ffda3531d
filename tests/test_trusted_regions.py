"""Where a trusted resume (issue 10) meets region and pooled features (issue 14): what a resume keeps
of pooled vectors, RoI features and boxes, the record written after all of them, and ``verify``
checking them. Through the command line, as the two issues' own tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import SEED, report_of, run
from imagefactory import save_rgb

LEVELS = ("p2", "p3", "p4", "p5")


def write_csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("path,x1,y1,x2,y2\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def entries(out: Path) -> dict[str, dict]:
    return {e["path"]: e for e in report_of(out)["images"]}


def run_ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


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
