"""What a run produced, and its human-readable renderings: the summary table and the shape report."""

from __future__ import annotations

import bisect
import inspect
import json
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from fpn_cli.formats import codecs
from fpn_cli.models.backbones import LevelInfo
from fpn_cli.run.signals import interrupted_status

Shapes = dict[str, tuple[int, int, int]]
_NAMES_SHOWN = 3  # images named per group in the shape report


COMPACT_AFTER = 3  # with more distinct input sizes, --summary gives a row per size, not a block
SIZE_ROWS = 10  # sizes shown as rows, the most common first; the rest are counted
FULL_BLOCKS = 2  # the largest sizes, also shown in full: they decide the memory a run needs


def format_summary(
    spec,
    params: int,
    info: dict[str, LevelInfo],
    sizes: Sequence[tuple[tuple[int, int], Shapes]],
    counts: Mapping[tuple[int, int], int] | None = None,
) -> str:
    """The model, then, for up to COMPACT_AFTER input sizes (or without ``counts``, the images
    per size), one block per size: a row per level with stride, channels, height and width, and
    the bytes per image. For more sizes, compact: a row per size (the SIZE_ROWS most common: its
    count and each level's height x width; the others counted), then the FULL_BLOCKS largest sizes
    as blocks."""
    config = spec.config
    lines = [f"{config.arch}, {config.fpn_style} FPN, {params:,} parameters, weights {spec.weights}"]
    lines.append(
        f"preprocessing: {spec.preprocess.describe()}"
        + (f", padded to a multiple of {config.pad_multiple}" if config.pad_multiple > 1 else "")
    )
    if counts is None or len(sizes) <= COMPACT_AFTER:
        for size, shapes in sizes:
            lines += ["", *_size_block(size, shapes, info)]
        return "\n".join(lines)
    by_size = dict(sizes)
    lines += ["", *_size_rows(by_size, counts)]
    largest = sorted(by_size, key=lambda s: (s[0] * s[1], s), reverse=True)[:FULL_BLOCKS]
    for size in largest:
        note = f"a largest; {counts[size]:,} image{'s' if counts[size] != 1 else ''}"
        lines += ["", *_size_block(size, by_size[size], info, note)]
    return "\n".join(lines)


def _size_block(
    size: tuple[int, int], shapes: Shapes, info: dict[str, LevelInfo], note: str = ""
) -> list[str]:
    """One input size in full: DESIGN.md's rows, level name first."""
    h, w = size
    lines = [f"input {h}x{w}" + (f" ({note})" if note else "")]
    lines.append(f"{'level':<6}{'stride':>7}{'channels':>10}{'height':>8}{'width':>7}")
    for name, (c, lh, lw) in shapes.items():
        lines.append(f"{name.upper():<6}{info[name].stride:>7}{c:>10}{lh:>8}{lw:>7}")
    per_dtype = (f"{codecs.stored_bytes(d, shapes) / 1e6:.1f} MB {d}" for d in codecs.SAVE_DTYPES)
    lines.append(f"output per image: {', '.join(per_dtype)}")
    return lines


def _size_rows(by_size: Mapping[tuple[int, int], Shapes], counts: Mapping[tuple[int, int], int]) -> list[str]:
    """A row per input size, the most common first: images, each level's height x width, MB."""
    order = sorted(by_size, key=lambda s: (-counts[s], s))
    names = list(by_size[order[0]])
    table = [["input", "images", *(name.upper() for name in names), "MB float32"]]
    for size in order[:SIZE_ROWS]:
        shapes = by_size[size]
        levels = [f"{lh}x{lw}" for _, lh, lw in shapes.values()]
        megabytes = f"{_values(shapes) * 4 / 1e6:.1f}"
        table.append([f"{size[0]}x{size[1]}", f"{counts[size]:,}", *levels, megabytes])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    shown = min(SIZE_ROWS, len(order))
    images = sum(counts.values())
    lines = [f"{len(order):,} input sizes, {images:,} images; the {shown} most common (levels: h x w):"]
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    rest = order[SIZE_ROWS:]
    if rest:
        others = sum(counts[s] for s in rest)
        lines.append(f"... {len(rest):,} more sizes, {others:,} image{'s' if others != 1 else ''}")
    return lines


def _values(shapes: Shapes) -> int:
    """The numbers an image's levels hold."""
    return sum(c * lh * lw for c, lh, lw in shapes.values())


