"""The main job end to end: files on disk, report.json, exit statuses, resume, determinism."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from fpn_cli import build_fpn

from conftest import FPN_EXTRACT, SEED, npy_files, report_of, run
from imagefactory import mixed_folder, save_rgb, truncated_jpeg

LEVELS = ("p2", "p3", "p4", "p5")


def ceil_shape(h, w, stride):
    return (256, -(-h // stride), -(-w // stride))


@pytest.fixture
def mixed(tmp_path):
    return tmp_path / "in", mixed_folder(tmp_path / "in")


def assert_complete(out: Path, expected: dict[str, tuple[int, int]], dtype=np.float32):
    for rel, (h, w) in expected.items():
        key = os.path.splitext(rel)[0]
        for level, stride in zip(LEVELS, (4, 8, 16, 32), strict=True):
            arr = np.load(out / key / f"{level}.npy", mmap_mode="r")
            assert arr.shape == ceil_shape(h, w, stride), (rel, level)
            assert arr.dtype == dtype


def test_mixed_folder_gives_every_file_at_its_path_with_its_shape(mixed, tmp_path):
    folder, expected = mixed
    out = tmp_path / "out"
    result = run(folder, "-o", out, *SEED)
    assert result.exit_code == 0, result.output
    assert_complete(out, expected)
    report = report_of(out)
    assert report["counts"] == {"ok": len(expected), "skipped": 0, "failed": 0}
    assert report["model"]["arch"] == "seed" and report["model"]["levels"] == list(LEVELS)
    assert report["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    entries = {e["path"]: e for e in report["images"]}
    assert set(entries) == set(expected)
    for rel, (h, w) in expected.items():
        assert entries[rel]["status"] == "ok"
        assert entries[rel]["input_size"] == [h, w]
        key = os.path.splitext(rel)[0]
        assert entries[rel]["levels"]["p3"] == {"shape": list(ceil_shape(h, w, 8)), "file": f"{key}/p3.npy"}
    assert not [p for p in out.rglob(".*.tmp")]


def test_installed_console_script_runs_end_to_end(mixed, tmp_path):
    folder, expected = mixed
    out = tmp_path / "out"
    proc = subprocess.run(
        [*FPN_EXTRACT, folder, "--out", out, "--arch", "seed", "--device", "cpu", "--save-dtype", "float16"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{len(expected)} images: {len(expected)} written, 0 already complete, 0 failed" in proc.stdout
    assert "37x53  (1 image: rgb.jpg)" in proc.stdout
    assert "P2 256x10x14  P3 256x5x7  P4 256x3x4  P5 256x2x2" in proc.stdout
    assert "features are for shapes and plumbing" in proc.stderr
    assert_complete(out, expected, dtype=np.float16)
    report = report_of(out)
    assert report["counts"]["ok"] == len(expected) and report["model"]["save_dtype"] == "float16"


def test_features_equal_the_model_on_torchvision_preprocessing(tmp_path):
    save_rgb(tmp_path / "cat.png", 37, 53)
    assert run(tmp_path / "cat.png", "-o", tmp_path / "out", *SEED).exit_code == 0
    image = TF.to_tensor(ImageOps.exif_transpose(Image.open(tmp_path / "cat.png")).convert("RGB"))
    x = TF.normalize(image, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])[None]
    with torch.no_grad():
        reference = build_fpn(arch="seed")(x)
    for level in LEVELS:
        ours = np.load(tmp_path / "out" / "cat" / f"{level}.npy")
        np.testing.assert_allclose(ours, reference[level][0].numpy(), rtol=0, atol=1e-5)


def test_bad_inputs_are_reported_and_the_others_written(tmp_path):
    folder = tmp_path / "in"
    save_rgb(folder / "good1.jpg", 20, 20)
    save_rgb(folder / "good2.jpg", 20, 20)
    truncated_jpeg(folder / "truncated.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    save_rgb(folder / "huge.png", 40, 40)
    out = tmp_path / "out"
    result = run(folder, "-o", out, "--max-pixels", 1000, "--batch-size", 4, *SEED)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4
    for name, reason in [
        ("truncated.jpg", "truncated or corrupt"),
        ("empty.png", "empty file"),
        ("text.jpg", "not an image file"),
        ("huge.png", "decompression bomb"),
    ]:
        assert any(str(folder / name) in line and reason in line for line in lines), name
        assert not (out / Path(name).stem).exists()
        entry = next(e for e in report_of(out)["images"] if e["path"] == name)
        assert entry["status"] == "failed" and reason in entry["error"]
    assert report_of(out)["counts"] == {"ok": 2, "skipped": 0, "failed": 4}
    assert_complete(out, {"good1.jpg": (20, 20), "good2.jpg": (20, 20)})
    assert "Traceback" not in result.output


def test_unreadable_file_is_a_failed_input(tmp_path, monkeypatch):
    save_rgb(tmp_path / "in" / "ok.png", 8, 8)
    save_rgb(tmp_path / "in" / "locked.png", 8, 8)
    real_open = os.open

    def guarded_open(path, *args, **kwargs):
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)  # root reads any file, so refuse it here
    result = run(tmp_path / "in", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 1
    assert "locked.png: permission denied" in result.stderr
    assert (tmp_path / "out" / "ok" / "p5.npy").exists()


def test_fail_fast_stops_at_the_first_failure(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"")
    for name in "bcdef":
        save_rgb(tmp_path / "in" / f"{name}.jpg", 8, 8)
    result = run(tmp_path / "in", "-o", tmp_path / "out", "--fail-fast", "--workers", 1, *SEED)
    assert result.exit_code == 1
    assert "stopped at the first failure (--fail-fast)" in result.stderr
    assert report_of(tmp_path / "out")["counts"]["failed"] == 1


def test_paths_from_stdin(tmp_path):
    save_rgb(tmp_path / "x" / "one.jpg", 8, 8)
    save_rgb(tmp_path / "y" / "two.png", 8, 8)
    paths = f"{tmp_path / 'x' / 'one.jpg'}\n\n{tmp_path / 'y' / 'two.png'}\n"
    result = run("-", "-o", tmp_path / "out", *SEED, input=paths)
    assert result.exit_code == 0, result.output
    # keyed relative to their deepest common folder (tests/test_keys.py)
    assert (tmp_path / "out" / "x" / "one" / "p2.npy").exists()
    assert (tmp_path / "out" / "y" / "two" / "p2.npy").exists()


def test_glob_pattern_input(tmp_path):
    save_rgb(tmp_path / "shots" / "day1" / "a.png", 8, 8)
    save_rgb(tmp_path / "shots" / "day2" / "b.png", 8, 8)
    save_rgb(tmp_path / "shots" / "day2" / "c.jpg", 8, 8)
    result = run(str(tmp_path / "shots" / "**" / "*.png"), "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 0, result.output
    assert sorted(e["path"] for e in report_of(tmp_path / "out")["images"]) == ["day1/a.png", "day2/b.png"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["EMPTY"], "no image files found"),
        (["COLLIDE"], "would both write cat/"),
        (["IMG", "--device", "tpu"], "unknown device 'tpu'"),
        (["IMG", "--device", "cuda:7"], "device 'cuda:7' is not available"),
        (["IMG", "--size", "32x32", "--short-side", "16"], "cannot be combined"),
        (["IMG", "--shard", "2/2"], "need 0 <= I < N"),
        ([], "no INPUTS given"),
        (["IMG", "--timeout", "inf"], "0<x<=1000000"),  # the platform's timers overflow past it
        (["IMG", "--pad-multiple", "99999999999"], "1<=x<=1024"),  # else an allocation past memory
        (["IMG", "--roi-size", "100000", "--boxes", "IMG"], "1<=x<=64"),
        (["IMG", "--shard-size", "10MB"], "--shard-size is for --format shards"),  # npy: millions of files
        (["IMG", "--list-column", "url"], "add --list"),
        (["IMG", "--roi-size", "5"], "--roi-size is for RoI features: add --boxes"),
        (["IMG", "--roi-levels", "p3,p4"], "--roi-levels is for RoI features: add --boxes"),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    save_rgb(tmp_path / "collide" / "cat.jpg", 8, 8)
    save_rgb(tmp_path / "collide" / "cat.png", 8, 8)
    save_rgb(tmp_path / "img.png", 8, 8)
    where = {"EMPTY": tmp_path / "empty", "COLLIDE": tmp_path / "collide", "IMG": tmp_path / "img.png"}
    result = run("-o", tmp_path / "out", *SEED, *[where.get(a, a) for a in args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "report.json").exists()


def test_missing_out_is_a_usage_error(tmp_path):
    save_rgb(tmp_path / "img.png", 8, 8)
    result = run(tmp_path / "img.png", "--arch", "seed")
    assert result.exit_code == 2 and "--out" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_a_usage_error(tmp_path):
    save_rgb(tmp_path / "img.png", 8, 8)
    result = run(tmp_path / "img.png", "-o", tmp_path / "out", "--arch", "seed", "--device", "cuda")
    assert result.exit_code == 2 and "device 'cuda' is not available" in result.output


def test_resume_completes_exactly_what_a_crash_left_missing(tmp_path):
    for name in ("a", "b", "c"):
        save_rgb(tmp_path / "in" / f"{name}.png", 16, 24, seed=ord(name))
    out = tmp_path / "out"
    assert run(tmp_path / "in", "-o", out, *SEED).exit_code == 0
    clean = npy_files(out)
    # the crash: b lost two levels, c's folder holds a half-written temporary file
    (out / "b" / "p4.npy").unlink()
    (out / "b" / "p5.npy").unlink()
    (out / "c" / ".p2.npy.999.tmp").write_bytes(b"\x93NUMPY partial")
    untouched = {p: (out / p).stat().st_mtime_ns for p in clean if str(p) not in ("b/p4.npy", "b/p5.npy")}
    os.utime(out / "a" / "p2.npy", ns=(1, 1))
    untouched[Path("a/p2.npy")] = 1
    result = run(tmp_path / "in", "-o", out, *SEED)
    assert result.exit_code == 0, result.output
    assert npy_files(out) == clean
    assert {p: (out / p).stat().st_mtime_ns for p in untouched} == untouched
    assert not list(out.rglob("*.tmp"))
    statuses = {e["path"]: e["status"] for e in report_of(out)["images"]}
    assert statuses == {"a.png": "skipped", "b.png": "ok", "c.png": "skipped"}
    skipped = next(e for e in report_of(out)["images"] if e["path"] == "a.png")
    assert skipped["levels"]["p2"]["shape"] == [256, 4, 6] and skipped["input_size"] == [16, 24]


def test_asking_a_finished_folder_for_more_levels_writes_only_the_new_files(tmp_path):
    for name in ("a", "b"):
        save_rgb(tmp_path / "in" / f"{name}.png", 24, 40, seed=ord(name))
    out = tmp_path / "out"
    assert run(tmp_path / "in", "-o", out, *SEED).exit_code == 0
    for path in out.rglob("*.npy"):
        os.utime(path, ns=(1, 1))
    before = {p.relative_to(out): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.npy")}
    assert len(before) == 8
    contents = npy_files(out)
    result = run(tmp_path / "in", "-o", out, *SEED, "--levels", "p2,p3,p4,p5,c5")
    assert result.exit_code == 0, result.output  # levels are not a setting that forbids resuming
    after = {p.relative_to(out): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.npy")}
    assert {p: after[p] for p in before} == before  # the same files, untouched
    now = npy_files(out)
    assert {p: now[p] for p in contents} == contents
    assert sorted(set(after) - set(before)) == [Path("a/c5.npy"), Path("b/c5.npy")]
    entries = {e["path"]: e for e in report_of(out)["images"]}
    assert {p: e["status"] for p, e in entries.items()} == {"a.png": "ok", "b.png": "ok"}
    assert list(entries["a.png"]["levels"]) == ["p2", "p3", "p4", "p5", "c5"]
    fresh = tmp_path / "fresh"
    assert run(tmp_path / "in", "-o", fresh, *SEED, "--levels", "c5").exit_code == 0
    for key in ("a", "b"):
        np.testing.assert_allclose(np.load(out / key / "c5.npy"), np.load(fresh / key / "c5.npy"), atol=1e-5)


def test_a_truncated_level_file_is_not_complete(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 16, 24)
    out = tmp_path / "out"
    run(tmp_path / "in", "-o", out, *SEED)
    good = (out / "a" / "p3.npy").read_bytes()
    (out / "a" / "p3.npy").write_bytes(good[:-10])
    assert run(tmp_path / "in", "-o", out, *SEED).exit_code == 0
    assert (out / "a" / "p3.npy").read_bytes() == good


def test_overwrite_recomputes_everything(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 16, 24)
    out = tmp_path / "out"
    run(tmp_path / "in", "-o", out, *SEED)
    os.utime(out / "a" / "p2.npy", ns=(1, 1))
    assert run(tmp_path / "in", "-o", out, "--overwrite", *SEED).exit_code == 0
    assert (out / "a" / "p2.npy").stat().st_mtime_ns != 1
    assert report_of(out)["counts"] == {"ok": 1, "skipped": 0, "failed": 0}


def test_features_made_with_other_settings_are_not_mixed_in(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 16, 24)
    out = tmp_path / "out"
    run(tmp_path / "in", "-o", out, *SEED)
    result = run(tmp_path / "in", "-o", out, *SEED, "--seed", "3")
    assert result.exit_code == 2 and "seed 0 -> 3" in result.output
    assert run(tmp_path / "in", "-o", out, *SEED, "--seed", "3", "--overwrite").exit_code == 0


def test_a_rerun_with_size_resumes_rather_than_seeing_other_settings(tmp_path):
    """--size is a tuple in the run and a list once recorded as JSON: the same settings."""
    save_rgb(tmp_path / "in" / "a.png", 16, 24)
    out = tmp_path / "out"
    assert run(tmp_path / "in", "-o", out, "--size", "8x8", *SEED).exit_code == 0
    again = run(tmp_path / "in", "-o", out, "--size", "8x8", *SEED)
    assert again.exit_code == 0, again.output
    assert report_of(out)["counts"] == {"ok": 0, "skipped": 1, "failed": 0}


def test_batch_size_does_not_change_features(tmp_path):
    for i in range(5):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24, 32, seed=i)
    save_rgb(tmp_path / "in" / "odd.png", 20, 36)
    run(tmp_path / "in", "-o", tmp_path / "b1", "--batch-size", 1, *SEED)
    run(tmp_path / "in", "-o", tmp_path / "b4", "--batch-size", 4, *SEED)
    for path in (tmp_path / "b1").rglob("*.npy"):
        other = tmp_path / "b4" / path.relative_to(tmp_path / "b1")
        np.testing.assert_allclose(np.load(path), np.load(other), rtol=0, atol=1e-5)


def test_two_cpu_runs_are_byte_identical(tmp_path):
    for i in range(3):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24, 32, seed=i)
    run(tmp_path / "in", "-o", tmp_path / "r1", "--batch-size", 2, *SEED)
    run(tmp_path / "in", "-o", tmp_path / "r2", "--batch-size", 2, *SEED)
    first = sorted((tmp_path / "r1").rglob("*.npy"))
    assert len(first) == 12
    for path in first:
        assert path.read_bytes() == (tmp_path / "r2" / path.relative_to(tmp_path / "r1")).read_bytes()


def test_resize_options_set_the_network_input(tmp_path):
    save_rgb(tmp_path / "a.png", 40, 60)
    out = tmp_path / "out"
    assert run(tmp_path / "a.png", "-o", out, "--short-side", 64, "--max-side", 80, *SEED).exit_code == 0
    entry = report_of(out)["images"][0]
    assert entry["input_size"] == [40, 60] and entry["model_input_size"] == [53, 80]
    assert np.load(out / "a" / "p2.npy").shape == (256, 14, 20)
    assert run(tmp_path / "a.png", "-o", tmp_path / "o2", "--size", "32x16", *SEED).exit_code == 0
    assert np.load(tmp_path / "o2" / "a" / "p2.npy").shape == (256, 8, 4)


def test_save_dtype_and_compute_dtype(tmp_path):
    save_rgb(tmp_path / "a.png", 32, 32)
    run(tmp_path / "a.png", "-o", tmp_path / "f32", *SEED)
    assert run(tmp_path / "a.png", "-o", tmp_path / "f16", "--save-dtype", "float16", *SEED).exit_code == 0
    half = np.load(tmp_path / "f16" / "a" / "p2.npy")
    full = np.load(tmp_path / "f32" / "a" / "p2.npy")
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=1e-2, atol=1e-3)
    assert run(tmp_path / "a.png", "-o", tmp_path / "bf", "--dtype", "bfloat16", *SEED).exit_code == 0
    bf = np.load(tmp_path / "bf" / "a" / "p2.npy")
    assert bf.dtype == np.float32
    assert np.abs(bf - full).max() < 0.1 * np.abs(full).max()


def test_levels_option_writes_only_those_levels(tmp_path):
    save_rgb(tmp_path / "a.png", 32, 32)
    assert run(tmp_path / "a.png", "-o", tmp_path / "out", "--levels", "c3,p6", *SEED).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out" / "a").iterdir()) == ["c3.npy", "input.json", "p6.npy"]
    assert np.load(tmp_path / "out" / "a" / "c3.npy").shape == (512, 4, 4)


def test_summary_for_given_images_lists_each_size(tmp_path):
    save_rgb(tmp_path / "a.png", 40, 60)
    save_rgb(tmp_path / "b.png", 64, 64)
    result = run("--summary", "--arch", "seed", tmp_path)
    assert result.exit_code == 0
    assert "input 40x60" in result.output and "input 64x64" in result.output


def test_shape_report_is_printed(tmp_path):
    save_rgb(tmp_path / "a.png", 40, 60)
    result = run(tmp_path / "a.png", "-o", tmp_path / "out", "--arch", "seed")
    assert "1 images: 1 written, 0 already complete, 0 failed" in result.stdout
    assert "40x60  (1 image: a.png)" in result.stdout


def test_an_unfinished_overwrite_must_be_finished_with_overwrite(tmp_path, monkeypatch):
    from fpn_cli.run import engine

    for i in range(4):
        save_rgb(tmp_path / "in" / f"im{i}.png", 16, 16, seed=i)
    out = tmp_path / "out"
    assert run(tmp_path / "in", "-o", out, *SEED).exit_code == 0
    real_call = engine.Engine.__call__
    calls = []

    def interrupted_after_two(self, batch):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_call(self, batch)

    monkeypatch.setattr(engine.Engine, "__call__", interrupted_after_two)
    assert run(tmp_path / "in", "-o", out, *SEED, "--seed", "3", "--overwrite").exit_code == 130
    monkeypatch.setattr(engine.Engine, "__call__", real_call)
    # two images hold seed-3 features, two seed-0 ones: a plain rerun must not call that complete
    refused = run(tmp_path / "in", "-o", out, *SEED, "--seed", "3")
    assert refused.exit_code == 2 and "unfinished --overwrite run" in refused.output
    assert run(tmp_path / "in", "-o", out, *SEED, "--seed", "3", "--overwrite").exit_code == 0
    assert run(tmp_path / "in", "-o", out, *SEED, "--seed", "3").exit_code == 0
    assert run(tmp_path / "in", "-o", tmp_path / "fresh", *SEED, "--seed", "3").exit_code == 0
    for path in (tmp_path / "fresh").rglob("*.npy"):
        assert path.read_bytes() == (out / path.relative_to(tmp_path / "fresh")).read_bytes()


@pytest.mark.parametrize("name", [".lock.png", "report.json.png", ".shards.jpg"])
def test_an_image_named_like_the_tools_own_files_is_refused(tmp_path, name):
    save_rgb(tmp_path / "in" / name, 8, 8)
    result = run(tmp_path / "in", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 2 and "a name fpn-extract keeps for itself" in result.output


def test_float16_compute_on_the_cpu_gets_a_note(tmp_path):
    save_rgb(tmp_path / "a.png", 16, 16)
    result = run(
        tmp_path / "a.png", "-o", tmp_path / "out", "--arch", "seed", "--device", "cpu", "--dtype", "float16"
    )
    assert result.exit_code == 0
    assert "--dtype float16 is slow on CPUs" in result.stderr


def test_compile_gives_the_eager_features(tmp_path):
    """--compile (torch.compile with frozen weights) changes speed, not the numbers beyond rounding."""
    save_rgb(tmp_path / "in" / "a.png", 64, 80)
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = run(tmp_path / "in", "-o", tmp_path / name, *SEED, "--levels", "p2,p5", *extra)
        assert result.exit_code == 0, result.output
    for level in ("p2", "p5"):
        eager = np.load(tmp_path / "eager" / "a" / f"{level}.npy")
        compiled = np.load(tmp_path / "compiled" / "a" / f"{level}.npy")
        assert np.abs(compiled - eager).max() <= 1e-4 * np.abs(eager).max(), level


def test_several_writer_threads_write_the_same_files(tmp_path):
    """--writers 3 (a GPU host's default is 4): the same bytes as one writer, every image complete."""
    for i in range(9):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24 + 8 * (i % 3), 32, seed=i)
    for writers in ("1", "3"):
        result = run(tmp_path / "in", "-o", tmp_path / f"w{writers}", *SEED, "--writers", writers)
        assert result.exit_code == 0, result.output
    one, three = npy_files(tmp_path / "w1"), npy_files(tmp_path / "w3")
    assert len(one) == 36 and one == three
    assert all((tmp_path / "w3" / f"im{i}" / "input.json").is_file() for i in range(9))
