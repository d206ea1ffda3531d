"""Shards: --format shards (index, members, resume and verify of a shard folder, damaged shards) and
scale-out (--shard job arrays and torchrun produce exactly what one process does)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fpn_cli import open_features
from fpn_cli.inputs.keys import shard_of
from fpn_cli.run.distributed import Launch, combine, is_rank_zero, torchrun_launch

from conftest import FPN_EXTRACT, SEED, assert_same_arrays, index_lines, npy_files, report_of, run
from imagefactory import save_rgb


@pytest.fixture
def images(tmp_path):
    for i in range(7):
        save_rgb(tmp_path / "in" / f"d{i % 2}" / f"im{i}.png", 20 + 4 * (i % 3), 28, seed=i)
    return tmp_path / "in"


def test_two_shards_together_equal_one_run_and_merge_one_report(images, tmp_path):
    assert run(images, "-o", tmp_path / "single", *SEED).exit_code == 0
    assert run(images, "-o", tmp_path / "sharded", "--shard", "0/2", *SEED).exit_code == 0
    assert not (tmp_path / "sharded" / "report.json").exists()  # half the job is no report
    assert run(images, "-o", tmp_path / "sharded", "--shard", "1/2", *SEED).exit_code == 0
    single = npy_files(tmp_path / "single")
    assert len(single) == 28
    assert npy_files(tmp_path / "sharded") == single
    merged = report_of(tmp_path / "sharded")
    assert [e["path"] for e in merged["images"]] == [
        e["path"] for e in report_of(tmp_path / "single")["images"]
    ]
    assert merged["counts"] == {"ok": 7, "skipped": 0, "failed": 0} and merged["shards"] == 2


def test_rerunning_a_shard_resumes(images, tmp_path):
    out = tmp_path / "out"
    run(images, "-o", out, "--shard", "1/2", *SEED)
    again = run(images, "-o", out, "--shard", "1/2", "--arch", "seed", "--device", "cpu")
    assert again.exit_code == 0
    assert "shard 1 of 2" in again.stdout and "0 written" in again.stdout
    part = json.loads((out / ".shards" / "report-1-of-2.json").read_text())
    assert part["counts"]["skipped"] > 0 and part["counts"]["ok"] == 0


@pytest.mark.parametrize("value", ["2/2", "1/0", "a/b", "-1/2", "3", "0/2/4"])
def test_bad_shard_values_are_usage_errors(images, tmp_path, value):
    result = run(images, "-o", tmp_path / "out", "--shard", value, *SEED)
    assert result.exit_code == 2
    assert "--shard" in result.output


@pytest.mark.parametrize(
    "key,crc32",  # zlib.crc32 of the key's UTF-8 bytes, computed once and written here
    [("cat", 2656977832), ("x/cat", 2530113985), ("d0/im0", 3394977512), ("img0000", 837122815)],
)
def test_an_images_shard_is_the_crc32_of_its_key_modulo_n(key, crc32):
    for count in (1, 2, 3, 4, 7):
        assert shard_of(key, count) == crc32 % count


def parts(out: Path) -> list[dict[str, str]]:
    """Each shard's report part: path -> status."""
    return [
        {e["path"]: e["status"] for e in json.loads(p.read_text())["images"]}
        for p in sorted((out / ".shards").glob("report-*-of-2.json"))
    ]


def test_an_image_keeps_its_shard_when_others_are_added(images, tmp_path):
    out = tmp_path / "out"
    for index in (0, 1):
        assert run(images, "-o", out, "--shard", f"{index}/2", *SEED).exit_code == 0
    first = parts(out)
    assert all(first)  # both shards own images
    assert sorted(p for part in first for p in part) == sorted(e["path"] for e in report_of(out)["images"])
    for i in range(3):  # sorted before the others: every earlier image moves by three places
        save_rgb(images / "a" / f"new{i}.png", 20, 28, seed=10 + i)
    for index in (0, 1):
        assert run(images, "-o", out, "--shard", f"{index}/2", *SEED).exit_code == 0
    second = parts(out)
    for before, after in zip(first, second, strict=True):
        assert {p: after.get(p) for p in before} == dict.fromkeys(before, "skipped")  # kept, not moved
    assert sorted(p for part in second for p in part if p.startswith("a/")) == [
        "a/new0.png",
        "a/new1.png",
        "a/new2.png",
    ]
    assert report_of(out)["counts"] == {"ok": 3, "skipped": 7, "failed": 0}


