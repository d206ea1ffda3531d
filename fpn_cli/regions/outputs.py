"""The arrays an image owns, besides its levels, and how they are named, shaped and reported:

    <key>.<level>          (C, h, w) a level, unless --no-maps
    <key>.p3_avg           (C,) a level averaged (or ``_max``: maximum) over its valid area
    <key>.rois             (N, C, h, w) RoI features of the image's N boxes, in the file's order
    <key>.boxes            (N, 4) float64: those boxes as given (x1, y1, x2, y2, original pixels)

(as ``OUT/<key>/<name>.npy`` in the npy layout, members ``<stem>.<name>.npy`` in shards).
:class:`Outputs` says which an image gets, which are complete in a store, computes the derived
ones from the levels (pooling.py) and writes the report fields; each image's boxes are checked
against its size once (:meth:`Outputs.checked`), and that check is passed on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fpn_cli.formats import codecs
from fpn_cli.formats.base import BOX_DTYPE, BOXES, ROIS, pool_name
from fpn_cli.formats.npyio import ChunkedArray
from fpn_cli.regions.boxes import BoxFile, Checked, check, clip_note
from fpn_cli.regions.geometry import Geometry, LevelSizes
from fpn_cli.regions.pooling import ROI_CHUNK_BYTES, RoiPooler, RoiSpec, pooled

if TYPE_CHECKING:
    from fpn_cli.formats import codecs
from fpn_cli.formats.base import Storage

Location = Callable[[str, str], dict]  # (key, array name) -> where report.json says it is


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
    sizes: LevelSizes | None = None  # the model's level sizes, for report.json's geometry
    detect: tuple[
        str, ...
    ] = ()  # with --detect: the det_* arrays (regions/detect.py), computed by the engine

    def unwanted(self, rel: str) -> tuple[str, ...]:
        """Arrays the image ``rel`` must not keep: with a boxes file, the RoI features of an
        image it does not name (they were made for boxes of another file). After a run with
        ``--boxes FILE``, rois.npy exists exactly for the images FILE names."""
        return (ROIS, BOXES) if self.boxes is not None and self.boxes.of(rel) is None else ()

    def names(self, rel: str) -> tuple[str, ...]:
        """Every array the image ``rel`` gets, in the order they are written: rois before boxes,
        since boxes.npy matching the file's boxes is what marks rois.npy complete."""
        names = [name for level in self.levels for name in self.stored(level)] if self.maps else []
        names += [pool_name(level, kind) for level in self.levels for kind in self.pool]
        names += self.detect
        if self.boxes is not None and self.boxes.of(rel) is not None:
            names += [ROIS, BOXES]
        return tuple(names)

    def stored(self, level: str) -> tuple[str, ...]:
        """The arrays that store ``level`` in the save dtype: ``p2``, and for int8 ``p2_scale``."""
        return codecs.array_names(level, self.save_dtype)

    def floats(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The levels among the stored ``arrays`` as floats: float32 and float16 levels as they
        are, bfloat16 and int8 ones decoded to float32 (with their scales)."""
        if self.save_dtype in ("float32", "float16"):
            return {level: arrays[level] for level in self.levels if level in arrays}
        return codecs.decode_levels(self.save_dtype, arrays, self.levels)

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
        found = store.shapes(key, names, {BOXES: BOX_DTYPE, **codecs.EXACT_DTYPES})
        have = found
        if level_shapes is not None:
            expected = self.shapes(rel, level_shapes)
            have = {name: shape for name, shape in found.items() if expected.get(name) == shape}
        have = {name: shape for name, shape in have.items() if name not in self.detect}
        have.update(self._detections_complete(found, level_shapes))
        if ROIS in names and not self._rois_current(store, key, rel, have):
            have.pop(ROIS, None)
            have.pop(BOXES, None)
        return have

    def shapes(self, rel: str, level_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The shape of each of the image's arrays, from its levels' {name: (C, h, w)}: levels as
        given (int8 scales (C,)), pooled vectors (C,), rois (N, C, *output_size) for its N boxes,
        boxes (N, 4)."""
        out = {level: tuple(level_shapes[level]) for level in self.levels}
        for level in self.levels:
            for name in self.stored(level)[1:]:
                out[name] = (level_shapes[level][0],)
        for level in self.levels:
            for kind in self.pool:
                out[pool_name(level, kind)] = (level_shapes[level][0],)
        boxes = self.boxes.of(rel) if self.boxes is not None else None
        if boxes is not None:
            count, channels = len(boxes.boxes), level_shapes[self.roi.levels[0]][0]
            out[ROIS] = (count, channels, *self.roi.output_size)
            out[BOXES] = (count, 4)
        return out

    def _detections_complete(
        self, found: Mapping[str, tuple[int, ...]], level_shapes: Mapping[str, tuple[int, ...]] | None
    ) -> dict[str, tuple[int, ...]]:
        """The det_* arrays, when every one is stored with the same row count N and the trailing
        shape it must have (det_boxes (N, 4), det_rois (N, C, S, S) ...); else none of them."""
        if not self.detect:
            return {}
        shapes = {name: found.get(name) for name in self.detect}
        if any(shape is None for shape in shapes.values()):
            return {}
        count = shapes["det_boxes"][0]
        channels = level_shapes[self.levels[0]][0] if level_shapes else None
        expected = {
            "det_boxes": (count, 4),
            "det_scores": (count,),
            "det_labels": (count,),
            "det_vectors": (count, shapes.get("det_vectors", (0, 0))[-1]),
        }
        for name, shape in shapes.items():
            if shape[0] != count or (name in expected and shape != expected[name]):
                return {}
            if name == "det_rois" and channels is not None and shape[1] != channels:
                return {}
        return shapes

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
        self,
        levels: Mapping[str, np.ndarray],
        names: Sequence[str],
        rel: str,
        geometry: Geometry,
        checked: Checked | None = None,
    ) -> dict[str, np.ndarray]:
        """The derived arrays among ``names`` (pooled vectors, rois and boxes), from the image's
        ``levels`` {name: (C, h, w)} as floats (:meth:`floats`), in codecs.derived_dtype;
        ``checked``: the image's boxes as :meth:`checked` found them (checked here if not given)."""
        dtype = codecs.derived_dtype(self.save_dtype)
        out = {}
        for level in self.levels:
            for kind in self.pool:
                name = pool_name(level, kind)
                if name in names:
                    out[name] = pooled(levels[level], kind).astype(dtype)
        if ROIS in names:
            boxes = self.boxes.of(rel)
            checked = checked or check(boxes, geometry.input_size)
            out[ROIS] = self._rois(levels, checked, geometry, dtype)
            out[BOXES] = boxes.array()
        return out

    def _rois(
        self, levels: Mapping[str, np.ndarray], checked: Checked, geometry: Geometry, dtype: np.dtype
    ) -> ChunkedArray:
        """(N, C, h, w) in ``dtype``, pooled as it is written, ROI_CHUNK_BYTES at a time into one
        buffer that every chunk reuses (the writers are done with a chunk before asking for the
        next): refused boxes' rows are NaN, so row i stays the file's i-th box."""
        pooler = RoiPooler(levels, self.roi)
        shape = (len(checked.boxes), *pooler.row_shape)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        per_chunk = max(1, ROI_CHUNK_BYTES // max(1, row_bytes))
        none = buffer = np.empty((0, *shape[1:]), dtype)

        def rows(start: int, stop: int) -> np.ndarray:
            nonlocal buffer
            if len(buffer) < stop - start:  # made once, at the first chunk (the largest)
                buffer = np.empty((min(per_chunk, shape[0]), *shape[1:]), dtype)
            out = buffer[: stop - start]
            if stop == shape[0]:  # the last chunk: the buffer goes when the writer is done with it
                buffer = none  # (a view of it would keep it)
            pooled = checked.pooled[start:stop]
            if pooled.all():
                pooler.into(out, geometry.to_model_input(checked.boxes[start:stop]))
            else:
                out[~pooled] = np.nan
                pooler.into(
                    out, geometry.to_model_input(checked.boxes[start:stop][pooled]), np.flatnonzero(pooled)
                )
            return out

        return ChunkedArray(shape, dtype, rows, per_chunk)

    def checked(self, rel: str, geometry: Geometry | None) -> Checked | None:
        """The image's boxes checked against its size; None without boxes or a size. The one
        check of an image's boxes: its callers pass the result on (compute, entries, tell_boxes)."""
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
        location: Location,
        checked: Checked | None = None,
    ) -> dict:
        """report.json fields of an image with these arrays stored: ``geometry``, ``pooled``
        {name: shape and where} and ``rois`` (shape, where, refused and clipped boxes: ``checked``,
        else checked here). ``location(key, name)`` says where an array is (the storage
        format's). ``rois["boxes"]`` names the boxes where rois are: their file, or their member
        of the same shard."""
        fields: dict = {
            "geometry": self.sizes.geometry_json(geometry) if geometry and self.sizes else None,
            "pooled": {
                name: {"shape": list(shapes[name]), **location(key, name)}
                for name in (pool_name(level, kind) for level in self.levels for kind in self.pool)
                if name in shapes
            },
        }
        if self.detect and all(name in shapes for name in self.detect):
            fields["detections"] = {
                "count": shapes["det_boxes"][0],
                "arrays": {
                    name: {"shape": list(shapes[name]), **location(key, name)} for name in self.detect
                },
            }
        if ROIS in shapes:
            boxes = location(key, BOXES)
            rois: dict = {
                "shape": list(shapes[ROIS]),
                **location(key, ROIS),
                "boxes": boxes.get("member", boxes["file"]),
            }
            checked = checked or self.checked(rel, geometry)
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


