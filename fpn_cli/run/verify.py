"""``fpn-extract verify OUT``: does an output folder hold what its report.json says, made from the
inputs as they are now?

For every image report.json lists as ok or skipped:

- each listed level's file is present, a regular file, a complete ``.npy`` (valid header, full
  length) of the report's save dtype, its array of the checksum recorded with the image (the
  image's own, unaltered: formats/npyio.py), and of the shape listed, which is the shape the
  report's model gives for the image's network input size; every level of the model is listed,
  unless the run stored none (``--no-maps``);
- its ``geometry``, if listed, gives each level the size the model gives (else, where the model
  cannot be built here, the size of the level's listed shape) and the level's stride;
- each listed pooled vector (``--pool``) likewise, of the shape listed, (C,) for its level's C;
- its RoI features (``--boxes``), if listed: ``rois.npy`` likewise, of the shape listed, and
  ``boxes.npy`` a complete float64 ``.npy`` of one row of 4 per RoI;
- its preview, if one is listed, is present;
- its record (``input.json``, resume.py) is present and names the same image, and the input it
  names is still there, a regular file of the recorded size and modification time, and of the
  recorded SHA-256 where one was recorded (``--hash``).

The counts must match the entries. Every problem is one line, ``PATH: what is wrong``. Arrays of
a folder made before checksums were recorded are checked by their shape alone, and the summary
says how many.

A ``--format shards`` folder is checked the same way through its index (formats/shards.py): each
listed array is a member of the shard the index has for the image, where report.json says, the
tar header just before it naming it (``<stem>.p2.npy``, the image's own) with the listed size, its
``.npy`` header in the tar of the dtype and shape the index and the report list, within the tar,
its bytes of the checksum in the index;
the record is the one in the image's index line (from its json member). An input that was a tar
member is found again by listing its tar, one behind a URL by asking its store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fpn_cli.errors import FPNError, ImageError, UsageError
from fpn_cli.formats import codecs, verify_reader
from fpn_cli.formats.base import BOX_DTYPE, VerifyReader
from fpn_cli.inputs.images import Readable, output_key
from fpn_cli.inputs.sources import RemoteFile, tar_members
from fpn_cli.inputs.urls import filesystem, is_url
from fpn_cli.layout import REPORT_FILE, SHARDS_DIR
from fpn_cli.models.levels import LEVELS
from fpn_cli.models.model import FPNConfig
from fpn_cli.regions.geometry import LevelSizes
from fpn_cli.run.resume import change, recorded_fingerprint

STATUSES = ("ok", "skipped", "failed")


@dataclass
class Verification:
    """What :func:`verify_folder` found."""

    images: int = 0  # entries checked (ok and skipped)
    problems: list[str] = field(default_factory=list)
    shape_only: int = 0  # arrays without a recorded checksum: checked by their shape alone

    def summary(self) -> str:
        found = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        line = (
            f"verified {self.images} images: {found}"
            if self.problems
            else f"verified {self.images} images: all as reported"
        )
        if self.shape_only:
            plural = "s" if self.shape_only != 1 else ""
            line += (
                f"; {self.shape_only} array{plural} checked by shape only (no checksum recorded: "
                "made by an earlier version)"
            )
        return line


def verify_folder(out: str | os.PathLike[str]) -> Verification:
    """Checks the folder ``out`` (either format) as the module says; a folder without a readable
    report.json is a :class:`UsageError`."""
    if is_url(str(out)):
        raise UsageError(f"{out}: verify reads local folders; copy the folder here to verify it")
    root = Path(out)
    report = _read_report(root)
    folder = verify_reader(root)
    tars: dict[str, dict[str, Readable]] = {}  # tar -> its image members, listed once
    result = Verification()
    model = report.get("model") if isinstance(report.get("model"), dict) else {}
    entries = report.get("images")
    if not isinstance(entries, list):
        result.problems.append(f"{REPORT_FILE}: lists no images")
        return result
    save_dtype = str(model.get("save_dtype", "float32"))
    if save_dtype not in codecs.SAVE_DTYPES:
        result.problems.append(f"{REPORT_FILE}: unknown save dtype {save_dtype!r}; read as float32")
        save_dtype = "float32"
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
        problems = _check_image(folder, entry, save_dtype, model, config, maps, tars, result)
        result.problems += [f"{path}: {p}" for p in problems]
    result.problems += folder.folder_problems()
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
    folder: VerifyReader,
    entry: dict,
    save_dtype: str,
    model: dict,
    config: FPNConfig | None,
    maps: bool = True,
    tars: dict[str, dict[str, Readable]] | None = None,
    result: Verification | None = None,
) -> list[str]:
    """The problems of one image's entry: each array as listed, in the dtype ``save_dtype``
    stores it (codecs.array_dtype: codes, int8 scales, float derived arrays); ``result`` counts
    the arrays checked by shape alone."""
    problems = []
    folder = _Counted(folder, result if result is not None else Verification())
    dtype = codecs.derived_dtype(save_dtype)  # pooled vectors and rois
    key = output_key(str(entry.get("path")))
    levels = entry.get("levels") if isinstance(entry.get("levels"), dict) else {}
    required = (model.get("levels") or ()) if maps else ()  # --no-maps stores no levels
    for level in required:
        if level not in levels:
            problems.append(f"lists no {level}")
    expected = _expected(config, entry.get("model_input_size"))
    for level, info in levels.items():
        problems += _check_level(folder, key, level, info, codecs.code_dtype(save_dtype), expected.get(level))
        problems += _check_scales(folder, key, level, info, save_dtype, expected.get(level))
    problems += _check_geometry(entry.get("geometry"), expected, levels)
    pooled = entry.get("pooled") if isinstance(entry.get("pooled"), dict) else {}
    for name, info in pooled.items():
        channels = expected.get(name.rsplit("_", 1)[0])
        problems += _check_level(folder, key, name, info, dtype, channels[:1] if channels else None)
    if entry.get("rois") is not None:
        problems += _check_rois(folder, key, entry["rois"], dtype)
    detections = entry.get("detections") if isinstance(entry.get("detections"), dict) else {}
    for name, info in (detections.get("arrays") or {}).items():  # --detect: exact or derived dtypes
        problems += _check_level(folder, key, name, info, codecs.array_dtype(save_dtype, name, ()), None)
    if entry.get("preview") and not (folder.root / entry["preview"]).is_file():
        problems.append(f"its preview {entry['preview']} is missing")
    if not (levels or pooled or detections or entry.get("rois") is not None or entry.get("preview")):
        return problems  # nothing stored for it (--no-maps, no boxes for it): no record vouches
    return problems + _check_input(folder, key, entry, {} if tars is None else tars)


class _Counted:
    """A verify reader that also checks an array's content against its recorded checksum
    (:meth:`content_problems`), counting in ``result`` the arrays that have none."""

    def __init__(self, reader: VerifyReader, result: Verification) -> None:
        self.reader, self.result, self.root = reader, result, reader.root

    def array(self, key: str, info: dict, dtype: np.dtype) -> tuple[str, str | None, tuple[int, ...] | None]:
        return self.reader.array(key, info, dtype)

    def content_problems(self, key: str, info: dict, shown: str) -> list[str]:
        same = self.reader.content(key, info)
        if same is None:
            self.result.shape_only += 1
        elif not same:
            return [f"{shown} does not hold the array recorded for it (its checksum differs)"]
        return []

    def boxes(self, rois: dict) -> dict:
        return self.reader.boxes(rois)

    def record(self, key: str) -> tuple[dict | None, str]:
        return self.reader.record(key)


def _expected(config: FPNConfig | None, size: object) -> dict[str, tuple[int, ...]]:
    """Each level's (C, h, w) as the model gives it for the network input ``size``."""
    if config is None or not (isinstance(size, list) and len(size) == 2):
        return {}
    try:
        return LevelSizes(config)(int(size[0]), int(size[1]))
    except (FPNError, TypeError, ValueError):
        return {}


