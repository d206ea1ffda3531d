"""Trust: what the tool checks before and after it computes (docs/guarantees-outputs.md):
file:// URLs are local paths, and the Python API validates its options as the CLI does."""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fpn_cli import Options, UsageError, WeightsError, build_fpn, extract
from fpn_cli.formats import codecs
from fpn_cli.inputs.urls import is_url, local_path
from fpn_cli.layout import SETTINGS_FILE
from fpn_cli.models.frameworks.own import FORMAT_KEY, save
from fpn_cli.report import ImageResult, Report
from fpn_cli.run import pipeline
from fpn_cli.run.finite import NonFinite, check_finite, check_finite_scales

from conftest import SEED, report_of, run
from imagefactory import save_rgb


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    save_rgb(folder / "a.png", 32, 40)
    save_rgb(folder / "b.png", 24, 32, seed=1)
    return folder


# --- file:// URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [("file:///abs/x", "/abs/x"), ("file://localhost/abs/x", "/abs/x"), ("FILE:///a%20b/c", "/a b/c")],
)
def test_file_url_is_the_local_path(url: str, path: str) -> None:
    assert not is_url(url)
    assert local_path(url) == path


@pytest.mark.parametrize("url", ["file://otherhost/x", "file://"])
def test_file_url_of_another_host_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(UsageError, match="file:///path"):
        local_path(url)


def test_file_url_output_writes_to_the_path_not_a_file_colon_folder(images, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = run(images, "-o", f"file://{out}", *SEED)
    assert result.exit_code == 0, result.output
    assert (out / "a" / "p2.npy").is_file() and (out / "report.json").is_file()
    assert not (tmp_path / "file:").exists()


def test_file_url_inputs_list_and_boxes_are_local_paths(images, tmp_path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'b.png'}\n")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x1,y1,x2,y2\na.png,0,0,16,16\n")
    out = tmp_path / "out"
    result = run(
        f"file://{images / 'a.png'}", "--list", f"file://{listing}", "--boxes", f"file://{boxes}",
        "--root", images, "-o", out, *SEED,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(image["path"] for image in report_of(out)["images"]) == ["a.png", "b.png"]
    assert (out / "a" / "rois.npy").is_file()


def test_file_url_output_of_another_host_is_exit_2(images, tmp_path) -> None:
    result = run(images, "-o", "file://host/x", *SEED)
    assert result.exit_code == 2
    assert "file://host/x" in result.output and "Traceback" not in result.output
    assert not Path("file:").exists()


# --- the Python API validates like the CLI ---------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("writers", -1, "--writers must be at least 1"),
        ("workers", 0, "--workers must be at least 1"),
        ("batch_size", 0, "--batch-size must be at least 1"),
        ("batch_size", 1.5, "--batch-size must be a whole number (got 1.5)"),
        ("seed", -1, "--seed must be from 0 to"),
        ("max_pixels", 0, "--max-pixels must be at least 1"),
        ("shard_size", 0, "--shard-size must be at least 1"),
        ("pad_multiple", 0, "--pad-multiple must be from 1 to"),
        ("timeout", float("nan"), "--timeout must be more than 0"),
        ("timeout", -1, "--timeout must be more than 0"),
    ],
)
def test_api_options_out_of_range_are_one_line_usage_errors(field, value, message, images, tmp_path) -> None:
    with pytest.raises(UsageError, match="^" + re.escape(message)) as info:
        extract([images], tmp_path / "out", **{field: value}, arch="seed", device="cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError):
        Options(**{field: value})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [("--writers", "0"), ("--workers", "0"), ("--batch-size", "0"), ("--seed", "-1"), ("--shard", "3/2")],
)
def test_cli_options_out_of_range_are_exit_2(option, value, images, tmp_path) -> None:
    result = run(images, "-o", tmp_path / "out", option, value, *SEED)
    assert result.exit_code == 2
    assert option in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("shard", [(3, 2), (0, 0), (-1, 2), (1,), "0/2", (0.5, 2)])
def test_api_bad_shard_is_a_usage_error(shard, images, tmp_path) -> None:
    with pytest.raises(UsageError, match="^--shard "):
        extract([images], tmp_path / "out", shard=shard, arch="seed", device="cpu")
    assert not (tmp_path / "out").exists()


def test_api_good_shard_processes_its_part(images, tmp_path) -> None:
    reports = [extract([images], tmp_path / "out", shard=(i, 2), arch="seed", device="cpu") for i in (0, 1)]
    assert sum(r.counts["ok"] for r in reports) == 2


