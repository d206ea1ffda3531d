"""The ``fpn-extract`` command: parses options, calls the library, prints. No logic of its own."""

from __future__ import annotations

import os
import sys
import time

import click

from fpn_cli.errors import FPNError, UsageError, describe_os_error
from fpn_cli.formats import FORMATS
from fpn_cli.inputs.images import DEFAULT_MAX_PIXELS
from fpn_cli.inputs.urls import local_path
from fpn_cli.models.choices import (
    ARCH_NAMES,
    MAX_PAD_MULTIPLE,
    RANDOM,
    SEED_RANGE,
    TIMM_PREFIX,
    USER_STYLES,
    check_arch,
)
from fpn_cli.models.levels import LEVELS, parse_levels
from fpn_cli.regions.choices import MAX_ROI_SIZE, parse_pool
from fpn_cli.run import signals
from fpn_cli.run.choices import DEFAULT_TIMEOUT, DTYPE_NAMES, MAX_TIMEOUT, SAVE_DTYPES, shard_problem
from fpn_cli.version import __version__

# torch is imported only by a command that computes (the library modules below it), inside the
# command's function: --help, --version, a usage error and the subcommands' --help come back at
# once, without the seconds torch takes to import.


class _IntPair(click.ParamType):
    """Two integers joined by ``separator``, e.g. ``600x900``; ``problem`` names what is wrong."""

    separator = ""
    example = ""

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            a, b = (int(p) for p in str(value).lower().split(self.separator))
        except ValueError:
            self.fail(f"{value!r} is not {self.name}, e.g. {self.example}", param, ctx)
        problem = self.problem(a, b)
        if problem:
            self.fail(f"{value!r}: {problem}", param, ctx)
        return a, b

    def problem(self, a: int, b: int) -> str | None:
        raise NotImplementedError


class SizeType(_IntPair):
    """``HxW`` -> (H, W), both positive."""

    name, separator, example = "HxW", "x", "600x900"

    def problem(self, a: int, b: int) -> str | None:
        return "height and width must be positive" if a < 1 or b < 1 else None


class LevelsType(click.ParamType):
    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_levels(value)
        except FPNError as e:
            self.fail(str(e), param, ctx)


class PoolType(click.ParamType):
    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_pool(value)
        except FPNError as e:
            self.fail(str(e), param, ctx)


class ArchType(click.ParamType):
    """A registered architecture, or ``timm:<model>``."""

    name = "NAME"

    def convert(self, value, param, ctx):
        try:
            check_arch(value)
        except FPNError as e:
            self.fail(str(e), param, ctx)
        return value

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(name) for name in ARCH_NAMES if name.startswith(incomplete)]


class ShardType(_IntPair):
    """``I/N`` -> (I, N) with 0 <= I < N."""

    name, separator, example = "I/N", "/", "0/4"

    def problem(self, a: int, b: int) -> str | None:
        return shard_problem(a, b)


class CountType(_IntPair):
    """``K:M`` -> (K, M) with 1 <= K <= M: at least K, at most M detections per image."""

    name, separator, example = "K:M", ":", "10:100"

    def problem(self, a: int, b: int) -> str | None:
        return None if 1 <= a <= b else "give K:M with 1 <= K <= M"


class ByteSizeType(click.ParamType):
    """``1GB``, ``500MB``, ``64MiB``, ``1e9`` or a plain count -> bytes (at least 1)."""

    name = "SIZE"
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        try:
            size = int(float(number) * self.units[text[len(number) :]])
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size, e.g. 1GB, 500MB or 1e9", param, ctx)
        if size < 1:
            self.fail(f"{value!r}: must be at least 1 byte", param, ctx)
        return size


