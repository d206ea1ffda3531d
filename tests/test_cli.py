"""The command line's own surface: help, documentation coverage, options (progress: test_progress.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fpn_cli import Options, UsageError
from fpn_cli.cli import main

from conftest import run
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
