"""--save-dtype bfloat16 and int8 through the run, both formats, the readers, resume, verify and
--summary: the stored arrays are the codec's (formats/codecs.py), readers decode them."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from fpn_cli import open_features
from fpn_cli.formats import codecs
from fpn_cli.run import choices

from conftest import SEED, report_of, run

LEVELS = ("p2", "p3", "p4", "p5")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two small RGB images of different sizes."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a", (70, 90)), ("b", (64, 64))):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    return folder


def extract(images, out, *options):
    result = run(images, "-o", out, *SEED, *options)
    assert result.exit_code == 0, result.output
    return out


def test_save_dtype_choices_are_the_codecs():
    assert choices.SAVE_DTYPES == codecs.SAVE_DTYPES == ("float32", "float16", "bfloat16", "int8")


@pytest.mark.parametrize("save_dtype", ["int8", "bfloat16"])
def test_npy_layout_stores_the_codecs_arrays(images, tmp_path, save_dtype):
    out = extract(images, tmp_path / "out", "--save-dtype", save_dtype)
    for key, (h, w) in (("a", (70, 90)), ("b", (64, 64))):
        names = sorted(p.name for p in (out / key).glob("*.npy"))
        scales = [f"{level}_scale.npy" for level in LEVELS] if save_dtype == "int8" else []
        assert names == sorted([f"{level}.npy" for level in LEVELS] + scales)
        p2 = np.load(out / key / "p2.npy")
        assert p2.shape == (256, -(-h // 4), -(-w // 4))
        assert p2.dtype == {"int8": np.int8, "bfloat16": np.uint16}[save_dtype]
        if save_dtype == "int8":
            scale = np.load(out / key / "p2_scale.npy")
            assert scale.shape == (256,) and scale.dtype == np.float32
    report = report_of(out)
    assert report["model"]["save_dtype"] == save_dtype
    p2 = report["images"][0]["levels"]["p2"]
    assert p2["file"] == "a/p2.npy"
    if save_dtype == "int8":
        assert p2["scale"] == {"shape": [256], "file": "a/p2_scale.npy"}
    else:
        assert "scale" not in p2


def test_shards_store_the_scales_as_members(images, tmp_path):
    out = extract(images, tmp_path / "out", "--save-dtype", "int8", "--format", "shards")
    (tar,) = (out / "shards").glob("*.tar")
    with tarfile.open(tar) as f:
        names = set(f.getnames())
    assert {f"a.{level}.npy" for level in LEVELS} <= names
    assert {f"a.{level}_scale.npy" for level in LEVELS} <= names
    raw = open_features(out, dtype=None)["a"]
    assert raw["p3"].dtype == np.int8 and raw["p3_scale"].shape == (256,)


@pytest.mark.parametrize("fmt", ["npy", "shards"])
def test_resume_with_another_save_dtype_is_refused_and_overwrite_recomputes(images, tmp_path, fmt):
    out = extract(images, tmp_path / "out", "--save-dtype", "int8", "--format", fmt)
    result = run(images, "-o", out, *SEED, "--save-dtype", "bfloat16", "--format", fmt)
    assert result.exit_code == 2
    assert "save_dtype 'int8' -> 'bfloat16'" in result.output
    extract(images, out, "--save-dtype", "bfloat16", "--format", fmt, "--overwrite")
    assert report_of(out)["model"]["save_dtype"] == "bfloat16"
    raw = open_features(out, dtype=None)["a"]
    assert sorted(raw) == list(LEVELS) and raw["p2"].dtype == np.uint16


def test_resume_with_the_same_save_dtype_skips_complete_images(images, tmp_path):
    out = extract(images, tmp_path / "out", "--save-dtype", "int8")
    before = (out / "a" / "p2.npy").stat().st_mtime_ns
    extract(images, out, "--save-dtype", "int8")
    assert report_of(out)["counts"] == {"ok": 0, "skipped": 2, "failed": 0}
    assert (out / "a" / "p2.npy").stat().st_mtime_ns == before


def test_resume_recomputes_a_level_whose_scales_are_missing(images, tmp_path):
    out = extract(images, tmp_path / "out", "--save-dtype", "int8")
    (out / "a" / "p3_scale.npy").unlink()
    loud = [option for option in SEED if option != "-q"]
    result = run(images, "-o", out, *loud, "--save-dtype", "int8")
    assert result.exit_code == 0, result.output
    assert "p3_scale.npy is not a complete (256,) float32 .npy file" in result.output
    assert np.load(out / "a" / "p3_scale.npy").shape == (256,)
    assert report_of(out)["counts"] == {"ok": 1, "skipped": 1, "failed": 0}
