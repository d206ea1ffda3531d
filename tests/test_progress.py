"""Progress on stderr: a bar on a terminal, plain lines in a log (Slurm, nohup, CI) at a steady
cadence, nothing with -q. Moved here from test_cli.py, with the log lines added."""

from __future__ import annotations

import os
import pty
import sys

import pytest

from fpn_cli.cli import ProgressBar, ProgressLines, main

from conftest import run
from imagefactory import save_rgb


def test_progress_bar_shows_done_total_and_rate(capsys):
    bar = ProgressBar()
    bar(1, 2)
    bar(2, 2)
    err = capsys.readouterr().err
    assert "2/2" in err and "img/s" in err and err.endswith("\n")


def run_with_tty_stderr(args: list[str], monkeypatch) -> str:
    """The CLI in this process with a real terminal (a pty) as its stderr: the terminal is the
    point here, not the process."""
    parent, child = pty.openpty()
    with open(child, "w", closefd=True) as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        try:
            with pytest.raises(SystemExit) as ended:
                main(args)
            assert ended.value.code == 0
        finally:
            terminal.flush()
            monkeypatch.undo()
    chunks = []
    while True:
        try:
            data = os.read(parent, 4096)
        except OSError:  # EIO: the terminal's other end is closed and everything was read
            break
        if not data:
            break
        chunks.append(data)
    os.close(parent)
    return b"".join(chunks).decode()


def test_progress_bar_on_a_terminal_and_not_with_quiet(tmp_path, monkeypatch):
    save_rgb(tmp_path / "in" / "a.png", 16, 16)
    common = [str(tmp_path / "in"), "--arch", "seed", "--device", "cpu"]
    shown = run_with_tty_stderr([*common, "-o", str(tmp_path / "o1")], monkeypatch)
    assert "1/1" in shown and "[###" in shown and "progress:" not in shown
    quiet = run_with_tty_stderr([*common, "-o", str(tmp_path / "o2"), "--quiet"], monkeypatch)
    assert "img/s" not in quiet and (tmp_path / "o2" / "a" / "p5.npy").is_file()


class Clock:
    """A clock that the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines_of(progress: ProgressLines, clock: Clock, total: int, seconds_each: float, capsys) -> list[str]:
    for done in range(1, total + 1):
        clock.now += seconds_each
        progress(done, total)
    return capsys.readouterr().err.splitlines()


def test_a_fast_job_logs_each_tenth_and_the_end(capsys):
    clock = Clock()
    lines = lines_of(ProgressLines(30, clock), clock, 1000, 1 / 16, capsys)  # 62.5 s in all
    assert [line.split(" ")[1] for line in lines] == [f"{n}/1000" for n in range(100, 1001, 100)]
    assert lines[0] == "progress: 100/1000 (10%), 16.0 img/s, 0:06 elapsed, ETA 0:56"
    assert lines[-1] == "progress: 1000/1000 (100%), 16.0 img/s, 1:02 elapsed"


def test_a_slow_job_logs_every_interval_not_every_image(capsys):
    clock = Clock()
    lines = lines_of(ProgressLines(30, clock), clock, 1000, 10.0, capsys)  # 10 s an image
    # 30 s after the last line (every 3rd image), and at each tenth: 3, 6, ..., 99, 100, 103, ...
    expected, last = [], 0
    for done in range(1, 1001):
        if done - last == 3 or done % 100 == 0:
            expected.append(f"{done}/1000")
            last = done
    assert [line.split(" ")[1] for line in lines] == expected
    assert lines[0] == "progress: 3/1000 (0%), 0.1 img/s, 0:30 elapsed, ETA 2:46:10"


def test_a_tiny_job_logs_no_more_than_a_line_a_second(capsys):
    clock = Clock()
    lines = lines_of(ProgressLines(30, clock), clock, 10, 1 / 64, capsys)
    assert lines == ["progress: 10/10 (100%), 64.0 img/s, 0:00 elapsed"]


def test_lines_in_a_log_through_the_cli_and_none_with_quiet(tmp_path, monkeypatch):
    monkeypatch.setenv("FPN_EXTRACT_PROGRESS_SECONDS", "0")  # a line per image
    for name in ("a.png", "b.png"):
        save_rgb(tmp_path / "in" / name, 16, 16)
    common = [tmp_path / "in", "--arch", "seed", "--device", "cpu"]
    result = run(*common, "-o", tmp_path / "o1")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress:")]
    assert [line.split(",")[0] for line in lines] == ["progress: 1/2 (50%)", "progress: 2/2 (100%)"]
    assert "ETA" in lines[0] and "img/s" in lines[1] and "\r" not in result.stderr
    assert "shapes" in result.stdout.lower() or "p2" in result.stdout.lower()  # the summary after
    quiet = run(*common, "-o", tmp_path / "o2", "-q")
    assert quiet.exit_code == 0 and "progress:" not in quiet.stderr


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_a_bad_progress_interval_is_a_usage_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv("FPN_EXTRACT_PROGRESS_SECONDS", value)
    save_rgb(tmp_path / "a.png", 16, 16)
    result = run(tmp_path / "a.png", "-o", tmp_path / "o", "--arch", "seed", "--device", "cpu")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Error: FPN_EXTRACT_PROGRESS_SECONDS={value!r}: give the seconds" in result.stderr


def test_the_rate_counts_only_images_computed_now_not_those_skipped(capsys):
    """A resume: 900 of 1000 images complete from before are skipped at once, then 100 are
    computed at 2 s each: the rate is 0.5 img/s, and the ETA follows from it."""
    clock = Clock()
    progress = ProgressLines(30, clock)
    for done in range(1, 901):
        progress(done, 1000, done)  # skipped as they are planned, in no time
    for done in range(901, 1001):
        clock.now += 2.0
        progress(done, 1000, 900)
    lines = capsys.readouterr().err.splitlines()
    # no line within the first second (the skipped ones), then one every 30 s: 450 img/s if they counted
    assert lines[:2] == [
        "progress: 901/1000 (90%), 0.5 img/s, 0:02 elapsed, ETA 3:18",
        "progress: 916/1000 (91%), 0.5 img/s, 0:32 elapsed, ETA 2:48",
    ]
    assert lines[-1] == "progress: 1000/1000 (100%), 0.5 img/s, 3:20 elapsed"


def test_the_bar_rate_leaves_skipped_images_out(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("fpn_cli.cli.time.perf_counter", lambda: now[0])
    bar = ProgressBar()
    now[0] += 4.0
    bar(10, 10, 8)  # 2 computed in 4 s; 8 skipped
    assert "10/10  0.5 img/s  0:04 elapsed" in capsys.readouterr().err


def test_a_resumed_run_reports_skipped_to_a_display_and_two_arguments_to_a_plain_callback(tmp_path):
    from fpn_cli import extract

    save_rgb(tmp_path / "in" / "a.png", 16, 16)
    first = extract([tmp_path / "in"], tmp_path / "out", arch="seed", device="cpu")
    assert first.counts == {"ok": 1, "skipped": 0, "failed": 0}
    save_rgb(tmp_path / "in" / "b.png", 16, 16)
    three, two = [], []
    extract(
        [tmp_path / "in"], tmp_path / "out", arch="seed", device="cpu", progress=lambda *a: three.append(a)
    )
    assert three == [(1, 2, 1), (2, 2, 1)]  # a.png skipped, then b.png computed
    extract(
        [tmp_path / "in"],
        tmp_path / "out",
        arch="seed",
        device="cpu",
        progress=lambda d, t: two.append((d, t)),
    )
    assert two == [(1, 2), (2, 2)]  # the documented (done, total) callback is unchanged
