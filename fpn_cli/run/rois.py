"""``fpn-extract roi OUT --boxes FILE``: RoI features from the levels an output folder stores,
with no network, in any storage format: through the format's :class:`~fpn_cli.formats.base.Storage`
(opened by the registry), as a run writes them. Each image the boxes file names gets its
``rois`` and ``boxes`` arrays; report.json's entries get their ``rois``.

A format that adds arrays to an image in place (npy) writes the two arrays and the image's record
again (last: it marks them complete); one that writes an image whole (shards) writes the image
again, with the arrays it keeps read back, into a new shard that replaces its old group.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpn_cli.errors import UsageError
from fpn_cli.formats import DEFAULT_SHARD_SIZE, codecs, get_format
from fpn_cli.formats.base import BOX_DTYPE, BOXES, ROIS, Storage, derived_names
from fpn_cli.formats.locks import finish_overwrite, read_settings, record_settings
from fpn_cli.inputs.images import output_key
from fpn_cli.layout import OVERWRITE_MARKER, REPORT_FILE, SETTINGS_FILE
from fpn_cli.models.levels import LEVELS
from fpn_cli.regions.boxes import BoxFile, read_boxes, warn_unknown
from fpn_cli.regions.geometry import Geometry
from fpn_cli.regions.outputs import Outputs, lost_rois, tell_boxes, tell_lost_rois
from fpn_cli.regions.pooling import RoiSpec
from fpn_cli.report import dump_report


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
    the ``rois`` and ``boxes`` arrays of each image the file names, in the folder's format, the
    same bytes an extraction with ``--boxes`` writes. Images whose rois are complete for these boxes are left
    alone unless ``overwrite``. The settings are the folder's (``roi_size``/``roi_levels`` other
    than those its rois were made with are a :class:`UsageError` unless ``overwrite``);
    report.json's entries get their ``rois``."""
    log = log or (lambda message: None)
    on_failure = on_failure or (lambda path, reason: None)
    out = Path(out)
    if not (out / SETTINGS_FILE).is_file() or not (out / REPORT_FILE).is_file():
        raise UsageError(f"{out} holds no finished extraction (.fpn-extract.json and report.json)")
    settings, report = read_settings(out), _read_report(out / REPORT_FILE)
    if settings is None or report is None:
        raise UsageError(f"cannot read the settings and report.json of {out}")
    format = get_format(settings.get("format", "npy"))
    store = format.open_store(
        out, report["model"]["levels"], settings["save_dtype"], DEFAULT_SHARD_SIZE, None
    )
    table = read_boxes(boxes)
    with store.lock():
        settings, report = read_settings(out), _read_report(out / REPORT_FILE)
        if settings is None or report is None:
            raise UsageError(f"cannot read the settings and report.json of {out}")
        if any(out.glob(OVERWRITE_MARKER + "*")):
            raise UsageError(f"{out} holds an unfinished --overwrite extraction: finish it first")
        spec = _roi_spec(settings, report, roi_size, roi_levels)
        # new RoI settings over old rois: the folder mixes both until every image is redone
        changed = overwrite and settings.get("roi", spec.record()) != spec.record()
        record_settings(out, {**settings, "roi": spec.record()}, changed, None)
        result = _rois_for_report(store, report, table, spec, overwrite, log, on_failure)
        if changed:
            finish_overwrite(out, None)
    return result


def _rois_for_report(
    store: Storage,
    report: dict,
    table: BoxFile,
    spec: RoiSpec,
    overwrite: bool,
    log: Callable[[str], None],
    on_failure: Callable[[str, str], None],
) -> RoiRun:
    """RoI features for every image of ``report`` that ``table`` has boxes for; report.json
    rewritten with their entries, the store's index with its images."""
    outputs = Outputs(spec.levels, store.save_dtype, maps=False, roi=spec, boxes=table)
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
    kept = [(rel, output_key(rel)) for rel, entry in entries.items() if entry["status"] != "failed"]
    tell_lost_rois(lost_rois(kept, outputs, store.is_stored), "roi", log)
    for rel, key in kept:  # rois of another boxes file (or RoI settings) go
        unwanted = outputs.unwanted(rel)
        if unwanted and any(store.is_stored(key, name) for name in unwanted):
            entries[rel].pop("rois", None)
            _rewrite(store, key, entries[rel], {}, unwanted)
    store.flush()
    regions = report.setdefault("regions", {"maps": True, "pool": []})
    regions.update({k: v for k, v in outputs.header(result.unknown).items() if k in ("roi", "boxes")})
    _write_report(store, report)  # with the format's index
    return result


def _rewrite(
    store: Storage,
    key: str,
    entry: dict,
    add: Mapping[str, np.ndarray],
    drop: Sequence[str],
    rois: Callable[[], dict] | None = None,
) -> None:
    """``key``'s arrays with ``add`` written and ``drop`` gone, through the store: in place where
    it can, else the image whole (what it keeps read back); then its record, last, and its
    report ``entry``, every array listed where the store now has it (``rois()``: the entry's
    ``rois``, asked once the arrays are written)."""
    if store.in_place:
        store.forget_arrays(key, drop)
        store.write_levels(key, add)
    else:
        scales = (codecs.scale_name(level) for level in LEVELS)
        stored = store.shapes(key, (*LEVELS, *scales, *derived_names()), {BOXES: BOX_DTYPE})
        kept = {name: store.read_array(key, name) for name in stored if name not in add and name not in drop}
        store.write_levels(key, {**kept, **add})
    for field_name in ("levels", "pooled"):
        for name, info in (entry.get(field_name) or {}).items():
            info.update(store.location(key, name))
            if "scale" in info:  # an int8 level's scales
                info["scale"].update(store.location(key, codecs.scale_name(name)))
    if rois is not None:
        entry["rois"] = rois()
    # the record written last again, as a run does: it marks the image complete
    store.finish_image(key, store.read_record(key), entry)


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
    store: Storage,
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
    checked = outputs.checked(rel, geometry)
    if ROIS in have:
        result.complete += 1
        entry["rois"] = outputs.entries(key, rel, have, geometry, store.location, checked)["rois"]
    else:
        stored = store.shapes(key, outputs.levels)
        lacking = [level for level in outputs.levels if level not in stored]
        if lacking:
            result.failed += 1
            on_failure(rel, f"{key}/{lacking[0]}.npy is missing or incomplete: extract it first")
            return
        names = [name for level in outputs.levels for name in outputs.stored(level)]
        levels = outputs.floats({name: store.read_array(key, name) for name in names})  # decoded
        arrays = outputs.compute(levels, (ROIS, BOXES), rel, geometry, checked)
        have = {name: arrays[name].shape for name in (ROIS, BOXES)}

        def rois() -> dict:
            return outputs.entries(key, rel, have, geometry, store.location, checked)["rois"]

        _rewrite(store, key, entry, arrays, (), rois)
        result.written += 1
    tell_boxes(rel, rel, outputs, geometry, log, on_failure, checked)
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


def _write_report(store: Storage, report: Mapping) -> None:
    """report.json again, in the layout a run writes it (one line per image)."""
    tail = ("images", "counts", "shards", "interrupted")
    header = {k: v for k, v in report.items() if k not in tail}
    extra = {k: report[k] for k in ("shards", "interrupted") if k in report}
    lines = (json.dumps(entry, allow_nan=False) for entry in report["images"])
    store.write_report(lambda f: dump_report(f, header, lines, report["counts"], extra))
