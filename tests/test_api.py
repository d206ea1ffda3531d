"""The library's front door: ``from fpn_cli import build_fpn, extract`` and how ``extract`` takes
its options."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fpn_cli import Options, extract

from imagefactory import save_rgb


def test_keywords_replace_the_fields_of_the_options_given(tmp_path):
    save_rgb(tmp_path / "a.png", 32, 32)
    base = Options(arch="seed", device="cpu", levels=("p2", "p3"))
    report = extract([tmp_path / "a.png"], tmp_path / "out", base, levels="p5", save_dtype="float16")
    assert report.exit_status == 0
    assert sorted(p.name for p in (tmp_path / "out" / "a").iterdir()) == ["input.json", "p5.npy"]
    assert np.load(tmp_path / "out" / "a" / "p5.npy").dtype == np.float16
    model = json.loads((tmp_path / "out" / "report.json").read_text())["model"]
    assert model["arch"] == "seed" and model["levels"] == ["p5"] and model["save_dtype"] == "float16"


@pytest.mark.parametrize("options", [None, Options(arch="seed", device="cpu")])
def test_a_keyword_that_is_no_option_is_an_error_naming_it(tmp_path, options):
    save_rgb(tmp_path / "a.png", 16, 16)
    with pytest.raises(TypeError, match="batchsize"):
        extract([tmp_path / "a.png"], tmp_path / "out", options, arch="seed", batchsize=4)
    assert not (tmp_path / "out").exists()


def test_the_library_imports_and_builds_without_posix_only_modules(tmp_path):
    """As on Windows: ``fcntl`` (the run's locks, O_DIRECT's fallback) is imported only where used."""
    code = (
        "import sys\n"
        "sys.modules['fcntl'] = None  # any import of it fails\n"
        "import torch\n"
        "from fpn_cli import build_fpn, extract\n"
        "feats = build_fpn(arch='seed')(torch.zeros(1, 3, 64, 64))\n"
        "print(sorted(feats), tuple(feats['p5'].shape))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['p2', 'p3', 'p4', 'p5'] (1, 256, 2, 2)"