def test_shard_under_torchrun_is_split_among_ranks():
    assert combine((1, 3), Launch(rank=1, world_size=2, local_rank=1)) == (3, 6)
    assert combine(None, Launch(rank=1, world_size=2, local_rank=1)) == (1, 2)
    assert combine((1, 3), None) == (1, 3)


@pytest.mark.parametrize(
    "env,launch",
    [
        ({}, None),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, Launch(1, 2, 1)),
        ({"RANK": "0", "WORLD_SIZE": "1"}, Launch(0, 1, 0)),
        ({"RANK": "x", "WORLD_SIZE": "2"}, None),
    ],
)
def test_the_torchrun_environment_is_read_in_one_place(monkeypatch, env, launch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert torchrun_launch() == launch
    assert is_rank_zero() == (launch is None or launch.rank == 0)


def test_torchrun_two_processes_equal_one_process(images, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread each, so float sums run in one order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference run, in this process, on one thread too
    try:
        single = run(images, "-o", tmp_path / "single", *SEED)
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.output
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--no-python", *FPN_EXTRACT, images, "-o", tmp_path / "dist", *SEED],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert npy_files(tmp_path / "dist") == npy_files(tmp_path / "single")
    merged = report_of(tmp_path / "dist")
    paths = [e["path"] for e in merged["images"]]
    assert len(paths) == len(set(paths)) == 7
    assert merged["counts"] == {"ok": 7, "skipped": 0, "failed": 0} and merged["shards"] == 2
    assert sorted(p.name for p in (tmp_path / "dist" / ".shards").glob("report-*")) == [
        "report-0-of-2.json",
        "report-1-of-2.json",
    ]


LOUD = ["--arch", "seed", "--device", "cpu"]  # SEED without -q: notes on stderr


SHARDS = ["--format", "shards", "--shard-size", 50_000]  # about one 24x32 image a shard


LOCATION = ("file", "member", "boxes")  # where report.json says an array is: the formats differ


def write_csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("path,x1,y1,x2,y2\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def run_ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def without_location(entry: object) -> object:
    """A report entry with where each array is left out (a file, or a shard and member)."""
    if isinstance(entry, dict):
        return {k: without_location(v) for k, v in entry.items() if k not in LOCATION}
    return entry


@pytest.fixture
def boxed_images(tmp_path) -> tuple[Path, Path]:
    """Three images, and boxes for two of them (one box refused: a NaN row)."""
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        save_rgb(tmp_path / "in" / name, 24, 32 + 8 * i, seed=i)
    rows = [("a.png", 2, 2, 20, 16), ("a.png", 0, 0, 0, 0), ("b.png", 1, 1, 30, 20)]
    return tmp_path / "in", write_csv(tmp_path / "boxes.csv", rows)


def test_shards_hold_pools_rois_and_float64_boxes_as_the_npy_layout_does(boxed_images, tmp_path):
    folder, csv = boxed_images
    regions = ["--pool", "avg,max", "--boxes", csv, "--save-dtype", "float16"]
    assert run(folder, "-o", tmp_path / "npy", *SEED, *regions).exit_code == 1  # the refused box
    assert run(folder, "-o", tmp_path / "shards", *SEED, *regions, *SHARDS).exit_code == 1
    assert_same_arrays(tmp_path / "npy", tmp_path / "shards")
    a = open_features(tmp_path / "shards", dtype=None)["a"]  # as stored
    assert a["boxes"].dtype == np.float64 and a["rois"].dtype == a["p3_avg"].dtype == np.float16
    members = {line["key"]: line["members"] for line in index_lines(tmp_path / "shards")}
    assert members["a"]["boxes.npy"]["dtype"] == "<f8" and members["a"]["rois.npy"]["dtype"] == "<f2"
    assert "rois.npy" not in members["c"]  # no boxes for c
    npy, shards = report_of(tmp_path / "npy"), report_of(tmp_path / "shards")
    assert [without_location(e) for e in npy["images"]] == [without_location(e) for e in shards["images"]]
    rois = next(e for e in shards["images"] if e["path"] == "a.png")["rois"]
    assert rois["file"].startswith("shards/")
    assert (rois["member"], rois["boxes"]) == ("a.rois.npy", "a.boxes.npy")  # boxes: in the same shard
    assert run("verify", tmp_path / "shards").exit_code == 0


def test_the_record_is_in_the_json_member_written_last_of_its_group(boxed_images, tmp_path):
    folder, _ = boxed_images
    out = tmp_path / "out"
    run_ok(folder, "-o", out, *SEED, *SHARDS, "--hash")
    line = index_lines(out)[0]
    record = line["record"]
    assert record["input"] == str(folder / "a.png") and record["path"] == "a.png"
    assert record["size"] == (folder / "a.png").stat().st_size and len(record["sha256"]) == 64
    with tarfile.open(out / "shards" / line["shard"]) as tar:
        names = tar.getnames()
        assert names == ["a.p2.npy", "a.p3.npy", "a.p4.npy", "a.p5.npy", "a.json"]
        assert json.loads(tar.extractfile("a.json").read())["record"] == record


def test_a_changed_input_in_a_complete_shard_is_written_anew_and_listed_once(boxed_images, tmp_path):
    folder, _ = boxed_images
    out = tmp_path / "out"
    run_ok(folder, "-o", out, *SEED, *SHARDS)
    before = {line["key"]: line["shard"] for line in index_lines(out)}
    assert len(set(before.values())) == 3
    save_rgb(folder / "b.png", 24, 48, seed=7)  # new pixels, new size
    result = run_ok(folder, "-o", out, *LOUD, *SHARDS)
    assert f"recomputing {folder / 'b.png'}: input changed: " in result.stderr
    lines = index_lines(out)
    assert [line["key"] for line in lines] == ["a", "b", "c"]  # each image once
    b = lines[1]
    assert b["shard"] not in before.values() and b["replaces"] == before["b"]
    assert {line["key"]: line["shard"] for line in lines if line["key"] != "b"} == {
        k: v for k, v in before.items() if k != "b"
    }
    entries = {e["path"]: e for e in report_of(out)["images"]}
    assert entries["b.png"]["recomputed"].startswith("input changed: ")
    assert report_of(out)["counts"] == {"ok": 1, "skipped": 2, "failed": 0}
    run_ok(folder, "-o", tmp_path / "fresh", *SEED)
    assert_same_arrays(tmp_path / "fresh", out)
    assert run("verify", out).exit_code == 0
    again = run_ok(folder, "-o", out, *LOUD, *SHARDS)
    assert "0 written, 3 already complete" in again.stdout and "recomputing" not in again.stderr
    # the index is made from the parts: without it, readers take the newest line too
    (out / "shards" / "index.jsonl").unlink()
    assert_same_arrays(tmp_path / "fresh", out)


def test_pools_and_rois_added_to_a_shard_folder_come_from_the_stored_levels(
    boxed_images, tmp_path, monkeypatch
):
    folder, csv = boxed_images
    out = tmp_path / "out"
    run_ok(folder, "-o", out, *SEED, *SHARDS)
    assert run(folder, "-o", tmp_path / "fresh", *SEED, "--pool", "max", "--boxes", csv).exit_code == 1

    def no_forward(self, batch):
        raise AssertionError("the network ran: the levels were in the shards")

    monkeypatch.setattr("fpn_cli.run.pipeline.Forward.__call__", no_forward)
    result = run(folder, "-o", out, *LOUD, *SHARDS, "--pool", "max", "--boxes", csv)
    assert result.exit_code == 1 and "3 written" in result.stdout  # 1: the refused box
    assert_same_arrays(tmp_path / "fresh", out)
    assert sorted(line["replaces"] for line in index_lines(out)) == ["000000.tar", "000001.tar", "000002.tar"]


def test_verify_checks_a_shard_folder_through_its_index(boxed_images, tmp_path):
    folder, csv = boxed_images
    out = tmp_path / "out"
    run(folder, "-o", out, *SEED, *SHARDS, "--boxes", csv)
    passed = run("verify", out)
    assert passed.exit_code == 0 and passed.stdout == "", passed.output
    lines = {line["key"]: line for line in index_lines(out)}
    p3 = lines["a"]["members"]["p3.npy"]
    with open(out / "shards" / lines["a"]["shard"], "r+b") as tar:  # a header that is not an .npy's
        tar.seek(p3["offset"])
        tar.write(b"garbage!")
    boxes = lines["b"]["members"]["boxes.npy"]
    with open(out / "shards" / lines["b"]["shard"], "r+b") as tar:
        tar.truncate(boxes["offset"] + 10)
    (folder / "c.png").unlink()
    result = run("verify", out)
    assert result.exit_code == 1
    a_tar, b_tar = (f"shards/{lines[k]['shard']}" for k in ("a", "b"))
    assert sorted(result.stdout.splitlines()) == [
        f"a.png: {a_tar}:a.p3.npy is not a complete float32 .npy file (header, dtype or length)",
        f"b.png: {b_tar}:b.boxes.npy is not a complete float64 .npy file (header, dtype or length)",
        f"c.png: its input {folder / 'c.png'} no longer exists",
    ]


@pytest.mark.parametrize("damage", ["truncated", "header", "shape"])
def test_a_resume_of_a_shard_folder_checks_each_member_in_its_tar(boxed_images, tmp_path, damage):
    """A member cut off by a short copy, or whose .npy header in the tar no longer says what the
    index lists, is not kept: the image is recomputed into a new shard, and verify then passes."""
    folder, _ = boxed_images
    out = tmp_path / "out"
    run_ok(folder, "-o", out, *SEED, *SHARDS)
    line = {line["key"]: line for line in index_lines(out)}["b"]
    p5 = line["members"]["p5.npy"]
    with open(out / "shards" / line["shard"], "r+b") as tar:
        if damage == "truncated":
            tar.truncate(p5["offset"] + p5["size"] - 8)
        else:
            tar.seek(p5["offset"])
            header = tar.read(p5["data"] - p5["offset"])
            old = str(tuple(p5["shape"])).encode()
            new = b"garbage!" if damage == "header" else str(tuple(reversed(p5["shape"]))).encode()
            tar.seek(p5["offset"])
            tar.write(header.replace(old, new.ljust(len(old))) if damage == "shape" else new)
    assert run("verify", out).exit_code == 1
    result = run_ok(folder, "-o", out, *LOUD, *SHARDS)
    assert f"recomputing {folder / 'b.png'}: p5.npy is not a complete float32 .npy file" in result.output
    counts = report_of(out)["counts"]
    assert counts == {"ok": 1, "skipped": 2, "failed": 0}
    assert run("verify", out).exit_code == 0
    assert [line["key"] for line in index_lines(out)] == ["a", "b", "c"]


def test_an_unreadable_shard_without_its_index_part_is_set_aside_and_its_images_redone(
    boxed_images, tmp_path
):
    folder, _ = boxed_images
    out = tmp_path / "out"
    run_ok(folder, "-o", out, *SEED, *SHARDS)
    clean = {line["key"]: line["shard"] for line in index_lines(out)}
    lost = clean["b"]
    with open(out / "shards" / lost, "r+b") as tar:
        tar.truncate(700)  # inside the first member's data: scanning it fails
    (out / "shards" / ".index" / lost.replace(".tar", ".jsonl")).unlink()
    result = run_ok(folder, "-o", out, *SEED, *SHARDS)
    assert "Traceback" not in result.output
    assert (out / "shards" / f"{lost}.unreadable").is_file() and not (out / "shards" / lost).exists()
    assert report_of(out)["counts"] == {"ok": 1, "skipped": 2, "failed": 0}
    assert [line["key"] for line in index_lines(out)] == ["a", "b", "c"]
    assert run("verify", out).exit_code == 0


def test_a_damaged_index_line_is_one_line_naming_the_index(boxed_images, tmp_path):
    folder, _ = boxed_images
    out = tmp_path / "out"
    run_ok(folder, "-o", out, *SEED, *SHARDS)
    index = out / "shards" / "index.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([lines[0], '{"key": 1}', *lines[1:]]) + "\n")
    result = run("verify", out)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{index}, line 2, is damaged" in result.output


def test_roi_subcommand_on_a_shard_folder_writes_what_an_extraction_with_boxes_does(boxed_images, tmp_path):
    folder, csv = boxed_images
    run_ok(folder, "-o", tmp_path / "out", *SEED, *SHARDS)
    result = run("roi", tmp_path / "out", "--boxes", csv)
    assert result.exit_code == 1 and "1 refused" in result.output  # the empty box: a NaN row
    assert run(folder, "-o", tmp_path / "direct", *SEED, *SHARDS, "--boxes", csv).exit_code == 1
    assert_same_arrays(tmp_path / "out", tmp_path / "direct")
    assert run("verify", tmp_path / "out").exit_code == 0
    assert len({line["key"] for line in index_lines(tmp_path / "out")}) == len(index_lines(tmp_path / "out"))


def make_tar(path: Path, members: dict[str, bytes], mtimes: dict[str, int] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), (mtimes or {}).get(name, 0)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_member_is_fingerprinted_by_its_header_and_its_tar(boxed_images, tmp_path):
    folder, _ = boxed_images
    px = {name: (folder / name).read_bytes() for name in ("a.png", "b.png")}
    tar = make_tar(tmp_path / "data.tar", px)
    out = tmp_path / "out"
    run_ok(tar, "-o", out, *SEED)
    record = json.loads((out / "a" / "input.json").read_text())
    assert (record["input"], record["member"], record["size"]) == (str(tar), "a.png", len(px["a.png"]))
    assert "0 written, 2 already complete" in run_ok(tar, "-o", out, *LOUD).stdout
    assert run("verify", out).exit_code == 0
    save_rgb(tmp_path / "new.png", 24, 40, seed=9)
    # b's member replaced; a's the same bytes with the same header, at another offset
    make_tar(tar, {"b.png": (tmp_path / "new.png").read_bytes(), "a.png": px["a.png"]}, {"b.png": 1})
    result = run_ok(tar, "-o", out, *LOUD)
    assert f"recomputing {tar}#b.png: input changed: " in result.stderr and "1 written" in result.stdout
    assert run("verify", out).exit_code == 0


def test_an_object_replaced_behind_a_url_is_recomputed(boxed_images, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    folder, _ = boxed_images
    fs = fsspec.filesystem("memory")
    try:
        for name in ("a.png", "b.png"):
            fs.pipe_file(f"/fmt-trust/{name}", (folder / name).read_bytes())
        args = ["memory://fmt-trust", "-o", tmp_path / "out", *LOUD, *SHARDS]
        run_ok(*args)
        assert "0 written, 2 already complete" in run_ok(*args).stdout
        fs.pipe_file("/fmt-trust/b.png", (folder / "c.png").read_bytes())
        result = run_ok(*args)
        assert "recomputing memory:///fmt-trust/b.png: input changed: " in result.stderr
        assert [line["key"] for line in index_lines(tmp_path / "out")] == ["a", "b"]
        assert index_lines(tmp_path / "out")[1]["record"]["input"] == "memory:///fmt-trust/b.png"
    finally:
        fs.rm("/fmt-trust", recursive=True)


def test_an_unsafe_member_fails_in_a_shard_run_too(boxed_images, tmp_path):
    folder, _ = boxed_images
    tar = make_tar(tmp_path / "x.tar", {"a.png": (folder / "a.png").read_bytes(), "../up.png": b"x"})
    result = run(tar, "-o", tmp_path / "out", *SEED, *SHARDS)
    assert result.exit_code == 1 and "x.tar#../up.png: unsafe name" in result.output
    assert {e["path"]: e["status"] for e in report_of(tmp_path / "out")["images"]} == {
        "a.png": "ok",
        "../up.png": "failed",
    }
    assert [line["key"] for line in index_lines(tmp_path / "out")] == ["a"]
    with tarfile.open(tmp_path / "out" / "shards" / "000000.tar") as shard:
        assert [name for name in shard.getnames() if ".." in name] == []


def test_reading_a_member_of_a_cut_shard_names_the_shard(boxed_images, tmp_path):
    from fpn_cli import FPNError

    folder, _ = boxed_images
    out = tmp_path / "out"
    run_ok(folder, "-o", out, *SEED, *SHARDS)
    line = {line["key"]: line for line in index_lines(out)}["b"]
    with open(out / "shards" / line["shard"], "r+b") as tar:
        tar.truncate(line["members"]["p5.npy"]["offset"])
    with pytest.raises(FPNError, match=f"{line['shard']} is cut short or damaged"):
        open_features(out)["b"]["p5"]
