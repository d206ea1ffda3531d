"""What a run produced, and its human-readable renderings: the summary table and the shape report."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .model import STRIDES, FPNConfig

Shapes = dict[str, tuple[int, int, int]]


def format_summary(config: FPNConfig, params: int, sizes: Sequence[tuple[tuple[int, int], Shapes]]) -> str:
    """One block per input size: a row per level with stride, channels, height and width."""
    lines = [f"{config.arch}, {config.fpn_style} FPN, {params:,} parameters"]
    for (h, w), shapes in sizes:
        lines += ["", f"input {h}x{w}", f"{'level':<6}{'stride':>7}{'channels':>10}{'height':>8}{'width':>7}"]
        for name, (c, lh, lw) in shapes.items():
            lines.append(f"{name.upper():<6}{STRIDES[name]:>7}{c:>10}{lh:>8}{lw:>7}")
    return "\n".join(lines)


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

    def to_json(self) -> dict:
        entry: dict = {"path": self.path, "status": self.status}
        if self.error is not None:
            entry["error"] = self.error
        entry["input_size"] = list(self.input_size) if self.input_size else None
        entry["model_input_size"] = list(self.model_input_size) if self.model_input_size else None
        entry["levels"] = self.levels
        if self.preview is not None:
            entry["preview"] = self.preview
        return entry


class Report:
    """Collects per-image results (from any thread), counts them and owns the exit-status policy."""

    def __init__(
        self, header: dict, total: int = 0, on_add: Callable[[int, int], None] | None = None
    ) -> None:
        self.header = header  # version, model, preprocess, device
        self.total = total  # images this run is responsible for
        self.on_add = on_add  # called with (done, total) after each result: a progress display
        self._results: list[ImageResult] = []
        self._lock = threading.Lock()
        self.interrupted = False

    def add(self, result: ImageResult) -> None:
        with self._lock:
            self._results.append(result)
            done = len(self._results)
        if self.on_add is not None:
            self.on_add(done, self.total)

    @property
    def results(self) -> list[ImageResult]:
        with self._lock:
            return sorted(self._results, key=lambda r: r.path)

    @property
    def counts(self) -> dict[str, int]:
        counts = {"ok": 0, "skipped": 0, "failed": 0}
        for r in self.results:
            counts[r.status] += 1
        return counts

    @property
    def exit_status(self) -> int:
        """0: every input written or already complete; 1: some failed; 130: interrupted."""
        if self.interrupted:
            return 130
        return 1 if self.counts["failed"] else 0

    def to_json(self) -> dict:
        return {
            **self.header,
            "images": [r.to_json() for r in self.results],
            "counts": self.counts,
            **({"interrupted": True} if self.interrupted else {}),
        }

    def format_shapes(self) -> str:
        """The human shape report: images grouped by network input size, with their level shapes."""
        groups: dict[tuple, list[ImageResult]] = defaultdict(list)
        failed = []
        for r in self.results:
            if r.status == "failed":
                failed.append(r)
            else:
                shapes = tuple((k, tuple(v["shape"])) for k, v in r.levels.items())
                groups[(r.model_input_size, shapes)].append(r)
        c = self.counts
        shard = self.header.get("shard")
        lines = [
            (f"shard {shard[0]} of {shard[1]}: " if shard else "")
            + f"{sum(c.values())} images: {c['ok']} written, {c['skipped']} already complete, "
            f"{c['failed']} failed",
            "network input HxW, then each level's CxHxW:",
        ]
        for (size, shapes), members in sorted(groups.items(), key=lambda g: g[1][0].path):
            names = ", ".join(m.path for m in members[:3]) + (
                f" and {len(members) - 3} more" if len(members) > 3 else ""
            )
            size_text = f"{size[0]}x{size[1]}" if size else "size unknown"
            lines.append(f"{size_text}  ({len(members)} image{'s' if len(members) > 1 else ''}: {names})")
            lines.append("    " + "  ".join(f"{k.upper()} {'x'.join(map(str, s))}" for k, s in shapes))
        for r in failed:
            lines.append(f"failed: {r.path}: {r.error}")
        return "\n".join(lines)


def merge_reports(parts: Sequence[dict]) -> dict:
    """One report.json from the shards' reports: every image once, counts added up."""
    images = sorted((image for part in parts for image in part["images"]), key=lambda e: e["path"])
    counts = {k: sum(part["counts"][k] for part in parts) for k in ("ok", "skipped", "failed")}
    merged = {k: v for k, v in parts[0].items() if k not in ("images", "counts", "interrupted", "shard")}
    merged.update(images=images, counts=counts, shards=len(parts))
    if any(part.get("interrupted") for part in parts):
        merged["interrupted"] = True
    return merged
