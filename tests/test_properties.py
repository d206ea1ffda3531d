"""Properties: whatever the options, file names and inputs, fpn-extract ends with exit status 0, 1
or 2, never prints a traceback, and writes nothing outside its output folder; whatever edits hit
a finished folder, verify never passes a wrong array and a resume never keeps one."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fpn_cli import open_features
from fpn_cli.run import engine, pipeline

from conftest import run
from imagefactory import save_rgb, truncated_jpeg

# names as users make them: odd characters, dots, spaces, leading dashes, bytes that are not UTF-8
NAMES = st.one_of(
    st.sampled_from(["-x", "--out", "-", ".hidden", "a.b.c", " sp ace ", "report.json", "p2.npy", "k"]),
    st.text(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"), min_size=1, max_size=8
    ),
    st.lists(st.integers(1, 255).filter(lambda b: b != ord("/")), min_size=1, max_size=6)
    .map(bytes)
    .map(os.fsdecode),
).filter(lambda name: name not in (".", "..") and len(os.fsencode(name)) < 200)
EXTENSIONS = st.sampled_from([".png", ".jpg", ".JPEG", ".bmp", ".png", ".jpg", ".txt", ""])
KINDS = st.sampled_from(["png", "png", "jpeg", "corrupt", "empty", "folder", "fifo"])
FILES = st.lists(
    st.tuples(st.sampled_from(["", "sub/", "sub/deeper/"]), NAMES, EXTENSIONS, KINDS), max_size=4
)


SIDES = st.sampled_from([1, 7, 16, 33])  # few network input sizes: each new one costs the backend setup
# valid values, so that most examples get to run; few models: each costs a second to build
OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "--levels": st.sampled_from(["c2", "p3,p6", "p5,c5,p2"]),
        "--seed": st.sampled_from(["1", str(2**64 - 1)]),
        "--batch-size": st.integers(1, 3).map(str),
        "--save-dtype": st.sampled_from(["float32", "float16"]),
        "--max-pixels": st.sampled_from(["100", "1000000"]),
        "--timeout": st.sampled_from(["0.001", "30"]),
        "--pad-multiple": st.sampled_from(["1", "32"]),
        "--shard": st.sampled_from(["0/1", "1/2"]),
        "--fpn-style": st.sampled_from(["reference", "torchvision"]),
        "--pool": st.sampled_from(["avg", "max,avg"]),
        "--roi-size": st.sampled_from(["1", "3"]),
    },
)
RESIZE = st.one_of(
    st.just(()),
    st.tuples(SIDES, SIDES).map(lambda hw: ("--size", f"{hw[0]}x{hw[1]}")),
    SIDES.map(lambda n: ("--short-side", str(n))),
    SIDES.map(lambda n: ("--max-side", str(n))),
    st.tuples(SIDES, SIDES).map(lambda nm: ("--short-side", str(nm[0]), "--max-side", str(nm[1]))),
)
# and now and then one value that is not
BAD = [
    ("--levels", ""), ("--levels", "p9"), ("--levels", "p2,p2"), ("--levels", "p7"), ("--size", "x"),
    ("--size", "0x3"), ("--size", "100000x100000"), ("--short-side", "-2"), ("--short-side", "100000"),
    ("--seed", str(2**64)), ("--seed", "-1"), ("--seed", str(-(2**70))), ("--batch-size", "0"),
    ("--save-dtype", "float8"), ("--max-pixels", "0"), ("--timeout", "0"), ("--timeout", "nan"),
    ("--pad-multiple", "0"), ("--shard", "2/2"), ("--shard", "a/b"), ("--fpn-style", "nope"),
    ("--pool", "median"), ("--pool", "avg,avg"), ("--roi-size", "0"), ("--roi-levels", "p2,p4"),
]  # fmt: skip
ONE_BAD = st.sampled_from([None] * 2 * len(BAD) + BAD)

FLAGS = st.lists(
    st.sampled_from(["--overwrite", "--hash", "--preview", "--fail-fast", "-v", "--summary", "--no-maps"]),
    unique=True,
)
BOXES = st.booleans()  # a boxes file naming the inputs: a good box, one past the edge, an empty one
# the seed ResNet, and now and then a backbone of another family whose stem rounds down and
# refuses the smallest SIDES (ConvNeXt: a 4x4 conv of stride 4, then 2x2 ones)
ARCHS = st.sampled_from(["seed", "seed", "seed", "timm:convnext_atto"])
HOW = st.sampled_from(["folder", "file", "glob", "stdin", "stdin0", "out-in-input", "empty-out"])


def make(folder: Path, files) -> list[Path]:
    made = []
    for sub, name, ext, kind in files:
        path = folder / sub / (name + ext)
        with contextlib.suppress(OSError):  # a name this file system refuses is not ours to test
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                continue
            if kind == "png":
                save_rgb(path, 12, 10, format="PNG")
            elif kind == "jpeg":
                save_rgb(path, 9, 14, format="JPEG")
            elif kind == "corrupt":
                truncated_jpeg(path, 8, 8)
            elif kind == "empty":
                path.write_bytes(b"")
            elif kind == "folder":
                save_rgb(path / "inner.png", 8, 8)
            else:
                os.mkfifo(path)
            made.append(path)
    return made


def write_boxes(path: Path, folder: Path, made: list[Path]) -> Path:
    """A CSV of boxes for ``made``, by their paths below ``folder`` (csv quotes any name; one
    that is not UTF-8 cannot be in the file, which is UTF-8)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "x1", "y1", "x2", "y2"])
        for image in made:
            rel = str(image.relative_to(folder))
            with contextlib.suppress(UnicodeEncodeError):
                rows.writerows([[rel, 1, 1, 6, 6], [rel, -2, 0, 40, 5], [rel, 3, 3, 3, 9]])
    return path


