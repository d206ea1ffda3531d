"""A run's settings: :class:`Options` (the CLI's options, by the same names), and what of them is
recorded: the settings record checked on resume, and report.json's header."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

import torch

from fpn_cli.errors import UsageError
from fpn_cli.formats import DEFAULT_SHARD_SIZE, FORMATS
from fpn_cli.inputs.images import DEFAULT_MAX_PIXELS, Resize
from fpn_cli.inputs.urls import local_path
from fpn_cli.models.builder import RANDOM, SEED_RANGE, ModelSpec
from fpn_cli.models.choices import MAX_PAD_MULTIPLE
from fpn_cli.models.levels import parse_levels
from fpn_cli.models.model import level_info, resolved_levels
from fpn_cli.regions.choices import parse_pool
from fpn_cli.regions.pooling import RoiSpec
from fpn_cli.run.choices import DEFAULT_TIMEOUT, MAX_TIMEOUT, SAVE_DTYPES, shard_problem
from fpn_cli.run.engine import DTYPES
from fpn_cli.version import __version__


def check_resize(resize: Resize, max_pixels: int) -> None:
    """A resize that makes every image larger than ``max_pixels`` is refused before any work:
    ``--size HxW`` over it, or ``--short-side N`` (capped by ``--max-side M``) whose square
    target, N x N (or M x M), is. Other targets over the limit (a panorama given
    ``--short-side``) fail as single inputs when decoded."""
    if resize.size is not None:
        h, w = resize.size
        what = f"--size {h}x{w}"
    elif resize.short_side is not None:
        h = w = min(resize.short_side, resize.max_side or resize.short_side)
        what = f"--short-side {resize.short_side}" + (
            f" --max-side {resize.max_side}" if resize.max_side else ""
        )
    else:
        return
    if h * w > max_pixels:
        raise UsageError(
            f"{what} makes {h * w:,}-pixel inputs, over --max-pixels {max_pixels:,}: choose a smaller size "
            "(or raise --max-pixels if this machine has the memory)"
        )


# option -> (least, most) of an integer setting; None: unbounded. The CLI's click types and
# :func:`check_options` (which the Python API goes through) both read this one table.
INT_RANGES: dict[str, tuple[int | None, int | None]] = {
    "seed": SEED_RANGE,
    "batch_size": (1, None),
    "workers": (1, None),
    "writers": (1, None),
    "max_pixels": (1, None),
    "shard_size": (1, None),
    "pad_multiple": (1, MAX_PAD_MULTIPLE),
    "max_detections": (1, None),
}
OPTIONAL_INTS = ("batch_size", "workers", "writers", "pad_multiple", "max_detections")  # None: a default


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_int(name: str, value: object) -> None:
    """``value`` is an integer within ``INT_RANGES[name]``, or a :class:`UsageError` naming the option."""
    least, most = INT_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{_option(name)} must be a whole number (got {value!r})")
    if (least is not None and value < least) or (most is not None and value > most):
        bound = f"at least {least}" if most is None else f"from {least} to {most}"
        raise UsageError(f"{_option(name)} must be {bound} (got {value})")


def check_shard(shard: object) -> tuple[int, int] | None:
    """``shard=(I, N)`` as (I, N) with 0 <= I < N, or None; anything else is a :class:`UsageError`."""
    if shard is None:
        return None
    try:
        index, count = shard  # type: ignore[misc]
    except (TypeError, ValueError):
        raise UsageError(f"--shard {shard!r}: give (I, N), e.g. (0, 4)") from None
    problem = shard_problem(index, count)
    if problem:
        raise UsageError(f"--shard {shard!r}: {problem} (whole numbers)")
    return index, count


def check_options(opts: Options) -> None:
    """Every range and choice of ``opts``: the one validation of a run's settings, for the CLI and
    the Python API alike; the first problem is a one-line :class:`UsageError` naming the option."""
    for name in INT_RANGES:
        value = getattr(opts, name)
        if value is not None or name not in OPTIONAL_INTS:
            check_int(name, value)
    if not isinstance(opts.resize, Resize):
        raise UsageError(f"resize {opts.resize!r}: give a Resize(size, short_side, max_side)")
    check_resize(opts.resize, opts.max_pixels)
    timeout = opts.timeout
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT
    ):
        raise UsageError(f"--timeout must be more than 0 and at most {MAX_TIMEOUT:,} seconds")
    if opts.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {opts.dtype!r}; choose from {', '.join(DTYPES)}")
    if opts.save_dtype not in SAVE_DTYPES:
        raise UsageError(f"unknown save dtype {opts.save_dtype!r}; choose from {', '.join(SAVE_DTYPES)}")
    if opts.format not in FORMATS:
        raise UsageError(f"unknown format {opts.format!r}; choose from {', '.join(FORMATS)}")
    if opts.no_maps and not (opts.pool or opts.boxes or opts.detect):
        raise UsageError(
            "--no-maps stores only pooled vectors, RoI features and detections: "
            "add --pool or --boxes, or --detect"
        )
    _check_detect(opts)
    if opts.preview and opts.format != "npy":
        raise UsageError("--preview draws PNG files into the npy layout; it is not for --format shards")


def _check_detect(opts: Options) -> None:
    """--score-thresh, --max-detections and --detections-count K:M, which only --detect uses."""
    given = [
        name
        for name in ("score_thresh", "max_detections", "detections_count")
        if getattr(opts, name) is not None
    ]
    if opts.detect_extras:
        given.append("detect_extras")
    if not opts.detect:
        if given:
            raise UsageError(f"{_option(given[0])} sets how --detect keeps detections: add --detect")
        return
    thresh = opts.score_thresh
    if thresh is not None and (
        isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not 0 <= thresh < 1
    ):
        raise UsageError(f"--score-thresh must be from 0 to below 1 (got {thresh!r})")
    if opts.detections_count is not None:
        count = opts.detections_count
        if (
            not isinstance(count, tuple)
            or len(count) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in count)
            or not 1 <= count[0] <= count[1]
        ):
            raise UsageError(f"--detections-count must be K:M with 1 <= K <= M (got {count!r})")
        if opts.max_detections is not None:
            raise UsageError("--detections-count K:M sets the most boxes (M): leave --max-detections out")


def parse_count(text: str) -> tuple[int, int]:
    """``10:100`` -> (10, 100): --detections-count's K:M; a malformed one is a :class:`UsageError`."""
    least, sep, most = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(least), int(most)
    except ValueError:
        raise UsageError(f"--detections-count {text!r}: give K:M, at least K and at most M boxes") from None