@pytest.mark.parametrize("as_path", [False, True])
def test_api_single_string_or_path_is_one_input(as_path, images, tmp_path) -> None:
    spec = images / "a.png" if as_path else os.fspath(images / "a.png")
    report = extract(spec, tmp_path / "out", arch="seed", device="cpu")
    assert report.counts == {"ok": 1, "skipped": 0, "failed": 0}
    assert [image["path"] for image in report_of(tmp_path / "out")["images"]] == ["a.png"]


# --- weights that would make every feature wrong are refused at load --------------------------


@functools.cache
def _own_bytes() -> bytes:
    """A seed-architecture checkpoint in fpn-extract's own format, built once."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.pt"
        save(build_fpn(arch="seed"), path)
        return path.read_bytes()


def _own_file(tmp_path: Path, name: str = "w.pt", **meta) -> Path:
    """That checkpoint, its record's fields replaced."""
    path = tmp_path / name
    saved = torch.load(io.BytesIO(_own_bytes()), weights_only=True)
    saved[FORMAT_KEY].update(meta)
    torch.save(saved, path)
    return path


def _assert_refused_then_fixed_rerun_works(
    tmp_path: Path, images: Path, weights: Path, message: str, rerun: bool = True
) -> None:
    """Refused in one line, exit 2, no settings record left behind; and (``rerun``) a run with
    good weights into the same folder then works."""
    out = tmp_path / "out"
    result = run(images, "-o", out, "--weights", weights, "--device", "cpu", "-q")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (out / SETTINGS_FILE).exists()  # nothing recorded that would refuse the fixed rerun
    if not rerun:
        return
    fixed = _own_file(tmp_path, "fixed.pt")
    result = run(images, "-o", out, "--weights", fixed, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert report_of(out)["counts"] == {"ok": 2, "skipped": 0, "failed": 0}


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("bn_eps", float("nan"), "is out of range"),
        ("bn_eps", -1.0, "is out of range"),
        ("bn_eps", float("inf"), "is out of range"),
        ("bn_eps", 5.0, "is out of range"),
        ("bn_eps", "1e-5", "is not a number"),
        ("bn_eps", True, "is not a number"),
        ("arch", 7, "is not an architecture name"),
        ("arch", "resnet9000", "is no known architecture"),
        ("fpn_style", "sideways", "is no known FPN style"),
    ],
)
def test_own_checkpoint_metadata_is_validated_naming_the_field(field, value, why, images, tmp_path) -> None:
    weights = _own_file(tmp_path, **{field: value})
    message = f"fpn_extract.{field} = {value!r} {why}"
    # the fixed rerun once (the case); for the others, the absent settings record says it
    rerun = (field, value) == ("bn_eps", -1.0)
    _assert_refused_then_fixed_rerun_works(tmp_path, images, weights, message, rerun)


def _tampered(tmp_path: Path, key: str, change) -> Path:
    path = _own_file(tmp_path)
    saved = torch.load(path, weights_only=True)
    saved["state_dict"][key] = change(saved["state_dict"][key])
    torch.save(saved, path)
    return path


def test_negative_batchnorm_variance_is_refused_naming_it(images, tmp_path) -> None:
    key = "body.layer1.0.bn2.running_var"
    weights = _tampered(tmp_path, key, lambda v: -v)
    _assert_refused_then_fixed_rerun_works(tmp_path, images, weights, f"{key} hold negative variances")


def test_integer_tensor_where_floats_belong_is_refused_naming_it(images, tmp_path) -> None:
    key = "body.conv1.weight"
    weights = _tampered(tmp_path, key, lambda v: (v * 100).to(torch.int64))
    _assert_refused_then_fixed_rerun_works(tmp_path, images, weights, f"{key} hold int64 values where")


def test_finite_weights_that_overflow_the_network_are_refused(images, tmp_path) -> None:
    key = "body.layer2.0.conv1.weight"
    weights = _tampered(tmp_path, key, lambda v: torch.full_like(v, 1e38))
    message = "come out NaN or infinite for any image"
    _assert_refused_then_fixed_rerun_works(tmp_path, images, weights, message)
    assert key in run(images, "-o", tmp_path / "o2", "--weights", weights, "--device", "cpu").output


def test_detectron2_pickle_with_a_non_numeric_array_is_one_line(tmp_path) -> None:
    path = tmp_path / "model_final.pkl"
    arrays = {"backbone.bottom_up.stem.conv1.weight": np.array(["not", "numbers"])}
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "x"}))
    with pytest.raises(WeightsError, match=r"stem\.conv1\.weight hold no numbers") as info:
        build_fpn(weights=path)
    assert "\n" not in str(info.value)


