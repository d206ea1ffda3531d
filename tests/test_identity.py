"""Features checked by identity and content: each array's checksum recorded with its image, tar
members named where the index puts them, stray shard copies, foreign tar members, and output
files that are not regular files (docs/guarantees.md)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from fpn_cli import FeatureDataset, open_features
from fpn_cli.errors import FPNError
from fpn_cli.formats import npyio
from fpn_cli.formats.shards import Folder, scan_shard

from conftest import SEED, index_lines, report_of, run
from imagefactory import save_rgb

SHARDS = ["--format", "shards", "--shard-size", 1]  # one image a shard
LOUD = ["--arch", "seed", "--device", "cpu"]
KEYS = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Four images of one size, extracted once in each format."""
    root = tmp_path_factory.mktemp("made")
    for i, key in enumerate(KEYS):
        save_rgb(root / "in" / f"{key}.png", 24, 32, seed=i)
    assert run(root / "in", "-o", root / "npy", *SEED).exit_code == 0
    assert run(root / "in", "-o", root / "shards", *SEED, *SHARDS).exit_code == 0
    return root


@pytest.fixture
def folders(made, tmp_path) -> tuple[Path, Path, Path]:
    """Copies of the inputs and of both output folders (copytree keeps modification times)."""
    for name in ("in", "npy", "shards"):
        shutil.copytree(made / name, tmp_path / name)
    return tmp_path / "in", tmp_path / "npy", tmp_path / "shards"


def crc(array: np.ndarray) -> str:
    return f"crc32:{zlib.crc32(np.ascontiguousarray(array).tobytes()):08x}"


def by_key(out: Path) -> dict[str, dict]:
    return {line["key"]: line for line in index_lines(out)}


def arrays(out: Path) -> dict[str, dict[str, np.ndarray]]:
    feats = open_features(out)
    return {key: {name: np.array(a) for name, a in feats[key].items()} for key in feats}


def flip_a_float(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        value = f.read(4)
        f.seek(at)
        f.write(bytes(b ^ 0x40 for b in value))


def test_every_array_is_recorded_with_the_checksum_of_its_bytes(folders):
    _, npy, shards = folders
    for key in KEYS:
        sums = json.loads((npy / key / "input.json").read_text())["checksums"]
        assert sums == {level: crc(np.load(npy / key / f"{level}.npy")) for level in ("p2", "p3", "p4", "p5")}
    raw = open_features(shards, dtype=None)
    for key, line in by_key(shards).items():
        assert {s: m["checksum"] for s, m in line["members"].items() if s != "json"} == {
            f"{name}.npy": crc(array) for name, array in raw[key].items()
        }


def test_one_float_edited_in_an_npy_file_fails_verify_and_is_recomputed(folders):
    src, npy, _ = folders
    before = (npy / "a" / "p3.npy").read_bytes()
    flip_a_float(npy / "a" / "p3.npy", 200)
    result = run("verify", npy)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "a.png: a/p3.npy does not hold the array recorded for it (its checksum differs)"
    ]
    rerun = run(src, "-o", npy, *LOUD)
    assert rerun.exit_code == 0, rerun.output
    assert f"recomputing {src / 'a.png'}: p3.npy does not hold the array recorded for it" in rerun.output
    assert report_of(npy)["counts"] == {"ok": 1, "skipped": 3, "failed": 0}
    assert (npy / "a" / "p3.npy").read_bytes() == before
    assert run("verify", npy).exit_code == 0


def test_two_npy_files_swapped_between_images_fail_verify_and_are_recomputed(folders):
    src, npy, _ = folders
    before = {key: (npy / key / "p4.npy").read_bytes() for key in ("b", "c")}
    os.replace(npy / "b" / "p4.npy", npy / "tmp")
    os.replace(npy / "c" / "p4.npy", npy / "b" / "p4.npy")
    os.replace(npy / "tmp", npy / "c" / "p4.npy")
    result = run("verify", npy)
    assert result.exit_code == 1
    assert sorted(result.stdout.splitlines()) == [
        f"{key}.png: {key}/p4.npy does not hold the array recorded for it (its checksum differs)"
        for key in ("b", "c")
    ]
    assert run(src, "-o", npy, *SEED).exit_code == 0
    assert report_of(npy)["counts"] == {"ok": 2, "skipped": 2, "failed": 0}
    assert {key: (npy / key / "p4.npy").read_bytes() for key in ("b", "c")} == before