def _check_geometry(geometry: object, expected: dict[str, tuple[int, ...]], levels: dict) -> list[str]:
    """report.json's ``geometry`` of an image against the model's level sizes (or, where the model
    cannot be built here, against the shapes listed)."""
    if geometry is None:
        return []
    per_level = geometry.get("levels") if isinstance(geometry, dict) else None
    if not isinstance(per_level, dict):
        return ["its geometry lists no levels"]
    problems = []
    for level, info in per_level.items():
        listed = levels.get(level) if isinstance(levels.get(level), dict) else {}
        size = expected.get(level, tuple(listed.get("shape") or ()))[1:]
        found = tuple(info.get("size") or ()) if isinstance(info, dict) else ()
        if size and found != tuple(size):
            model = _text(tuple(size))
            problems.append(f"its geometry gives {level} as {_text(found)}, but the model gives {model}")
        stride = LEVELS[level].stride if level in LEVELS else None
        if isinstance(info, dict) and info.get("stride") != stride:
            problems.append(f"its geometry gives {level} stride {info.get('stride')}, not {stride}")
    return problems


def _check_level(
    folder: VerifyReader,
    key: str,
    level: str,
    info: object,
    dtype: np.dtype,
    expected: tuple[int, ...] | None,
) -> list[str]:
    if not isinstance(info, dict) or "file" not in info:
        return [f"{level}: no file listed"]
    listed = tuple(info.get("shape") or ())
    shown, absent, shape = folder.array(key, info, dtype)
    if absent is not None:
        return [absent]
    if shape is None:
        return [f"{shown} is not a complete {dtype} .npy file (header, dtype or length)"]
    problems = []
    if shape != listed:
        problems.append(f"{shown} has shape {_text(shape)}, the report lists {_text(listed)}")
    if expected is not None and listed != expected:
        problems.append(f"{level} is listed as {_text(listed)}, but the model gives {_text(expected)}")
    if not problems and isinstance(folder, _Counted):
        problems += folder.content_problems(key, info, shown)
    return problems


