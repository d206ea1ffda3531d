"""The command line's own surface: help, documentation coverage, progress display."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fpn_cli import Options, UsageError
from fpn_cli.cli import ProgressBar, main

from conftest import FPN_EXTRACT, run
from imagefactory import save_rgb

ROOT = Path(__file__).resolve().parents[1]


def option_names() -> list[str]:
    return [opt for p in main.params for opt in p.opts if opt.startswith("--")]


def test_every_option_is_in_help_and_readme():
    """In the README, or in the docs/ page of its subject (README.md is rewritten apart)."""
    help_text = run("--help").output
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    docs = "\n".join(page.read_text() for page in pages)
    assert len(option_names()) >= 20
    for name in option_names():
        assert name in help_text, name
        assert re.search(rf"`{re.escape(name)}\b", docs), f"{name} is not documented in README.md or docs/"


def test_help_shows_examples():
    assert "fpn-extract images/ --out feats/" in run("--help").output


def test_progress_bar_shows_done_total_and_rate(capsys):
    bar = ProgressBar()
    bar(1, 2)
    bar(2, 2)
    err = capsys.readouterr().err
    assert "2/2" in err and "img/s" in err and err.endswith("\n")


def run_with_tty_stderr(args: list[str]) -> str:
    parent, child = pty.openpty()
    proc = subprocess.Popen(
        [*FPN_EXTRACT, *args],
        stdout=subprocess.DEVNULL,
        stderr=child,
    )
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(parent, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait()
    os.close(parent)
    return b"".join(chunks).decode()


def test_progress_bar_on_a_terminal_and_not_with_quiet(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 16, 16)
    common = [str(tmp_path / "in"), "--arch", "seed", "--device", "cpu"]
    assert "1/1" in run_with_tty_stderr([*common, "-o", str(tmp_path / "o1")])
    assert "img/s" not in run_with_tty_stderr([*common, "-o", str(tmp_path / "o2"), "--quiet"])


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path):
    save_rgb(tmp_path / "a.png", 16, 16)
    result = run(tmp_path / "a.png", "-o", tmp_path / "o", "--arch", "seed")
    assert result.exit_code == 0
    assert "img/s" not in result.stderr


def test_verbose_lists_every_image(tmp_path):
    save_rgb(tmp_path / "a.png", 16, 16)
    result = run(tmp_path / "a.png", "-o", tmp_path / "o", "--arch", "seed", "-v")
    assert "ok: a.png" in result.stderr


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "fpn_cli", "--summary", "--arch", "seed"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "P5         32       256      19     29" in proc.stdout


def test_library_options_are_validated():
    with pytest.raises(UsageError, match="unknown dtype 'float8'"):
        Options(dtype="float8")
    with pytest.raises(UsageError, match="unknown save dtype 'bfloat16'"):
        Options(save_dtype="bfloat16")
    with pytest.raises(UsageError, match="--batch-size must be at least 1"):
        Options(batch_size=0)
