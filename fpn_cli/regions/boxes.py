"""Boxes to pool RoI features for, read from a file, and checked against their image.

Two formats, told apart by their first character (``{`` is JSON):

- CSV, ``path,x1,y1,x2,y2``, one box a row, an optional header row naming those columns (with a
  header, other columns may sit beside them and are ignored);
- COCO JSON: ``images[]`` (``id``, ``file_name``) and ``annotations[]`` (``image_id``, ``bbox``
  as ``[x, y, width, height]``).

``path`` / ``file_name`` is the image's path as report.json writes it: relative to its input root.
Coordinates are the image's own pixels after EXIF orientation (the frame of report.json's
``input_size``), x to the right and y down, corners at ``(x1, y1)`` and ``(x2, y2)``. An image's
boxes keep the file's order: row ``i`` of its ``rois.npy`` is its ``i``-th box.

A file that cannot be read as either format is a :class:`UsageError` naming the line or
annotation; a box that is empty, not finite, or outside its image is refused by :func:`check`
alone, and the image's other boxes are pooled.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpn_cli.errors import UsageError

COLUMNS = ("path", "x1", "y1", "x2", "y2")
UNKNOWN_SHOWN = 10  # images a boxes file names that have no features: a warning each, up to this


@dataclass
class ImageBoxes:
    """One image's boxes, in the file's order."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # x1, y1, x2, y2
    sources: list[str] = field(default_factory=list)  # where each is in the file: "line 12", "annotation 7"

    def array(self) -> np.ndarray:
        """(N, 4) float64: x1, y1, x2, y2 as given."""
        return np.array(self.boxes, dtype=np.float64).reshape(-1, 4)


@dataclass(frozen=True)
class BoxFile:
    """A boxes file, read: image path (relative to its input root) -> its boxes."""

    path: str
    images: dict[str, ImageBoxes]

    def of(self, rel: str) -> ImageBoxes | None:
        return self.images.get(rel)

    def unknown(self, known: Iterable[str]) -> dict[str, int]:
        """Images the file names that are not among ``known`` -> how many boxes each has."""
        known = set(known)
        return {rel: len(b.boxes) for rel, b in sorted(self.images.items()) if rel not in known}

    @property
    def count(self) -> int:
        return sum(len(b.boxes) for b in self.images.values())


def read_boxes(path: str | Path) -> BoxFile:
    """Reads a CSV or COCO JSON boxes file; a :class:`UsageError` names what is wrong where."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UsageError(f"cannot read --boxes {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--boxes {path} is not UTF-8 text (CSV or COCO JSON)") from None
    images = _read_coco(text, path) if text.lstrip().startswith("{") else _read_csv(text, path)
    return BoxFile(str(path), images)


def _normal(rel: str) -> str:
    """``./x/cat.jpg`` and ``x//cat.jpg`` -> ``x/cat.jpg``, as report.json writes paths."""
    return posixpath.normpath(rel.strip().replace("\\", "/")).lstrip("/")


def _read_csv(text: str, path: str | Path) -> dict[str, ImageBoxes]:
    rows = csv.reader(io.StringIO(text))
    images: dict[str, ImageBoxes] = {}
    columns: list[int] | None = None
    header: list[str] | None = None
    for row in rows:
        line = rows.line_num
        if not any(cell.strip() for cell in row):
            continue
        if columns is None:
            names = [cell.strip().lower() for cell in row]
            if all(name in names for name in COLUMNS):  # a header row
                columns, header = [names.index(name) for name in COLUMNS], names
                continue
            columns = list(range(len(COLUMNS)))
            if len(row) != len(COLUMNS):
                raise UsageError(
                    f"--boxes {path}, line {line}: expected {','.join(COLUMNS)} "
                    f"(or a header row naming those columns), got {len(row)} columns"
                )
        if header is None and len(row) != len(COLUMNS):  # without a header, every row alike
            raise UsageError(
                f"--boxes {path}, line {line}: expected {len(COLUMNS)} columns ({','.join(COLUMNS)}), "
                f"got {len(row)}"
            )
        try:
            cells = [row[i] for i in columns]
        except IndexError:
            raise UsageError(f"--boxes {path}, line {line}: too few columns") from None
        rel = _normal(cells[0])
        if not rel or rel == ".":
            raise UsageError(f"--boxes {path}, line {line}: no image path")
        try:
            x1, y1, x2, y2 = (float(c) for c in cells[1:])
        except ValueError:
            raise UsageError(
                f"--boxes {path}, line {line}: coordinates must be numbers: {cells[1:]}"
            ) from None
        entry = images.setdefault(rel, ImageBoxes())
        entry.boxes.append((x1, y1, x2, y2))
        entry.sources.append(f"line {line}")
    return images


