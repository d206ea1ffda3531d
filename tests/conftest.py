"""Shared helpers: running fpn-extract (in this process or as a subprocess), reading what it
wrote, and torchvision reference models with non-trivial BatchNorm statistics."""

from __future__ import annotations

import io
import json
import locale
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fpn_cli import console, open_features
from fpn_cli.cli import main

from imagefactory import save_rgb

SEED = ["--arch", "seed", "--device", "cpu", "-q"]  # the small architecture, quietly

# Under pytest-xdist (`make test` runs a worker per core) each worker's torch gets its share of the
# cores: two workers with a thread per core each would contend for them and run slower than one.
# The subprocesses a test starts get the same share (OMP_NUM_THREADS), so their float sums are
# bit-identical to this process's runs.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


def console_script() -> list[str]:
    """The command that runs fpn-extract in a subprocess: the installed console script, or
    ``python -m fpn_cli`` where none is installed beside this Python (the GPU machine's)."""
    script = Path(sys.executable).parent / "fpn-extract"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fpn_cli"]


FPN_EXTRACT = console_script()


def start(*args, preexec_fn: Callable[[], object] | None = None) -> subprocess.Popen:
    """``fpn-extract ARGS`` as a running subprocess, pipes for stdout and stderr, with Ctrl-C's
    default action: a shell starts background jobs with SIGINT ignored, and Python then never
    raises KeyboardInterrupt, however pytest itself was started. ``preexec_fn`` runs in the child
    before the console script (an rlimit)."""

    def before_exec() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec_fn is not None:
            preexec_fn()

    return subprocess.Popen(
        [*FPN_EXTRACT, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=before_exec,
    )


def forked(*args, preexec_fn: Callable[[], object] | None = None) -> Forked | subprocess.Popen:
    """``fpn-extract ARGS`` in a forked copy of this process (:class:`Forked`): a process of its own
    (pid, signals, kill -9, rlimits, exit status) without a fresh interpreter's start-up, whose
    import of torch is most of a short run's CPU time. For tests where the running process is the
    point, not its start-up or its exit with threads left behind (those use :func:`start`). Where
    torch runs several threads here (pytest without xdist), a fork could inherit a thread pool it
    cannot use: then it is the console script, started as :func:`start` does."""
    if torch.get_num_threads() != 1:
        return start(*args, preexec_fn=preexec_fn)

    def fpn_extract() -> None:
        sys.argv = ["fpn-extract", *map(str, args)]
        console.main()  # the console script's entry point: ends in SystemExit

    return Forked(fpn_extract, preexec_fn)


class Forked:
    """The part of :class:`subprocess.Popen` these tests use (pid, poll, wait, send_signal, kill,
    communicate, returncode: negative for a signal) for ``target()`` run in a fork of this process
    (:func:`forked`'s runs fpn-extract as the console script does), its stdout and stderr on pipes,
    SIGINT and SIGTERM at their default actions until the code installs its own. The child leaves
    with ``os._exit`` (never back into pytest): status 0 when ``target`` returns, a SystemExit's
    code, 1 after any other exception (its traceback on stderr)."""

    def __init__(self, target: Callable[[], object], preexec_fn: Callable[[], object] | None = None) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                os.close(out_r)
                os.close(err_r)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                encoding = locale.getpreferredencoding(False)
                sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding)
                sys.stderr = io.TextIOWrapper(
                    io.FileIO(2, "w", closefd=False), encoding, "backslashreplace", line_buffering=True
                )
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                if preexec_fn is not None:
                    preexec_fn()
                target()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        os.close(out_w)
        os.close(err_w)
        self.pid = pid
        self.returncode: int | None = None
        self._streams: dict[int, bytes] = {}
        self._readers = [
            threading.Thread(target=self._drain, args=(fd,), daemon=True) for fd in (out_r, err_r)
        ]
        for reader in self._readers:
            reader.start()
        self._fds = (out_r, err_r)

    def _drain(self, fd: int) -> None:
        with open(fd, "rb") as f:
            self._streams[fd] = f.read()

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"fpn-extract (pid {self.pid})", timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        out, err = (self._streams.get(fd, b"").decode(errors="backslashreplace") for fd in self._fds)
        return out, err


