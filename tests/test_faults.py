"""Faults, interruptions and abuse: nothing hangs, nothing is dropped silently, no input, option,
signal or full disk ends in a traceback or leaves a partial file. Through click's runner in this
process, and the installed console script in a subprocess where the process itself is the point
(kill -9, signals, stalls, rlimits, a second process holding the lock, strict output encodings)."""

from __future__ import annotations

import fcntl
import os
import resource
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

from fpn_cli.errors import Interrupted
from fpn_cli.inputs import images
from fpn_cli.run import pipeline

from conftest import (
    FPN_EXTRACT,
    SEED,
    assert_report_matches_files,
    entries,
    files,
    forked,
    report_of,
    run,
    start,
)
from imagefactory import save_rgb, truncated_jpeg


def fpn(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``fpn-extract ARGS`` as a subprocess: for tests where the process itself is the point."""
    return subprocess.run(
        [*FPN_EXTRACT, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def wait_for_outputs(out: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``count`` images are complete; fails the test if the run ends first."""
    deadline = time.monotonic() + timeout
    while len(list(out.glob("*/p5.npy"))) < count:
        assert proc.poll() is None, "the run finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def strays(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]


def image_folder(factory, name: str, count: int, side: int) -> Path:
    folder = factory.mktemp(name)
    for i in range(count):
        save_rgb(folder / f"im{i:02d}.png", side, side, seed=i)
    return folder


MANY = 30


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """30 images of 160x160: a run long enough (about 40 ms an image) to be interrupted."""
    return image_folder(tmp_path_factory, "many", MANY, 160)


@pytest.fixture(scope="module")
def clean(many, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("clean") / "out"
    assert run(many, "-o", out, *SEED).exit_code == 0  # in this process: the kill below is in another
    return {k: v for k, v in files(out).items() if k.endswith(".npy")}


def test_sigkill_mid_run_then_rerun_is_byte_identical_to_a_clean_run(many, clean, tmp_path):
    out = tmp_path / "out"
    proc = forked(many, "-o", out, *SEED)
    wait_for_outputs(out, 5, proc)
    proc.kill()
    proc.wait()
    assert len(list(out.glob("*/p5.npy"))) < MANY
    rerun = run(many, "-o", out, *SEED)  # the rerun in this process: no start-up cost
    assert rerun.exit_code == 0, rerun.output
    assert {k: v for k, v in files(out).items() if k.endswith(".npy")} == clean
    assert strays(out) == []
    assert {p.name for p in out.iterdir() if p.is_file()} == {"report.json", ".fpn-extract.json", ".lock"}


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_soon_reports_what_is_done_and_leaves_no_partial_file(many, tmp_path, sig, status):
    out = tmp_path / "out"
    proc = forked(many, "-o", out, *SEED)
    wait_for_outputs(out, 3, proc)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == status, stderr
    assert "Interrupted:" in stderr and "Traceback" not in stderr
    report = report_of(out)
    assert report["interrupted"] is True
    done = [e["path"] for e in report["images"] if e["status"] == "ok"]
    assert 3 <= len(done) < MANY
    for name in done:
        for level in ("p2", "p3", "p4", "p5"):
            np.load(out / Path(name).stem / f"{level}.npy")  # complete and readable
    assert strays(out) == []
    assert run(many, "-o", out, *SEED).exit_code == 0  # the rerun in this process: no start-up cost
    assert report_of(out)["counts"]["skipped"] == len(done)


def small_images(folder: Path, n: int = 6) -> None:
    for i in range(n):
        save_rgb(folder / f"im{i}.png", 32, 32, seed=i)


def test_temporary_files_of_dead_runs_are_swept_and_a_live_runs_kept(tmp_path):
    """The real names, ``.NAME~HOST~PID.tmp``: at the top of OUT and in .shards, only those whose
    writer ran on this host and is gone are deleted; in an image folder (which the lock makes this
    run's alone), any."""
    small_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert run(tmp_path / "in", "-o", out, "--levels", "p5", *SEED).exit_code == 0
    (out / ".shards").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is no process now
    live = subprocess.Popen(["sleep", "60"])
    host = socket.gethostname()

    def leftover(folder: Path, name: str, host: str, pid: int) -> Path:
        path = folder / f".{name}~{host}~{pid}.tmp"
        path.write_bytes(b"partial")
        return path

    try:
        swept = [
            leftover(out, "report.json", host, dead.pid),
            leftover(out / ".shards", "report-0-of-2.json", host, dead.pid),
            leftover(out / "im0", "p2.npy", host, live.pid),
        ]
        kept = [
            leftover(out, "report.json", host, live.pid),
            leftover(out / ".shards", "report-1-of-2.json", host, live.pid),
            leftover(out, ".fpn-extract.json", "another-host", dead.pid),
        ]
        rerun = run(tmp_path / "in", "-o", out, "--levels", "p2,p5", *SEED)
        assert rerun.exit_code == 0, rerun.output
        assert [p.name for p in swept if p.exists()] == []
        assert [p.name for p in kept if not p.exists()] == []
    finally:
        live.kill()
        live.wait()


def test_file_size_limit_at_the_write_layer_is_a_clean_error_then_resumes(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 100 kB (EFBIG), as a full disk refuses them."""
    small_images(tmp_path / "in")
    save_rgb(tmp_path / "in" / "zbig.png", 96, 96)  # its P2 is 576 kB
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    failed = forked(tmp_path / "in", "-o", out, *SEED, preexec_fn=limit)
    _, stderr = failed.communicate(timeout=300)
    assert failed.returncode == 1
    assert "Error: cannot write" in stderr and "File too large" in stderr
    assert "Traceback" not in stderr
    assert strays(out) == []
    for path in out.rglob("*.npy"):
        np.load(path)  # nothing partial
    assert not (out / "zbig" / "p2.npy").exists()
    rerun = run(tmp_path / "in", "-o", out, *SEED)
    assert rerun.exit_code == 0, rerun.output
    assert np.load(out / "zbig" / "p2.npy").shape == (256, 24, 24)


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs: a real full disk. Needs mount rights (root in a container that allows it)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", mnt], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here; the RLIMIT_FSIZE test covers the write layer")
    yield mnt
    subprocess.run(["umount", mnt], check=True)


def test_disk_full_is_a_clean_error_and_a_rerun_after_freeing_space_completes(tmp_path, small_disk):
    small_images(tmp_path / "in", 8)  # 85 kB of features each: the disk takes three
    out = small_disk / "out"
    failed = run(tmp_path / "in", "-o", out, *SEED)  # a real full disk: ENOSPC, no rlimit needed
    assert failed.exit_code == 1, failed.output
    assert "No space left on device" in failed.stderr
    assert isinstance(failed.exception, SystemExit)  # an exit status, not an escaped exception
    assert strays(out) == []
    for path in out.rglob("*.npy"):
        np.load(path)
    subprocess.run(["mount", "-o", "remount,size=2m", small_disk], check=True)
    rerun = run(tmp_path / "in", "-o", out, *SEED)
    assert rerun.exit_code == 0, rerun.output
    assert len(list(out.glob("*/p5.npy"))) == 8


@pytest.mark.parametrize(
    "target,message",
    [("/sys/fpn-extract-test", "cannot create output folder"), ("/proc/1", "is not writable")],
)
def test_unwritable_output_folder_is_a_usage_error(tmp_path, target, message):
    small_images(tmp_path / "in", 1)
    result = run(tmp_path / "in", "-o", target, *SEED)  # in this process: a usage error is decided here
    assert result.exit_code == 2
    assert message in result.stderr and target in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_output_path_that_is_a_file_is_a_usage_error(tmp_path):
    small_images(tmp_path / "in", 1)
    (tmp_path / "taken").write_text("a file")
    result = run(tmp_path / "in", "-o", tmp_path / "taken", *SEED)
    assert result.exit_code == 2 and "exists and is not a folder" in result.stderr


def test_symlink_loop_and_a_folder_named_like_an_image(tmp_path):
    small_images(tmp_path / "in", 2)
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "up").symlink_to(tmp_path / "in")
    (tmp_path / "in" / "holiday.jpg").mkdir()
    save_rgb(tmp_path / "in" / "holiday.jpg" / "inside.png", 16, 16)
    result = run(tmp_path / "in", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 0, result.output
    paths = sorted(e["path"] for e in report_of(tmp_path / "out")["images"])
    assert paths == ["holiday.jpg/inside.png", "im0.png", "im1.png"]


def test_a_file_that_disappears_after_listing_is_a_failed_input(tmp_path, monkeypatch):
    from fpn_cli.run import pipeline

    small_images(tmp_path / "in", 3)
    real_find = pipeline.find_inputs

    def find_then_delete(*args, **kwargs):
        found = real_find(*args, **kwargs)
        (tmp_path / "in" / "im1.png").unlink()  # listed, not yet read
        return found

    monkeypatch.setattr(pipeline, "find_inputs", find_then_delete)
    result = run(tmp_path / "in", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 1
    missing = tmp_path / "in" / "im1.png"
    assert f"failed: {missing}: file disappeared before it could be read" in result.stderr
    assert report_of(tmp_path / "out")["counts"] == {"ok": 2, "skipped": 0, "failed": 1}


def test_a_corrupt_image_in_the_middle_of_a_batch_spares_the_rest(tmp_path):
    for name in "abde":
        save_rgb(tmp_path / "in" / f"{name}.png", 32, 32, seed=ord(name))
    truncated_jpeg(tmp_path / "in" / "c.jpg", 32, 32)
    result = run(tmp_path / "in", "-o", tmp_path / "out", "--batch-size", "4", *SEED)
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "c.jpg" in result.stderr
    assert len(list((tmp_path / "out").glob("*/p5.npy"))) == 4


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Path:
    """10 images of 320x320: a run of a few seconds after its first image, for a second run (in
    this process, refused at the lock in well under a second) to meet it."""
    return image_folder(tmp_path_factory, "slow", 10, 320)


def test_a_second_run_into_the_same_folder_is_refused_and_the_first_finishes(slow, tmp_path):
    out = tmp_path / "out"
    first = forked(slow, "-o", out, *SEED)
    wait_for_outputs(out, 1, first)
    second = run(slow, "-o", out, *SEED)  # the first is another process; this one need not be
    assert first.poll() is None, "the first run ended before the second met it"
    assert second.exit_code == 2
    assert f"another fpn-extract run (pid {first.pid} on " in second.stderr
    assert first.wait(timeout=120) == 0
    assert report_of(out)["counts"] == {"ok": 10, "skipped": 0, "failed": 0}
    for path in out.glob("*/p2.npy"):
        assert np.load(path).shape == (256, 80, 80)


def test_shards_may_share_a_folder_but_a_whole_run_may_not(tmp_path):
    small_images(tmp_path / "in", 4)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # as a running shard holds it
        fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
        # flock conflicts between open files, so these runs may share the test's process
        whole = run(tmp_path / "in", "-o", out, *SEED)
        assert whole.exit_code == 2 and "another fpn-extract run" in whole.stderr
        for index in (0, 1):
            shard = run(tmp_path / "in", "-o", out, "--shard", f"{index}/2", *SEED)
            assert shard.exit_code == 0, shard.output
    assert report_of(out)["counts"]["ok"] == 4


def test_out_of_memory_splits_the_batch_then_fails_only_the_image(tmp_path, monkeypatch):
    from PIL import Image

    from fpn_cli.run import engine

    for i in range(3):
        save_rgb(tmp_path / "in" / f"im{i}.png", 32, 32, seed=i)
    Image.new("RGB", (32, 32), (7, 7, 7)).save(tmp_path / "in" / "huge.png")
    real_call = engine.Engine.__call__

    def tight_memory(self, batch):
        if len(batch) > 1 or (batch[0] == 7).all():  # only single ordinary images fit
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")
        return real_call(self, batch)

    monkeypatch.setattr(engine.Engine, "__call__", tight_memory)
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--batch-size", "4", *SEED]
    result = run(*args)
    assert result.exit_code == 1
    assert "huge.png: out of memory on cpu for a 32x32 input" in result.stderr
    assert len(list((tmp_path / "out").glob("*/p5.npy"))) == 3


def test_an_unexpected_error_in_the_writer_stops_the_run_instead_of_hanging(tmp_path, monkeypatch):
    from fpn_cli.formats import npy as store

    small_images(tmp_path / "in", 12)

    def broken(self, key, arrays):
        raise ValueError("simulated bug")

    monkeypatch.setattr(store.Store, "write_levels", broken)
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--batch-size", "1", *SEED]
    result = run(*args)
    assert result.exit_code == 1
    assert "cannot write" in result.stderr and "ValueError: simulated bug" in result.stderr


@pytest.mark.parametrize(
    "interrupt,status", [(KeyboardInterrupt(), 130), (Interrupted(signal.SIGTERM), 143)], ids=["int", "term"]
)
def test_an_interrupt_during_start_up_is_a_message_not_a_traceback(tmp_path, monkeypatch, interrupt, status):
    from fpn_cli.run import pipeline

    small_images(tmp_path / "in", 1)

    def interrupted(*args, **kwargs):
        raise interrupt

    monkeypatch.setattr(pipeline, "_build_model", interrupted)  # Ctrl-C or SIGTERM while the model loads
    result = run(tmp_path / "in", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == status
    assert "Interrupted before any image was processed" in result.stderr
    assert not (tmp_path / "out").exists()


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
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():  # importing torch now
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    out, err = burst(proc)
    assert proc.returncode == 130
    assert err == "Interrupted before any image was processed\n"


def test_a_burst_of_ctrl_c_during_a_run_reports_what_was_written_and_exits_130(tmp_path):
    for i in range(16):
        save_rgb(tmp_path / "in" / f"im{i:02d}.png", 96, 96, seed=i)
    out = tmp_path / "out"
    proc = forked(tmp_path / "in", "-o", out, *SEED)
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
