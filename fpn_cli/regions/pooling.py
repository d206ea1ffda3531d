"""RoI maths: torchvision's ``MultiScaleRoIAlign`` over an image's levels (:class:`RoiSpec`,
:class:`RoiPooler`, :func:`roi_features`), and a level pooled to one vector (:func:`pooled`, ``--pool``).

Computed on the CPU from the levels as stored (in the save dtype, widened to float32), during a
run and by ``fpn-extract roi`` alike: both give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fpn_cli.errors import UsageError
from fpn_cli.models.levels import LEVELS, parse_levels
from fpn_cli.regions.choices import MAX_ROI_SIZE

ROI_LEVELS = ("p2", "p3", "p4", "p5")  # torchvision's Faster R-CNN box pooler's
CANONICAL_SCALE, CANONICAL_LEVEL = 224, 4  # FPN paper eq. 1: a 224x224 box pools from P4


@dataclass(frozen=True)
class RoiSpec:
    """How RoI features are pooled: torchvision's ``MultiScaleRoIAlign(levels, output_size,
    sampling_ratio)`` with its level rule (FPN eq. 1, canonical 224 at level 4, clamped to the
    levels) and ``aligned=False``."""

    levels: tuple[str, ...] = ROI_LEVELS  # consecutive pyramid levels, finest first
    output_size: tuple[int, int] = (7, 7)  # (h, w) of each box's features
    sampling_ratio: int = 2  # bilinear samples per output cell along each axis

    @classmethod
    def resolve(
        cls, size: int | tuple[int, int], levels: Sequence[str] | None, run_levels: Sequence[str]
    ) -> RoiSpec:
        """``--roi-size`` and ``--roi-levels`` for a run of ``run_levels``; ``levels`` None is
        those of P2-P5 the run extracts. A level the run lacks, a backbone level, or a gap (p2,p4)
        is a :class:`UsageError`: the level rule needs one level per stride."""
        size = (size, size) if isinstance(size, int) else tuple(size)
        if not 1 <= min(size) <= max(size) <= MAX_ROI_SIZE:
            raise UsageError(f"--roi-size must be from 1 to {MAX_ROI_SIZE}")
        if levels is None:
            chosen = tuple(name for name in ROI_LEVELS if name in run_levels)
            if not chosen:
                raise UsageError(
                    f"RoI features pool from P2-P5 and this run extracts none of them "
                    f"({','.join(run_levels)}); choose levels with --roi-levels"
                )
        else:
            chosen = tuple(sorted(parse_levels(levels), key=lambda n: LEVELS[n].stride))
        lacking = [n for n in chosen if n not in run_levels]
        if lacking:
            raise UsageError(
                f"--roi-levels {lacking[0]} is not among the levels extracted ({','.join(run_levels)})"
            )
        if any(LEVELS[n].kind != "pyramid" for n in chosen):
            raise UsageError("--roi-levels takes pyramid levels (p2..p7): backbone levels differ in channels")
        strides = [LEVELS[n].stride for n in chosen]
        if any(b != 2 * a for a, b in zip(strides, strides[1:], strict=False)):
            raise UsageError(f"--roi-levels {','.join(chosen)} must be consecutive (strides doubling)")
        return cls(chosen, size)

    def record(self) -> dict:
        """What decides the numbers in rois.npy: the settings record's ``roi`` and report.json's."""
        return {
            "levels": list(self.levels),
            "output_size": list(self.output_size),
            "sampling_ratio": self.sampling_ratio,
            "canonical_scale": CANONICAL_SCALE,
            "canonical_level": CANONICAL_LEVEL,
            "aligned": False,
        }

    @classmethod
    def from_record(cls, record: Mapping) -> RoiSpec:
        return cls(tuple(record["levels"]), tuple(record["output_size"]), record["sampling_ratio"])


# RoI features are pooled and written this many bytes at a time (a ChunkedArray): 100,000 boxes
# make a 5 GB rois.npy, and pooling it whole took 4 times that (torchvision's output, its per-level
# parts, the cast, the write). A chunk at a time into one reused buffer, ROI_BATCH_BYTES of boxes
# per roi_align call, the peak is the image's levels and about 1.3 chunks, whatever the box count
# (benchmarks/roi_memory.py, docs/guarantees-waits.md). 1 MiB batches (20 boxes of 256x7x7) pool
# as fast as whole chunks; 4 MiB ones left 0.4 chunk more of freed results in glibc's heap.
ROI_CHUNK_BYTES = 64 * 2**20
ROI_BATCH_BYTES = 2**20  # float32 features of the boxes one roi_align call pools


class RoiPooler:
    """torchvision's ``MultiScaleRoIAlign`` of ``spec`` over one image's levels {name: (C, h, w)},
    prepared once (the levels as C-order float32 tensors) for pooling any number of box chunks.

    The pooler's own steps, with bounded temporaries: the level of each box by its
    ``LevelMapper`` (FPN eq. 1 with the strides given), then per level ``roi_align`` on at most
    ``ROI_BATCH_BYTES`` of boxes at a time, each result cast into its rows of the caller's array.
    ``MultiScaleRoIAlign`` instead allocates the whole output and a second array per level; each
    box's row depends on that box alone, so the bytes are the same (tests/test_regions.py)."""

    def __init__(self, levels: Mapping[str, np.ndarray], spec: RoiSpec) -> None:
        # imported here: torchvision.ops pulls in torch._dynamo, a second of every command's start-up
        # that only runs with boxes need
        from torchvision.ops import roi_align
        from torchvision.ops.poolers import LevelMapper

        self.roi_align, self.spec = roi_align, spec
        # MultiScaleRoIAlign would infer each level's scale as its height over the image's, rounded to
        # a power of two: for small images that is wrong (P5 of a 37-row image: 2/37 rounds to 1/16,
        # not 1/32). The strides are known, so they are given; where its inference is right, the
        # result is the same.
        self.scales = [1.0 / LEVELS[name].stride for name in spec.levels]
        k_min, k_max = (int(math.log2(LEVELS[spec.levels[i]].stride)) for i in (0, -1))
        self.map_levels = LevelMapper(k_min, k_max, CANONICAL_SCALE, CANONICAL_LEVEL)
        self.feats = [_as_tensor(levels[name])[None] for name in spec.levels]
        self.channels = levels[spec.levels[0]].shape[0]
        self.row_shape = (self.channels, *spec.output_size)

    def __call__(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) boxes in model-input pixels (x1, y1, x2, y2) -> (N, C, *output_size) float32."""
        out = np.empty((len(boxes), *self.row_shape), np.float32)
        self.into(out, boxes)
        return out

    def into(self, out: np.ndarray, boxes: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Pools (N, 4) boxes in model-input pixels (x1, y1, x2, y2) into ``out`` (M, C,
        *output_size) of any float dtype: box i into row ``rows[i]`` (default: row i), cast from
        float32 as ``astype`` does; other rows are left as they are."""
        if rows is None and len(boxes) != len(out):
            raise ValueError(f"{len(boxes)} boxes for {len(out)} rows")
        if len(boxes) == 0:
            return
        per_call = max(1, ROI_BATCH_BYTES // (int(np.prod(self.row_shape)) * 4))
        with torch.inference_mode():
            given = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4))
            rois = torch.cat([given.new_zeros((len(given), 1)), given], 1)  # image 0, as torchvision's
            one = len(self.feats) == 1  # torchvision pools every box from a single level
            levels = torch.zeros(len(given), dtype=torch.int64) if one else self.map_levels([given])
            # a box no level takes (non-finite): torchvision leaves its row zero (or, with one
            # level, crashes in roi_align); here its row is zero either way
            unmapped = (levels < 0) | (levels >= len(self.feats)) | ~torch.isfinite(given).all(1)
            if unmapped.any():
                levels[unmapped] = -1
                unmapped = unmapped.numpy()
                out[np.flatnonzero(unmapped) if rows is None else rows[unmapped]] = 0
            for level, (feat, scale) in enumerate(zip(self.feats, self.scales, strict=True)):
                index = torch.where(levels == level)[0]
                for start in range(0, len(index), per_call):
                    part = index[start : start + per_call]
                    result = self.roi_align(
                        feat,
                        rois[part],
                        output_size=self.spec.output_size,
                        spatial_scale=scale,
                        sampling_ratio=self.spec.sampling_ratio,
                        aligned=False,
                    )
                    part = part.numpy()
                    out[part if rows is None else rows[part]] = result.numpy()
                    del result  # one batch's result at a time