def tell_lost_rois(lost: Sequence[str], who: str, log: Callable[[str], None], few: int = 3) -> None:
    """Says how many images lose the RoI features of an earlier boxes file, because the new one
    names none of their boxes, and which (up to ``few``): ``who`` begins the line ("roi")."""
    if not lost:
        return
    shown = ", ".join(sorted(lost)[:few]) + (f" and {len(lost) - few} more" if len(lost) > few else "")
    had = "image had" if len(lost) == 1 else "images had"
    new = "have none in the new one"
    log(f"{who}: {len(lost)} {had} RoI features of an earlier boxes file and {new}: {shown}")


def lost_rois(
    images: Sequence[tuple[str, str]], outputs: Outputs, is_stored: Callable[[str, str], bool]
) -> list[str]:
    """Of ``images`` ((rel, key) pairs, with features stored), those whose rois.npy goes: the
    boxes file of ``outputs`` names none of their boxes (:meth:`Outputs.unwanted`)."""
    return [rel for rel, key in images if ROIS in outputs.unwanted(rel) and is_stored(key, ROIS)]


def tell_boxes(
    rel: str,
    shown: str,
    outputs: Outputs,
    geometry: Geometry | None,
    log: Callable[[str], None],
    on_failure: Callable[[str, str], None],
    checked: Checked | None = None,
) -> Checked | None:
    """One message per refused box of the image ``rel`` (``on_failure``) and per clipped box
    (``log``), naming the image as ``shown`` (its path as the user gave it); the check told
    (``checked``, else checked here)."""
    checked = checked or outputs.checked(rel, geometry)
    if checked is None:
        return None
    for refusal in checked.refused:
        on_failure(shown, refusal["error"] + "; its row of rois.npy is NaN")
    for clip in checked.clipped:
        log(f"note: {shown}: {clip_note(outputs.boxes.of(rel), clip, geometry.input_size)}")
    return checked