def test_two_shard_tars_swapped_are_refused_by_readers_verify_and_resume(folders):
    src, _, shards = folders
    expected = arrays(shards)
    lines = by_key(shards)
    first, second = (shards / "shards" / lines[key]["shard"] for key in ("a", "b"))
    assert first.stat().st_size == second.stat().st_size  # equal-size tars: every offset lines up
    os.replace(first, shards / "tmp")
    os.replace(second, first)
    os.replace(shards / "tmp", second)
    feats = open_features(shards)
    with pytest.raises(FPNError, match=rf"shards/{first.name} does not hold a\.p2\.npy where the index"):
        feats["a"]["p2"]
    np.testing.assert_array_equal(feats["c"]["p2"], expected["c"]["p2"])  # the others read as before
    result = run("verify", shards)
    assert result.exit_code == 1
    assert sorted(result.stdout.splitlines()) == [
        f"{key}.png: shards/{tar.name} holds another member where the index puts {key}.{level}.npy"
        for key, tar in (("a", first), ("b", second))
        for level in ("p2", "p3", "p4", "p5")
    ]
    rerun = run(src, "-o", shards, *LOUD, *SHARDS)
    assert rerun.exit_code == 0, rerun.output
    assert report_of(shards)["counts"] == {"ok": 2, "skipped": 2, "failed": 0}
    after = arrays(shards)
    for key in KEYS:
        for name in expected[key]:
            np.testing.assert_array_equal(after[key][name], expected[key][name])
    assert run("verify", shards).exit_code == 0


def test_one_float_edited_inside_a_shard_fails_verify_and_is_recomputed(folders):
    src, _, shards = folders
    expected = arrays(shards)
    line = by_key(shards)["c"]
    flip_a_float(shards / "shards" / line["shard"], line["members"]["p2.npy"]["data"] + 64)
    result = run("verify", shards)
    assert result.exit_code == 1
    shown = f"shards/{line['shard']}:c.p2.npy"
    assert result.stdout.splitlines() == [
        f"c.png: {shown} does not hold the array recorded for it (its checksum differs)"
    ]
    rerun = run(src, "-o", shards, *LOUD, *SHARDS)
    assert rerun.exit_code == 0
    assert f"recomputing {src / 'c.png'}: p2.npy does not hold the array recorded for it" in rerun.output
    np.testing.assert_array_equal(open_features(shards)["c"]["p2"], expected["c"]["p2"])
    assert run("verify", shards).exit_code == 0


def test_a_stray_copy_of_a_shard_stops_the_run_naming_both_tars_and_keeps_the_report(folders):
    src, _, shards = folders
    report = (shards / "report.json").read_bytes()
    held = by_key(shards)["b"]["shard"]
    shutil.copy2(shards / "shards" / held, shards / "shards" / "000009.tar")
    result = run(src, "-o", shards, *SEED, *SHARDS)
    assert result.exit_code == 1
    assert f"image 'b' is in 2 shards of {shards / 'shards'} ({held}, 000009.tar)" in result.output
    assert "Move the copy" in result.output and "Traceback" not in result.output
    assert (shards / "report.json").read_bytes() == report
    checked = run("verify", shards)
    assert checked.exit_code == 1
    assert checked.stdout.startswith(f"image 'b' is in 2 shards of shards ({held}, 000009.tar)")
    (shards / "shards" / "000009.tar").unlink()
    (shards / "shards" / ".index" / "000009.jsonl").unlink()
    again = run(src, "-o", shards, *SEED, *SHARDS)
    assert again.exit_code == 0 and report_of(shards)["counts"]["skipped"] == 4


def test_an_index_rebuild_skips_and_names_members_no_run_writes(folders):
    src, _, shards = folders
    line = by_key(shards)["a"]
    tar_path = shards / "shards" / line["shard"]
    foreign = {"../../x.p2.npy": io.BytesIO(), "../../x.json": b'{"path": "../../x.png"}', "a.p2.npy": None}
    np.save(foreign["../../x.p2.npy"], np.ones((256, 6, 8), np.float32))
    with tarfile.open(tar_path, "a") as tar:
        for name, data in foreign.items():
            if data is None:  # a second member of a name the image has: appended after it
                data = io.BytesIO()
                np.save(data, np.zeros((256, 6, 8), np.float32))
            raw = data.getvalue() if isinstance(data, io.BytesIO) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    (shards / "shards" / ".index" / line["shard"].replace(".tar", ".jsonl")).unlink()
    (shards / "shards" / "index.jsonl").unlink()
    result = run(src, "-o", shards, *SEED, *SHARDS)
    assert result.exit_code == 0, result.output
    where = shards / "shards" / line["shard"]
    for name in ("../../x.p2.npy", "../../x.json"):
        assert f"warning: {where}: skipped member {name!r}: not a member fpn-extract writes" in result.output
    assert f"warning: {where}: skipped member 'a.p2.npy': a second member of that name" in result.output
    assert sorted(by_key(shards)) == list(KEYS)
    assert report_of(shards)["counts"]["skipped"] == 4
    assert len(FeatureDataset(shards)) == 4
    assert float(np.abs(open_features(shards)["a"]["p2"]).sum()) > 0  # the image's own, not the zeros
    assert run("verify", shards).exit_code == 0


