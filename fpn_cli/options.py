"""A run's settings: :class:`Options` (the CLI's options, by the same names), and what of them is
recorded: the settings record checked on resume, and report.json's header."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .engine import DTYPES, MEAN, SAVE_DTYPES, STD
from .errors import UsageError
from .images import DEFAULT_MAX_PIXELS, Resize
from .model import DEFAULT_LEVELS, FPNConfig, parse_levels
from .version import __version__


@dataclass(frozen=True)
class Options:
    """Every setting of an extraction run (the CLI's options, by the same names)."""

    arch: str = "resnet50"
    weights: str = "random"
    fpn_style: str | None = None  # None: reference, or what the weights need
    levels: tuple[str, ...] = DEFAULT_LEVELS
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None  # None: 8 on an accelerator, 1 on the CPU
    resize: Resize = field(default_factory=Resize)
    dtype: str = "float32"  # compute precision (autocast below float32)
    save_dtype: str = "float32"
    overwrite: bool = False
    workers: int | None = None  # decode threads; None: by device and core count
    fail_fast: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    preview: bool = False  # also write OUT/<key>/preview.png

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", parse_levels(self.levels))
        object.__setattr__(self, "weights", str(self.weights))
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UsageError(f"unknown save dtype {self.save_dtype!r}; choose from {', '.join(SAVE_DTYPES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")


def settings_record(opts: Options, fpn_style: str) -> dict:
    """What decides the numbers in the files: recorded in the output folder and checked on resume."""
    weights = opts.weights
    if weights not in ("random", "imagenet", "coco"):
        weights = str(Path(weights).resolve())
    return {
        "arch": opts.arch,
        "fpn_style": fpn_style,
        "weights": weights,
        "seed": opts.seed if opts.weights != "coco" else None,
        "dtype": opts.dtype,
        "save_dtype": opts.save_dtype,
        "resize": asdict(opts.resize),
    }


def report_header(
    opts: Options, config: FPNConfig, device: torch.device, shard: tuple[int, int] | None
) -> dict:
    """report.json's fields before the images: version, model, preprocessing, device, shard."""
    return {
        "version": __version__,
        "model": {
            "arch": config.arch,
            "fpn_style": config.fpn_style,
            "weights": opts.weights,
            "levels": list(config.levels),
            "seed": opts.seed,
            "bn_eps": config.bn_eps,
            "dtype": opts.dtype,
            "save_dtype": opts.save_dtype,
        },
        "preprocess": {
            "size": list(opts.resize.size) if opts.resize.size else None,
            "short_side": opts.resize.short_side,
            "max_side": opts.resize.max_side,
            "resample": "bilinear (Pillow, on 8-bit RGB)",
            "mean": list(MEAN),
            "std": list(STD),
        },
        "device": str(device),
        **({"shard": list(shard)} if shard else {}),
    }