class LocalFile(click.Path):
    """An existing file, named by a path or a ``file://`` URL (urls.local_path)."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False)

    def convert(self, value, param, ctx):
        try:
            return super().convert(local_path(os.fspath(value)), param, ctx)
        except FPNError as e:
            self.fail(str(e), param, ctx)


class ProgressBar:
    """``[#####.....] 12/100  3.4 img/s`` on stderr, redrawn at most ten times a second; the rate
    counts the images computed in this run, not those skipped as complete."""

    width = 30

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.last_draw = 0.0

    def __call__(self, done: int, total: int, skipped: int = 0) -> None:
        now = time.perf_counter()
        if done < total and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        filled = self.width * done // max(total, 1)
        elapsed = now - self.started
        rate = (done - skipped) / max(elapsed, 1e-9)  # computed now: skipped ones took no time
        eta = f", ETA {_clock((total - done) / rate)}" if 0 < done < total and rate > 0 else ""
        bar = "#" * filled + "." * (self.width - filled)
        line = f"\r[{bar}] {done}/{total}  {rate:.1f} img/s  {_clock(elapsed)} elapsed{eta}  "
        click.echo(line, err=True, nl=done >= total)


class ProgressLines:
    """Progress for logs (Slurm, nohup, CI), where stderr is no terminal: plain lines such as
    ``progress: 120/1000 (12%), 3.4 img/s, 0:35 elapsed, ETA 4:18``. A line once ``interval``
    seconds have passed since the last, or sooner when another tenth of the images is done (but
    not within a second of the last line), and one when all are done: a long job logs twice a
    minute, not per image; a short one logs its tenths. The rate counts the images computed in
    this run, not those skipped as complete (a resume). ``interval`` defaults to
    ``$FPN_EXTRACT_PROGRESS_SECONDS``, else 30; ``clock`` is injectable for tests."""

    default_interval = 30.0
    env = "FPN_EXTRACT_PROGRESS_SECONDS"

    def __init__(self, interval: float | None = None, clock=time.monotonic) -> None:
        self.interval = self._from_env() if interval is None else interval
        self.clock = clock
        self.started = self.last_line = clock()
        self.last_tenth = 0

    def _from_env(self) -> float:
        text = os.environ.get(self.env, "").strip()
        if not text:
            return self.default_interval
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise UsageError(f"{self.env}={text!r}: give the seconds between progress lines, e.g. 30")
        return seconds

    def __call__(self, done: int, total: int, skipped: int = 0) -> None:
        now = self.clock()
        tenth = 10 * done // max(total, 1)
        since = now - self.last_line
        if done < total and since < self.interval and (tenth <= self.last_tenth or since < 1.0):
            return
        self.last_line, self.last_tenth = now, tenth
        elapsed = now - self.started
        rate = (done - skipped) / elapsed if elapsed > 0 else 0.0  # skipped ones took no time
        eta = f", ETA {_clock((total - done) / rate)}" if 0 < done < total and rate > 0 else ""
        percent = 100 * done // max(total, 1)
        _echo_err(f"progress: {done}/{total} ({percent}%), {rate:.1f} img/s, {_clock(elapsed)} elapsed{eta}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class HelpArgument(click.Argument):
    """An argument with a row in ``--help``, in its section like an option (click gives arguments none)."""

    def __init__(self, *args, help: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help = help

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        return (self.metavar or self.human_readable_name, self.help) if self.help else None


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists its arguments and options in sections (click has no option
    groups of its own); ``sections`` maps a title to parameter names, in order. A parameter in no
    section is listed under "Other options" (a test keeps that section empty)."""

    def __init__(self, *args, sections: dict[str, tuple[str, ...]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sections = sections

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        help_option = self.get_help_option(ctx)  # named "help" in the sections, whatever click calls it
        rows = {"help" if p is help_option else p.name: p.get_help_record(ctx) for p in self.get_params(ctx)}
        placed = {name for names in self.sections.values() for name in names}
        other = tuple(name for name in rows if name not in placed)
        for title, names in [*self.sections.items(), ("Other options", other)]:
            records = [rows[n] for n in names if rows.get(n)]
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)

    def format_arguments(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Nothing: the arguments have their rows in the sections (click 8.5 would list them apart)."""


class WithSubcommands(GroupedCommand):
    """The main form, ``fpn-extract [OPTIONS] INPUTS...``, with subcommands beside it: a first
    argument that names one (``models``, ``verify``, ``roi``) runs it; an input named like a subcommand
    is reached as ``./models``. Not a ``click.Group``: a group would read the first input as a
    command name, and the main form must take inputs directly. Shell completion knows both."""

    subcommands: dict[str, click.Command] = {}

    def main(self, args=None, prog_name=None, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] in self.subcommands:
            name = prog_name or "fpn-extract"
            return self.subcommands[args[0]].main(args[1:], prog_name=f"{name} {args[0]}", **kwargs)
        return super().main(args, prog_name=prog_name, **kwargs)

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        # shell completion resolves the words typed so far through here: a subcommand's name hands
        # them to it, so that `fpn-extract roi --<TAB>` offers roi's options
        if extra.get("resilient_parsing") and args and args[0] in self.subcommands:
            return self.subcommands[args[0]].make_context(args[0], args[1:], parent, **extra)
        return super().make_context(info_name, args, parent, **extra)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, cmd.get_short_help_str(70)) for name, cmd in self.subcommands.items()])
        super().format_epilog(ctx, formatter)


def _complete_inputs(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """INPUTS complete as file names; the first word also as a subcommand's name."""
    from click.shell_completion import CompletionItem

    names = []
    if not ctx.params.get("inputs"):
        names = [CompletionItem(n) for n in WithSubcommands.subcommands if n.startswith(incomplete)]
    return [*names, CompletionItem(incomplete, type="file")]


EXAMPLES = """
\b
Examples:
  fpn-extract images/ --out feats/                     P2-P5 of every image, resumable
  fpn-extract images/ -o feats/ --device cuda --dtype bfloat16 --save-dtype float16
  fpn-extract 'shots/**/*.png' -o feats/ --short-side 800 --max-side 1333
  find . -name '*.jpg' | fpn-extract - -o feats/        paths from standard input
  fpn-extract 'data/shard-{000000..000099}.tar' -o s3://bucket/feats --format shards
  fpn-extract --summary --input-size 800x1333          level sizes, no images needed
  fpn-extract images/ -o feats/ --boxes boxes.csv --pool avg     RoI features, pooled vectors
  fpn-extract roi feats/ --boxes more.csv              RoI features from the stored levels
  fpn-extract images/ -o dets/ --weights coco --detect   detections, their RoI features and vectors
  fpn-extract detections dets/ --coco results.json     detections as COCO results JSON
"""


SECTIONS = {
    "Inputs": ("inputs", "lists", "root", "null", "size", "short_side", "max_side"),
    "Model": ("arch", "weights", "fpn_style", "levels", "seed"),
    "Output": (
        "out",
        "format",
        "save_dtype",
        "overwrite",
        "preview",
        "boxes",
        "pool",
        "no_maps",
        "detect",
        "detect_extras",
        "score_thresh",
        "max_detections",
        "detections_count",
    ),
    "Run": (
        "device",
        "dtype",
        "batch_size",
        "shard",
        "fail_fast",
        "summary",
        "input_size",
        "quiet",
        "verbose",
        "version",
        "help",
    ),
    # rarely needed: defaults that fit nearly every run
    "Advanced": (
        "list_column",
        "max_pixels",
        "timeout",
        "hash",
        "pad_multiple",
        "shard_size",
        "roi_size",
        "roi_levels",
        "workers",
        "writers",
        "compile",
    ),
}


@click.command(
    cls=WithSubcommands,
    sections=SECTIONS,
    epilog=EXAMPLES,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument(
    "inputs",
    nargs=-1,
    metavar="[INPUTS]...",
    cls=HelpArgument,
    shell_complete=_complete_inputs,
    help="Image files, folders (searched recursively), glob patterns, WebDataset tar shards (brace "
    "patterns too) or URLs (s3://, gs://, https://); - reads paths from standard input.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=True),
    help="Output folder, or with --format shards a URL (required unless --summary).",
)
@click.option(
    "--format",
    type=click.Choice(FORMATS),
    default="npy",
    show_default=True,
    help="npy: a .npy file per level and image; shards: WebDataset tar shards under OUT/shards/ "
    "with an index.",
)
@click.option(
    "--shard-size",
    type=ByteSizeType(),
    default="1GB",
    show_default=True,
    help="With --format shards: a tar shard closes once it holds this much.",
)
@click.option(
    "--list",
    "lists",
    multiple=True,
    metavar="FILE",
    help="Inputs listed in FILE: text (a path a line), CSV/TSV/parquet (a path column); repeatable.",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Key files named one by one (arguments, --list, -) and folders by their path relative to DIR "
    "[default: a folder's own root; for files, their deepest common folder].",
    metavar="DIR",
)
@click.option(
    "--list-column",
    default=None,
    metavar="NAME",
    help="The column of a CSV/TSV/parquet --list that holds the paths [default: path].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--arch",
    type=ArchType(),
    default=None,
    help=f"Backbone: {', '.join(ARCH_NAMES)}, or {TIMM_PREFIX}<model> "
    "[default: resnet50, or what --weights needs].",
)
@click.option(
    "--weights",
    default=RANDOM,
    show_default=True,
    help="random (seeded), imagenet, a zoo name (coco, torchvision:..., detectron2:..., mmdet:...; "
    "see fpn-extract models), or a checkpoint file.",
)
@click.option(
    "--fpn-style",
    type=click.Choice(USER_STYLES),
    default=None,
    help="Top-down design [default: reference, or what --weights needs].",
)
@click.option(
    "--seed",
    type=click.IntRange(*SEED_RANGE),
    default=0,
    show_default=True,
    help="Seed of the random initialisation (0 to 2**64-1).",
)
@click.option(
    "--levels",
    type=LevelsType(),
    default=None,
    help=f"Comma-separated from {','.join(LEVELS)} [default: p2,p3,p4,p5, or the zoo model's pyramid].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images of one size per forward pass [default: 8 on a GPU, 1 on the CPU].",
)
@click.option("--size", type=SizeType(), default=None, help="Resize every image to HxW.")
@click.option(
    "--short-side",
    type=click.IntRange(min=1),
    default=None,
    help="Resize so the shorter side has this length (e.g. 800).",
)
@click.option(
    "--max-side",
    type=click.IntRange(min=1),
    default=None,
    help="Cap the longer side (e.g. 1333); alone, only shrinks larger images.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES),
    default="float32",
    show_default=True,
    help="Compute precision (autocast below float32).",
)
@click.option(
    "--save-dtype",
    type=click.Choice(SAVE_DTYPES),
    default="float32",
    show_default=True,
    help="Stored precision; int8 adds per-channel scales (p2_scale.npy). Readers decode to float32.",
)
@click.option("--overwrite", is_flag=True, help="Recompute images whose outputs exist (default: skip them).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Decode threads [default: by device and core count].",
)
@click.option(
    "--writers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads writing images, each image whole by one [default: 4 on a GPU, 1 on the CPU].",
)
@click.option(
    "--compile",
    is_flag=True,
    help="torch.compile the network (weights prepacked once): faster forwards after a compile per "
    "input size; for runs at one --size.",
)
@click.option("--fail-fast", is_flag=True, help="Stop at the first image that cannot be read.")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Larger images are refused as decompression bombs.",
)
@click.option(
    "--preview", is_flag=True, help="Also write OUT/<image>/preview.png: the image beside its levels."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True, max=MAX_TIMEOUT),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to read and decode one image; a slower one (a hung mount) fails, the run goes on.",
)
@click.option(
    "--hash",
    is_flag=True,
    help="Record a SHA-256 of each input with its features; a resume keeps only those it matches.",
)
@click.option("-0", "--null", is_flag=True, help="With -: paths on stdin are NUL-separated (find -print0).")
@click.option(
    "--pad-multiple",
    type=click.IntRange(min=1, max=MAX_PAD_MULTIPLE),
    default=None,
    help="Zero-pad each input's bottom/right to a multiple of N, as detectron2 and mmdetection do; "
    "levels are cropped back [default: what the weights' framework does, none for torchvision].",
)
@click.option(
    "--boxes",
    type=LocalFile(),
    default=None,
    help="CSV (path,x1,y1,x2,y2) or COCO JSON of boxes in original pixels: OUT/<image>/rois.npy, "
    "each box's features by torchvision's MultiScaleRoIAlign.",
)
@click.option(
    "--roi-size",
    type=click.IntRange(min=1, max=MAX_ROI_SIZE),
    default=7,
    show_default=True,
    help="RoI features are N x N.",
)
@click.option(
    "--roi-levels",
    type=LevelsType(),
    default=None,
    help="Consecutive pyramid levels RoIs pool from [default: those of p2-p5 extracted].",
)
@click.option(
    "--pool",
    type=PoolType(),
    default=None,
    help="avg, max or avg,max: one vector per level, OUT/<image>/<level>_avg.npy.",
)
@click.option(
    "--no-maps", is_flag=True, help="Store only the pooled vectors and RoI features, not the levels."
)
@click.option(
    "--detect",
    is_flag=True,
    help="Also run the weights' detector (coco, torchvision:...): det_boxes, det_scores, det_labels, "
    "det_rois, det_vectors per image, at its own test-time size unless resized.",
)
@click.option(
    "--detect-extras",
    type=click.Choice(["masks", "keypoints"]),
    multiple=True,
    help="With --detect: det_masks (Mask R-CNN), det_keypoints (Keypoint R-CNN). Repeatable.",
)
@click.option(
    "--score-thresh",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Keep detections scoring above this [default: the detector's, 0.05; FCOS 0.2].",
)
@click.option(
    "--max-detections",
    type=click.IntRange(min=1),
    default=None,
    help="At most this many detections per image, best first [default: the detector's, 100].",
)
@click.option(
    "--detections-count",
    type=CountType(),
    default=None,
    help="At least K, at most M detections per image (VQA-style features, e.g. 10:100).",
)
@click.option("--shard", type=ShardType(), default=None, help="Process only shard I (0-based) of N.")
@click.option("--summary", is_flag=True, help="Print the level sizes and exit; computes no features.")
@click.option(
    "--input-size",
    type=SizeType(),
    default="600x900",
    show_default=True,
    help="Image size (HxW) that --summary reports for when no INPUTS are given.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, notes or shape report.")
@click.option("-v", "--verbose", is_flag=True, help="Also list every image as it is written.")
@click.version_option(__version__, "--version", prog_name="fpn-extract")
@signals.stop_on_first_signal()
def main(
    inputs, out, size, short_side, max_side, shard, summary, input_size, quiet, verbose, null, lists,
    list_column, root, **options,
):  # fmt: skip
    """Compute Feature Pyramid Network features (P2-P5) for images.

    Each image's levels go to OUT/<path without extension>/<level>.npy (or into tar shards with
    --format shards), and OUT/report.json lists every image.
    """
    from fpn_cli.inputs.images import Resize, read_names

    _tolerant_streams()
    stdin_lines = read_names(_stdin(), null) if "-" in inputs else ()
    failures = []

    def on_failure(path: str, reason: str) -> None:
        failures.append(path)
        _echo_err(f"failed: {path}: {reason}")

    report = None
    try:
        _refuse_unused(click.get_current_context(), options, lists, summary)
        resize = Resize(size, short_side, max_side)
        if not summary and not inputs and not lists:
            raise click.UsageError("no INPUTS given (image files, folders, patterns, or - for stdin)")
        if not summary and out is None:
            raise click.UsageError("missing option '-o' / '--out'")
        # torch from here on, inside the try: a Ctrl-C while it loads ends as any interrupt does
        from fpn_cli.models.builder import resolve
        from fpn_cli.run.distributed import is_rank_zero
        from fpn_cli.run.options import Options, with_framework_resize
        from fpn_cli.run.pipeline import extract, summarize

        if summary:
            spec = resolve(
                options["arch"], options["weights"], options["fpn_style"], options["levels"],
                options["seed"], options["pad_multiple"],
            )  # fmt: skip
            # the resize a run of this command line would apply, the framework's included: one owner
            resize = with_framework_resize(Options(resize=resize, **options), spec).resize
            text = summarize(
                inputs, spec, resize, input_size, stdin_lines, on_failure, lists, list_column,
                options["shard_size"], parse_pool(options["pool"] or ()), not options["no_maps"], root,
                Options(resize=resize, **options) if options["detect"] else None, options["timeout"],
            )  # fmt: skip
            _echo(text)
            sys.exit(1 if failures else 0)
        options = Options(resize=resize, **options)
        progress = None
        if not quiet and is_rank_zero():  # a bar on a terminal, lines in a log
            progress = ProgressBar() if sys.stderr.isatty() else ProgressLines()
        report = extract(
            inputs,
            out,
            options,
            stdin_lines=stdin_lines,
            lists=lists,
            list_column=list_column,
            root=root,
            shard=shard,
            log=None if quiet else _echo_err,
            on_failure=on_failure,
            progress=progress,
        )
        _print_outcome(report, out, quiet, verbose)
    except FPNError as e:
        _echo_err(f"Error: {e}")
        sys.exit(e.exit_code)
    except OSError as e:  # a step with no message of its own (a full disk, a folder where a file goes)
        _echo_err(f"Error: {describe_os_error(e)}")
        sys.exit(1)
    except MemoryError:
        _echo_err("Error: out of memory; try a smaller --batch-size, --max-side or --workers")
        sys.exit(1)
    except KeyboardInterrupt as e:
        if report is None:  # the run had not begun: nothing was written
            _echo_err("Interrupted before any image was processed")
            sys.exit(signals.interrupted_status(e))
        report.interrupt(e)  # while its outcome was printed: report.json is written
        _echo_err(_interrupted(report, out))
    sys.exit(report.exit_status)


def _refuse_unused(ctx: click.Context, options: dict, lists: tuple, summary: bool) -> None:
    """An option given on the command line that this run would not use is a usage error, not
    silently ignored (a forgotten --format shards would write millions of files)."""
    given = {
        name
        for name in ("shard_size", "list_column", "roi_size", "roi_levels")
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }
    if "shard_size" in given and options["format"] != "shards" and not summary:
        raise click.UsageError("--shard-size is for --format shards")
    if "list_column" in given and not lists:
        raise click.UsageError("--list-column names the column of a --list file: add --list")
    for name in sorted(given & {"roi_size", "roi_levels"}):
        if options["boxes"] is None and not (name == "roi_size" and options["detect"]):
            raise click.UsageError(f"--{name.replace('_', '-')} is for RoI features: add --boxes")


def _print_outcome(report, out: str, quiet: bool, verbose: bool) -> None:
    if verbose:
        for path, status in report.statuses():
            _echo_err(f"{status}: {path}")
    if report.interrupted:
        _echo_err(_interrupted(report, out))
    elif not quiet:
        _echo(report.format_shapes())


def _interrupted(report, out: str) -> str:
    return f"Interrupted: {report.counts['ok']} images written; {out}/report.json lists what is done"


def _stdin():
    """Standard input as bytes: names are bytes, and not all of them are UTF-8."""
    return getattr(sys.stdin, "buffer", sys.stdin)


def _tolerant_streams() -> None:
    """Output never fails on a character its stream cannot encode: a file name that is not UTF-8
    (held as surrogates, os.fsdecode's way) prints as ``\\xff``, on a strict UTF-8 stream too."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def printable(text: str) -> str:
    """``text`` with the bytes of undecodable file names as ``\\xNN`` rather than surrogates."""
    return os.fsencode(text).decode(sys.getfilesystemencoding(), "backslashreplace")


def _echo(message: str) -> None:
    click.echo(printable(message))


def _echo_err(message: str) -> None:
    click.echo(printable(message), err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("pattern", required=False, default="")
def models(pattern: str) -> None:
    """List the model zoo (--weights NAME): backbone, levels, preprocessing, the framework's
    test-time resize (shorter side, longer side cap), download size, cached.

    PATTERN keeps the entries whose name contains it, e.g. retinanet or detectron2:.
    """
    from fpn_cli.models import zoo  # the declared table: no torch

    entries = [e for e in zoo.listing() if pattern.lower() in e.name.lower()]
    if not entries:
        raise click.UsageError(f"no zoo entry matches {pattern!r}")
    rows = [("name", "backbone", "levels", "preprocessing", "test-time resize", "download", "cached")]
    for e in entries:
        size = "?" if e.size_mb is None else f"{'~' if e.size_estimated else ''}{e.size_mb:.0f} MB"
        pad = f", pad {e.pad_multiple}" if e.pad_multiple > 1 else ""
        levels = ",".join(e.levels)
        resize = e.resize.describe() if e.resize else "none"
        cached = "yes" if e.is_cached() else "no"
        rows.append((e.name, e.arch, levels, e.preprocess.label + pad, resize, size, cached))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    cache = zoo.ZooEntry.cache_root()
    click.echo(
        f"\ncoco = torchvision:fasterrcnn_resnet50_fpn. Files are cached in {cache}; '~' sizes are estimates."
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False))
def verify(out: str) -> None:
    """Check an output folder (either --format) against its report.json and the inputs: every
    listed image's arrays (present, complete, dtype and shape as listed; in shards, through the
    index) and its input's fingerprint (still there, same size and modification time, same
    SHA-256 if recorded). Prints one line per problem; exit status 1 if there is any, 0 if none.
    """
    from fpn_cli.run.verify import verify_folder

    _tolerant_streams()
    try:
        result = verify_folder(out)
    except FPNError as e:
        _echo_err(f"Error: {e}")
        sys.exit(e.exit_code)
    except OSError as e:  # a step with no message of its own (a full disk, a folder where a file goes)
        _echo_err(f"Error: {describe_os_error(e)}")
        sys.exit(1)
    for problem in result.problems:
        _echo(problem)
    _echo_err(result.summary())
    sys.exit(1 if result.problems else 0)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--boxes",
    type=LocalFile(),
    required=True,
    help="CSV (path,x1,y1,x2,y2) or COCO JSON, paths as in OUT/report.json.",
)
@click.option(
    "--roi-size",
    type=click.IntRange(min=1, max=MAX_ROI_SIZE),
    default=None,
    help="[default: the folder's, else 7]",
)
@click.option("--roi-levels", type=LevelsType(), default=None, help="[default: the folder's, else p2-p5]")
@click.option("--overwrite", is_flag=True, help="Recompute rois that are complete for these boxes.")
@click.option("-q", "--quiet", is_flag=True, help="Only failures on stderr; no summary.")
@signals.stop_on_first_signal()
def roi(out, boxes, roi_size, roi_levels, overwrite, quiet) -> None:
    """RoI features for the boxes in FILE from the levels stored in OUT, with no network:
    OUT/<image>/rois.npy, the same bytes that extracting with --boxes writes. For the npy layout;
    a --format shards folder gets them by extracting again with --boxes (no network either).
    """
    _tolerant_streams()
    try:
        from fpn_cli.run.rois import rois_from_folder

        result = rois_from_folder(
            out,
            boxes,
            roi_size,
            roi_levels,
            overwrite,
            log=None if quiet else _echo_err,
            on_failure=lambda path, reason: _echo_err(f"failed: {path}: {reason}"),
        )
    except FPNError as e:
        _echo_err(f"Error: {e}")
        sys.exit(e.exit_code)
    except OSError as e:  # a step with no message of its own (a full disk, a folder where a file goes)
        _echo_err(f"Error: {describe_os_error(e)}")
        sys.exit(1)
    except KeyboardInterrupt as e:  # every file is whole (atomic writes); report.json not yet updated
        _echo_err(f"Interrupted: {out}/report.json is as it was; run the command again to finish")
        sys.exit(signals.interrupted_status(e))
    if not quiet:
        _echo(result.describe())
    sys.exit(result.exit_status)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--coco",
    type=click.Path(dir_okay=False, writable=True),
    required=True,
    help="Write COCO results JSON here: [{image_id, category_id, bbox [x, y, w, h], score}, ...].",
)
@click.option(
    "--images",
    type=LocalFile(),
    default=None,
    help="COCO annotations file whose images[].file_name give the image ids [default: 1..n in key order].",
)
def detections(out, coco, images) -> None:
    """The detections stored in OUT (extracted with --detect, any --format) as COCO results JSON,
    which pycocotools' COCO.loadRes reads. Image ids come from the --images file (file_name equal
    to the image's path as in report.json, or to its file name), else 1..n in key order.
    """
    _tolerant_streams()
    try:
        from fpn_cli.run.detections import write_coco

        export = write_coco(out, coco, images)
    except FPNError as e:
        _echo_err(f"Error: {e}")
        sys.exit(e.exit_code)
    if export.unmatched:
        shown = ", ".join(export.unmatched[:5])
        more = f" and {len(export.unmatched) - 5} more" if len(export.unmatched) > 5 else ""
        _echo_err(f"warning: {len(export.unmatched)} image(s) not in {images}, left out: {shown}{more}")
    _echo(f"{coco}: {export.describe()}")


WithSubcommands.subcommands = {"models": models, "verify": verify, "roi": roi, "detections": detections}
