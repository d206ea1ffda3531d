"""Where a trusted resume (issue 10) meets region and pooled features (issue 14): what a resume keeps
of pooled vectors, RoI features and boxes, the record written after all of them, and ``verify``
checking them. Through the command line, as the two issues' own tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fpn_cli.run import pipeline

from conftest import SEED, report_of, run
from imagefactory import save_rgb

LEVELS = ("p2", "p3", "p4", "p5")
LOUD = ["--arch", "seed", "--device", "cpu"]  # SEED without -q: notes on stderr


def write_csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("path,x1,y1,x2,y2\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def entries(out: Path) -> dict[str, dict]:
    return {e["path"]: e for e in report_of(out)["images"]}


def run_ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


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