@dataclass
class ImageResult:
    """One image's entry in report.json."""

    path: str  # relative to its input root, as in the output layout
    status: str  # "ok" | "skipped" | "failed"
    error: str | None = None
    input_size: tuple[int, int] | None = None  # (H, W) as decoded, EXIF orientation applied
    model_input_size: tuple[int, int] | None = None  # (H, W) after --size / --short-side
    levels: dict[str, dict] = field(default_factory=dict)  # level -> {"shape": [...], "file": ...}
    preview: str | None = None  # "x/cat/preview.png" when one exists
    recomputed: str | None = None  # why stored features were not kept (the input changed, say)
    geometry: dict | None = None  # orientation, scale, each level's stride and size (regions/geometry.py)
    pooled: dict[str, dict] = field(default_factory=dict)  # "p3_avg" -> {"shape": [C], "file": ...}
    rois: dict | None = None  # shape, files, refused and clipped boxes: with --boxes
    detections: dict | None = None  # with --detect: {"count": N, "arrays": {"det_boxes": {shape, file}}}

    @property
    def refused_boxes(self) -> int:
        return len(self.rois.get("refused", ())) if self.rois else 0

    def to_json(self) -> dict:
        entry: dict = {"path": self.path, "status": self.status}
        if self.error is not None:
            entry["error"] = self.error
        if self.recomputed is not None:
            entry["recomputed"] = self.recomputed
        entry["input_size"] = list(self.input_size) if self.input_size else None
        entry["model_input_size"] = list(self.model_input_size) if self.model_input_size else None
        entry["levels"] = self.levels
        if self.preview is not None:
            entry["preview"] = self.preview
        if self.pooled:
            entry["pooled"] = self.pooled
        if self.rois is not None:
            entry["rois"] = self.rois
        if self.detections is not None:
            entry["detections"] = self.detections
        if self.geometry is not None:
            entry["geometry"] = self.geometry
        return entry


def _takes_skipped(on_add: Callable | None) -> bool:
    """Whether a progress callback takes a third argument, the images skipped so far (complete
    from before, not computed: the CLI's displays leave them out of the rate); a plain
    ``(done, total)`` callback, as the API documents, keeps getting two."""
    if on_add is None:
        return False
    try:
        inspect.signature(on_add).bind(0, 0, 0)
    except (TypeError, ValueError):
        return False
    return True