@dataclass(frozen=True)
class Options:
    """Every setting of an extraction run (the CLI's options, by the same names)."""

    arch: str | None = None  # None: resnet50, or what the weights need
    weights: str = RANDOM
    fpn_style: str | None = None  # None: reference, or what the weights need
    levels: tuple[str, ...] | None = None  # None: P2-P5, or the zoo model's own pyramid
    pad_multiple: int | None = None  # None: what the weights' framework does (none for torchvision)
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None  # None: 8 on an accelerator, 1 on the CPU
    resize: Resize = field(default_factory=Resize)
    framework_resize: bool = False  # resize as the weights' framework does at test time (800/1333)
    dtype: str = "float32"  # compute precision (autocast below float32)
    save_dtype: str = "float32"
    overwrite: bool = False
    workers: int | None = None  # decode threads; None: by device and core count
    writers: int | None = None  # threads writing images; None: 4 on an accelerator, 1 on the CPU
    fail_fast: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    preview: bool = False  # also write OUT/<key>/preview.png
    format: str = "npy"  # npy: a file per level and image; shards: tar shards and an index (formats/)
    shard_size: int = DEFAULT_SHARD_SIZE  # with shards: a shard closes once it holds this many bytes
    timeout: float | None = DEFAULT_TIMEOUT  # seconds to read and decode one image; None: no limit
    hash: bool = False  # record a sha256 of each input, and check it on resume
    compile: bool = False  # torch.compile with freezing: faster forwards after a compile per input size
    boxes: str | None = None  # --boxes FILE: RoI features for its boxes (roi.py)
    roi_size: int | tuple[int, int] = 7  # each box's features are roi_size x roi_size (or (h, w))
    roi_levels: tuple[str, ...] | None = None  # None: those of P2-P5 the run extracts
    pool: tuple[str, ...] = ()  # "avg", "max": one vector per level
    no_maps: bool = False  # store only the pooled vectors and RoI features, not the levels
    detect: bool = False  # run the weights' detector heads: det_* arrays (regions/detect.py)
    detect_extras: tuple[str, ...] = ()  # "masks" (Mask R-CNN), "keypoints" (Keypoint R-CNN)
    score_thresh: float | None = None  # None: the detector's (0.05; FCOS 0.2)
    max_detections: int | None = None  # None: the detector's (100)
    detections_count: tuple[int, int] | None = None  # (K, M): at least K, at most M boxes per image

    def __post_init__(self) -> None:
        if self.levels is not None:
            object.__setattr__(self, "levels", parse_levels(self.levels))
        if self.roi_levels is not None:
            object.__setattr__(self, "roi_levels", parse_levels(self.roi_levels))
        object.__setattr__(self, "pool", parse_pool(self.pool or ()))
        if self.boxes is not None:
            object.__setattr__(self, "boxes", local_path(os.fspath(self.boxes)))
        object.__setattr__(self, "weights", str(self.weights))
        extras = self.detect_extras
        extras = extras.split(",") if isinstance(extras, str) else extras
        object.__setattr__(self, "detect_extras", tuple(dict.fromkeys(e for e in extras or () if e)))
        if isinstance(self.detections_count, str):
            object.__setattr__(self, "detections_count", parse_count(self.detections_count))
        elif isinstance(self.detections_count, list):
            object.__setattr__(self, "detections_count", tuple(self.detections_count))
        check_options(self)


