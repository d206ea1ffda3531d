"""--format shards against the npy layout: the same arrays, WebDataset reads them as they are, each
level memory-maps out of its tar, resume is exact (kill -9 mid-shard), readers for both formats."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpn_cli import FeatureDataset, open_features
from fpn_cli.formats.shards import ShardStore, key_of, member_stem
from fpn_cli.formats.tario import TarWriter

from conftest import SEED, assert_same_arrays, forked, index_lines, report_of, run
from imagefactory import save_rgb

SHARD_SIZE = 200_000  # bytes: about 85 kB of float32 P2-P5 per 32x32 image, so three to a shard
# keys that WebDataset's rules would break, unescaped: dots in the base name, a first folder it
# skips as metadata, %, spaces, non-ASCII, a name past tar's 100 bytes, a leading dot
NAMES = [
    "plain.png",
    "x/img.2024.01.png",
    "__meta__/a.png",
    "100% pure.png",
    "ünï/çödé.png",
    "long/" + "n" * 120 + ".png",
    ".hidden.png",
]
KEYS = sorted(os.path.splitext(name)[0] for name in NAMES)


@dataclass
class Pair:
    inputs: Path
    npy: Path
    shards: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    """The same images extracted once in each format."""
    root = tmp_path_factory.mktemp("pair")
    for i, name in enumerate(NAMES):
        save_rgb(root / "in" / name, 32, 32, seed=i)
    pair = Pair(root / "in", root / "npy", root / "shards")
    assert run(pair.inputs, "-o", pair.npy, *SEED).exit_code == 0
    result = run(pair.inputs, "-o", pair.shards, "--format", "shards", "--shard-size", SHARD_SIZE, *SEED)
    assert result.exit_code == 0, result.output
    return pair


def tars(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("*.tar"))


def test_shards_hold_exactly_the_npy_layouts_files(pair):
    """Each member is byte for byte the .npy file of the npy layout; the readers agree."""
    assert list(open_features(pair.npy)) == KEYS
    assert_same_arrays(pair.npy, pair.shards)
    for line in index_lines(pair.shards):
        with open(pair.shards / "shards" / line["shard"], "rb") as f:
            for level in ("p2", "p3", "p4", "p5"):
                member = line["members"][f"{level}.npy"]
                f.seek(member["offset"])
                assert f.read(member["size"]) == (pair.npy / line["key"] / f"{level}.npy").read_bytes()
    npy_report, shard_report = report_of(pair.npy), report_of(pair.shards)
    assert [e["path"] for e in shard_report["images"]] == [e["path"] for e in npy_report["images"]]
    entry = next(e for e in shard_report["images"] if e["path"] == "x/img.2024.01.png")
    p3 = entry["levels"]["p3"]
    assert p3["file"].startswith("shards/") and p3["member"] == "x/img%2E2024%2E01.p3.npy"


def test_webdataset_reads_the_shards_as_they_are(pair):
    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset([str(t) for t in tars(pair.shards)], shardshuffle=False).decode())
    keys = [unquote(s["__key__"]) for s in samples]
    assert sorted(keys) == KEYS  # every image once, no member lost to the key rule
    npy = open_features(pair.npy)
    for key, sample in zip(keys, samples, strict=True):
        assert sample["json"]["path"] == NAMES[[os.path.splitext(n)[0] for n in NAMES].index(key)]
        for level in ("p2", "p3", "p4", "p5"):
            assert np.array_equal(sample[f"{level}.npy"], npy[key][level])


def test_a_level_memory_maps_straight_out_of_its_tar(pair):
    lines = index_lines(pair.shards)
    assert json.loads((pair.shards / "shards" / "index.jsonl").read_text().splitlines()[0])["images"] == 7
    assert [line["key"] for line in lines] == KEYS  # sorted: readers bisect it
    for line in lines:
        tar = pair.shards / "shards" / line["shard"]
        for suffix, member in line["members"].items():
            assert member["offset"] % 512 == 0
            if suffix.endswith(".npy"):
                assert member["data"] % 64 == 0
                mapped = np.memmap(tar, member["dtype"], "r", member["data"], tuple(member["shape"]))
                with open(tar, "rb") as f:
                    f.seek(member["offset"])
                    assert np.array_equal(mapped, np.load(f))
    p2 = open_features(pair.shards)[KEYS[0]]["p2"]
    assert not p2.flags.owndata and not p2.flags.writeable  # a view of the mapped tar


def test_an_image_never_straddles_shards_and_a_shard_closes_at_shard_size(pair):
    shards = tars(pair.shards)
    assert len(shards) == 3
    seen: list[str] = []
    for tar in shards:
        assert tar.stat().st_size >= SHARD_SIZE or tar == shards[-1]
        with tarfile.open(tar) as archive:
            stems = {name.rsplit("/", 1)[-1].split(".", 1)[0] for name in archive.getnames()}
            seen += [name.split(".", 1)[0] for name in archive.getnames() if name.endswith(".json")]
        assert len(stems) * 5 == len(tarfile.open(tar).getnames())  # four levels and a json each
    assert sorted(key_of(stem) for stem in seen) == KEYS


def test_several_writer_threads_each_fill_shards_of_their_own(pair, tmp_path):
    """--writers 3: the same arrays as one writer; each image once, whole, in one tar; every tar a
    valid archive that WebDataset reads; then a rerun keeps them all."""
    out = tmp_path / "out"
    args = ["--format", "shards", "--shard-size", SHARD_SIZE, *SEED]
    result = run(pair.inputs, "-o", out, *args, "--writers", "3")
    assert result.exit_code == 0, result.output
    assert_same_arrays(pair.shards, out)
    lines = index_lines(out)
    assert [line["key"] for line in lines] == KEYS
    groups = {}
    for tar in tars(out):
        with tarfile.open(tar) as archive:
            names = archive.getnames()
        stems = [name.rsplit(".", 2)[0] if name.endswith(".npy") else name[: -len(".json")] for name in names]
        runs = [stem for i, stem in enumerate(stems) if i == 0 or stems[i - 1] != stem]
        assert len(runs) == len(set(runs)), tar  # each image's members together
        groups.update(dict.fromkeys(runs, tar.name))
    assert sorted(map(key_of, groups)) == KEYS
    assert {line["key"]: line["shard"] for line in lines} == {key_of(s): t for s, t in groups.items()}
    before = {t.name: t.read_bytes() for t in tars(out)}
    again = run(pair.inputs, "-o", out, *args, "--writers", "3")
    assert again.exit_code == 0 and report_of(out)["counts"]["skipped"] == 7
    assert {t.name: t.read_bytes() for t in tars(out)} == before


def test_a_rerun_keeps_every_complete_shard_and_rebuilds_a_lost_index_part(pair, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pair.shards, out)
    before = {t.name: t.read_bytes() for t in tars(out)}
    part = out / "shards" / ".index" / "000001.jsonl"
    lost = part.read_text()
    part.unlink()
    result = run(pair.inputs, "-o", out, "--format", "shards", "--shard-size", SHARD_SIZE, "--arch", "seed")
    assert result.exit_code == 0, result.output
    assert "0 written, 7 already complete" in result.output
    assert {t.name: t.read_bytes() for t in tars(out)} == before
    assert part.read_text() == lost  # scanned back out of its tar
    entries = report_of(out)["images"]
    assert {e["status"] for e in entries} == {"skipped"}
    assert entries[0]["input_size"] == [32, 32] and entries[0]["levels"]["p5"]["file"].startswith("shards/")


def test_overwrite_replaces_the_shards_and_keeps_each_image_once(pair, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pair.shards, out)
    args = [pair.inputs, "-o", out, "--format", "shards", "--shard-size", 10**9, *SEED]
    part = run(*args, "--overwrite", "--shard", "0/2")  # a job-array part cannot tell whose images
    assert part.exit_code == 2 and "holds shards of another --shard layout (000000.tar)" in part.output
    assert len(tars(out)) == 3 and not list(out.glob(".overwrite*"))
    assert run(*args, "--overwrite").exit_code == 0
    assert [t.name for t in tars(out)] == ["000000.tar"]
    assert [line["key"] for line in index_lines(out)] == KEYS
    assert_same_arrays(pair.npy, out)


def test_other_levels_in_a_shard_folder_are_other_settings(pair, tmp_path):
    """A complete shard cannot gain a level, so levels are part of a shard folder's settings."""
    out = tmp_path / "out"
    shutil.copytree(pair.shards, out)
    result = run(pair.inputs, "-o", out, "--format", "shards", "--levels", "p3", *SEED)
    assert result.exit_code == 2 and "other settings" in result.output and "levels" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preview", "--format", "shards"], "--preview draws PNG files into the npy layout"),
        (["-o", "memory://x"], "a URL needs --format shards"),
        (["--shard-size", "lots"], "is not a size"),
    ],
)
def test_format_usage_errors(pair, tmp_path, args, message):
    result = run(pair.inputs, "-o", tmp_path / "out", *args, *SEED)
    assert result.exit_code == 2 and message in result.output


