"""The run's steps on their own: batching by size, and the forward pass's out-of-memory splitting."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fpn_cli.inputs.images import InputImage
from fpn_cli.report import Report
from fpn_cli.run.pipeline import Forward, Job, batches


def job(name: str, h: int, w: int = 8) -> Job:
    return Job(InputImage(f"/in/{name}.png", f"{name}.png"), ("p2",), rgb=np.zeros((h, w, 3), np.uint8))


def names(batch: list[Job]) -> list[str]:
    return [j.image.key for j in batch]


def test_batches_hold_one_size_in_arrival_order_and_few_images_wait():
    jobs = [job("a", 8), job("b", 9), job("c", 8), job("d", 9), job("e", 8), job("f", 7), job("g", 6)]
    assert [names(b) for b in batches(jobs, batch_size=3, max_pending=10)] == [
        ["a", "c", "e"],  # full
        ["b", "d"],  # the rest, at the end
        ["f"],
        ["g"],
    ]
    # at most three images may wait: the fullest bucket goes early
    assert [names(b) for b in batches(jobs, batch_size=3, max_pending=3)] == [
        ["a", "c"],
        ["b", "d"],
        ["e"],
        ["f"],
        ["g"],
    ]


class TightEngine:
    """Runs out of memory for more than one image, or for any batch holding an image ``too_tall``;
    records each call's size and whether it ran inside an ``except`` block (whose traceback would
    keep the failed call's activations alive)."""

    device = torch.device("cpu")

    def __init__(self, too_tall: int = 1000) -> None:
        self.too_tall = too_tall
        self.calls: list[tuple[int, bool]] = []

    def fits(self, count: int, height: int, width: int) -> tuple[bool, str]:
        return True, ""  # known only by trying

    def __call__(self, batch: np.ndarray):
        self.calls.append((len(batch), sys.exc_info()[0] is not None))
        if len(batch) > 1 or batch.shape[1] >= self.too_tall:
            raise RuntimeError("CUDA out of memory. Tried to allocate 9 GiB")
        return {"p2": torch.zeros(1, 1, 2, 2)}, None


def test_out_of_memory_splits_the_batch_and_retries_outside_the_except_block():
    engine, notes = TightEngine(), []
    forward = Forward(engine, Report({}), on_failure=lambda path, reason: None, log=notes.append)
    out = list(forward([job(name, 8) for name in "abcd"]))
    assert [j.image.key for j, _, _ in out] == ["a", "b", "c", "d"]
    assert all(levels["p2"].shape == (1, 2, 2) for _, levels, _ in out)
    assert [n for n, _ in engine.calls] == [4, 2, 1, 1, 2, 1, 1]
    assert not any(inside for _, inside in engine.calls), engine.calls
    assert notes[0] == "note: out of memory on cpu for 4 8x8 images: splitting the batch"


def test_an_image_that_does_not_fit_alone_fails_and_its_neighbours_are_computed():
    failures: list[tuple[str, str]] = []
    report = Report({})
    forward = Forward(TightEngine(too_tall=9), report, lambda *failure: failures.append(failure), print)
    out = list(forward([job("a", 8)])) + list(forward([job("b", 9)]))
    assert [j.image.key for j, _, _ in out] == ["a"]
    assert failures == [("/in/b.png", "out of memory on cpu for a 9x8 input; try --max-side or --batch-size")]
    assert report.counts == {"ok": 0, "skipped": 0, "failed": 1}


def test_a_batch_past_the_hosts_free_memory_is_never_run(monkeypatch):
    """On the CPU the kernel's OOM killer ends the run before Python sees a MemoryError: a batch
    the estimate says will not fit is split without running, and an image that cannot fit alone
    fails, saying how much it needs."""
    from fpn_cli import build_fpn
    from fpn_cli.run import engine

    ran: list[int] = []

    class Counting(engine.Engine):
        def __call__(self, batch):
            ran.append(len(batch))
            return super().__call__(batch)

    counting = Counting(build_fpn(arch="seed"), torch.device("cpu"), "float32", "float32")
    monkeypatch.setattr(engine, "available_memory", lambda: int(2.5 * counting.host_bytes(1, 64, 64)))
    failures: list[tuple[str, str]] = []
    forward = Forward(counting, Report({}), lambda *failure: failures.append(failure), lambda note: None)
    out = list(forward([job(name, 64, 64) for name in "abcd"]))
    assert [j.image.key for j, _, _ in out] == ["a", "b", "c", "d"] and ran == [2, 2]
    assert list(forward([job("e", 128, 128)])) == [] and ran == [2, 2]  # 4x the pixels: never run
    assert failures[0][0] == "/in/e.png" and "GiB of memory" in failures[0][1]
    assert counting.host_bytes(1, 2000, 2000) / 4e6 == pytest.approx(427, abs=5)  # 366-389 measured
