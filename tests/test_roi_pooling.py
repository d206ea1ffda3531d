"""RoiPooler in process: the bytes of torchvision's MultiScaleRoIAlign however its boxes are split,
and memory bounded by design (one chunk buffer, roi_align a small batch at a time), whatever the
box count."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torchvision.ops
from torchvision.ops import MultiScaleRoIAlign

from fpn_cli.formats.npyio import write_file
from fpn_cli.regions import outputs, pooling
from fpn_cli.regions.boxes import BoxFile, ImageBoxes
from fpn_cli.regions.geometry import Geometry
from fpn_cli.regions.outputs import Outputs
from fpn_cli.regions.pooling import RoiPooler, RoiSpec

HEIGHT, WIDTH, CHANNELS = 96, 128, 16


def levels_of(seed: int = 0, channels_last: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k in (2, 3, 4, 5):
        shape = (CHANNELS, -(-HEIGHT // 2**k), -(-WIDTH // 2**k))
        level = rng.standard_normal(shape, dtype=np.float32)
        # channels-last: the network's layout, a (C, h, w) view of (h, w, C) memory
        out[f"p{k}"] = (
            np.ascontiguousarray(level.transpose(1, 2, 0)).transpose(2, 0, 1) if channels_last else level
        )
    return out


def random_boxes(count: int, seed: int = 1) -> np.ndarray:
    """Boxes from 2 to 900 pixels a side (most reaching past the 96x128 image): every level gets some."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, (WIDTH - 2, HEIGHT - 2), (count, 2))
    side = np.exp(rng.uniform(np.log(2), np.log(900), (count, 2)))
    return np.concatenate([xy, xy + side], 1)


def torchvision_pooled(levels: dict[str, np.ndarray], boxes: np.ndarray, spec: RoiSpec) -> np.ndarray:
    """torchvision's MultiScaleRoIAlign, all boxes at once, given the levels' true strides (as the
    pooler gives them, tests/test_regions.py shows why) and its own LevelMapper over them."""
    from torchvision.ops.poolers import LevelMapper

    pooler = MultiScaleRoIAlign(list(spec.levels), list(spec.output_size), spec.sampling_ratio)
    strides = [int(name[1:]) for name in spec.levels]
    pooler.scales = [2.0**-k for k in strides]
    pooler.map_levels = LevelMapper(strides[0], strides[-1])
    feats = {
        name: torch.from_numpy(np.ascontiguousarray(levels[name], np.float32))[None] for name in spec.levels
    }
    return pooler(feats, [torch.from_numpy(boxes.astype(np.float32))], [(1, 1)]).numpy()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("levels_dtype", [np.float32, np.float16])
def test_pooled_a_few_boxes_per_roi_align_call_the_bytes_are_torchvisions(
    monkeypatch, channels_last, levels_dtype
):
    monkeypatch.setattr(pooling, "ROI_BATCH_BYTES", 3 * CHANNELS * 49 * 4)  # 3 boxes per call
    levels = {k: v.astype(levels_dtype) for k, v in levels_of(channels_last=channels_last).items()}
    boxes = random_boxes(200)
    spec = RoiSpec()
    reference = torchvision_pooled(levels, boxes, spec)
    chosen = torchvision.ops.poolers.LevelMapper(2, 5)([torch.from_numpy(boxes.astype(np.float32))])
    assert sorted(set(chosen.tolist())) == [0, 1, 2, 3]  # every level pools some of the boxes
    got = RoiPooler(levels, spec)(boxes)
    assert got.dtype == np.float32 and got.shape == (200, CHANNELS, 7, 7)
    assert got.tobytes() == reference.tobytes()


def test_into_rows_of_a_float16_array_is_torchvisions_cast_and_leaves_other_rows(monkeypatch):
    monkeypatch.setattr(pooling, "ROI_BATCH_BYTES", 2 * CHANNELS * 25 * 4)  # 2 boxes per call
    levels, boxes, spec = levels_of(), random_boxes(40), RoiSpec(("p3", "p4"), (5, 5))
    reference = torchvision_pooled(levels, boxes, spec).astype(np.float16)
    out = np.full((50, CHANNELS, 5, 5), 7, np.float16)
    rows = np.arange(40) + 10  # rows 0-9 are not the pooler's
    RoiPooler(levels, spec).into(out, boxes, rows)
    assert out[10:].tobytes() == reference.tobytes()
    assert (out[:10] == 7).all()