def test_job_array_parts_write_their_own_shards_and_one_merged_index(pair, tmp_path):
    out = tmp_path / "out"
    for index in (0, 1):
        assert not (out / "shards" / "index.jsonl").exists()  # half the job is no index
        result = run(pair.inputs, "-o", out, "--format", "shards", "--shard", f"{index}/2", *SEED)
        assert result.exit_code == 0, result.output
        if index == 0:  # a reader meanwhile sees what the complete shards hold
            done = json.loads((out / ".shards" / "report-0-of-2.json").read_text())["images"]
            assert 0 < len(done) < 7
            assert list(open_features(out)) == sorted(os.path.splitext(e["path"])[0] for e in done)
    assert {t.name.split("-0")[0] for t in tars(out)} == {"0-of-2", "1-of-2"}
    assert report_of(out)["counts"]["ok"] == 7
    assert_same_arrays(pair.npy, out)


def test_feature_dataset_in_dataloader_workers(pair):
    from torch.utils.data import DataLoader

    dataset = FeatureDataset(pair.shards, levels=["p3", "p5"])
    pickle.dumps(dataset)  # what a spawned worker receives
    npy = open_features(pair.npy)
    got = {batch["key"][0]: batch for batch in DataLoader(dataset, batch_size=1, num_workers=2)}
    assert sorted(got) == KEYS
    for key, batch in got.items():
        assert set(batch) == {"key", "p3", "p5"}
        assert np.array_equal(batch["p3"][0].numpy(), npy[key]["p3"])
    assert set(FeatureDataset(pair.npy)[0]) == {"key", "p2", "p3", "p4", "p5"}
    with pytest.raises(KeyError, match="stores no p9"):  # at once, not in a worker later
        FeatureDataset(pair.shards, levels=["p3", "p9"])


