"""CUDA: the device path against the CPU and torchvision. Marked ``cuda``; skipped without a GPU.

Run on a GPU machine with ``bash benchmarks/gpu_check.sh`` (or ``pytest -m cuda``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fpn_cli import Options, extract
from fpn_cli.run.engine import Engine

from conftest import randomize_batchnorm, rel_diff
from imagefactory import save_rgb

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LEVELS = ("p2", "p3", "p4", "p5")
# Documented tolerances (docs/performance.md, "On a GPU"): float32 on CUDA runs without TF32, so it
# agrees with the CPU to float rounding; autocast's errors are relative to each level's largest value.
FP32_TOL = 1e-4
BF16_TOL = 2e-2
FP16_TOL = 5e-3


def levels_of(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.load(p) for p in sorted(out.rglob("*.npy"))}


def worst(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys() and a
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max() / np.abs(b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory) -> dict[str, np.ndarray]:
    """resnet50 float32 on the CPU: the depth that matters for accumulated error."""
    out = tmp_path_factory.mktemp("cpu")
    report = extract([EXAMPLES], out, arch="resnet50", device="cpu")
    assert report.exit_status == 0
    return levels_of(out)


def test_float32_on_cuda_equals_the_cpu(cpu_reference, tmp_path):
    report = extract([EXAMPLES], tmp_path, arch="resnet50", device="cuda")
    assert report.exit_status == 0
    assert worst(levels_of(tmp_path), cpu_reference) <= FP32_TOL


@pytest.mark.parametrize(("dtype", "tol"), [("bfloat16", BF16_TOL), ("float16", FP16_TOL)])
def test_autocast_on_cuda_stays_within_the_documented_error(cpu_reference, tmp_path, dtype, tol):
    report = extract([EXAMPLES], tmp_path, arch="resnet50", device="cuda", dtype=dtype)
    assert report.exit_status == 0
    error = worst(levels_of(tmp_path), cpu_reference)
    print(f"{dtype} on cuda: max error {error:.2e} of each level's largest value")
    assert error <= tol


def test_float16_storage_from_cuda_rounds_only(cpu_reference, tmp_path):
    report = extract([EXAMPLES], tmp_path, arch="resnet50", device="cuda", save_dtype="float16")
    assert report.exit_status == 0
    stored = levels_of(tmp_path)
    assert all(v.dtype == np.float16 for v in stored.values())
    assert worst(stored, cpu_reference) <= 2e-3


@pytest.fixture(scope="module")
def same_size_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("same")
    for i in range(24):
        save_rgb(folder / f"im{i:02d}.png", 384, 512, seed=i)
    return folder


def test_writer_waits_for_each_batch_copy(same_size_images, tmp_path, monkeypatch):
    """Non-blocking copies back with an event against fully synchronous copies: every file equal.
    A writer that did not wait would store a batch before (or while) its copy lands."""
    fast = extract([same_size_images], tmp_path / "async", arch="seed", device="cuda", batch_size=8)
    assert fast.exit_status == 0

    real_call = Engine.__call__

    def synchronous(self, batch):
        feats, event = real_call(self, batch)
        torch.cuda.synchronize()
        return {k: v.clone() for k, v in feats.items()}, None

    monkeypatch.setattr(Engine, "__call__", synchronous)
    slow = extract([same_size_images], tmp_path / "sync", arch="seed", device="cuda", batch_size=8)
    assert slow.exit_status == 0
    a, b = levels_of(tmp_path / "async"), levels_of(tmp_path / "sync")
    assert len(a) == 24 * 4
    assert worst(a, b) <= 1e-6


def peak_reserved(run) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run()
    return torch.cuda.max_memory_reserved()


def test_out_of_memory_splits_the_batch_for_real(tmp_path):
    folder = tmp_path / "big"
    for i in range(8):
        save_rgb(folder / f"im{i}.png", 1024, 1024, seed=i)

    def run(name: str, batch: int, log=None):
        return extract(
            [folder], tmp_path / name, Options(arch="seed", device="cuda", batch_size=batch), log=log
        )

    one = peak_reserved(lambda: run("one", 1))
    eight = peak_reserved(lambda: run("eight", 8))
    cap = 2.5 * one  # room for one or two images at a time, not for eight
    assert eight > 1.5 * cap, (one, eight)  # else the test would prove nothing
    notes: list[str] = []
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        report = run("split", 8, log=notes.append)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    print("\n".join(notes))
    assert report.counts == {"ok": 8, "skipped": 0, "failed": 0}, report.format_shapes()
    assert any("out of memory" in n and "splitting the batch" in n for n in notes), notes
    assert worst(levels_of(tmp_path / "split"), levels_of(tmp_path / "one")) <= 1e-5


def test_agrees_with_torchvision_detector_backbone_on_cuda(tmp_path):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from fpn_cli import build_fpn

    detector = randomize_batchnorm(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None))
    torch.save(detector.state_dict(), tmp_path / "det.pth")
    ours = build_fpn(arch="resnet50", weights=tmp_path / "det.pth", device="cuda")
    engine = Engine(ours, torch.device("cuda"), "float32", "float32")
    x = torch.randn(1, 3, 333, 517, generator=torch.Generator().manual_seed(0))
    reference = detector.backbone.eval().to("cuda")
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = reference(x.cuda())
    got, event = engine.forward(x.cuda())
    event.synchronize()
    for i, level in enumerate(LEVELS):
        assert rel_diff(got[level].float(), expected[str(i)].cpu()) <= FP32_TOL, level


def run_module(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )


def test_a_cuda_index_this_machine_lacks_is_a_usage_error(tmp_path):
    count = torch.cuda.device_count()
    proc = run_module("fpn_cli", EXAMPLES, "-o", tmp_path, "--device", f"cuda:{count}", "--arch", "seed")
    assert proc.returncode == 2
    assert f"cuda:{count}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "report.json").exists()


def test_torchrun_with_nccl_on_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_module(
        "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "fpn_cli", EXAMPLES, "-o", tmp_path, "--arch", "seed", "--device", "cuda", "-v",
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "nccl" in proc.stderr
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["counts"] == {"ok": 5, "skipped": 0, "failed": 0}
    assert report["device"] == "cuda:0"


def test_a_padded_bgr_zoo_model_on_cuda_equals_the_cpu(tmp_path, monkeypatch):
    """detectron2's preprocessing (BGR 0-255, padding to 32) and MSRA ResNet on the device."""
    from fpn_cli.models import zoo

    from frameworks import d2_state, write_d2_pkl

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FPN_EXTRACT_OFFLINE", "1")
    name = "detectron2:COCO-Detection/retinanet_R_50_FPN_1x"
    write_d2_pkl(d2_state((3, 4, 6, 3), retinanet=True), zoo.entry(name).path())
    save_rgb(tmp_path / "in" / "odd.png", 45, 71)
    for device in ("cpu", "cuda"):
        assert extract([tmp_path / "in"], tmp_path / device, weights=name, device=device).exit_status == 0
    assert worst(levels_of(tmp_path / "cuda"), levels_of(tmp_path / "cpu")) <= FP32_TOL
