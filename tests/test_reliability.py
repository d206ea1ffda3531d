"""Faults, interruptions and abuse, each through the real console script in a subprocess."""

from __future__ import annotations

import fcntl
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fpn_cli.errors import Interrupted

from conftest import FPN_EXTRACT, SEED, files, report_of, run, start
from imagefactory import save_rgb, truncated_jpeg


def fpn(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FPN_EXTRACT, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs
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
    assert fpn(many, "-o", out, *SEED).returncode == 0
    return {k: v for k, v in files(out).items() if k.endswith(".npy")}


def test_sigkill_mid_run_then_rerun_is_byte_identical_to_a_clean_run(many, clean, tmp_path):
    out = tmp_path / "out"
    proc = start(many, "-o", out, *SEED)
    wait_for_outputs(out, 5, proc)
    proc.kill()
    proc.wait()
    assert len(list(out.glob("*/p5.npy"))) < MANY
    rerun = fpn(many, "-o", out, *SEED)
    assert rerun.returncode == 0, rerun.stderr
    assert {k: v for k, v in files(out).items() if k.endswith(".npy")} == clean
    assert strays(out) == []
    assert {p.name for p in out.iterdir() if p.is_file()} == {"report.json", ".fpn-extract.json", ".lock"}


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_soon_reports_what_is_done_and_leaves_no_partial_file(many, tmp_path, sig, status):
    out = tmp_path / "out"
    proc = start(many, "-o", out, *SEED)
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

    failed = fpn(tmp_path / "in", "-o", out, *SEED, preexec_fn=limit)
    assert failed.returncode == 1
    assert "Error: cannot write" in failed.stderr and "File too large" in failed.stderr
    assert "Traceback" not in failed.stderr
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


def test_a_file_that_disappears_after_listing_is_a_failed_input(many, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(many.iterdir())[:20]:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    proc = start(folder, "-o", out, *SEED, "--workers", "1")
    wait_for_outputs(out, 1, proc)  # listing is long done; im19 is not yet read
    (folder / "im19.png").unlink()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"failed: {folder / 'im19.png'}: file disappeared before it could be read" in stderr
    assert report_of(out)["counts"] == {"ok": 19, "skipped": 0, "failed": 1}


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
    """24 images of 320x320: a run of several seconds, for a second run to meet it."""
    return image_folder(tmp_path_factory, "slow", 24, 320)


def test_a_second_run_into_the_same_folder_is_refused_and_the_first_finishes(slow, tmp_path):
    out = tmp_path / "out"
    first = start(slow, "-o", out, *SEED)
    wait_for_outputs(out, 1, first)
    second = run(slow, "-o", out, *SEED)  # the first is another process; this one need not be
    assert first.poll() is None, "the first run ended before the second met it"
    assert second.exit_code == 2
    assert f"another fpn-extract run (pid {first.pid} on " in second.stderr
    assert first.wait(timeout=120) == 0
    assert report_of(out)["counts"] == {"ok": 24, "skipped": 0, "failed": 0}
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