def with_framework_resize(opts: Options, spec: ModelSpec) -> Options:
    """``opts`` with the weights' framework's test-time resize (``spec.resize``) as its resize,
    when ``framework_resize`` asks for it; an explicit resize beside it, or weights whose framework
    has none (random, imagenet, timm, a file without an FPN), is a :class:`UsageError`."""
    if not opts.framework_resize:
        return opts
    if spec.resize is None:
        raise UsageError(
            f"--weights {spec.weights} brings no framework test-time resize (zoo models and detector "
            "files do): resize with --size or --short-side/--max-side instead"
        )
    resize = spec.resize.resize()
    if opts.resize not in (Resize(), resize):
        raise UsageError(
            "the framework's test-time resize cannot be combined with --size/--short-side/--max-side"
        )
    check_resize(resize, opts.max_pixels)
    return replace(opts, resize=resize)


def settings_record(opts: Options, spec: ModelSpec) -> dict:
    """What decides the numbers in the files: recorded in the output folder and checked on resume."""
    return {
        "arch": spec.config.arch,
        "fpn_style": spec.config.fpn_style,
        "weights": spec.weights,
        "seed": None if spec.fpn_from_weights else spec.seed,
        "dtype": opts.dtype,
        "save_dtype": opts.save_dtype,
        "resize": asdict(opts.resize),
        "pad_multiple": spec.config.pad_multiple,
        # shards record their format and levels (a resume keeps an image's whole group or
        # writes it anew: no image gains a level in place); npy folders made before formats
        # existed record neither, and stay resumable
        **(
            {"format": opts.format, "levels": list(resolved_levels(spec.config))}
            if opts.format != "npy"
            else {}
        ),
        # the weights file's bytes: a resume with another file under the same name is refused
        # (optional in locks.OPTIONAL_SETTINGS: folders recorded before it was kept stay resumable)
        **({"weights_sha256": identity["sha256"]} if (identity := spec.identity()) else {}),
        # only with --boxes: a run without boxes leaves the recorded one alone (locks.OPTIONAL_SETTINGS)
        **({"roi": roi_spec(opts, spec).record()} if opts.boxes else {}),
        # only with --detect: a run with other detection settings (or none) over det_* arrays is
        # refused unless --overwrite, as any other changed setting
        **({"detect": detect_record(opts)} if opts.detect else {}),
    }


def detect_record(opts: Options) -> dict:
    """What of --detect decides the det_* arrays: in the settings record, checked on resume."""
    count = opts.detections_count
    return {
        "extras": list(opts.detect_extras),
        "score_thresh": opts.score_thresh,
        "max_detections": opts.max_detections,
        "detections_count": list(count) if count is not None else None,
        "roi_size": opts.roi_size if isinstance(opts.roi_size, int) else list(opts.roi_size),
    }


def roi_spec(opts: Options, spec: ModelSpec) -> RoiSpec:
    """How this run pools RoI features (used with ``--boxes``)."""
    return RoiSpec.resolve(opts.roi_size, opts.roi_levels, resolved_levels(spec.config))


def report_header(
    opts: Options, spec: ModelSpec, device: torch.device, shard: tuple[int, int] | None
) -> dict:
    """report.json's fields before the images: version, model, preprocessing, device, shard."""
    config = spec.config
    levels = resolved_levels(config)
    info = level_info(config)
    return {
        "version": __version__,
        "model": {
            "arch": config.arch,
            "fpn_style": config.fpn_style,
            "weights": spec.weights,
            "levels": list(levels),
            "strides": {name: info[name].stride for name in levels},
            "seed": spec.seed,
            "bn_eps": config.bn_eps,
            "weights_file": spec.identity(),  # name, url, file and SHA-256 of the file loaded
            "dtype": opts.dtype,
            "save_dtype": opts.save_dtype,
        },
        "preprocess": {
            "size": list(opts.resize.size) if opts.resize.size else None,
            "short_side": opts.resize.short_side,
            "max_side": opts.resize.max_side,
            "resample": "bilinear (torchvision's detector transform, on the normalised floats)"
            if opts.detect and opts.resize.size is None
            else "bilinear (Pillow, on 8-bit RGB)",
            **spec.preprocess.to_json(),
            "pad_multiple": config.pad_multiple,
            # the weights' framework's own test-time resize, and whether this run applied it
            "framework_resize": {**spec.resize.to_json(), "applied": opts.framework_resize}
            if spec.resize
            else None,
        },
        "device": str(device),
        **({"shard": list(shard)} if shard else {}),
    }
