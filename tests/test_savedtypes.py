"""--save-dtype bfloat16 and int8 through the run, both formats, the readers, resume, verify and
--summary: the stored arrays are the codec's (formats/codecs.py), readers decode them."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
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


def _bound(save_dtype, x32, raw, level):
    """The codec's bound on |decoded - float32| for each element of ``level`` (x32 (C, H, W))."""
    if save_dtype == "bfloat16":
        return np.abs(x32) * 2**-8
    scale = raw[f"{level}_scale"][:, None, None]
    return scale * (0.5 + 2**-20) + np.abs(x32) * 2**-23  # plus the float32 rounding of the decode


@pytest.fixture(scope="module")
def runs(images, tmp_path_factory):
    """Output folders of one float32 run and of each compact save dtype in each format, with pooling."""
    root = tmp_path_factory.mktemp("runs")
    folders = {"float32": extract(images, root / "float32", "--pool", "avg")}
    for save_dtype in ("int8", "bfloat16"):
        for fmt in ("npy", "shards"):
            options = ("--save-dtype", save_dtype, "--format", fmt, "--pool", "avg")
            folders[save_dtype, fmt] = extract(images, root / f"{save_dtype}-{fmt}", *options)
    return folders


@pytest.mark.parametrize("fmt", ["npy", "shards"])
@pytest.mark.parametrize("save_dtype", ["int8", "bfloat16"])
def test_readers_decode_within_the_codecs_bound(runs, save_dtype, fmt):
    reference = open_features(runs["float32"])
    decoded, raw = open_features(runs[save_dtype, fmt]), open_features(runs[save_dtype, fmt], dtype=None)
    assert list(decoded) == list(reference) == ["a", "b"]
    for key in reference:
        assert sorted(decoded[key]) == sorted(reference[key])  # no scales among the decoded arrays
        for level in LEVELS:
            x32, x = reference[key][level], decoded[key][level]
            assert x.dtype == np.float32 and x.shape == x32.shape
            error = np.abs(x.astype(np.float64) - x32)
            assert np.all(error <= _bound(save_dtype, x32, raw[key], level)), (key, level)
            assert error.max() > 0  # stored lossy: the reader decoded, not a float32 copy
        assert open_features(runs[save_dtype, fmt], dtype=np.float16)[key]["p4"].dtype == np.float16


@pytest.mark.parametrize("save_dtype", ["int8", "bfloat16"])
def test_raw_arrays_with_dtype_none_and_plain_numpy_decode_as_documented(runs, save_dtype):
    out = runs[save_dtype, "npy"]
    raw = open_features(out, dtype=None)["a"]
    expected = {"int8": np.int8, "bfloat16": np.uint16}[save_dtype]
    assert raw["p2"].dtype == expected and ("p2_scale" in raw) == (save_dtype == "int8")
    if save_dtype == "bfloat16":  # docs/compact-storage.md's recipes
        bits = np.load(out / "a" / "p2.npy")
        p2 = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        codes = np.load(out / "a" / "p2.npy", mmap_mode="r")
        scale = np.load(out / "a" / "p2_scale.npy")
        p2 = codes * scale[:, None, None]
    assert p2.dtype == np.float32
    assert np.array_equal(p2, open_features(out)["a"]["p2"])


def test_feature_dataset_gives_decoded_floats(runs):
    from fpn_cli.formats.dataset import FeatureDataset

    out = runs["int8", "shards"]
    item = FeatureDataset(out, levels=["p3", "p3_avg"])[0]
    assert item["p3"].dtype == torch.float32 and item["p3_avg"].dtype == torch.float32
    assert np.array_equal(item["p3"].numpy(), open_features(out)["a"]["p3"])
    assert sorted(FeatureDataset(out)[1]) == sorted(["key", *LEVELS, *(f"{v}_avg" for v in LEVELS)])
    raw = FeatureDataset(out, dtype=None)[0]
    assert raw["p3"].dtype == torch.int8 and raw["p3_scale"].shape == (256,)


