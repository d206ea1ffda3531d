"""Keys (inputs/keys.py, docs/inputs.md): files named one by one (arguments, --list, stdin) are
keyed relative to --root or their deepest common folder; folders, globs and tar members keep
their own roots. Each test runs the CLI and reads report.json and the files on disk."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from fpn_cli.formats.npy import check_layout, files_of_a_key

from conftest import SEED, report_of, run
from imagefactory import save_rgb


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """data/cats/x.jpg, data/dogs/x.jpg, data/sub/coffee.jpg, data/tea.jpg; the current folder
    is tmp_path, so relative paths are as a user types them."""
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(["cats/x.jpg", "dogs/x.jpg", "sub/coffee.jpg", "tea.jpg"]):
        save_rgb(tmp_path / "data" / name, 24, 32, seed=i)
    return tmp_path / "data"


def paths(out: str | Path) -> list[str]:
    return [entry["path"] for entry in report_of(Path(out))["images"]]


def test_listed_files_with_one_base_name_in_two_folders_keep_their_folders(data):
    Path("l.txt").write_text("data/cats/x.jpg\ndata/dogs/x.jpg\n")
    result = run("--list", "l.txt", "-o", "o", *SEED)
    assert result.exit_code == 0, result.output
    assert paths("o") == ["cats/x.jpg", "dogs/x.jpg"]
    assert Path("o/cats/x/p2.npy").is_file() and Path("o/dogs/x/p5.npy").is_file()
    assert not Path("o/x").exists()


def test_piped_paths_are_relative_to_their_deepest_common_folder(data):
    piped = "data/cats/x.jpg\ndata/dogs/x.jpg\ndata/sub/coffee.jpg\ndata/tea.jpg\n"
    result = run("-", "-o", "o", *SEED, input=piped)
    assert result.exit_code == 0, result.output
    assert paths("o") == ["cats/x.jpg", "dogs/x.jpg", "sub/coffee.jpg", "tea.jpg"]
    assert Path("o/sub/coffee/p3.npy").is_file() and not Path("o/coffee").exists()


def test_several_file_arguments_share_their_common_folder(data):
    result = run(data / "sub" / "coffee.jpg", data / "tea.jpg", "-o", "o", *SEED)
    assert result.exit_code == 0, result.output
    assert paths("o") == ["sub/coffee.jpg", "tea.jpg"]


def test_a_single_file_keeps_its_base_name(data):
    result = run("data/sub/coffee.jpg", "-o", "o", *SEED)
    assert result.exit_code == 0, result.output
    assert paths("o") == ["coffee.jpg"]
    assert Path("o/coffee/p2.npy").is_file()


def test_root_keys_named_files_and_folders_relative_to_it(data):
    result = run("data/sub/coffee.jpg", "--root", "data", "-o", "o", *SEED)
    assert result.exit_code == 0, result.output
    assert paths("o") == ["sub/coffee.jpg"]
    # a folder input under --root: relative to --root, so two class folders never collide
    both = run("data/cats", "data/dogs", "--root", "data", "-o", "o2", *SEED)
    assert both.exit_code == 0, both.output
    assert paths("o2") == ["cats/x.jpg", "dogs/x.jpg"]


def test_a_path_outside_root_is_a_usage_error_naming_it(data):
    result = run("data/tea.jpg", "data/cats/x.jpg", "--root", "data/cats", "-o", "o", *SEED)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error: data/tea.jpg is outside --root data/cats" in result.output
    assert not Path("o").exists()


def test_folder_and_glob_inputs_keep_their_own_roots(data):
    folder = run("data/sub", "-o", "o", *SEED)
    assert folder.exit_code == 0, folder.output
    assert paths("o") == ["coffee.jpg"]
    glob = run("data/*/x.jpg", "-o", "o2", *SEED)
    assert glob.exit_code == 0, glob.output
    assert paths("o2") == ["cats/x.jpg", "dogs/x.jpg"]


def test_a_resumed_run_finds_the_same_keys_and_boxes_name_them(data):
    Path("l.txt").write_text("data/cats/x.jpg\ndata/dogs/x.jpg\n")
    Path("boxes.csv").write_text("path,x1,y1,x2,y2\ndogs/x.jpg,0,0,16,12\n")
    first = run("--list", "l.txt", "-o", "o", "--boxes", "boxes.csv", *SEED)
    assert first.exit_code == 0, first.output
    assert Path("o/dogs/x/rois.npy").is_file() and not Path("o/cats/x/rois.npy").exists()
    again = run("--list", "l.txt", "-o", "o", "--boxes", "boxes.csv", "--arch", "seed", "--device", "cpu")
    assert again.exit_code == 0 and "0 written, 2 already complete" in again.output


def test_shards_name_members_by_the_same_keys(data):
    Path("l.txt").write_text("data/cats/x.jpg\ndata/dogs/x.jpg\n")
    result = run("--list", "l.txt", "-o", "o", "--format", "shards", *SEED)
    assert result.exit_code == 0, result.output
    assert paths("o") == ["cats/x.jpg", "dogs/x.jpg"]


def test_tar_members_keep_their_names_beside_named_files(data):
    buffer = (data / "tea.jpg").read_bytes()
    with tarfile.open("s.tar", "w") as tar:
        info = tarfile.TarInfo("deep/er/tea.jpg")
        info.size = len(buffer)
        tar.addfile(info, io.BytesIO(buffer))
    result = run("s.tar", "data/cats/x.jpg", "data/dogs/x.jpg", "-o", "o", *SEED)
    assert result.exit_code == 0, result.output
    assert paths("o") == ["cats/x.jpg", "deep/er/tea.jpg", "dogs/x.jpg"]


def test_listed_urls_share_their_common_folder_per_host(data, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    try:
        for name in ("train/a.jpg", "val/a.jpg"):
            fs.pipe_file(f"/keys/{name}", (data / "tea.jpg").read_bytes())
        Path("urls.txt").write_text("memory://keys/train/a.jpg\nmemory://keys/val/a.jpg\n")
        result = run("--list", "urls.txt", "-o", "o", *SEED)
        assert result.exit_code == 0, result.output
        assert paths("o") == ["train/a.jpg", "val/a.jpg"]
    finally:
        fs.rm("/keys", recursive=True)


def clash_cases() -> list[tuple[str, str]]:
    """Pairs of input files whose outputs would land on each other, one per file a key writes."""
    cases = [("k.jpg", f"k/{name}.jpg") for name in sorted(files_of_a_key())]
    cases += [
        ("K.png", "k/P2.NPY.png"),  # casefolded, as on macOS and Windows
        ("k.png", "k/p2.npy/deeper.png"),  # a folder above the key
        ("sub/k.png", "sub/k/preview.png.jpg"),
        ("k.png", "k/input.json/x.png"),
    ]
    return cases


def test_inputs_whose_outputs_would_collide_are_refused_before_any_work(tmp_path):
    for i, (first, second) in enumerate(clash_cases()):
        folder = tmp_path / f"in{i}"
        save_rgb(folder / first, 8, 8)
        save_rgb(folder / second, 8, 8)
        result = run(folder, "-o", tmp_path / f"out{i}", *SEED)
        assert result.exit_code == 2, (first, second, result.output)
        assert str(folder / first) in result.stderr and str(folder / second) in result.stderr, result.stderr
        assert not (tmp_path / f"out{i}").exists()


@pytest.mark.parametrize("name", [".p2.npy~host~12.tmp.png", ".report.json~h~1.tmp.jpg"])
def test_an_input_named_like_a_temporary_file_is_refused(tmp_path, name):
    save_rgb(tmp_path / "in" / "k" / name, 8, 8)
    result = run(tmp_path / "in", "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 2 and "named like fpn-extract's temporary files" in result.stderr


def test_a_glob_that_climbs_out_of_its_root_cannot_write_outside_out(tmp_path):
    save_rgb(tmp_path / "a" / "x.png", 8, 8)
    (tmp_path / "a" / "b").mkdir()
    result = run(str(tmp_path / "a" / "*" / ".." / "*.png"), "-o", tmp_path / "out", *SEED)
    assert result.exit_code == 2 and "not a folder inside the output folder" in result.stderr


def test_keys_that_only_look_alike_do_not_clash():
    check_layout(
        [("k", "k.jpg"), ("k/p2", "k/p2.jpg"), ("k/p2.npy.x", "k/p2.npy.x.png"), ("p2.npy", "p2.npy.jpg")]
    )


def test_a_folder_search_never_enters_another_runs_output_folder(tmp_path):
    """OUT inside the input folder: a second run into another OUT there does not take the first
    run's previews (or anything else in an fpn-extract output folder) as inputs."""
    for i in range(2):
        save_rgb(tmp_path / "in" / f"im{i}.png", 24, 32, seed=i)
    assert run(tmp_path / "in", "-o", tmp_path / "in" / "first", "--preview", *SEED).exit_code == 0
    assert list((tmp_path / "in" / "first").rglob("preview.png"))
    result = run(tmp_path / "in", "-o", tmp_path / "in" / "second", *SEED)
    assert result.exit_code == 0, result.output
    assert [e["path"] for e in report_of(tmp_path / "in" / "second")["images"]] == ["im0.png", "im1.png"]
