"""Resume: what a rerun keeps, recomputes and deletes, and why it says so (run/resume.py)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FINISHED_SIZES, SEED, assert_report_matches_files, entries, report_of, run
from imagefactory import gradient, save_rgb


def test_a_complete_image_replaced_by_a_fifo_is_a_failed_input_and_its_features_stay(copied):
    src, out = copied
    before = {p: p.read_bytes() for p in (out / "b").iterdir()}
    (src / "b.png").unlink()
    os.mkfifo(src / "b.png")
    result = run(src, "-o", out, *SEED)
    assert result.exit_code == 1
    assert f"failed: {src / 'b.png'}: not a regular file (a FIFO)" in result.stderr
    listed = entries(out)
    assert len(listed) == len(FINISHED_SIZES) and listed["b.png"]["status"] == "failed"
    assert {e["status"] for p, e in listed.items() if p != "b.png"} == {"skipped"}
    assert {p: p.read_bytes() for p in (out / "b").iterdir()} == before  # for when the file is back


def test_a_resume_check_that_stalls_fails_that_image_after_timeout(copied, monkeypatch):
    from fpn_cli.run import resume

    src, out = copied
    release = threading.Event()
    real_change = resume.change

    def change(recorded, path, content_hash):
        if Path(path).stem == "c":
            release.wait()
        return real_change(recorded, path, content_hash)

    monkeypatch.setattr(resume, "change", change)
    try:
        result = run(src, "-o", out, "--timeout", "0.5", *SEED)
    finally:
        release.set()
    assert result.exit_code == 1
    assert f"failed: {src / 'c.png'}: timed out after 0.5 s reading it (--timeout)" in result.stderr
    statuses = {path: e["status"] for path, e in entries(out).items()}
    assert statuses == {**dict.fromkeys(statuses, "skipped"), "c.png": "failed"}


def test_a_resume_recomputes_whatever_it_cannot_trust_and_says_why(copied, finished):
    src, out = copied
    np.save(out / "b" / "p4.npy", np.zeros((256, 2, 2), np.float32))  # a valid .npy of the wrong shape
    good = (out / "c" / "p3.npy").read_bytes()
    (out / "c" / "p3.npy").write_bytes(good[:-10])  # cut short
    save_rgb(src / "d.png", 30, 50, seed=9)  # new pixels, new size
    os.utime(src / "e.png")  # the same bytes, touched
    (out / "f" / "input.json").unlink()  # as an earlier version, or a crash before the record, left it
    Image.open(src / "g.png").save(src / "g.jpg")  # another file behind the same output folder
    (src / "g.png").unlink()
    result = run(src, "-o", out, "--arch", "seed", "--device", "cpu")
    assert result.exit_code == 0, result.output
    listed = entries(out)
    assert listed["a.png"]["status"] == "skipped" and "recomputed" not in listed["a.png"]
    assert json.loads((out / "a" / "input.json").read_text())["input"] == str(src / "a.png")  # moved
    reasons = {p: e.get("recomputed", "") for p, e in listed.items()}
    assert reasons["b.png"] == "p4.npy is 256x2x2, not 256x3x5"
    assert reasons["c.png"] == "p3.npy is not a complete float32 .npy file"
    assert reasons["d.png"].startswith("input changed: ") and "bytes then" in reasons["d.png"]
    assert reasons["e.png"] == "input changed: modified since its features were written"
    assert reasons["f.png"].startswith("no fingerprint recorded")
    assert reasons["g.jpg"] == "input changed: was g.png"
    assert {listed[p]["status"] for p in reasons if p != "a.png"} == {"ok"}
    assert listed["d.png"]["input_size"] == [30, 50] and listed["d.png"]["levels"]["p2"]["shape"] == [
        256,
        8,
        13,
    ]
    assert f"recomputing {src / 'b.png'}: p4.npy is 256x2x2" in result.stderr
    assert_report_matches_files(out)
    clean = finished[1]
    for key in "abcef":
        for level in ("p2", "p3", "p4", "p5"):
            assert (out / key / f"{level}.npy").read_bytes() == (clean / key / f"{level}.npy").read_bytes()
    assert run("verify", out).exit_code == 0


@pytest.mark.parametrize("rerun", [["--hash"], []], ids=["with-hash", "then-without"])
def test_with_hash_a_resume_catches_new_content_of_the_same_size_and_time(tmp_path, rerun):
    """A folder made with --hash is checked by content on every resume, with --hash or not (a
    rerun without it kept changed content that verify then flagged)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(gradient(24, 32, 1)).save(src / "a.ppm")  # uncompressed: its size is its shape
    Image.fromarray(gradient(24, 32, 2)).save(src / "b.ppm")
    assert run(src, "-o", out, "--hash", *SEED).exit_code == 0
    assert len((out / "a" / "input.json").read_text().split('"sha256": "')[1].split('"')[0]) == 64
    before = (src / "a.ppm").stat()
    old = (out / "a" / "p2.npy").read_bytes()
    Image.fromarray(gradient(24, 32, 3)).save(src / "a.ppm")
    os.utime(src / "a.ppm", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (src / "a.ppm").stat().st_size == before.st_size
    checked = run("verify", out)
    assert checked.exit_code == 1
    assert checked.stdout == f"a.ppm: its input {src / 'a.ppm'}: input changed: different content (sha256)\n"
    result = run(src, "-o", out, *rerun, *SEED)
    assert result.exit_code == 0
    listed = entries(out)
    assert listed["a.ppm"]["recomputed"] == "input changed: different content (sha256)"
    assert listed["b.ppm"]["status"] == "skipped"
    assert (out / "a" / "p2.npy").read_bytes() != old
    assert run("verify", out).exit_code == 0


def test_with_hash_a_copied_input_of_the_same_content_keeps_its_features(tmp_path):
    """Content wins over modification time: ``cp -r`` of the inputs (new mtimes) keeps every
    feature with --hash, and the records then name the copies' times (a later run needs no hash)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(gradient(24, 32, 1)).save(src / "a.ppm")
    Image.fromarray(gradient(24, 32, 2)).save(src / "b.ppm")
    assert run(src, "-o", out, "--hash", *SEED).exit_code == 0
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, copy_function=shutil.copyfile)  # contents only: new times
    for name in ("a.ppm", "b.ppm"):
        os.utime(copy / name, ns=(1, (src / name).stat().st_mtime_ns + 10**9))
    result = run(copy, "-o", out, "--hash", *SEED)
    assert result.exit_code == 0, result.output
    assert {e["status"] for e in entries(out).values()} == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    record = json.loads((out / "a" / "input.json").read_text())
    assert record["input"] == str(copy / "a.ppm")
    assert record["mtime_ns"] == (copy / "a.ppm").stat().st_mtime_ns
    again = run(copy, "-o", out, *SEED)
    assert again.exit_code == 0 and {e["status"] for e in entries(out).values()} == {"skipped"}
    assert run("verify", out).exit_code == 0
    (copy / "b.ppm").write_bytes((copy / "b.ppm").read_bytes()[:-1] + b"\x00")  # same size, new content
    changed = run(copy, "-o", out, "--hash", *SEED)
    assert entries(out)["b.ppm"]["recomputed"] == "input changed: different content (sha256)"
    assert changed.exit_code == 0 and entries(out)["a.ppm"]["status"] == "skipped"


@pytest.mark.parametrize("fmt", ["npy", "shards"])
@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_features_without_a_readable_settings_record_are_not_kept_as_this_runs(tmp_path, fmt, damage):
    """A lost or damaged .fpn-extract.json leaves nothing to check other settings against: a
    run is refused (exit 2) rather than keeping features made with another seed under its own
    settings; --overwrite recomputes them."""
    for i in range(2):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24, 32, seed=i)
    out, args = tmp_path / "out", [*SEED, "--format", fmt]
    assert run(tmp_path / "in", "-o", out, *args).exit_code == 0
    settings = out / ".fpn-extract.json"
    settings.unlink() if damage == "deleted" else settings.write_text("garbage")
    refused = run(tmp_path / "in", "-o", out, *args, "--seed", "5")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "no readable record of their settings (.fpn-extract.json)" in refused.output
    assert run(tmp_path / "in", "-o", out, *args, "--seed", "5", "--overwrite").exit_code == 0
    assert report_of(out)["counts"]["ok"] == 2
