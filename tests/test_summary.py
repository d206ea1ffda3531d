"""``fpn-extract --summary``: level sizes without images or feature memory; compact over many sizes."""

from __future__ import annotations

import pytest
import torch

from conftest import run
from imagefactory import save_rgb

SEED_600x900 = """\
seed, reference FPN, 16,700,480 parameters, weights random
preprocessing: RGB [0,1], mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]

input 600x900
level  stride  channels  height  width
P2          4       256     150    225
P3          8       256      75    113
P4         16       256      38     57
P5         32       256      19     29
output per image: 46.0 MB float32, 23.0 MB float16, 23.0 MB bfloat16, 11.5 MB int8
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


COMPACT_ROWS = """\
30 input sizes, 32 images; the 10 most common (levels: h x w):
input  images     P2    P3   P4   P5  MB float32
64x96       3  16x24  8x12  4x6  2x3         0.5
32x48       1   8x12   4x6  2x3  1x2         0.1
36x48       1   9x12   5x6  3x3  2x2         0.2
40x48       1  10x12   5x6  3x3  2x2         0.2
44x48       1  11x12   6x6  3x3  2x2         0.2
48x48       1  12x12   6x6  3x3  2x2         0.2
52x48       1  13x12   7x6  4x3  2x2         0.2
56x48       1  14x12   7x6  4x3  2x2         0.2
60x48       1  15x12   8x6  4x3  2x2         0.2
64x48       1  16x12   8x6  4x3  2x2         0.3
... 20 more sizes, 20 images

input 144x48 (a largest; 1 image)
level  stride  channels  height  width
P2          4       256      36     12
P3          8       256      18      6
P4         16       256       9      3
P5         32       256       5      2
output per image: 0.6 MB float32, 0.3 MB float16, 0.3 MB bfloat16, 0.2 MB int8

input 140x48 (a largest; 1 image)
"""


def test_many_sizes_give_a_row_each_and_the_largest_in_full(tmp_path):
    """30 sizes: a row per size with its count (the 10 most common), the 2 largest sizes as
    blocks, then the totals; not 8 lines per size (249 lines for 30 sizes, issue 20)."""
    for i in range(3):
        save_rgb(tmp_path / f"common{i}.png", 64, 96, seed=i)
    for i in range(29):
        save_rgb(tmp_path / f"s{i:02d}.png", 32 + 4 * i, 48, seed=i)
    result = run("--summary", tmp_path, "--arch", "seed")
    assert result.exit_code == 0, result.output
    assert COMPACT_ROWS in result.output
    assert result.output.count("\nlevel  stride") == 2 and "input 32x48" not in result.output
    assert "\ndataset: 32 images (30 sizes)\n" in result.output
    assert len(result.output.splitlines()) == 43  # the totals: 2 formats x 4 save dtypes


def test_a_few_sizes_keep_a_block_each(tmp_path):
    for i, (h, w) in enumerate([(64, 96), (32, 48), (32, 48), (96, 64)]):
        save_rgb(tmp_path / f"im{i}.png", h, w, seed=i)
    result = run("--summary", tmp_path, "--arch", "seed")
    assert result.exit_code == 0, result.output
    blocks = [line for line in result.output.splitlines() if line.startswith("input ")]
    assert blocks == ["input 32x48", "input 64x96", "input 96x64"]
    assert "most common" not in result.output
    assert "\nP2          4       256       8     12\n" in result.output  # 32x48: DESIGN.md's row


@pytest.mark.parametrize(
    ("resize", "network", "p2"),
    [
        (["--size", "40x60"], "40x60", (10, 15)),
        (["--short-side", "30", "--max-side", "40"], "27x40", (7, 10)),
    ],
)
def test_summary_without_inputs_shows_the_sizes_a_run_would_resize_to(tmp_path, resize, network, p2):
    """--input-size is the image's size: the summary resizes it as the run resizes such an image, and
    says that its sizes are the network's; a run of a 48x72 image agrees."""
    import numpy as np

    result = run("--summary", "--arch", "seed", "--input-size", "48x72", *resize)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[2].startswith("input sizes below are the network's, after resizing the images (")
    assert f"input {network}" in lines and f"P2          4       256{p2[0]:>8}{p2[1]:>7}" in lines
    save_rgb(tmp_path / "in" / "a.png", 48, 72)
    done = run(tmp_path / "in", "-o", tmp_path / "out", "--arch", "seed", "--device", "cpu", "-q", *resize)
    assert done.exit_code == 0, done.output
    assert np.load(tmp_path / "out" / "a" / "p2.npy").shape == (256, *p2)


def test_summary_applies_the_framework_resize_where_the_run_would(torch_home):
    """One owner: options.with_framework_resize gives the run's resize and the summary's (the CLI's
    --summary asks it too); the detector's 800/1333 turns a 600x900 image into 800x1200."""
    from fpn_cli.models.builder import resolve
    from fpn_cli.run.options import Options, with_framework_resize
    from fpn_cli.run.pipeline import summarize

    name = "torchvision:fasterrcnn_resnet50_fpn"
    spec = resolve(weights=name)  # describes the model without its file
    for applied, network in ((False, "600x900"), (True, "800x1200")):
        opts = with_framework_resize(Options(weights=name, framework_resize=applied), spec)
        text = summarize([], spec, opts.resize, (600, 900))
        assert f"input {network}" in text.splitlines()
        assert ("shorter side 800, longer side at most 1333" in text) is applied
