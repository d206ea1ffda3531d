"""``fpn-extract verify OUT``: does an output folder hold what its report.json says, made from the
inputs as they are now?

For every image report.json lists as ok or skipped:

- each listed level's file is present, a complete ``.npy`` (valid header, full length) of the
  report's save dtype, and of the shape listed, which is the shape the report's model gives for
  the image's network input size; every level of the model is listed, unless the run stored
  none (``--no-maps``);
- each listed pooled vector (``--pool``) likewise, of the shape listed, (C,) for its level's C;
- its RoI features (``--boxes``), if listed: ``rois.npy`` likewise, of the shape listed, and
  ``boxes.npy`` a complete float64 ``.npy`` of one row of 4 per RoI;
- its preview, if one is listed, is present;
- its record (``input.json``, resume.py) is present and names the same image, and the input it
  names is still there, a regular file of the recorded size and modification time, and of the
  recorded SHA-256 where one was recorded (``--hash``).

The counts must match the entries. Every problem is one line, ``PATH: what is wrong``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FPNError, ImageError, UsageError
from .images import InputImage
from .model import FPNConfig, output_shapes
from .npyio import npy_shape
from .resume import change, recorded_fingerprint
from .roi import BOX_DTYPE
from .store import REPORT_FILE, SHARDS_DIR, Store

STATUSES = ("ok", "skipped", "failed")


@dataclass
class Verification:
    """What :func:`verify_folder` found."""

    images: int = 0  # entries checked (ok and skipped)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        found = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return (
            f"verified {self.images} images: {found}"
            if self.problems
            else f"verified {self.images} images: all as reported"
        )


def verify_folder(out: str | os.PathLike[str]) -> Verification:
    """Checks the folder ``out`` as the module says; a folder without a readable report.json is a
    :class:`UsageError`."""
    root = Path(out)
    report = _read_report(root)
    result = Verification()
    model = report.get("model") if isinstance(report.get("model"), dict) else {}
    entries = report.get("images")
    if not isinstance(entries, list):
        result.problems.append(f"{REPORT_FILE}: lists no images")
        return result
    try:
        dtype = np.dtype(model.get("save_dtype", "float32"))
    except TypeError:
        dtype = np.dtype("float32")
    config = _config(report)
    regions = report.get("regions") if isinstance(report.get("regions"), dict) else {}
    maps = regions.get("maps", True) is not False
    counts = dict.fromkeys(STATUSES, 0)
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("status") not in STATUSES:
            result.problems.append(f"{REPORT_FILE}: an entry that is not an image's: {str(entry)[:80]}")
            continue
        counts[entry["status"]] += 1
        if entry["status"] == "failed":
            continue
        result.images += 1
        path = str(entry.get("path"))
        problems = _check_image(root, entry, dtype, model, config, maps)
        result.problems += [f"{path}: {p}" for p in problems]
    if isinstance(report.get("counts"), dict) and report["counts"] != counts:
        result.problems.append(f"{REPORT_FILE}: counts {report['counts']} but its entries give {counts}")
    return result


def _read_report(root: Path) -> dict:
    try:
        text = (root / REPORT_FILE).read_bytes()
    except FileNotFoundError:
        shards = " (its shards have not all finished)" if (root / SHARDS_DIR).is_dir() else ""
        raise UsageError(
            f"{root} has no {REPORT_FILE}{shards}: not a finished fpn-extract output folder"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read {root / REPORT_FILE}: {e.strerror or e}") from None
    try:
        report = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{root / REPORT_FILE} is not valid JSON: {e}") from None
    if not isinstance(report, dict):
        raise UsageError(f"{root / REPORT_FILE} is not an fpn-extract report")
    return report


def _config(report: dict) -> FPNConfig | None:
    """The network report.json describes, for its shapes; None where it cannot be built here (a
    timm backbone without timm installed): shapes are then checked against the report alone."""
    model, pre = report.get("model") or {}, report.get("preprocess") or {}
    try:
        return FPNConfig(
            model["arch"],
            model["fpn_style"],
            tuple(model["levels"]),
            pad_multiple=int(pre.get("pad_multiple") or 1),
        )
    except (FPNError, KeyError, TypeError, ValueError, ImportError):
        return None


def _check_image(
    root: Path, entry: dict, dtype: np.dtype, model: dict, config: FPNConfig | None, maps: bool = True
) -> list[str]:
    problems = []
    levels = entry.get("levels") if isinstance(entry.get("levels"), dict) else {}
    required = (model.get("levels") or ()) if maps else ()  # --no-maps stores no levels
    for level in required:
        if level not in levels:
            problems.append(f"lists no {level}")
    expected = _expected(config, entry.get("model_input_size"))
    for level, info in levels.items():
        problems += _check_level(root, level, info, dtype, expected.get(level))
    pooled = entry.get("pooled") if isinstance(entry.get("pooled"), dict) else {}
    for name, info in pooled.items():
        channels = expected.get(name.rsplit("_", 1)[0])
        problems += _check_level(root, name, info, dtype, channels[:1] if channels else None)
    if entry.get("rois") is not None:
        problems += _check_rois(root, entry["rois"], dtype)
    if entry.get("preview") and not (root / entry["preview"]).is_file():
        problems.append(f"its preview {entry['preview']} is missing")
    return problems + _check_input(root, entry)


def _expected(config: FPNConfig | None, size: object) -> dict[str, tuple[int, ...]]:
    if config is None or not (isinstance(size, list) and len(size) == 2):
        return {}
    try:
        return output_shapes(config, int(size[0]), int(size[1]))
    except (FPNError, RuntimeError, TypeError, ValueError):
        return {}


def _check_level(
    root: Path, level: str, info: object, dtype: np.dtype, expected: tuple[int, ...] | None
) -> list[str]:
    if not isinstance(info, dict) or "file" not in info:
        return [f"{level}: no file listed"]
    path = root / str(info["file"])
    listed = tuple(info.get("shape") or ())
    if not path.is_file():
        return [f"{info['file']} is missing"]
    shape = npy_shape(path, dtype)
    if shape is None:
        return [f"{info['file']} is not a complete {dtype} .npy file (header, dtype or length)"]
    problems = []
    if shape != listed:
        problems.append(f"{info['file']} has shape {_text(shape)}, the report lists {_text(listed)}")
    if expected is not None and listed != expected:
        problems.append(f"{level} is listed as {_text(listed)}, but the model gives {_text(expected)}")
    return problems


def _check_rois(root: Path, rois: object, dtype: np.dtype) -> list[str]:
    """rois.npy as listed, and boxes.npy beside it: (N, 4) float64 for its N rows."""
    if not isinstance(rois, dict) or "boxes" not in rois:
        return ["rois: no boxes file listed"]
    problems = _check_level(root, "rois", rois, dtype, None)
    count = (rois.get("shape") or [None])[0]
    path = root / str(rois["boxes"])
    if not path.is_file():
        return [*problems, f"{rois['boxes']} is missing"]
    shape = npy_shape(path, BOX_DTYPE)
    if shape is None:
        problems.append(f"{rois['boxes']} is not a complete {BOX_DTYPE} .npy file (header, dtype or length)")
    elif shape != (count, 4):
        problems.append(f"{rois['boxes']} has shape {_text(shape)}, not {count}x4 for the RoIs listed")
    return problems


def _check_input(root: Path, entry: dict) -> list[str]:
    key = InputImage("", str(entry.get("path"))).key
    record = Store(root, (), "float32").read_record(key)
    if record is None:
        return [f"no record of its input ({key}/input.json)"]
    recorded = recorded_fingerprint(record)
    source = record.get("input")
    if recorded is None or not isinstance(source, str):
        return [f"{key}/input.json is not a valid record"]
    if record.get("path") != entry.get("path"):
        return [f"{key}/input.json is the record of {record.get('path')}"]
    if not os.path.lexists(source):
        return [f"its input {source} no longer exists"]
    try:
        changed = change(recorded, source, content_hash=recorded.sha256 is not None)
    except ImageError as e:
        return [f"its input {source}: {e}"]
    return [f"its input {source}: {changed}"] if changed else []


def _text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "nothing"