def roi_features(levels: Mapping[str, np.ndarray], boxes: np.ndarray, spec: RoiSpec) -> np.ndarray:
    """One image's levels {name: (C, h, w)} and (N, 4) boxes in model-input pixels (x1, y1, x2, y2)
    -> (N, C, *spec.output_size) float32, as torchvision's ``MultiScaleRoIAlign`` pools them."""
    return RoiPooler(levels, spec)(boxes)


def _as_tensor(level: np.ndarray) -> torch.Tensor:
    """A level as C-order float32 for roi_align: widened from float16; a channels-last level (the
    network's) made C-order once here, or roi_align would copy the whole level on every call; a
    read-only memory map copied (torch wants writable memory; the file's pages are read once
    either way)."""
    if level.dtype == np.float32 and level.flags.writeable and level.flags.c_contiguous:
        return torch.from_numpy(level)
    return torch.from_numpy(np.array(level, np.float32, order="C"))


def pooled(level: np.ndarray, kind: str) -> np.ndarray:
    """(C, h, w) -> (C,): the average (summed in float64) or the maximum over the level, which is
    its valid area: padding is cropped before a level is stored."""
    if kind == "max":
        return level.max(axis=(1, 2))
    # numpy's summation order follows the memory layout: in C order, as in the file, a channels-last
    # level from the network sums exactly as the stored one does later
    return np.ascontiguousarray(level).mean(axis=(1, 2), dtype=np.float64)
