"""``fpn-extract --summary``: level sizes without images or feature memory."""

from __future__ import annotations

import pytest
import torch

from conftest import run

SEED_600x900 = """\
seed, reference FPN, 16,700,480 parameters, weights random
preprocessing: RGB [0,1], mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]

input 600x900
level  stride  channels  height  width
P2          4       256     150    225
P3          8       256      75    113
P4         16       256      38     57
P5         32       256      19     29
output per image: 46.0 MB float32, 23.0 MB float16
"""


def test_summary_for_the_seed_arch_at_the_default_size():
    result = run("--summary", "--arch", "seed")
    assert result.exit_code == 0, result.output
    assert result.output == SEED_600x900


def test_summary_honours_levels_style_and_input_size():
    result = run(
        "--summary",
        "--arch",
        "resnet18",
        "--fpn-style",
        "torchvision",
        "--levels",
        "p6,c5",
        "--input-size",
        "801x1333",
    )
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()
    assert rows[0].startswith("resnet18, torchvision FPN, ")
    assert rows[3] == "input 801x1333"
    assert rows[5].split() == ["P6", "64", "256", "13", "21"]
    assert rows[6].split() == ["C5", "32", "512", "26", "42"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--levels", "p8"], "unknown level 'p8'"),
        (["--levels", "p7"], "resnet50 with the reference FPN has no level p7"),
        (["--levels", "p2,p2"], "listed twice"),
        (["--input-size", "600by900"], "is not HxW"),
        (["--input-size", "0x900"], "must be positive"),
        (["--arch", "resnet9"], "unknown arch 'resnet9'"),
        (["--fpn-style", "detectron"], "'detectron' is not one of"),
    ],
)
def test_bad_options_are_usage_errors(args, message):
    result = run("--summary", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_summary_describes_the_model_the_run_uses():
    """One owner for the model: --summary --weights coco is the torchvision-style FPN the run builds
    (it once printed the reference FPN's 26,262,336 parameters)."""
    from fpn_cli.models.builder import resolve
    from fpn_cli.models.model import FPN

    result = run("--summary", "--weights", "coco")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("resnet50, torchvision FPN, 26,852,416 parameters")
    with torch.device("meta"):
        run_model = FPN(resolve(weights="coco").config)  # what extract() builds, without the download
    assert sum(p.numel() for p in run_model.parameters()) == 26_852_416