def test_every_json_written_is_strict(images, tmp_path) -> None:
    """report.json, the settings record and a shard folder's json parse with NaN/Infinity refused."""

    def strict(constant: str) -> None:
        raise AssertionError(f"non-strict JSON constant {constant}")

    for fmt in ("npy", "shards"):
        out = tmp_path / fmt
        assert run(images, "-o", out, "--format", fmt, "--pool", "avg", *SEED).exit_code == 0
        written = [p for p in out.rglob("*") if p.suffix in (".json", ".jsonl")]
        assert written
        for p in written:
            for line in [p.read_text()] if p.suffix == ".json" else p.read_text().splitlines():
                json.loads(line, parse_constant=strict)


def test_a_non_finite_value_never_reaches_a_report_as_bare_nan(tmp_path) -> None:
    report = Report({})
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        report.add(ImageResult("x.png", "ok", geometry={"scale": float("nan")}))


# --- a NaN or infinite level fails its image, not the run --------------------------------------


def _refuse(constant: str) -> None:
    raise AssertionError(f"non-strict JSON constant {constant}")


def _poison_bright_images(monkeypatch) -> None:
    """The run's network, made to put NaN into P3 and infinity into P5 of every image whose mean
    normalised value is above 1.5 (a white image), as a real overflow would for some inputs."""

    def build(spec):
        model = pipeline.build(spec)  # not conftest's cached model: the hook must not outlive the test

        def hook(module, inputs, feats):
            bright = inputs[0].flatten(1).mean(1) > 1.5
            feats["p3"][bright] = float("nan")
            feats["p5"][bright] = float("inf")
            return feats

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(pipeline, "_build_model", build)


@pytest.mark.parametrize(
    ("batch_size", "save_dtype"), [("1", "float32"), ("4", "float32"), ("4", "int8"), ("1", "float16")]
)
def test_non_finite_levels_fail_that_image_and_the_others_are_written(
    batch_size, save_dtype, images, tmp_path, monkeypatch
) -> None:
    Image.new("RGB", (40, 32), "white").save(images / "white.png")
    _poison_bright_images(monkeypatch)
    out = tmp_path / "out"
    result = run(
        images, "-o", out, "--batch-size", batch_size, "--size", "32x40", "--save-dtype", save_dtype, *SEED
    )
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "white.png" in failed[0] and "P3, P5 came out NaN or infinite" in failed[0]
    report = json.loads((out / "report.json").read_text(), parse_constant=_refuse)
    assert report["counts"] == {"ok": 2, "skipped": 0, "failed": 1}
    entry = next(image for image in report["images"] if image["path"] == "white.png")
    assert entry["status"] == "failed" and "P3, P5 came out NaN or infinite" in entry["error"]
    assert not (out / "white").exists()  # nothing of it stored
    for key in ("a", "b"):
        assert np.isfinite(np.load(out / key / "p3.npy")).all()
        if save_dtype == "int8":  # codes, and their scales: finite
            assert np.isfinite(np.load(out / key / "p3_scale.npy")).all()


def test_finite_outputs_pass_the_check_unchanged() -> None:
    feats = {"p2": torch.randn(3, 4, 5, 5), "p3": torch.randn(3, 4, 2, 2)}
    check_finite(feats)  # returns: nothing raised
    check_finite({"p2": torch.full((2, 4, 3, 3), 3e38)})  # finite values whose sum overflows pass
    feats["p3"][1, 0, 0, 0] = float("nan")
    feats["p2"][2, 3, 4, 4] = float("-inf")
    with pytest.raises(NonFinite) as info:
        check_finite(feats)
    assert sorted(info.value.images) == [1, 2]
    assert info.value.images[1].startswith("P3 came out") and info.value.images[2].startswith("P2 came out")


def test_int8_scales_say_which_images_have_non_finite_levels() -> None:
    """int8's check reads the scales (NaN where a channel held NaN or infinity), not the level."""
    feats = {"p2": torch.randn(3, 4, 5, 5), "p3": torch.randn(3, 4, 2, 2)}
    feats["p3"][1, 0, 0, 0] = float("nan")
    feats["p2"][2, 3, 4, 4] = float("-inf")
    scales = {level: codecs.encode(level, v, "int8")[f"{level}_scale"] for level, v in feats.items()}
    with pytest.raises(NonFinite) as info:
        check_finite_scales(scales)
    assert sorted(info.value.images) == [1, 2]
    assert info.value.images[1].startswith("P3 came out") and info.value.images[2].startswith("P2 came out")
    check_finite_scales({"p2": codecs.encode("p2", torch.full((2, 4, 3, 3), 3e38), "int8")["p2_scale"]})
