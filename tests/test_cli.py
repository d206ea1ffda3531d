"""The command line's own surface: help, documentation coverage, options (progress: test_progress.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fpn_cli import Options, UsageError
from fpn_cli.cli import SECTIONS, main

from conftest import FPN_EXTRACT, run
from imagefactory import save_rgb

ROOT = Path(__file__).resolve().parents[1]


def test_help_shows_examples():
    assert "fpn-extract images/ --out feats/" in run("--help").output


# runs the console script's entry in one fresh interpreter for each form given (a JSON list of
# argument lists), then prints, per form, its stdout, exit status and whether torch was imported
TORCH_PROBE = """
import contextlib, io, json, sys
from fpn_cli.console import main
results = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["fpn-extract", *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main()
        except SystemExit as e:
            status = e.code
    results.append([out.getvalue(), status, "torch" in sys.modules])
print(json.dumps(results))
"""

HELP_FORMS = {
    "--help": "Usage: fpn-extract [OPTIONS] [INPUTS]...",
    "--version": "fpn-extract, version",
    "models --help": "Usage: fpn-extract models [OPTIONS] [PATTERN]",
    "verify --help": "Usage: fpn-extract verify [OPTIONS] OUT",
    "roi --help": "Usage: fpn-extract roi [OPTIONS] OUT",
}
BAD_OPTIONS = [
    ["--arch", "resnet5", "a.png", "-o", "out"],
    ["--levels", "p2,p9", "a.png", "-o", "out"],
    ["--pool", "mean", "a.png", "-o", "out"],
    ["--dtype", "float8", "a.png", "-o", "out"],
    ["--fpn-style", "detectron", "a.png", "-o", "out"],
    ["--seed", "-1", "a.png", "-o", "out"],
    ["a.png"],
    ["-o", "out"],
    ["a.png", "-o", "out", "--shard-size", "1GB"],
    ["a.png", "-o", "out", "--list-column", "file"],
]


@pytest.fixture(scope="module")
def probed() -> dict[tuple[str, ...], tuple[str, int, bool]]:
    """Every form of HELP_FORMS and BAD_OPTIONS run in one fresh interpreter, in order (a form that
    imported torch would show in its own result and those after it): (stdout, status, torch?)."""
    forms = [form.split() for form in HELP_FORMS] + BAD_OPTIONS
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_PROBE, json.dumps(forms)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return {tuple(form): tuple(result) for form, result in zip(forms, json.loads(proc.stdout), strict=True)}


@pytest.mark.parametrize("form", list(HELP_FORMS))
def test_help_and_version_do_not_import_torch(form, probed):
    out, status, torch_imported = probed[tuple(form.split())]
    assert HELP_FORMS[form] in out
    assert (status, torch_imported) == (0, False)


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=" ".join)
def test_a_bad_option_value_is_refused_without_importing_torch(args, probed):
    assert probed[tuple(args)][1:] == (2, False)


# every form of `fpn-extract models` in one fresh interpreter: each one's exit status, stdout's line
# count and its first row's last column (cached?), then whether torch or torchvision was imported
MODELS_PROBE = """
import contextlib, io, sys
from fpn_cli.console import main
for args in (["models"], ["models", "fcos"], ["models", "detectron2:"], ["models", "nope"], ["models", "-h"]):
    sys.argv = ["fpn-extract", *args]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main()
    except SystemExit as e:
        lines = out.getvalue().splitlines()
        print(" ".join(args), e.code, len(lines), (lines[1].split() or ["-"])[-1] if len(lines) > 1 else "-")
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision"}))
"""


def test_models_in_all_its_forms_imports_neither_torch_nor_torchvision(torch_home):
    from fpn_cli.models import zoo

    cached = torch_home / "hub" / "checkpoints" / "fcos_resnet50_fpn_coco-99b0c9b7.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # found in $TORCH_HOME by torch.hub's rule, without torch
    proc = subprocess.run([sys.executable, "-c", MODELS_PROBE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = len(zoo.zoo())  # the rows: a header, one per entry, a blank line and the note
    detectron2 = sum(name.startswith("detectron2:") for name in zoo.zoo())
    assert proc.stdout.splitlines() == [
        f"models 0 {table + 3} no",
        "models fcos 0 4 yes",
        f"models detectron2: 0 {detectron2 + 3} no",
        "models nope 2 0 -",
        f"models -h 0 {len(run('models', '-h').output.splitlines())} -",  # as in-process
        "[]",
    ]


def test_cli_choices_are_the_library_registries():
    from fpn_cli.models.backbones import ARCHS
    from fpn_cli.models.choices import ARCH_NAMES
    from fpn_cli.run.choices import DTYPE_NAMES
    from fpn_cli.run.engine import DTYPES

    assert ARCH_NAMES == tuple(ARCHS)
    assert DTYPE_NAMES == tuple(DTYPES)


def test_help_lists_every_option_in_its_section():
    help_text = run("--help").output
    titles = [line[:-1] for line in help_text.splitlines() if line.endswith(":") and not line[0].isspace()]
    assert titles == ["Inputs", "Model", "Output", "Run", "Advanced", "Commands"]
    assert "Other options" not in help_text and "Positional arguments" not in help_text
    placed = [name for names in SECTIONS.values() for name in names]
    assert len(placed) == len(set(placed))
    assert set(placed) == {p.name for p in main.params} | {"help"}


def test_help_shows_inputs_first_in_the_inputs_section():
    lines = run("--help").output.splitlines()
    inputs = lines.index("Inputs:")
    assert lines[inputs + 1].split()[:2] == ["[INPUTS]...", "Image"]
    assert lines.index("Advanced:") < next(i for i, line in enumerate(lines) if "--compile" in line)


def test_help_carries_no_benchmark_figures():
    help_text = run("--help").output
    assert not re.search(r"\d(\.\d+)?x\b|measured|\d+(-\d+)? s\b", help_text), help_text


def complete(words: str) -> list[str]:
    """What the shell completion of the installed script offers after ``words`` (bash's protocol)."""
    env = {**os.environ, "_FPN_EXTRACT_COMPLETE": "bash_complete", "COMP_WORDS": words}
    env["COMP_CWORD"] = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    return subprocess.run(FPN_EXTRACT, env=env, capture_output=True, text=True).stdout.splitlines()


def test_shell_completion_offers_subcommands_options_and_choices():
    assert "plain,models" in complete("fpn-extract mo")
    assert "plain,--boxes" in complete("fpn-extract roi --bo")
    assert complete("fpn-extract --arch resnet1") == [
        "plain,resnet18",
        "plain,resnet101",
        "plain,resnet152",
        "plain,resnet101_msra",
    ]
    assert "plain,models" not in complete("fpn-extract a.png mo")


def test_verbose_lists_every_image(tmp_path):
    save_rgb(tmp_path / "a.png", 16, 16)
    result = run(tmp_path / "a.png", "-o", tmp_path / "o", "--arch", "seed", "-v")
    assert "ok: a.png" in result.stderr


def test_python_dash_m_runs_the_cli_and_a_computing_command_imports_torch():
    """``python -m fpn_cli`` works, and the import-time log shows torch imported once a command
    computes (so the torch-free forms above are torch-free because of the lazy imports, not
    because the probe cannot see torch)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fpn_cli", "--summary", "--arch", "seed"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "P5         32       256      19     29" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" in imported and "fpn_cli.cli" in imported
    assert "torch._dynamo" not in imported  # level shapes are probed without the meta device's 1.5 s


def test_library_options_are_validated():
    with pytest.raises(UsageError, match="unknown dtype 'float8'"):
        Options(dtype="float8")
    with pytest.raises(
        UsageError, match="unknown save dtype 'int4'; choose from float32, float16, bfloat16, int8"
    ):
        Options(save_dtype="int4")
    with pytest.raises(UsageError, match="--batch-size must be at least 1"):
        Options(batch_size=0)