def snapshot(root: Path, out: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``root`` but ``out``, its contents and the folders above it (making those
    is ``mkdir -p``), with a file's size and modification time."""
    skip = {out, *out.parents}
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != out]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path not in skip:
                st_ = os.lstat(path)
                found[str(path)] = None if path.is_dir() else (st_.st_size, st_.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def fast_models():
    """One model and one prepared engine per configuration for the whole test, BatchNorm left
    unfolded (the same features to rounding): building and folding take a second or two per
    run, and what is under test is the command line around them."""
    built, engines = {}, {}
    real_build, real_engine = pipeline._build_model, engine.Engine

    def build(spec):
        key = (spec.config, spec.seed)
        if key not in built:
            built[key] = real_build(spec)
        return built[key]

    def prepared(model, *args):
        key = (id(model), *args)
        if key not in engines:
            engines[key] = real_engine(model, *args)
        return engines[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "_build_model", build)
    mp.setattr(pipeline, "Engine", prepared)
    mp.setattr(engine, "fold_batchnorm", lambda model: model)
    yield
    mp.undo()


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    files=FILES, options=OPTIONS, resize=RESIZE, bad=ONE_BAD, flags=FLAGS, how=HOW, boxes=BOXES, arch=ARCHS
)
def test_any_options_names_and_inputs_end_in_0_1_or_2_without_traceback_or_stray_files(
    fast_models, files, options, resize, bad, flags, how, boxes, arch
):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, out = root / "in", root / "out"
        folder.mkdir()
        made = make(folder, files)
        if how == "out-in-input":
            out = folder / "sub" / "out"
        stdin = None
        if how == "folder":
            inputs = [str(folder)]
        elif how == "file":
            inputs = [str(made[0] if made else folder / "missing.png")]
        elif how == "glob":
            inputs = [str(folder / "**" / "*.*")]
        elif how in ("stdin", "stdin0"):
            sep = b"\0" if how == "stdin0" else b"\n"
            stdin = sep.join(os.fsencode(p) for p in [*made, folder / "missing.jpg"])
            inputs = ["-0", "-"] if how == "stdin0" else ["-"]
        else:
            inputs = [str(folder)]
        args = [*inputs, "-o", "" if how == "empty-out" else str(out), "--arch", arch, "--device", "cpu"]
        args += [a for item in (*options.items(), resize, *([bad] if bad else [])) for a in item] + flags
        if boxes:
            args += ["--boxes", str(write_boxes(root / "boxes.csv", folder, made))]
        before = snapshot(root, out)
        cwd = os.getcwd()
        os.chdir(root)  # a write to the working folder would show in the snapshot
        try:
            result = run(*args, input=stdin)
        finally:
            os.chdir(cwd)
        last = result.output.strip().splitlines()[-1][:50] if result.output.strip() else ""
        event(f"exit {result.exit_code}: {last}")  # --hypothesis-show-statistics shows the mix
        assert result.exit_code in (0, 1, 2), (args, result.output, result.exception)
        assert "Traceback" not in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        after = snapshot(root, out)
        assert after == before, (args, set(after) ^ set(before))


# -- edits to a finished folder: verify never passes a wrong array, a resume never keeps one ---------

EDIT_KEYS = ("a", "b", "c")
EDITS = st.lists(
    st.tuples(
        st.sampled_from(["truncate", "swap", "duplicate", "append", "member", "flip"]),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(1, 255),
    ),
    min_size=1,
    max_size=3,
)
EDIT_RUN = ["--arch", "seed", "--device", "cpu", "-q", "--batch-size", "1"]  # one image a forward: exact
FORMAT_ARGS = {"npy": ["--format", "npy"], "shards": ["--format", "shards", "--shard-size", "1"]}


