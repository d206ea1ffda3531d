"""Trust (issue 10): nothing hangs, nothing is dropped silently, a resume keeps only what it can
verify, ``verify`` checks a folder, clashes and impossible sizes are refused before any work, and
no input, option or signal ends in a traceback. Through the command line: click's runner in this
process where a test must patch something, the installed console script in a subprocess where
the process itself is the point (signals, stalls, memory limits, strict output encodings)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fpn_cli.formats.npy import check_layout, files_of_a_key
from fpn_cli.inputs import images
from fpn_cli.run import pipeline

from conftest import FPN_EXTRACT, SEED, report_of, run, start
from imagefactory import gradient, save_rgb

SIZES = {
    "a": (64, 96),
    "b": (48, 80),
    "c": (40, 40),
    "d": (56, 72),
    "e": (36, 52),
    "f": (44, 60),
    "g": (32, 48),
}


def fpn(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FPN_EXTRACT, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def entries(out: Path) -> dict[str, dict]:
    return {e["path"]: e for e in report_of(out)["images"]}


def assert_report_matches_files(out: Path) -> None:
    """Every level report.json lists is on disk with the shape it lists."""
    for entry in report_of(out)["images"]:
        for level in entry["levels"].values():
            assert list(np.load(out / level["file"], mmap_mode="r").shape) == level["shape"], entry["path"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of seven PNGs of different sizes and its complete output, made once: tests copy
    both (copy2 keeps modification times, so the copies' fingerprints match)."""
    root = tmp_path_factory.mktemp("finished")
    for name, (h, w) in SIZES.items():
        save_rgb(root / "in" / f"{name}.png", h, w, seed=ord(name))
    assert run(root / "in", "-o", root / "out", *SEED).exit_code == 0
    return root / "in", root / "out"


@pytest.fixture
def copied(finished, tmp_path) -> tuple[Path, Path]:
    src, out = finished
    shutil.copytree(src, tmp_path / "in")
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "in", tmp_path / "out"


# --- 1. nothing blocks, 2. nothing is dropped silently ----------------------------------------------


def test_special_files_and_unreadable_folders_met_while_listing_are_failed_inputs(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    save_rgb(folder / "a.png", 16, 16)
    save_rgb(folder / "locked" / "b.png", 16, 16)
    os.mkfifo(folder / "x.jpg")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "s.png"))
    real_scandir = os.scandir

    def scandir(path="."):  # root reads any folder: an unreadable one, as another user meets it
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    try:
        result = run(folder, "-o", tmp_path / "out", *SEED)
    finally:
        sock.close()
    assert result.exit_code == 1, result.output
    assert f"failed: {folder / 'x.jpg'}: not a regular file (a FIFO)" in result.stderr
    assert f"failed: {folder / 's.png'}: not a regular file (a socket)" in result.stderr
    assert f"failed: {folder / 'gone.png'}: broken symbolic link" in result.stderr
    assert f"failed: {folder / 'locked'}: cannot read folder: Permission denied" in result.stderr
    statuses = {path: e["status"] for path, e in entries(tmp_path / "out").items()}
    assert statuses == {
        "a.png": "ok",
        "gone.png": "failed",
        "locked/": "failed",
        "s.png": "failed",
        "x.jpg": "failed",
    }


def test_summary_of_a_fifo_named_like_an_image_fails_it_at_once(tmp_path):
    os.mkfifo(tmp_path / "x.jpg")
    save_rgb(tmp_path / "a.png", 40, 60)
    result = run("--summary", tmp_path / "x.jpg", tmp_path / "a.png", "--arch", "seed")
    assert result.exit_code == 1
    assert f"failed: {tmp_path / 'x.jpg'}: not a regular file (a FIFO)" in result.stderr
    assert "input 40x60" in result.stdout


def test_a_complete_image_replaced_by_a_fifo_is_a_failed_input_and_its_features_stay(copied):
    src, out = copied
    before = {p: p.read_bytes() for p in (out / "b").iterdir()}
    (src / "b.png").unlink()
    os.mkfifo(src / "b.png")
    result = run(src, "-o", out, *SEED)
    assert result.exit_code == 1
    assert f"failed: {src / 'b.png'}: not a regular file (a FIFO)" in result.stderr
    listed = entries(out)
    assert len(listed) == len(SIZES) and listed["b.png"]["status"] == "failed"
    assert {e["status"] for p, e in listed.items() if p != "b.png"} == {"skipped"}
    assert {p: p.read_bytes() for p in (out / "b").iterdir()} == before  # for when the file is back