def _read_coco(text: str, path: str | Path) -> dict[str, ImageBoxes]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--boxes {path} is not valid JSON: {e}") from None
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise UsageError(f"--boxes {path}: a COCO file needs 'images' and 'annotations' lists")
    names: dict[int | str, str] = {}
    images: dict[str, ImageBoxes] = {}
    for i, image in enumerate(data["images"]):
        ident = image.get("id") if isinstance(image, dict) else None
        rel = image.get("file_name") if isinstance(image, dict) else None
        if not _is_id(ident) or not isinstance(rel, str) or not _normal(rel).strip("."):
            raise UsageError(
                f"--boxes {path}: images[{i}] needs an 'id' (a number or string) and a 'file_name'"
            )
        rel = _normal(rel)
        if rel in images:
            raise UsageError(f"--boxes {path}: two images are named {rel}")
        if ident in names:
            raise UsageError(f"--boxes {path}: two images have id {ident!r} ({names[ident]} and {rel})")
        names[ident] = rel
        images[rel] = ImageBoxes()
    for i, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            raise UsageError(f"--boxes {path}: annotations[{i}] is not an object")
        where = f"annotations[{i}]" + (f" (id {annotation['id']})" if _is_id(annotation.get("id")) else "")
        bbox, ident = annotation.get("bbox"), annotation.get("image_id")
        box_ok = isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))
        if not _is_id(ident) or not box_ok:
            raise UsageError(
                f"--boxes {path}: {where} needs 'image_id' and 'bbox' as [x, y, width, height] numbers"
            )
        x, y, w, h = (float(v) for v in bbox)
        if ident not in names:
            raise UsageError(f"--boxes {path}: {where} names image_id {ident!r}, which 'images' lacks")
        entry = images[names[ident]]
        entry.boxes.append((x, y, x + w, y + h))
        entry.sources.append(where)
    return {rel: entry for rel, entry in images.items() if entry.boxes}


def _is_id(value: object) -> bool:
    """A COCO id: a number or a string (JSON's ``true`` is no id)."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Checked:
    """An image's boxes checked against its size: what is pooled, and why some are not."""

    boxes: np.ndarray  # (N, 4) float64 in the image's pixels, clipped to it; refused rows as given
    pooled: np.ndarray  # (N,) bool: False for the refused
    refused: list[dict]  # [{"box": i, "error": why}]
    clipped: list[dict]  # [{"box": i, "to": [x1, y1, x2, y2]}]


def check(boxes: ImageBoxes, size: tuple[int, int]) -> Checked:
    """Checks each box against an image of ``size`` (H, W). A box reaching past the image is
    clipped to it, as torchvision's detectors clip proposals before pooling (COCO boxes often end
    a fraction of a pixel past the edge); one that is empty, not finite, or wholly outside is
    refused."""
    height, width = size
    given = boxes.array()
    clipped = given.copy()
    clipped[:, 0::2] = np.clip(given[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(given[:, 1::2], 0, height)
    pooled = np.ones(len(given), dtype=bool)
    refused: list[dict] = []
    moved: list[dict] = []
    for i, (box, source) in enumerate(zip(given, boxes.sources, strict=True)):
        x1, y1, x2, y2 = box
        text = f"box {i} ({source}) {_show(box)}"
        if not all(math.isfinite(v) for v in box):
            error = f"{text}: coordinates are not finite"
        elif x2 <= x1 or y2 <= y1:
            error = f"{text}: empty ({'x2 <= x1' if x2 <= x1 else 'y2 <= y1'})"
        elif clipped[i, 2] <= clipped[i, 0] or clipped[i, 3] <= clipped[i, 1]:
            error = f"{text}: outside the {height}x{width} image"
        else:
            if not np.array_equal(clipped[i], box):
                moved.append({"box": i, "to": clipped[i].tolist()})
            continue
        pooled[i] = False
        clipped[i] = box
        refused.append({"box": i, "error": error})
    return Checked(clipped, pooled, refused, moved)


def _show(box: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def clip_note(boxes: ImageBoxes, clip: dict, size: tuple[int, int]) -> str:
    """The message for a box that :func:`check` clipped."""
    i = clip["box"]
    return (
        f"box {i} ({boxes.sources[i]}) {_show(boxes.boxes[i])} reaches past the {size[0]}x{size[1]} "
        f"image: clipped to {_show(clip['to'])}"
    )


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