@pytest.mark.parametrize("form", ["pax", "gnu"])
def test_shards_repacked_by_another_tool_with_long_names_are_kept_and_verified(tmp_path, form):
    """Member names past ustar's 100 bytes, the tars rewritten as other tools write them (PAX
    records beyond the path, or GNU's ././@LongLink) and the index rebuilt from them: every array
    is still the image's own to verify, a resume and the readers."""
    deep = "d" * 70
    for i, name in enumerate(("e" * 40, "f" * 45)):
        save_rgb(tmp_path / "in" / deep / f"{name}.png", 24, 32, seed=i)
    out = tmp_path / "out"
    assert run(tmp_path / "in", "-o", out, *SEED, *SHARDS).exit_code == 0
    before = arrays(out)
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as old:
            members = [(info, old.extractfile(info).read()) for info in old.getmembers()]
        assert max(len(info.name) for info, _ in members) > 100
        with tarfile.open(
            tar_path, "w", format=tarfile.PAX_FORMAT if form == "pax" else tarfile.GNU_FORMAT
        ) as new:
            for info, data in members:
                copy = tarfile.TarInfo(info.name)
                copy.size, copy.mtime = len(data), 1_700_000_000
                if form == "pax":  # more records than fpn-extract writes: a longer header than its own
                    copy.pax_headers = {"comment": "repacked " * 80, "mtime": "1700000000.25"}
                new.addfile(copy, io.BytesIO(data))
    for part in (out / "shards" / ".index").glob("*.jsonl"):
        part.unlink()
    (out / "shards" / "index.jsonl").unlink()
    rerun = run(tmp_path / "in", "-o", out, *SEED, *SHARDS)
    assert rerun.exit_code == 0, rerun.output
    assert report_of(out)["counts"] == {"ok": 0, "skipped": 2, "failed": 0}  # kept, not recomputed
    checked = run("verify", out)
    assert checked.exit_code == 0, checked.output
    after = arrays(out)
    assert sorted(after) == sorted(before)
    for key in before:
        assert all(np.array_equal(after[key][n], before[key][n]) for n in before[key])


@pytest.mark.parametrize("fmt", ["npy", "shards"])
def test_a_record_that_lost_its_input_is_recomputed_and_the_folder_then_verifies(folders, fmt):
    """A record whose ``input`` is damaged (one flipped byte: ``hnput``), in the image's input.json
    or in the shard index part that a resume merges: the resume recomputes that image and writes
    its record anew; verify then passes (it had kept the image, and verify then failed it)."""
    src, npy, shards = folders
    out = {"npy": npy, "shards": shards}[fmt]
    record = out / "b" / "input.json" if fmt == "npy" else out / "shards" / ".index" / "000001.jsonl"
    text = record.read_text()
    assert text.count('"input":') == 1
    record.write_text(text.replace('"input":', '"hnput":'))
    resumed = run(src, "-o", out, *LOUD, *(SHARDS if fmt == "shards" else []))
    assert resumed.exit_code == 0, resumed.output
    assert report_of(out)["counts"] == {"ok": 1, "skipped": 3, "failed": 0}
    assert "note: recomputing 1 images whose features carry no fingerprint of their input" in resumed.output
    checked = run("verify", out)
    assert checked.exit_code == 0, checked.output