def test_a_single_level_pools_every_box_from_it_and_a_non_finite_box_gets_a_zero_row():
    levels, boxes, spec = levels_of(), random_boxes(20), RoiSpec(("p4",), (3, 3))
    assert RoiPooler(levels, spec)(boxes).tobytes() == torchvision_pooled(levels, boxes, spec).tobytes()
    boxes = np.concatenate([boxes, [[np.nan, 1, 5, 5]]])
    assert (RoiPooler(levels, spec)(boxes)[-1] == 0).all()  # torchvision's roi_align would crash on it
    several = RoiSpec(("p2", "p3", "p4", "p5"), (3, 3))
    got = RoiPooler(levels, several)(boxes)
    assert (got[-1] == 0).all()  # no level takes it: torchvision's row stays as allocated, zero
    assert got.tobytes() == torchvision_pooled(levels, boxes, several).tobytes()


def test_rows_for_boxes_must_match_the_array_they_fill():
    with pytest.raises(ValueError, match="3 boxes for 4 rows"):
        RoiPooler(levels_of(), RoiSpec()).into(np.empty((4, CHANNELS, 7, 7), np.float32), random_boxes(3))


def rois_written(tmp_path, count: int, save_dtype: str) -> tuple[int, int, np.ndarray]:
    """Writes rois.npy of ``count`` boxes as a run does (Outputs then the npy writer); returns the
    peak of the allocations tracemalloc sees while pooling and writing (numpy's and Python's, not
    torch's: those are roi_align's results, counted by the caller), what is still held once it
    is written (the RoI array not yet dropped, as in a run until the image is done) and the file's
    array."""
    levels = levels_of()
    boxes = random_boxes(count)
    table = BoxFile(
        "b.csv", {"a.png": ImageBoxes([tuple(b) for b in boxes], [f"line {i}" for i in range(count)])}
    )
    rois = Outputs(tuple(levels), save_dtype, maps=False, roi=RoiSpec(), boxes=table).compute(
        levels, ("rois", "boxes"), "a.png", Geometry((HEIGHT, WIDTH), (HEIGHT, WIDTH), 1)
    )["rois"]
    tracemalloc.start()
    try:
        write_file(tmp_path / f"{count}.npy", rois)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, held, np.load(tmp_path / f"{count}.npy")


@pytest.mark.parametrize("save_dtype", ["float32", "float16"])
def test_pooling_memory_is_one_chunk_and_a_batch_whatever_the_box_count(tmp_path, monkeypatch, save_dtype):
    """The bound by design: rois.npy of 30 or 120 chunks is pooled into one buffer of a chunk,
    roi_align never returning more than a batch; the peak does not grow with the box count.
    (The spies keep counters, not lists: a list per call would itself grow with the boxes.)"""
    item = np.dtype(save_dtype).itemsize
    chunk, batch = 32 * CHANNELS * 49 * item, 4 * CHANNELS * 49 * 4
    monkeypatch.setattr(outputs, "ROI_CHUNK_BYTES", chunk)  # 32 rows in the save dtype
    monkeypatch.setattr(pooling, "ROI_BATCH_BYTES", batch)  # 4 boxes per roi_align call
    seen = {"boxes": 0, "most": 0, "chunks": 0}
    buffers: set[int] = set()
    real = torchvision.ops.roi_align

    def roi_align(feature, rois, **kwargs):
        seen["boxes"] += len(rois)
        seen["most"] = max(seen["most"], len(rois))
        return real(feature, rois, **kwargs)

    chunks = outputs.ChunkedArray.chunks

    def chunk_by_chunk(self):
        for start, rows in chunks(self):
            seen["chunks"] += 1
            buffers.add(rows.__array_interface__["data"][0])  # where the chunk's rows are
            yield start, rows

    monkeypatch.setattr(torchvision.ops, "roi_align", roi_align)
    monkeypatch.setattr(outputs.ChunkedArray, "chunks", chunk_by_chunk)
    peaks = {}
    for count in (30 * 32, 120 * 32):
        seen.update(boxes=0, most=0, chunks=0)
        buffers.clear()
        peaks[count], held, stored = rois_written(tmp_path, count, save_dtype)
        assert stored.shape == (count, CHANNELS, 7, 7) and stored.dtype == np.dtype(save_dtype)
        assert seen["chunks"] == count // 32 and len(buffers) == 1  # every chunk in the one buffer
        assert seen["boxes"] == count and seen["most"] == 4  # torch's results: a batch at most
        # the buffer, a chunk's boxes, torch's Python objects (measured: 30-45 KiB); the boxes of
        # every chunk at once would be 120 KiB more (3840 boxes x 4 float64)
        assert chunk <= peaks[count] <= chunk + 64 * 2**10, (count, peaks[count] / chunk)
        assert held <= 32 * 2**10, held  # the buffer went with the last chunk (measured: 12-16 KiB)
    assert abs(peaks[120 * 32] - peaks[30 * 32]) <= 24 * 2**10, peaks  # 4 times the boxes, the same peak