@pytest.mark.parametrize("save_dtype", ["int8", "bfloat16"])
def test_pooled_vectors_are_float32_means_of_the_float_features(runs, save_dtype):
    reference, decoded = open_features(runs["float32"]), open_features(runs[save_dtype, "npy"])
    raw = open_features(runs[save_dtype, "npy"], dtype=None)
    for level in LEVELS:
        stored = raw["b"][f"{level}_avg"]
        assert stored.dtype == np.float32 and stored.shape == (256,)
        mean = decoded["b"][level].astype(np.float64).mean(axis=(1, 2))
        np.testing.assert_allclose(stored, mean, rtol=1e-5, atol=1e-6)  # of the decoded level
        x32 = reference["b"][level]
        bound = _bound(save_dtype, x32, raw["b"], level).max(axis=(1, 2))
        assert np.all(np.abs(stored - reference["b"][f"{level}_avg"]) <= bound + 1e-6)


@pytest.mark.parametrize("fmt", ["npy", "shards"])
def test_roi_on_an_int8_folder_pools_the_decoded_levels(images, tmp_path, fmt):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x1,y1,x2,y2\na.png,4,6,60,50\na.png,30,10,88,69\nb.png,0,0,63,63\n")
    folders = {}
    for save_dtype in ("float32", "int8"):
        out = extract(images, tmp_path / save_dtype, "--save-dtype", save_dtype, "--format", fmt)
        result = run("roi", out, "--boxes", boxes)
        assert result.exit_code == 0, result.output
        folders[save_dtype] = out
    reference, quantised = open_features(folders["float32"]), open_features(folders["int8"])
    raw = open_features(folders["int8"], dtype=None)
    for key, count in (("a", 2), ("b", 1)):
        rois = raw[key]["rois"]
        assert rois.dtype == np.float32 and rois.shape == (count, 256, 7, 7)
        assert sorted(quantised[key]) == sorted([*LEVELS, "rois", "boxes"])
        # RoIAlign averages the level's values: its error stays within the largest scale / 2
        bound = np.max([raw[key][f"{v}_scale"] for v in LEVELS], axis=0)[None, :, None, None]
        error = np.abs(rois - reference[key]["rois"])
        assert np.all(error <= bound * (0.5 + 2**-20) + 1e-6) and error.max() > 0


@pytest.mark.parametrize("fmt", ["npy", "shards"])
def test_verify_passes_a_clean_int8_folder(runs, fmt):
    result = run("verify", runs["int8", fmt])
    assert result.exit_code == 0, result.output
    assert "verified 2 images: all as reported" in result.output


def test_verify_fails_when_an_int8_levels_scales_are_deleted(images, tmp_path):
    out = extract(images, tmp_path / "out", "--save-dtype", "int8")
    (out / "b" / "p4_scale.npy").unlink()
    result = run("verify", out)
    assert result.exit_code == 1
    assert "b.png: b/p4_scale.npy is missing" in result.output


def test_verify_fails_when_scales_have_the_wrong_shape(images, tmp_path):
    out = extract(images, tmp_path / "out", "--save-dtype", "int8")
    np.save(out / "a" / "p2_scale.npy", np.ones(255, np.float32))
    result = run("verify", out)
    assert result.exit_code == 1
    assert "a.png: a/p2_scale.npy has shape 255, the report lists 256" in result.output


def test_summary_lists_the_bytes_of_every_save_dtype(images, runs):
    result = run(images / "a.png", images / "b.png", "--summary", "--arch", "seed", "--pool", "avg")
    assert result.exit_code == 0, result.output
    on_disk = {
        save_dtype: sum(p.stat().st_size for p in runs[save_dtype, "npy"].rglob("*.npy"))
        for save_dtype in ("int8", "bfloat16")
    }
    assert on_disk["int8"] == 250_112 and on_disk["bfloat16"] == 471_552  # as the rows below give
    assert "npy     int8          250.1 kB       29" in result.output
    assert "npy     bfloat16      471.6 kB       21" in result.output
    assert "shards  int8          274.4 kB        4" in result.output
    p2 = (256, 18, 23)  # a.png's; the codec's bytes: 1 per value, and 4 per channel's scale
    assert codecs.stored_bytes("int8", {"p2": p2}) == 256 * 18 * 23 + 256 * 4