def _check_scales(
    folder: VerifyReader,
    key: str,
    level: str,
    info: object,
    save_dtype: str,
    expected: tuple[int, ...] | None,
) -> list[str]:
    """An int8 level's scales, listed as its entry's ``scale``: (C,) float32 for its C channels."""
    names = codecs.array_names(level, save_dtype)[1:]
    if not names or not isinstance(info, dict):
        return []
    if not isinstance(info.get("scale"), dict):
        return [f"{level}: no scales listed (an int8 level's codes need them)"]
    channels = (expected or tuple(info.get("shape") or ()))[:1]
    return _check_level(folder, key, names[0], info["scale"], np.dtype(np.float32), channels or None)


def _check_rois(folder: VerifyReader, key: str, rois: object, dtype: np.dtype) -> list[str]:
    """rois.npy as listed, and boxes.npy beside it: (N, 4) float64 for its N rows."""
    if not isinstance(rois, dict) or "boxes" not in rois:
        return ["rois: no boxes file listed"]
    problems = _check_level(folder, key, "rois", rois, dtype, None)
    count = (rois.get("shape") or [None])[0]
    shown, absent, shape = folder.array(key, folder.boxes(rois), BOX_DTYPE)
    if absent is not None:
        return [*problems, absent]
    if shape is None:
        problems.append(f"{shown} is not a complete {BOX_DTYPE} .npy file (header, dtype or length)")
    elif shape != (count, 4):
        problems.append(f"{shown} has shape {_text(shape)}, not {count}x4 for the RoIs listed")
    elif isinstance(folder, _Counted):
        problems += folder.content_problems(key, folder.boxes(rois), shown)
    return problems


def _check_input(
    folder: VerifyReader, key: str, entry: dict, tars: dict[str, dict[str, Readable]]
) -> list[str]:
    record, where = folder.record(key)
    if record is None:
        return [f"no record of its input ({where})"]
    recorded = recorded_fingerprint(record)
    if recorded is None:
        return [f"{where} is not a valid record"]
    source = record["input"]
    if record.get("path") != entry.get("path"):
        return [f"{where} is the record of {record.get('path')}"]
    shown = source if "member" not in record else f"{source}#{record['member']}"
    try:
        found = _input(source, record.get("member"), tars)
        if found is None:
            return [f"its input {shown} no longer exists"]
        changed = change(recorded, found, content_hash=recorded.sha256 is not None)
    except ImageError as e:
        return [f"its input {shown}: {e}"]
    except FPNError as e:  # a tar that cannot be listed, a URL without its backend
        return [f"its input {shown}: {e}"]
    return [f"its input {shown}: {changed}"] if changed else []


def _input(source: str, member: object, tars: dict[str, dict[str, Readable]]) -> str | Readable | None:
    """The input a record names, as it is now: a local path, a member of a tar (its tar listed
    again, once: ``tars``), an object behind a URL; None where it no longer exists."""
    if member is not None:
        if source not in tars:
            if not is_url(source) and not os.path.isfile(source):
                return None
            found = tar_members(source, _open(source), source)
            tars[source] = {image.path.name: image.path for image in found if image.error is None}
        return tars[source].get(str(member))
    if is_url(source):
        return RemoteFile(source)
    return source if os.path.lexists(source) else None


def _open(path: str) -> BinaryIO:
    if not is_url(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    return fs.open(inner, "rb")


def _text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "nothing"