@pytest.fixture(scope="module")
def edited_folders(tmp_path_factory) -> tuple[Path, dict[str, dict[str, dict[str, np.ndarray]]]]:
    """Three tiny images extracted once in each format (shards: one image a tar), and the arrays
    each format holds, as stored: what every edited copy is compared with."""
    root = tmp_path_factory.mktemp("edited")
    for i, key in enumerate(EDIT_KEYS):
        save_rgb(root / "in" / f"{key}.png", 16, 16, seed=i)
    truth = Arrays()
    for fmt in ("npy", "shards"):
        result = run(root / "in", "-o", root / fmt, *EDIT_RUN, *FORMAT_ARGS[fmt])
        assert result.exit_code == 0, result.output
        truth[fmt] = stored_arrays(root / fmt)
    return root, truth


class Arrays(dict):
    """The stored arrays of each format, shown short in hypothesis' reports."""

    def __repr__(self) -> str:
        return "<the stored arrays>"


def stored_arrays(out: Path) -> dict[str, dict[str, np.ndarray]]:
    feats = open_features(out, dtype=None)
    return {key: {name: np.array(a) for name, a in feats[key].items()} for key in feats}


def edit_targets(out: Path) -> list[Path]:
    """The files an edit may hit: arrays, records, tars and index parts (not the settings, lock or
    report.json, whose damage is another test's)."""
    skip = ("report.json", ".fpn-extract.json", ".lock")
    return sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith(skip))


def apply_edit(out: Path, kind: str, i: int, j: int, k: int) -> None:
    files = edit_targets(out)
    a, b = files[i % len(files)], files[j % len(files)]
    size = a.stat().st_size
    if kind == "truncate":
        os.truncate(a, size * (j % 100) // 100)
    elif kind == "swap" and a != b:
        os.replace(a, out / "swap.tmp")
        os.replace(b, a)
        os.replace(out / "swap.tmp", b)
    elif kind == "duplicate" and (a != b or a.suffix == ".tar"):
        copy = a.with_name(f"{9 + k % 3:06d}.tar") if a.suffix == ".tar" else b
        if copy != a:  # a copy made by an earlier edit is not copied onto itself
            shutil.copyfile(a, copy)
    elif kind == "append":
        with open(a, "ab") as f:
            f.write(bytes([k]) * (j % 600 + 1))
    elif kind == "member" and a.suffix == ".tar":
        name = [f"{EDIT_KEYS[k % 3]}.p2.npy", "../../x.p2.npy", f"{EDIT_KEYS[k % 3]}.json"][j % 3]
        data = io.BytesIO()
        np.save(data, np.full((256, 4, 4), float(k), np.float32))
        with contextlib.suppress(tarfile.TarError, OSError), tarfile.open(a, "a") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(data.getvalue())
            tar.addfile(info, io.BytesIO(data.getvalue()))
    elif size:
        with open(a, "r+b") as f:
            f.seek(j % size)
            byte = f.read(1)
            f.seek(j % size)
            f.write(bytes([byte[0] ^ k]))


def assert_arrays(out: Path, truth: dict[str, dict[str, np.ndarray]], what: str) -> None:
    found = stored_arrays(out)
    assert sorted(found) == sorted(truth), what
    for key, arrays in truth.items():
        assert sorted(found[key]) == sorted(arrays), (what, key)
        for name, array in arrays.items():
            assert found[key][name].dtype == array.dtype and np.array_equal(found[key][name], array), (
                what,
                key,
                name,
            )


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(fmt=st.sampled_from(["npy", "shards"]), edits=EDITS)
def test_edits_to_a_finished_folder_never_pass_verify_or_a_resume_with_a_wrong_array(
    edited_folders, fmt, edits
):
    root, truth = edited_folders
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        shutil.copytree(root / fmt, out)
        for edit in edits:
            apply_edit(out, *edit)
        report = (out / "report.json").read_bytes()
        checked = run("verify", out)
        assert checked.exit_code in (0, 1, 2) and "Traceback" not in checked.output, checked.output
        event(f"{fmt} verify exit {checked.exit_code}")
        if checked.exit_code == 0:  # verify passed: every array is the image's own, unaltered
            assert_arrays(out, truth[fmt], f"verify passed after {edits}")
        resumed = run(root / "in", "-o", out, *EDIT_RUN, *FORMAT_ARGS[fmt])
        assert resumed.exit_code in (0, 1) and "Traceback" not in resumed.output, resumed.output
        event(f"{fmt} resume exit {resumed.exit_code}")
        if resumed.exit_code == 1:  # a stray copy of a shard: the run stops, the report stays
            last = resumed.output.strip().splitlines()[-1]  # after any warnings on skipped members
            assert last.startswith("Error: image '") and "shards" in last, resumed.output
            assert (out / "report.json").read_bytes() == report
            return
        assert_arrays(out, truth[fmt], f"resumed after {edits}")
        assert run("verify", out).exit_code == 0