@pytest.fixture
def stall(monkeypatch):
    """Reading any input named stuck.* hangs (a dead network mount) until the test ends."""
    release = threading.Event()
    real_decode = pipeline.decode_image

    def decode(path, *args, **kwargs):
        if Path(path).stem == "stuck":
            release.wait()
        return real_decode(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_image", decode)
    yield
    release.set()


def test_a_stalled_read_fails_that_image_after_timeout_and_the_run_goes_on(tmp_path, stall):
    for name in ("a", "stuck", "z"):
        save_rgb(tmp_path / "in" / f"{name}.png", 16, 16)
    started = time.monotonic()
    result = run(tmp_path / "in", "-o", tmp_path / "out", "--timeout", "0.5", "--workers", "1", *SEED)
    assert time.monotonic() - started < 30
    assert result.exit_code == 1
    assert f"{tmp_path / 'in' / 'stuck.png'}: timed out after 0.5 s reading or decoding it" in result.stderr
    statuses = {path: e["status"] for path, e in entries(tmp_path / "out").items()}
    assert statuses == {"a.png": "ok", "stuck.png": "failed", "z.png": "ok"}


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


def test_a_read_stalled_forever_does_not_keep_the_process_from_exiting(tmp_path):
    """The real console script, with a read that never returns: the stuck thread is left behind
    and the process still exits (ThreadPoolExecutor's threads are joined at exit)."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(
        "import time\n"
        "from fpn_cli.inputs import images\n"
        "real_open = images.open_regular\n"
        "def open_regular(path):\n"
        "    if 'stuck' in str(path):\n"
        "        time.sleep(3600)\n"
        "    return real_open(path)\n"
        "images.open_regular = open_regular\n"
    )
    for name in ("a", "stuck"):
        save_rgb(tmp_path / "in" / f"{name}.png", 16, 16)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hook")}
    started = time.monotonic()
    result = fpn(tmp_path / "in", "-o", tmp_path / "out", "--timeout", "1", *SEED, env=env, timeout=60)
    assert time.monotonic() - started < 45
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "stuck.png: timed out after 1 s" in result.stderr
    assert entries(tmp_path / "out")["a.png"]["status"] == "ok"


# --- 3. a resume keeps only what it can verify ---------------------------------------------------


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


# --- 4. verify ---------------------------------------------------------------------------------------


def test_verify_passes_a_finished_folder(finished):
    result = run("verify", finished[1])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"verified {len(SIZES)} images: all as reported" in result.stderr


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


# --- 5. every clash before any work ------------------------------------------------------------------


def clash_cases() -> list[tuple[str, str]]:
    """Pairs of input files whose outputs would land on each other, one per file a key writes."""
    cases = [("k.jpg", f"k/{name}.jpg") for name in sorted(files_of_a_key())]
    cases += [
        ("K.png", "k/P2.NPY.png"),  # casefolded, as on macOS and Windows
        ("k.png", "k/p2.npy/deeper.png"),  # a folder above the key
        ("sub/k.png", "sub/k/preview.png.jpg"),
        ("k.png", "k/input.json/x.png"),
    ]
    return cases


def test_inputs_whose_outputs_would_collide_are_refused_before_any_work(tmp_path):
    for i, (first, second) in enumerate(clash_cases()):
        folder = tmp_path / f"in{i}"
        save_rgb(folder / first, 8, 8)
        save_rgb(folder / second, 8, 8)
        result = run(folder, "-o", tmp_path / f"out{i}", *SEED)
        assert result.exit_code == 2, (first, second, result.output)
        assert str(folder / first) in result.stderr and str(folder / second) in result.stderr, result.stderr
        assert not (tmp_path / f"out{i}").exists()


@pytest.mark.parametrize("name", [".p2.npy~host~12.tmp.png", ".report.json~h~1.tmp.jpg"])
def test_an_input_named_like_a_temporary_file_is_refused(tmp_path, name):
    save_rgb(tmp_path / "in" / "k" / name, 8, 8)
    result = run(tmp_path / "in", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 2 and "named like fpn-extract's temporary files" in result.stderr


def test_a_glob_that_climbs_out_of_its_root_cannot_write_outside_out(tmp_path):
    save_rgb(tmp_path / "a" / "x.png", 8, 8)
    (tmp_path / "a" / "b").mkdir()
    result = run(str(tmp_path / "a" / "*" / ".." / "*.png"), "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 2 and "not a folder inside the output folder" in result.stderr


def test_keys_that_only_look_alike_do_not_clash():
    check_layout(
        [("k", "k.jpg"), ("k/p2", "k/p2.jpg"), ("k/p2.npy.x", "k/p2.npy.x.png"), ("p2.npy", "p2.npy.jpg")]
    )


# --- 6. memory is bounded ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--size", "100000x100000"], "--size 100000x100000 makes 10,000,000,000-pixel inputs"),
        (["--short-side", "20000"], "--short-side 20000 makes 400,000,000-pixel inputs"),
        (["--size", "1000x1000", "--max-pixels", "999999"], "over --max-pixels 999,999"),
    ],
)
def test_a_resize_target_over_max_pixels_is_a_usage_error_before_any_work(tmp_path, args, message):
    save_rgb(tmp_path / "a.png", 8, 8)
    result = run(tmp_path / "a.png", "-o", tmp_path / "out", *SEED, *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_allocation_failures_are_failed_inputs_or_one_line_errors(tmp_path, monkeypatch):
    from fpn_cli.run import engine, preview

    (tmp_path / "in").mkdir()
    for name, value in (("a", 10), ("b", 20), ("c", 30), ("d", 40)):
        Image.new("RGB", (16, 16), (value,) * 3).save(tmp_path / "in" / f"{name}.png")
    real_decode, real_call, real_render = images._decode, engine.Engine.__call__, preview.render

    def decode(path, *args):
        if Path(path).stem == "a":
            raise MemoryError
        return real_decode(path, *args)

    def call(self, batch):
        if (batch[:, 0, 0, 0] == 20).any():
            raise MemoryError
        return real_call(self, batch)

    def render(rgb, arrays):
        if rgb[0, 0, 0] == 30:
            raise MemoryError
        return real_render(rgb, arrays)

    monkeypatch.setattr(images, "_decode", decode)
    monkeypatch.setattr(engine.Engine, "__call__", call)
    monkeypatch.setattr(preview, "render", render)
    result = run(tmp_path / "in", "-o", tmp_path / "out", "--preview", *SEED)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert f"failed: {tmp_path / 'in' / 'a.png'}: not enough memory to decode and resize it" in lines
    assert any(
        line.startswith(f"failed: {tmp_path / 'in' / 'b.png'}: out of memory on cpu") for line in lines
    )
    assert lines[-1] == f"Error: cannot write {tmp_path / 'out' / 'c'}: out of memory"
    statuses = {path: e["status"] for path, e in entries(tmp_path / "out").items()}
    assert statuses == {"a.png": "failed", "b.png": "failed", "c.png": "failed"}


def test_an_allocation_failure_writing_the_report_is_one_line(tmp_path, monkeypatch):
    from fpn_cli.report import Report

    save_rgb(tmp_path / "a.png", 8, 8)

    def write_json(self, f):
        raise MemoryError

    monkeypatch.setattr(Report, "write_json", write_json)
    result = run(tmp_path / "a.png", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: out of memory")


def test_under_a_real_memory_limit_a_huge_resize_is_a_failed_input(tmp_path):
    """RLIMIT_AS lets the process start and run, but not allocate a 60000x60000 image."""
    save_rgb(tmp_path / "in" / "a.png", 16, 16)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    args = ["--size", "60000x60000", "--max-pixels", 4 * 10**9]
    result = fpn(tmp_path / "in", "-o", tmp_path / "out", *args, *SEED, preexec_fn=limit)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "a.png: not enough memory to decode and resize it" in result.stderr


LIMIT = 8 * 1024**3  # a CPU run needs 3.7 GB of address space here, the image 10.8 GB


# --- 8. no traceback, ever ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [str(2**64), "-1", "99999999999999999999999999"])
def test_a_seed_out_of_torchs_range_is_a_usage_error(tmp_path, seed):
    save_rgb(tmp_path / "a.png", 8, 8)
    result = run(tmp_path / "a.png", "-o", tmp_path / "out", *SEED, "--seed", seed)
    assert result.exit_code == 2 and "is not in the range 0<=x<=18446744073709551615" in result.output


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    save_rgb(tmp_path / "a.png", 8, 8)
    result = run(tmp_path / "a.png", "-o", tmp_path / "out", "--weights", "/etc/passwd")
    assert result.exit_code == 2
    assert "cannot read weights file /etc/passwd: not a checkpoint" in result.stderr
    assert "IndexError" not in result.output


def test_names_that_are_not_utf8_print_on_a_strict_utf8_terminal(tmp_path):
    folder = os.fsencode(tmp_path / "in")
    os.mkdir(folder)
    save_rgb(Path(os.fsdecode(folder + b"/\xff good.png")), 8, 8)
    Path(os.fsdecode(folder + b"/\xfe bad.jpg")).write_bytes(b"not an image")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    result = subprocess.run(
        [*FPN_EXTRACT, tmp_path / "in", "-o", tmp_path / "out", "--arch", "seed", "-v"],
        capture_output=True,
        env=env,
    )
    stdout, stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")  # strictly UTF-8
    assert result.returncode == 1 and "Traceback" not in stderr
    assert f"failed: {tmp_path / 'in'}/\\xfe bad.jpg: not an image file" in stderr
    assert "ok: \\xff good.png" in stderr and "(1 image: \\xff good.png)" in stdout
    assert (Path(os.fsdecode(os.fsencode(tmp_path / "out") + b"/\xff good")) / "p2.npy").is_file()


def burst(proc: subprocess.Popen, count: int = 6) -> tuple[str, str]:
    for _ in range(count):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    return proc.communicate(timeout=60)


def test_a_burst_of_ctrl_c_during_start_up_is_one_message_and_130(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 16, 16)
    proc = start(tmp_path / "in", "-o", tmp_path / "out", *SEED)
    time.sleep(0.3)  # importing torch
    out, err = burst(proc)
    assert proc.returncode == 130
    assert err == "Interrupted before any image was processed\n"


def test_a_burst_of_ctrl_c_during_a_run_reports_what_was_written_and_exits_130(tmp_path):
    for i in range(16):
        save_rgb(tmp_path / "in" / f"im{i:02d}.png", 96, 96, seed=i)
    out = tmp_path / "out"
    proc = start(tmp_path / "in", "-o", out, *SEED)
    deadline = time.monotonic() + 60
    while not list(out.glob("*/input.json")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    _, err = burst(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert "before any image" not in err
    written = report_of(out)["counts"]["ok"]
    assert (
        written >= 1
        and err == f"Interrupted: {written} images written; {out}/report.json lists what is done\n"
    )
    assert report_of(out)["interrupted"] is True
    assert_report_matches_files(out)


# --- 9. lists as users make them ---------------------------------------------------------------------


def test_null_separated_names_from_stdin_keep_newlines_and_spaces(tmp_path):
    names = [tmp_path / "new\nline.png", tmp_path / " lead.png", tmp_path / "dir\n" / "x.png"]
    for path in names:
        save_rgb(path, 8, 8)
    listed = b"\0".join(os.fsencode(p) for p in [*names[:2], tmp_path / "dir\n", tmp_path / "missing.png"])
    result = run("-0", "-", "-o", tmp_path / "out", *SEED, input=listed + b"\0")
    assert result.exit_code == 1, result.output
    statuses = {path: e["status"] for path, e in entries(tmp_path / "out").items()}
    assert statuses == {"new\nline.png": "ok", " lead.png": "ok", "x.png": "ok", "missing.png": "failed"}
    assert f"failed: {tmp_path / 'missing.png'}: does not exist" in result.stderr


def test_an_empty_out_is_a_usage_error(tmp_path):
    save_rgb(tmp_path / "a.png", 8, 8)
    result = run(tmp_path / "a.png", "-o", "", *SEED)
    assert result.exit_code == 2 and "--out is empty" in result.stderr


def test_the_console_script_runs_from_a_fresh_interpreter():
    """The entry point imports nothing heavy before its signal handling is in place."""
    code = "import sys, fpn_cli.console; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "False\n"


def test_ordered_map_gives_up_a_late_item_keeps_order_and_joins_nothing():
    from fpn_cli.inputs.deadline import ordered_map

    release = threading.Event()

    def work(n: int) -> int:
        if n == 2:
            release.wait()
        return n * 10

    before = threading.active_count()
    results = list(
        ordered_map(work, range(6), workers=2, lookahead=3, timeout=0.2, late=lambda n: -n, name="t")
    )
    assert results == [0, 10, -2, 30, 40, 50]
    assert threading.active_count() <= before + 3  # two workers and the one left behind
    release.set()


@pytest.mark.parametrize("name", ["input.json", "p2.npy"])
def test_a_folder_where_an_image_file_goes_fails_that_image_alone(tmp_path, name):
    """A folder by the name of one of an image's files (its record, a level): that image fails,
    naming the folder, and the others are written; no traceback."""
    for i in range(3):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24, 32, seed=i)
    out = tmp_path / "out"
    assert run(tmp_path / "in", "-o", out, *SEED).exit_code == 0
    (out / "im1" / name).unlink()
    (out / "im1" / name).mkdir()
    (out / "im2" / "p3.npy").unlink()  # another image to redo beside it
    result = run(tmp_path / "in", "-o", out, *SEED)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{out / 'im1' / name}: Is a directory" in result.output
    statuses = {e["path"]: e["status"] for e in report_of(out)["images"]}
    assert statuses == {"im0.png": "skipped", "im1.png": "failed", "im2.png": "ok"}


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


def test_a_folder_search_never_enters_another_runs_output_folder(tmp_path):
    """OUT inside the input folder: a second run into another OUT there does not take the first
    run's previews (or anything else in an fpn-extract output folder) as inputs."""
    for i in range(2):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24, 32, seed=i)
    assert run(tmp_path / "in", "-o", tmp_path / "in" / "first", "--preview", *SEED).exit_code == 0
    assert list((tmp_path / "in" / "first").rglob("preview.png"))
    result = run(tmp_path / "in", "-o", tmp_path / "in" / "second", *SEED)
    assert result.exit_code == 0, result.output
    assert [e["path"] for e in report_of(tmp_path / "in" / "second")["images"]] == ["im0.png", "im1.png"]
