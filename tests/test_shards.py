"""Scale-out: --shard job arrays and torchrun produce exactly what one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpn_cli.inputs.keys import shard_of
from fpn_cli.run.distributed import Launch, combine, is_rank_zero, torchrun_launch

from conftest import FPN_EXTRACT, SEED, npy_files, report_of, run
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