class Report:
    """Collects per-image results (from any thread), counts them and owns the exit-status policy.

    Each result is kept as its report.json line (about 500 bytes, against 1.8 kB as objects) and
    the shape report's groups are tallied as results arrive, so a run of a million images holds
    a few hundred MB of report, not gigabytes."""

    def __init__(
        self, header: dict, total: int = 0, on_add: Callable[[int, int], None] | None = None
    ) -> None:
        self.header = header  # version, model, preprocess, device
        self.total = total  # images this run is responsible for
        self.on_add = on_add  # called with (done, total) after each result: a progress display
        self._with_skipped = _takes_skipped(on_add)  # ...and with skipped, where it takes a third
        self._interrupted_status: int | None = None  # set by interrupt()
        self._entries: list[tuple[str, str, str]] = []  # (path, status, JSON line)
        self._counts = {"ok": 0, "skipped": 0, "failed": 0}
        self._refused_boxes = 0  # boxes whose RoI features could not be pooled (a failure, too)
        self._nothing = 0  # images with nothing to store (--no-maps, no boxes for them): "skipped"
        self._groups: dict[tuple, list] = {}  # (input size, shapes) -> [count, first paths]
        self._failures: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add(self, result: ImageResult) -> None:
        line = json.dumps(result.to_json(), allow_nan=False)
        with self._lock:
            self._entries.append((result.path, result.status, line))
            self._counts[result.status] += 1
            self._refused_boxes += result.refused_boxes
            if result.status == "failed":
                self._failures.append((result.path, result.error or ""))
            else:
                stored = result.levels or result.pooled or result.rois is not None or result.preview
                self._nothing += result.status == "skipped" and not stored
                shapes = tuple((k, tuple(v["shape"])) for k, v in result.levels.items())
                group = self._groups.setdefault((result.model_input_size, shapes), [0, []])
                group[0] += 1
                bisect.insort(group[1], result.path)
                del group[1][_NAMES_SHOWN:]
            done, skipped = len(self._entries), self._counts["skipped"]
        if self._with_skipped:
            self.on_add(done, self.total, skipped)
        elif self.on_add is not None:
            self.on_add(done, self.total)

    def interrupt(self, interrupt: KeyboardInterrupt) -> None:
        """Records that ``interrupt`` (Ctrl-C, or an :class:`~fpn_cli.errors.Interrupted` signal)
        stopped the run: the report says ``"interrupted": true`` and :attr:`exit_status` is the
        signal's."""
        self._interrupted_status = interrupted_status(interrupt)

    @property
    def interrupted(self) -> bool:
        return self._interrupted_status is not None

    def statuses(self) -> list[tuple[str, str]]:
        """(path, status) of every image, sorted by path."""
        with self._lock:
            return sorted((path, status) for path, status, _ in self._entries)

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def refused_boxes(self) -> int:
        with self._lock:
            return self._refused_boxes

    @property
    def exit_status(self) -> int:
        """0: every input written or already complete; 1: some failed, or some boxes were refused;
        when interrupted, the signal's status (:func:`interrupted_status`: 130 for Ctrl-C, 143 for
        SIGTERM)."""
        if self._interrupted_status is not None:
            return self._interrupted_status
        return 1 if self.counts["failed"] or self.refused_boxes else 0

    def write_json(self, f: BinaryIO) -> None:
        """Writes report.json to ``f``: the header, one line per image (sorted by path), counts."""
        with self._lock:
            lines = [line for _, _, line in sorted(self._entries)]
        extra = {"interrupted": True} if self.interrupted else {}
        dump_report(f, self.header, lines, self.counts, extra)

    def format_shapes(self) -> str:
        """The human shape report: images grouped by network input size, with their level shapes."""
        c = self.counts
        shard = self.header.get("shard")
        nothing = f"{self._nothing} with nothing to store, " if self._nothing else ""
        lines = [
            (f"shard {shard[0]} of {shard[1]}: " if shard else "")
            + f"{sum(c.values())} images: {c['ok']} written, {c['skipped'] - self._nothing} already "
            f"complete, {nothing}{c['failed']} failed",
            "network input HxW, then each level's CxHxW:",
        ]
        with self._lock:
            groups = sorted(self._groups.items(), key=lambda g: g[1][1][0])
            failures = sorted(self._failures)
        for (size, shapes), (count, first) in groups:
            names = ", ".join(first) + (f" and {count - len(first)} more" if count > len(first) else "")
            size_text = f"{size[0]}x{size[1]}" if size else "size unknown"
            lines.append(f"{size_text}  ({count} image{'s' if count > 1 else ''}: {names})")
            if shapes:  # --no-maps stores no levels
                lines.append("    " + "  ".join(f"{k.upper()} {'x'.join(map(str, s))}" for k, s in shapes))
        for path, error in failures:
            lines.append(f"failed: {path}: {error}")
        if self.refused_boxes:
            lines.append(
                f"{self.refused_boxes} boxes refused (their rows of rois.npy are NaN; report.json says why)"
            )
        return "\n".join(lines)


def dump_report(f: BinaryIO, header: dict, image_lines: Iterable[str], counts: dict, extra: dict) -> None:
    """report.json, streamed: the header indented, then ``"images"`` one JSON object per line."""

    def field(key: str, value: object) -> str:
        return f"  {json.dumps(key, allow_nan=False)}: " + json.dumps(
            value, indent=2, allow_nan=False
        ).replace("\n", "\n  ")

    f.write(("{\n" + "".join(field(k, v) + ",\n" for k, v in header.items()) + '  "images": [').encode())
    for i, line in enumerate(image_lines):
        f.write(((",\n    " if i else "\n    ") + line).encode())
    tail = [field("counts", counts)] + [field(k, v) for k, v in extra.items()]
    f.write(("\n  ],\n" + ",\n".join(tail) + "\n}\n").encode())


def write_merged(f: BinaryIO, parts: Sequence[dict]) -> None:
    """One report.json from the shards' reports: every image once, counts added up."""
    images = sorted((image for part in parts for image in part["images"]), key=lambda e: e["path"])
    counts = {k: sum(part["counts"][k] for part in parts) for k in ("ok", "skipped", "failed")}
    header = {k: v for k, v in parts[0].items() if k not in ("images", "counts", "interrupted", "shard")}
    extra = {"shards": len(parts)}
    if any(part.get("interrupted") for part in parts):
        extra["interrupted"] = True
    dump_report(f, header, (json.dumps(image, allow_nan=False) for image in images), counts, extra)