def run(*args, input: str | None = None) -> Result:
    """``fpn-extract ARGS`` in this process, through click's runner; arguments may be Paths."""
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def index_lines(out: Path) -> list[dict]:
    """A shard folder's index entries (``shards/index.jsonl`` after its header line)."""
    return [json.loads(line) for line in (out / "shards" / "index.jsonl").read_text().splitlines()[1:]]


def entries(out: Path) -> dict[str, dict]:
    return {e["path"]: e for e in report_of(out)["images"]}


def assert_report_matches_files(out: Path) -> None:
    """Every level report.json lists is on disk with the shape it lists."""
    for entry in report_of(out)["images"]:
        for level in entry["levels"].values():
            assert list(np.load(out / level["file"], mmap_mode="r").shape) == level["shape"], entry["path"]


def assert_same_arrays(a: Path | str, b: Path | str) -> None:
    """Two output folders (either format) hold the same keys, and for each the same arrays:
    names, dtypes as stored and values (NaN rows of refused boxes equal too)."""
    first, second = open_features(a, dtype=None), open_features(b, dtype=None)
    assert list(first) == list(second)
    for key in first:
        x, y = first[key], second[key]
        assert x.keys() == y.keys(), key
        for name in x:
            assert x[name].dtype == y[name].dtype, (key, name)
            assert np.array_equal(x[name], y[name], equal_nan=True), (key, name)


def npy_files(out: Path) -> dict[Path, bytes]:
    """Every .npy file under ``out`` (relative path -> bytes)."""
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*.npy")}


def files(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (relative path as text -> bytes)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def randomize_batchnorm(model: nn.Module, seed: int = 1, tiny_var: bool = False) -> nn.Module:
    """Gives every (Frozen)BatchNorm non-trivial statistics, so a test notices a BN mapped wrongly.
    ``tiny_var`` makes some of the stem's running variances 1e-4, where eps = 0 vs 1e-5 shows."""
    g = torch.Generator().manual_seed(seed)
    first = True
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.weight.shape[0]
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                var = torch.rand(n, generator=g) * 1.5 + 0.5
                if tiny_var and first:
                    var[::3] = 1e-4
                first = False
                m.running_var.copy_(var)
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the issue's 'relative difference'."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME, and no downloads: a missing file must fail, not reach the network."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("FPN_EXTRACT_OFFLINE", "1")
    return home


@pytest.fixture(scope="session", autouse=True)
def built_engines():
    """Each random-weight model built, and its engine prepared (BatchNorm folded), once per test
    session: hundreds of in-process runs use a handful of configurations, and building and
    folding cost a third of a second to seconds a run. Models from weights files are built each
    time (tests change those files between runs). The run itself is unchanged: the same
    ``_build_model`` and ``Engine`` calls, answered from the cache."""
    from fpn_cli.run import pipeline

    models, engines = {}, {}
    real_build, real_engine = pipeline._build_model, pipeline.Engine

    def build(spec):
        if not spec.random:
            return real_build(spec)
        if spec not in models:
            models[spec] = real_build(spec)
        return models[spec]

    def prepared(model, *args, **kwargs):
        if not any(model is m for m in models.values()):
            return real_engine(model, *args, **kwargs)
        key = (id(model), *args, *sorted(kwargs.items()))
        if key not in engines:
            engines[key] = real_engine(model, *args, **kwargs)
        return engines[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "_build_model", build)
    mp.setattr(pipeline, "Engine", prepared)
    yield
    mp.undo()


# seven sizes, for resume and verify tests on a finished folder
FINISHED_SIZES = {
    "a": (64, 96),
    "b": (48, 80),
    "c": (40, 40),
    "d": (56, 72),
    "e": (36, 52),
    "f": (44, 60),
    "g": (32, 48),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of seven PNGs of different sizes and its complete output, made once: tests copy
    both (copy2 keeps modification times, so the copies' fingerprints match)."""
    root = tmp_path_factory.mktemp("finished")
    for name, (h, w) in FINISHED_SIZES.items():
        save_rgb(root / "in" / f"{name}.png", h, w, seed=ord(name))
    assert run(root / "in", "-o", root / "out", *SEED).exit_code == 0
    return root / "in", root / "out"


@pytest.fixture
def copied(finished, tmp_path) -> tuple[Path, Path]:
    src, out = finished
    shutil.copytree(src, tmp_path / "in")
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "in", tmp_path / "out"