def test_every_array_stored_with_an_image_comes_back(tmp_path):
    """Readers return all of an image's arrays: region features (rois) and pooled vectors too."""
    arrays = {
        "p3": np.ones((256, 4, 4), np.float32),
        "rois": np.arange(2 * 256 * 7 * 7, dtype=np.float32).reshape(2, 256, 7, 7),
        "pool_avg_p3": np.full(256, 0.5, np.float32),
    }
    store = ShardStore(tmp_path / "shards", ["p3"], "float32")
    with store.lock():
        store.record_settings({"format": "shards"}, overwrite=False)
        store.write_levels("a", arrays)
        store.finish_image("a", None, {"path": "a.png"})
        store.flush()
    (tmp_path / "npy" / "a").mkdir(parents=True)
    (tmp_path / "npy" / ".fpn-extract.json").write_text("{}")
    (tmp_path / "npy" / "report.json").write_text(
        '{\n  "images": [\n    {"path": "a.png", "status": "ok"}\n  ]\n}\n'
    )
    for name, array in arrays.items():
        np.save(tmp_path / "npy" / "a" / f"{name}.npy", array)
    for out in ("shards", "npy"):
        feats = open_features(tmp_path / out)
        assert feats["a"].keys() == arrays.keys()
        for name, array in arrays.items():
            assert np.array_equal(feats["a"][name], array)
        assert feats.read("a", ["rois"]).keys() == {"rois"}
        assert feats.entry("a")["path"] == "a.png"


KEY_TEXT = st.text(st.sampled_from("ab.%_ -é#~:"), min_size=1, max_size=8).filter(
    lambda t: t not in (".", "..")
)


