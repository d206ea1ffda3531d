"""Region and pooled features from an image's levels, and how stored levels relate to the image.

    OUT/<key>/rois.npy       (N, C, h, w) RoI features of the image's N boxes, in the file's order
    OUT/<key>/boxes.npy      (N, 4) float64: those boxes as given (x1, y1, x2, y2, original pixels)
    OUT/<key>/p3_avg.npy     (C,) a level averaged (or ``_max``: maximum) over its valid area

- :class:`Geometry`: how an image's pixels reach the network (EXIF orientation, resize) and each
  level's stride and valid size, as report.json records it.
- :class:`RoiSpec` and :func:`roi_features`: torchvision's ``MultiScaleRoIAlign`` over the levels.
- :class:`Outputs`: every array a run writes for an image (levels, pooled vectors, RoI features),
  which of them are complete on disk, and the derived ones computed from the levels.
- :func:`rois_from_folder`: ``fpn-extract roi OUT --boxes FILE``, from the stored levels.

Derived arrays are computed on the CPU from the levels as stored (in the save dtype, widened to
float32), during a run and by :func:`rois_from_folder` alike: both give the same bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fpn_cli.errors import UsageError
from fpn_cli.formats.locks import finish_overwrite, lock_folder, read_settings, record_settings
from fpn_cli.formats.store import (
    BOXES,
    OVERWRITE_MARKER,
    POOLS,
    REPORT_FILE,
    ROIS,
    SETTINGS_FILE,
    Store,
    pool_name,
)
from fpn_cli.inputs.images import output_key
from fpn_cli.models.levels import LEVELS, parse_levels
from fpn_cli.regions.boxes import BoxFile, Checked, check, clip_note, read_boxes
from fpn_cli.report import dump_report

if TYPE_CHECKING:
    from fpn_cli.formats.base import Storage

Location = Callable[[str, str], dict]  # (key, array name) -> where report.json says it is

ROI_LEVELS = ("p2", "p3", "p4", "p5")  # torchvision's Faster R-CNN box pooler's
CANONICAL_SCALE, CANONICAL_LEVEL = 224, 4  # FPN paper eq. 1: a 224x224 box pools from P4
BOX_DTYPE = np.dtype(np.float64)  # coordinates exactly as given, whatever the save dtype
UNKNOWN_SHOWN = 10  # images a boxes file names that have no features: a warning each, up to this
MAX_ROI_SIZE = 64  # detection heads pool 7x7, mask heads 14x14 or 28x28: 64 bounds (N, 256, 64, 64)


def parse_pool(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """``"avg,max"`` or ``("avg",)`` -> ``("avg", "max")``; unknown or repeated kinds are errors."""
    names = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in POOLS]
    if unknown:
        raise UsageError(f"unknown pooling {unknown[0]!r}; choose from {', '.join(POOLS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"a pooling is listed twice in {','.join(names)}")
    return tuple(names)


@dataclass(frozen=True)
class Geometry:
    """How an image's pixels reach the network, and so how a box maps onto each level: a point
    (x, y) of the image, after EXIF orientation, is (x * sx / stride, y * sy / stride) on a level."""

    input_size: tuple[int, int]  # (H, W) as decoded, EXIF orientation applied
    model_input_size: tuple[int, int]  # (H', W') after --size / --short-side
    orientation: int = 1  # the EXIF orientation applied, 1 (none) to 8

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): original pixels to model-input pixels, each axis on its own."""
        (h, w), (mh, mw) = self.input_size, self.model_input_size
        return mh / h, mw / w

    def to_model_input(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) x1, y1, x2, y2 in original pixels -> the same boxes in model-input pixels."""
        sy, sx = self.scale
        return boxes * np.array([sx, sy, sx, sy])

    def to_json(self, levels: Sequence[str], pad_multiple: int = 1) -> dict:
        """report.json's ``geometry``: orientation, scale, and per level its stride and valid size
        ⌈H'/stride⌉ x ⌈W'/stride⌉ (the stored shape); with padding, also the size of the padded
        input's level, of which the stored level is the top-left crop."""
        h, w = self.model_input_size
        ph, pw = -(-h // pad_multiple) * pad_multiple, -(-w // pad_multiple) * pad_multiple
        per_level = {}
        for name in levels:
            stride = LEVELS[name].stride
            entry: dict = {"stride": stride, "size": [-(-h // stride), -(-w // stride)]}
            if pad_multiple > 1:
                entry["padded_size"] = [-(-ph // stride), -(-pw // stride)]
            per_level[name] = entry
        return {"orientation": self.orientation, "scale": list(self.scale), "levels": per_level}


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


def roi_features(levels: Mapping[str, np.ndarray], boxes: np.ndarray, spec: RoiSpec) -> np.ndarray:
    """One image's levels {name: (C, h, w)} and (N, 4) boxes in model-input pixels (x1, y1, x2, y2)
    -> (N, C, *spec.output_size) float32, by torchvision's ``MultiScaleRoIAlign``."""
    # imported here: torchvision.ops pulls in torch._dynamo, a second of every command's start-up
    # that only runs with boxes need
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.poolers import LevelMapper

    pooler = MultiScaleRoIAlign(list(spec.levels), list(spec.output_size), spec.sampling_ratio)
    # The pooler would infer each level's scale as its height over the image's, rounded to a power
    # of two: for small images that is wrong (P5 of a 37-row image: 2/37 rounds to 1/16, not 1/32).
    # The strides are known, so they are given; where its inference is right, the result is the same.
    pooler.scales = [1.0 / LEVELS[name].stride for name in spec.levels]
    k_min, k_max = (int(math.log2(LEVELS[spec.levels[i]].stride)) for i in (0, -1))
    pooler.map_levels = LevelMapper(k_min, k_max, CANONICAL_SCALE, CANONICAL_LEVEL)
    feats = {name: _as_tensor(levels[name])[None] for name in spec.levels}
    with torch.inference_mode():
        out = pooler(
            feats, [torch.from_numpy(boxes.astype(np.float32))], [(1, 1)]
        )  # sizes unused: scales are set
    return out.numpy()


def _as_tensor(level: np.ndarray) -> torch.Tensor:
    """A level as float32 for torchvision: widened from float16; a read-only memory map copied
    (torch wants writable memory; the file's pages are read once either way)."""
    if level.dtype != np.float32 or not level.flags.writeable:
        level = level.astype(np.float32)
    return torch.from_numpy(level)


def pooled(level: np.ndarray, kind: str) -> np.ndarray:
    """(C, h, w) -> (C,): the average (summed in float64) or the maximum over the level, which is
    its valid area: padding is cropped before a level is stored."""
    if kind == "max":
        return level.max(axis=(1, 2))
    # numpy's summation order follows the memory layout: in C order, as in the file, a channels-last
    # level from the network sums exactly as the stored one does later
    return np.ascontiguousarray(level).mean(axis=(1, 2), dtype=np.float64)


@dataclass(frozen=True)
class Outputs:
    """The arrays a run writes for each image: its levels (unless ``maps`` is off), pooled vectors,
    and for an image with boxes its RoI features with the boxes they came from.

    Every one is a named array of the image, handed to the store like a level (``write_levels``
    takes {name: array} in :meth:`names` order) and found again by name (``shapes``,
    ``read_array``): a storage format that stores ``<key>.<name>.npy`` members stores these too.
    """

    levels: tuple[str, ...]  # the levels the run computes
    save_dtype: str = "float32"
    maps: bool = True  # store the levels themselves (--no-maps: only what is derived from them)
    pool: tuple[str, ...] = ()
    roi: RoiSpec | None = None
    boxes: BoxFile | None = None
    pad_multiple: int = 1

    def unwanted(self, rel: str) -> tuple[str, ...]:
        """Arrays the image ``rel`` must not keep: with a boxes file, the RoI features of an
        image it does not name (they were made for boxes of another file). After a run with
        ``--boxes FILE``, rois.npy exists exactly for the images FILE names."""
        return (ROIS, BOXES) if self.boxes is not None and self.boxes.of(rel) is None else ()

    def names(self, rel: str) -> tuple[str, ...]:
        """Every array the image ``rel`` gets, in the order they are written: rois before boxes,
        since boxes.npy matching the file's boxes is what marks rois.npy complete."""
        names = list(self.levels) if self.maps else []
        names += [pool_name(level, kind) for level in self.levels for kind in self.pool]
        if self.boxes is not None and self.boxes.of(rel) is not None:
            names += [ROIS, BOXES]
        return tuple(names)

    def complete(
        self,
        store: Storage,
        key: str,
        rel: str,
        level_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> dict[str, tuple[int, ...]]:
        """Shapes of the image's arrays complete on disk: every level (stored or not this run, so
        that derived arrays can come from the files), its other names. RoI features count only
        with boxes.npy equal to the file's boxes for the image and of its row count. Given the
        levels' (C, h, w) for the image (``level_shapes``), an array counts only at exactly the
        shape they give it (:meth:`shapes`)."""
        names = dict.fromkeys([*self.levels, *self.names(rel)])
        have = store.shapes(key, names, {BOXES: BOX_DTYPE})
        if level_shapes is not None:
            expected = self.shapes(rel, level_shapes)
            have = {name: shape for name, shape in have.items() if expected.get(name) == shape}
        if ROIS in names and not self._rois_current(store, key, rel, have):
            have.pop(ROIS, None)
            have.pop(BOXES, None)
        return have

    def shapes(self, rel: str, level_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The shape of each of the image's arrays, from its levels' {name: (C, h, w)}: levels as
        given, pooled vectors (C,), rois (N, C, *output_size) for its N boxes, boxes (N, 4)."""
        out = {level: tuple(level_shapes[level]) for level in self.levels}
        for level in self.levels:
            for kind in self.pool:
                out[pool_name(level, kind)] = (level_shapes[level][0],)
        boxes = self.boxes.of(rel) if self.boxes is not None else None
        if boxes is not None:
            count, channels = len(boxes.boxes), level_shapes[self.roi.levels[0]][0]
            out[ROIS] = (count, channels, *self.roi.output_size)
            out[BOXES] = (count, 4)
        return out

    def _rois_current(self, store: Storage, key: str, rel: str, have: Mapping[str, tuple[int, ...]]) -> bool:
        wanted = self.boxes.of(rel).array()
        rois, boxes = have.get(ROIS), have.get(BOXES)
        if (
            rois is None
            or boxes != wanted.shape
            or rois[0] != len(wanted)
            or rois[2:] != self.roi.output_size
        ):
            return False
        return np.array_equal(store.read_array(key, BOXES), wanted, equal_nan=True)  # refused rows: NaN

    def compute(
        self, levels: Mapping[str, np.ndarray], names: Sequence[str], rel: str, geometry: Geometry
    ) -> dict[str, np.ndarray]:
        """The derived arrays among ``names`` (pooled vectors, rois and boxes), from the image's
        ``levels`` {name: (C, h, w)} as stored, in the save dtype."""
        dtype = np.dtype(self.save_dtype)
        out = {}
        for level in self.levels:
            for kind in self.pool:
                name = pool_name(level, kind)
                if name in names:
                    out[name] = pooled(levels[level], kind).astype(dtype)
        if ROIS in names:
            boxes = self.boxes.of(rel)
            checked = check(boxes, geometry.input_size)
            out[ROIS] = self._rois(levels, checked, geometry).astype(dtype)
            out[BOXES] = boxes.array()
        return out

    def _rois(self, levels: Mapping[str, np.ndarray], checked: Checked, geometry: Geometry) -> np.ndarray:
        """(N, C, h, w): refused boxes' rows are NaN, so row i stays the file's i-th box."""
        channels = levels[self.roi.levels[0]].shape[0]
        out = np.full((len(checked.boxes), channels, *self.roi.output_size), np.nan, np.float32)
        if checked.pooled.any():
            boxes = geometry.to_model_input(checked.boxes[checked.pooled])
            out[checked.pooled] = roi_features(levels, boxes, self.roi)
        return out

    def checked(self, rel: str, geometry: Geometry | None) -> Checked | None:
        """The image's boxes checked against its size; None without boxes or a size."""
        boxes = self.boxes.of(rel) if self.boxes is not None else None
        if boxes is None or geometry is None:
            return None
        return check(boxes, geometry.input_size)

    def entries(
        self,
        key: str,
        rel: str,
        shapes: Mapping[str, tuple[int, ...]],
        geometry: Geometry | None,
        location: Location | None = None,
    ) -> dict:
        """report.json fields of an image with these arrays stored: ``geometry``, ``pooled``
        {name: shape and where} and ``rois`` (shape, where, refused and clipped boxes).
        ``location(key, name)`` says where an array is (the storage format's): by default the npy
        layout's ``{"file": "<key>/<name>.npy"}``. ``rois["boxes"]`` names the boxes where rois
        are: their file, or their member of the same shard."""
        location = location or _npy_location
        fields: dict = {
            "geometry": geometry.to_json(self.levels, self.pad_multiple) if geometry else None,
            "pooled": {
                name: {"shape": list(shapes[name]), **location(key, name)}
                for name in (pool_name(level, kind) for level in self.levels for kind in self.pool)
                if name in shapes
            },
        }
        if ROIS in shapes:
            boxes = location(key, BOXES)
            rois: dict = {
                "shape": list(shapes[ROIS]),
                **location(key, ROIS),
                "boxes": boxes.get("member", boxes["file"]),
            }
            checked = self.checked(rel, geometry)
            if checked is not None and checked.refused:
                rois["refused"] = checked.refused
            if checked is not None and checked.clipped:
                rois["clipped"] = checked.clipped
            fields["rois"] = rois
        return fields

    def header(self, unknown: Mapping[str, int]) -> dict:
        """report.json's ``regions``: what is stored, the RoI settings, the boxes file and the
        images it names that are not among the inputs (with their box counts)."""
        regions: dict = {"maps": self.maps, "pool": list(self.pool)}
        if self.roi is not None and self.boxes is not None:
            regions["roi"] = self.roi.record()
            regions["boxes"] = {
                "file": self.boxes.path,
                "images": len(self.boxes.images),
                "boxes": self.boxes.count,
                "not_among_inputs": dict(unknown),
            }
        return regions


def _npy_location(key: str, name: str) -> dict:
    return {"file": f"{key}/{name}.npy"}


def tell_boxes(
    rel: str,
    shown: str,
    outputs: Outputs,
    geometry: Geometry | None,
    log: Callable[[str], None],
    on_failure: Callable[[str, str], None],
) -> Checked | None:
    """One message per refused box of the image ``rel`` (``on_failure``) and per clipped box
    (``log``), naming the image as ``shown`` (its path as the user gave it); the check told."""
    checked = outputs.checked(rel, geometry)
    if checked is None:
        return None
    for refusal in checked.refused:
        on_failure(shown, refusal["error"] + "; its row of rois.npy is NaN")
    for clip in checked.clipped:
        log(f"note: {shown}: {clip_note(outputs.boxes.of(rel), clip, geometry.input_size)}")
    return checked


# --- fpn-extract roi OUT --boxes FILE --------------------------------------------------------------


@dataclass
class RoiRun:
    """What :func:`rois_from_folder` did: images written, already complete, failed, and boxes."""

    written: int = 0
    complete: int = 0
    failed: int = 0
    boxes: int = 0
    refused: int = 0
    clipped: int = 0
    unknown: dict[str, int] = field(default_factory=dict)  # images in FILE not in report.json

    @property
    def exit_status(self) -> int:
        """0, or 1 when an image failed or a box was refused (the rest are written)."""
        return 1 if self.failed or self.refused else 0

    def describe(self) -> str:
        return (
            f"{self.written + self.complete + self.failed} images with boxes: {self.written} written, "
            f"{self.complete} already complete, {self.failed} failed; {self.boxes} boxes "
            f"({self.refused} refused, {self.clipped} clipped)"
        )


def rois_from_folder(
    out: str | os.PathLike[str],
    boxes: str | os.PathLike[str],
    roi_size: int | tuple[int, int] | None = None,
    roi_levels: Sequence[str] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    on_failure: Callable[[str, str], None] | None = None,
) -> RoiRun:
    """RoI features for the boxes in ``boxes`` from the levels stored in ``out``, with no network:
    ``out/<key>/rois.npy`` and ``boxes.npy`` for each image the file names, the same bytes an
    extraction with ``--boxes`` writes. Images whose rois are complete for these boxes are left
    alone unless ``overwrite``. The settings are the folder's (``roi_size``/``roi_levels`` other
    than those its rois were made with are a :class:`UsageError` unless ``overwrite``);
    report.json's entries get their ``rois``."""
    log = log or (lambda message: None)
    on_failure = on_failure or (lambda path, reason: None)
    out = Path(out)
    if not (out / SETTINGS_FILE).is_file() or not (out / REPORT_FILE).is_file():
        raise UsageError(f"{out} holds no finished extraction (.fpn-extract.json and report.json)")
    if (read_settings(out) or {}).get("format", "npy") != "npy":
        raise UsageError(
            f"{out} holds --format shards, whose images are written whole: run the extraction again "
            "with --boxes FILE instead (it derives the RoI features from the stored levels, no network)"
        )
    table = read_boxes(boxes)
    with lock_folder(out, None):
        settings, report = read_settings(out), _read_report(out / REPORT_FILE)
        if settings is None or report is None:
            raise UsageError(f"cannot read the settings and report.json of {out}")
        if any(out.glob(OVERWRITE_MARKER + "*")):
            raise UsageError(f"{out} holds an unfinished --overwrite extraction: finish it first")
        spec = _roi_spec(settings, report, roi_size, roi_levels)
        # new RoI settings over old rois: the folder mixes both until every image is redone
        changed = overwrite and settings.get("roi", spec.record()) != spec.record()
        record_settings(out, {**settings, "roi": spec.record()}, changed, None)
        result = _rois_for_report(
            out, report, table, spec, settings["save_dtype"], overwrite, log, on_failure
        )
        if changed:
            finish_overwrite(out, None)
    return result


def _rois_for_report(
    out: Path,
    report: dict,
    table: BoxFile,
    spec: RoiSpec,
    save_dtype: str,
    overwrite: bool,
    log: Callable[[str], None],
    on_failure: Callable[[str, str], None],
) -> RoiRun:
    """rois.npy for every image of ``report`` that ``table`` has boxes for; report.json rewritten
    with their entries."""
    outputs = Outputs(spec.levels, save_dtype, maps=False, roi=spec, boxes=table)
    store = Store(out, spec.levels, save_dtype)
    result = RoiRun(boxes=table.count)
    entries = {entry["path"]: entry for entry in report["images"]}
    result.unknown = table.unknown(p for p, e in entries.items() if e["status"] != "failed")

    def warning(rel: str, count: int) -> str:
        reason = "failed in the extraction" if rel in entries else "not in report.json"
        return f"warning: {rel}: {count} box(es) in {table.path}, but the image is {reason}"

    warn_unknown(result.unknown, warning, "images with boxes but no features", log)
    for rel in sorted(table.images):
        if rel not in result.unknown:
            _rois_of(entries[rel], store, outputs, overwrite, result, log, on_failure)
    for rel, entry in entries.items():  # rois of another boxes file (or RoI settings) go
        unwanted = outputs.unwanted(rel)
        if entry["status"] != "failed" and unwanted:
            store.forget_arrays(output_key(rel), unwanted)
            entry.pop("rois", None)
    regions = report.setdefault("regions", {"maps": True, "pool": []})
    regions.update({k: v for k, v in outputs.header(result.unknown).items() if k in ("roi", "boxes")})
    _write_report(store, report)
    return result


def warn_unknown(
    unknown: Mapping[str, int], warning: Callable[[str, int], str], rest: str, log: Callable[[str], None]
) -> None:
    """A warning (``warning(rel, count)``) for each of the first few images a boxes file names
    without features for them, then one line counting the rest: a dataset's COCO file may name
    millions."""
    for rel, count in list(unknown.items())[:UNKNOWN_SHOWN]:
        log(warning(rel, count))
    if len(unknown) > UNKNOWN_SHOWN:
        log(f"warning: ... and {len(unknown) - UNKNOWN_SHOWN} more {rest}")


def _roi_spec(
    settings: Mapping,
    report: Mapping,
    roi_size: int | tuple[int, int] | None,
    roi_levels: Sequence[str] | None,
) -> RoiSpec:
    """The options, else the folder's recorded RoI settings, else the defaults for its levels."""
    recorded = RoiSpec.from_record(settings["roi"]) if "roi" in settings else None
    size = roi_size if roi_size is not None else recorded.output_size if recorded else 7
    levels = roi_levels if roi_levels is not None else recorded.levels if recorded else None
    return RoiSpec.resolve(size, levels, report["model"]["levels"])


def _rois_of(
    entry: dict,
    store: Store,
    outputs: Outputs,
    overwrite: bool,
    result: RoiRun,
    log: Callable[[str], None],
    on_failure: Callable[[str, str], None],
) -> None:
    """One image's rois from its stored levels; its report entry updated."""
    rel = entry["path"]
    key = output_key(rel)
    geometry = _geometry(entry)
    if geometry is None:
        result.failed += 1
        on_failure(rel, "report.json has no size for it (input_size, model_input_size)")
        return
    have = {} if overwrite else outputs.complete(store, key, rel)
    if ROIS in have:
        result.complete += 1
    else:
        lacking = [level for level in outputs.levels if level not in store.existing(key)]
        if lacking:
            result.failed += 1
            on_failure(rel, f"{key}/{lacking[0]}.npy is missing or incomplete: extract it first")
            return
        arrays = outputs.compute(store.read_levels(key), (ROIS, BOXES), rel, geometry)
        store.write_levels(key, arrays)
        record = store.read_record(key)
        if record is not None:  # written last again, as a run does: it marks the image complete
            store.write_record(key, record)
        have = {name: arrays[name].shape for name in (ROIS, BOXES)}
        result.written += 1
    entry["rois"] = outputs.entries(key, rel, have, geometry)["rois"]
    checked = tell_boxes(rel, rel, outputs, geometry, log, on_failure)
    if checked is not None:
        result.refused += len(checked.refused)
        result.clipped += len(checked.clipped)


def _geometry(entry: Mapping) -> Geometry | None:
    """An image's geometry from its report.json entry (sizes only in reports before geometry)."""
    if not entry.get("input_size") or not entry.get("model_input_size"):
        return None
    orientation = (entry.get("geometry") or {}).get("orientation", 1)
    return Geometry(tuple(entry["input_size"]), tuple(entry["model_input_size"]), orientation)


def _read_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_report(store: Store, report: Mapping) -> None:
    """report.json again, in the layout a run writes it (one line per image)."""
    tail = ("images", "counts", "shards", "interrupted")
    header = {k: v for k, v in report.items() if k not in tail}
    extra = {k: report[k] for k in ("shards", "interrupted") if k in report}
    lines = (json.dumps(entry, allow_nan=False) for entry in report["images"])
    store.write_report(lambda f: dump_report(f, header, lines, report["counts"], extra))