def test_a_shard_index_line_whose_record_was_edited_is_not_trusted(folders):
    """One byte of a record's input path flipped in the index part that a resume merges
    (``"/tmp..."`` to ``".tmp..."``): the record no longer matches its ``record_checksum``, so the
    resume recomputes the image and verify then passes; the json member's record is the same
    and checksummed, so an index rebuilt from the tar has it right."""
    src, _, shards = folders
    part = shards / "shards" / ".index" / "000001.jsonl"
    line = json.loads(part.read_text())
    assert line["record_checksum"].startswith("crc32:")
    part.write_text(part.read_text().replace('"input": "/', '"input": ".', 1))
    resumed = run(src, "-o", shards, *LOUD, *SHARDS)
    assert resumed.exit_code == 0, resumed.output
    assert report_of(shards)["counts"] == {"ok": 1, "skipped": 3, "failed": 0}
    assert run("verify", shards).exit_code == 0
    rebuilt = scan_shard(Folder(shards), by_key(shards)["b"]["shard"])
    assert rebuilt[0]["record"] == by_key(shards)["b"]["record"]
    assert rebuilt[0]["record_checksum"] == by_key(shards)["b"]["record_checksum"]


def test_a_level_whose_header_is_cut_inside_a_bracket_is_recomputed_not_a_crash(folders):
    """numpy's header parser raises tokenize.TokenError (not a ValueError) for a header dict cut
    inside its brackets (a swapped or edited file): verify reports it and a resume recomputes it,
    each in one line, never a traceback; npyio.read_header and npyio.load say ValueError."""
    src, npy, _ = folders
    path = npy / "b" / "p2.npy"
    data = bytearray(path.read_bytes())
    header_end = data.index(b"\n") + 1
    broken = b"{'descr': '<f4', 'fortran_order': False, 'shape': (256, "
    data[10 : header_end - 1] = broken.ljust(header_end - 11, b" ")  # same length, cut inside "("
    path.write_bytes(bytes(data))
    with open(path, "rb") as f, pytest.raises(ValueError, match="not a .npy header"):
        npyio.read_header(f)
    with pytest.raises(ValueError, match="not a .npy file"):
        npyio.load(path)
    checked = run("verify", npy)
    assert checked.exit_code == 1 and "Traceback" not in checked.output and "b.png" in checked.output
    resumed = run(src, "-o", npy, *LOUD)
    assert resumed.exit_code == 0, resumed.output
    assert report_of(npy)["counts"] == {"ok": 1, "skipped": 3, "failed": 0}
    assert run("verify", npy).exit_code == 0


def test_folders_without_checksums_are_checked_by_shape_and_say_how_many(folders):
    src, npy, shards = folders
    for key in KEYS:
        record = json.loads((npy / key / "input.json").read_text())
        del record["checksums"]
        (npy / key / "input.json").write_text(json.dumps(record))
    index = (shards / "shards" / "index.jsonl").read_text().splitlines()
    lines = [json.loads(text) for text in index[1:]]
    for line in lines:
        for member in line["members"].values():
            member.pop("checksum", None)
    (shards / "shards" / "index.jsonl").write_text("\n".join([index[0], *map(json.dumps, lines)]) + "\n")
    for out in (npy, shards):
        result = run("verify", out)
        assert result.exit_code == 0, result.output
        assert (
            "verified 4 images: all as reported; 16 arrays checked by shape only (no checksum recorded: "
            "made by an earlier version)"
        ) in result.stderr
        assert open_features(out)["a"]["p5"].shape == (256, 1, 1)
    assert run(src, "-o", npy, *SEED).exit_code == 0
    assert report_of(npy)["counts"]["skipped"] == 4  # kept, as before


def test_a_fifo_in_place_of_an_output_file_is_refused_at_once_naming_it(folders):
    src, npy, shards = folders
    os.unlink(npy / "a" / "p2.npy")
    os.mkfifo(npy / "a" / "p2.npy")
    with pytest.raises(FPNError, match=rf"{npy / 'a' / 'p2.npy'} is a FIFO, not a regular file"):
        open_features(npy)["a"]
    result = run("verify", npy)
    assert result.stdout.splitlines() == ["a.png: a/p2.npy is not a regular file"]
    rerun = run(src, "-o", npy, *LOUD, "--timeout", "60")
    assert rerun.exit_code == 0, rerun.output
    assert f"recomputing {src / 'a.png'}: p2.npy is not a complete float32 .npy file" in rerun.output
    assert "timed out" not in rerun.output
    assert np.load(npy / "a" / "p2.npy").shape == (256, 6, 8)
    tar = shards / "shards" / by_key(shards)["d"]["shard"]
    tar.unlink()
    os.mkfifo(tar)
    with pytest.raises(FPNError, match=rf"{tar} is a FIFO, not a regular file"):
        open_features(shards)["d"]["p3"]
    with pytest.raises(FPNError, match=rf"{tar} is a FIFO"):
        FeatureDataset(shards)[3]