@given(st.lists(KEY_TEXT, min_size=1, max_size=3).map("/".join))
def test_member_stems_keep_every_key_through_webdatasets_rules(key):
    tariterators = pytest.importorskip("webdataset.tariterators")
    stem = member_stem(key)
    assert tariterators.base_plus_ext(f"{stem}.p2.npy") == (stem, "p2.npy")
    assert tariterators.base_plus_ext(f"{stem}.json") == (stem, "json")
    assert not re.match(r"__[^/]*__($|/)", f"{stem}.p2.npy")  # WebDataset skips such names as metadata
    assert key_of(stem) == key


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_tar_writer_writes_what_tarfile_writes_and_rolls_back(tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    big = np.random.default_rng(0).random((40, 30, 256), np.float32).transpose(2, 0, 1)  # channels-last
    members = [("a.p2.npy", big), ("a.json", b'{"path": "a.png"}'), ("ü/" + "n" * 150 + ".p3.npy", big[:3])]
    writer = TarWriter(tmp_path / "ours.tar")
    for name, data in members[:2]:
        writer.add_array(name, data) if isinstance(data, np.ndarray) else writer.add_bytes(name, data)
    kept = writer.position
    writer.add_array("b.p2.npy", big * 2)  # an image cut short: rolled back past what was written
    writer.rollback(kept)
    writer.add_array(*members[2])
    writer.close()
    with tarfile.open(tmp_path / "reference.tar", "w", format=tarfile.PAX_FORMAT) as reference:
        for name, data in members:
            if isinstance(data, np.ndarray):
                buffer = io.BytesIO()
                np.save(buffer, data)
                data = buffer.getvalue()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uname, info.gname = len(data), 0o644, "", ""
            reference.addfile(info, io.BytesIO(data))
    ours, reference = (tmp_path / "ours.tar").read_bytes(), (tmp_path / "reference.tar").read_bytes()
    assert ours == reference[: len(ours)] and not reference[len(ours) :].strip(
        b"\0"
    )  # but its record padding


def test_summary_totals_are_the_files_a_run_writes(pair):
    result = run("--summary", pair.inputs, "--arch", "seed", "--shard-size", SHARD_SIZE)
    assert result.exit_code == 0, result.output
    assert "dataset: 7 images (1 size)" in result.output
    rows = {tuple(line.split()[:2]): line.split()[2:5] for line in result.output.splitlines()}
    value, unit, files = rows["npy", "float32"]
    npy_bytes = sum(p.stat().st_size for p in pair.npy.rglob("*.npy"))
    assert f"{value} {unit}" == f"{npy_bytes / 1e3:.1f} kB"  # exact: headers and all
    written = [p for p in pair.npy.rglob("*") if p.is_file()]  # arrays, records, report, settings, lock
    assert int(files) == len(written) == len(list(pair.npy.rglob("*.npy"))) + 7 + 3
    value, unit, files = rows["shards", "float32"]
    tar_bytes = sum(t.stat().st_size for t in tars(pair.shards))
    assert abs(float(value) * 1e3 - tar_bytes) / tar_bytes < 0.05
    assert int(files) == 2 * len(tars(pair.shards)) + 2
    assert rows["npy", "float16"][:2] != rows["npy", "float32"][:2]


def test_summary_totals_count_what_pool_and_no_maps_store(pair, tmp_path):
    args = ["--arch", "seed", "--pool", "avg,max", "--no-maps"]
    result = run("--summary", pair.inputs, *args)
    assert result.exit_code == 0, result.output
    rows = {tuple(line.split()[:2]): line.split()[2:5] for line in result.output.splitlines()}
    out = tmp_path / "out"
    assert run(pair.inputs, "-o", out, *args, "--device", "cpu", "-q").exit_code == 0
    value, unit, files = rows["npy", "float32"]
    arrays = list(out.rglob("*.npy"))
    assert len(arrays) == 7 * 8  # two vectors per level, no levels
    assert f"{value} {unit}" == f"{sum(p.stat().st_size for p in arrays) / 1e3:.1f} kB"
    assert int(files) == len([p for p in out.rglob("*") if p.is_file()])


def test_sigkill_mid_shard_then_rerun_is_byte_identical_to_a_clean_run(tmp_path):
    for i in range(12):
        save_rgb(tmp_path / "in" / f"im{i:02d}.png", 64, 64, seed=i)
    args = ["--format", "shards", "--shard-size", 650_000, *SEED]  # two 64x64 images a shard
    assert run(tmp_path / "in", "-o", tmp_path / "clean", *args).exit_code == 0
    assert len(tars(tmp_path / "clean")) == 6
    out = tmp_path / "out"
    proc = forked(tmp_path / "in", "-o", out, *args)
    deadline = time.monotonic() + 60
    while not (tars(out) and list((out / "shards").glob(".*.tmp"))):  # a shard done, the next begun
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= len(tars(out)) < 6
    rerun = run(tmp_path / "in", "-o", out, *args)
    assert rerun.exit_code == 0, rerun.output
    assert {t.name: t.read_bytes() for t in tars(out)} == {
        t.name: t.read_bytes() for t in tars(tmp_path / "clean")
    }
    assert index_lines(out) == index_lines(tmp_path / "clean")
    assert [p.name for p in out.rglob("*.tmp")] == []
    counts = report_of(out)["counts"]
    assert counts["ok"] + counts["skipped"] == 12 and counts["skipped"] >= 2


def test_sigkill_with_several_shard_writers_then_rerun_lists_every_image_once(tmp_path):
    """--writers 3, killed while shards of several threads are open: the rerun recomputes the
    images of every unfinished shard, and the folder then holds the clean run's arrays, each
    image once in the index, in shards that may group them differently."""
    for i in range(12):
        save_rgb(tmp_path / "in" / f"im{i:02d}.png", 64, 64, seed=i)
    shards = ["--format", "shards", "--shard-size", 650_000, *SEED]
    assert run(tmp_path / "in", "-o", tmp_path / "clean", *shards, "--writers", "1").exit_code == 0
    args = [*shards, "--writers", "3"]
    out = tmp_path / "out"
    proc = forked(tmp_path / "in", "-o", out, *args)
    deadline = time.monotonic() + 60
    while not (tars(out) and list((out / "shards").glob(".*.tmp"))):  # a shard done, others begun
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = run(tmp_path / "in", "-o", out, *args)
    assert rerun.exit_code == 0, rerun.output
    assert_same_arrays(tmp_path / "clean", out)
    keys = [line["key"] for line in index_lines(out)]
    assert keys == [f"im{i:02d}" for i in range(12)]
    assert [p.name for p in out.rglob("*.tmp")] == []
    counts = report_of(out)["counts"]
    assert counts["ok"] + counts["skipped"] == 12 and counts["failed"] == 0


def test_a_write_error_mid_shard_keeps_the_whole_images_before_it(tmp_path):
    """RLIMIT_FSIZE refuses writes past 100 kB (EFBIG), as a full disk refuses them: the image that
    hit it fails, the shard closes with the image before it, and a rerun completes the job."""
    for i in range(3):
        save_rgb(tmp_path / "in" / f"im{i}.png", 32, 32, seed=i)
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    failed = forked(tmp_path / "in", "-o", out, "--format", "shards", *SEED, preexec_fn=limit)
    _, stderr = failed.communicate(timeout=300)
    assert failed.returncode == 1
    assert "cannot write" in stderr and "File too large" in stderr
    assert "Traceback" not in stderr
    assert report_of(out)["counts"] == {"ok": 1, "skipped": 0, "failed": 1}
    assert list(open_features(out)) == ["im0"]
    assert run(tmp_path / "in", "-o", out, "--format", "shards", *SEED).exit_code == 0
    assert list(open_features(out)) == ["im0", "im1", "im2"]


def test_overwrite_into_the_other_format_removes_the_old_formats_files(pair, tmp_path):
    """--overwrite with another --format: the old layout's files go (readers globbing the old
    shards or image folders would find stale features), and nothing else in OUT is touched."""
    npy = tmp_path / "npy"
    shutil.copytree(pair.npy, npy)
    (npy / "notes.txt").write_text("mine")
    result = run(pair.inputs, "-o", npy, "--format", "shards", "--overwrite", *SEED)
    assert result.exit_code == 0, result.output
    assert list(npy.rglob("*.npy")) == [] and (npy / "notes.txt").read_text() == "mine"
    left = sorted(p.name for p in npy.iterdir())
    assert left == [".fpn-extract.json", ".lock", "notes.txt", "report.json", "shards"]
    shards = tmp_path / "shards"
    shutil.copytree(pair.shards, shards)
    result = run(pair.inputs, "-o", shards, "--overwrite", *SEED)
    assert result.exit_code == 0, result.output
    assert not (shards / "shards").exists()
    assert_same_arrays(pair.npy, shards)


def test_a_chunked_array_is_streamed_into_a_tar_member_never_whole(tmp_path):
    """A ChunkedArray (the RoI features of many boxes) goes into a shard a block of rows at a time,
    each block in pieces: the writer's buffer keeps its first size (1 MiB), smaller than a block,
    the member is np.save's bytes, and its checksum is the bytes' own."""
    from fpn_cli.formats.npyio import ChunkedArray, checksum

    whole = np.arange(24 * 64 * 1024, dtype=np.float32).reshape(24, 64, 1024)  # 6 MiB
    rows = ChunkedArray(whole.shape, whole.dtype, lambda a, b: whole[a:b], rows_per_chunk=12)  # 3 MiB each
    writer = TarWriter(tmp_path / "s.tar")
    writer.add_bytes("k.json", b"{}")
    member = writer.add_array("k.rois.npy", rows)
    writer.close()
    assert len(writer._buffer) == 1 << 20  # never grown: no block of rows is copied whole
    with tarfile.open(tmp_path / "s.tar") as tar:
        data = tar.extractfile("k.rois.npy").read()
        offset = tar.getmember("k.rois.npy").offset_data
    expected = io.BytesIO()
    np.save(expected, whole)
    assert data == expected.getvalue()
    assert member.checksum == checksum(memoryview(whole).cast("B"))
    assert (member.offset, member.size) == (offset, len(data))
