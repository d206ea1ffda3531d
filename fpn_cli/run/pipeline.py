"""The extraction run. Each arrow of the diagram is one named step, defined below in this order;
jobs flow one way through them, and :func:`run` strings them together:

    plan -> decode_ahead -> split_off_failures -> batches -> Forward -> Writer -> publish_report

- :func:`plan`: which images need work and which arrays of each (levels, pooled vectors, RoI
  features); complete ones are reported skipped (what a resume keeps, deletes and recomputes,
  of the levels and of the arrays derived from them, is resume.py's one decision).
- :func:`decode_ahead`: fingerprinting and decoding on a few threads, a bounded look-ahead in
  front of the network, a deadline per image (deadline.py).
- :func:`split_off_failures`: unreadable images to the report, jobs whose levels are on disk to
  the writer.
- :func:`batches`: images of equal size grouped (never padded), a bounded number waiting.
- :class:`Forward`: the network (engine.py); out of memory splits the batch, then fails the image.
- :class:`Writer`: a background thread, behind a bounded queue, derives pooled vectors and RoI
  features from the levels (regions/) and writes them, the levels and previews, then the input's
  record (resume.py) last.
- :func:`publish_report`: report.json, or a shard's part, merged once the set is complete, and
  the storage's index.

Where and how features are stored is the :class:`~fpn_cli.formats.base.Storage` that
:func:`extract` opens (formats/): the npy layout or tar shards, on disk or behind a URL. The steps
ask it, never a path, what is stored and where.

:func:`extract` is the whole job around the run: inputs, shard, model, output folder and its lock.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fpn_cli.errors import FPNError, ImageError, UsageError
from fpn_cli.formats import (
    DEFAULT_SHARD_SIZE,
    Storage,
    check_destination,
    check_layout,
    codecs,
    format_totals,
    open_store,
)
from fpn_cli.formats import record_settings as record_format_settings
from fpn_cli.formats.base import human_bytes, npy_size
from fpn_cli.inputs.deadline import ordered_map
from fpn_cli.inputs.images import InputImage, Resize, decode_image, read_header, warnings_to
from fpn_cli.inputs.keys import shard_of
from fpn_cli.inputs.sources import find_inputs
from fpn_cli.inputs.urls import is_url, local_path
from fpn_cli.models.builder import ModelSpec, build, resolve
from fpn_cli.models.model import FPN, level_info, parameter_count, resolved_levels
from fpn_cli.regions.boxes import Checked, read_boxes, warn_unknown
from fpn_cli.regions.detect import DetectorResize
from fpn_cli.regions.geometry import Geometry, LevelSizes
from fpn_cli.regions.outputs import Outputs, lost_rois, tell_boxes, tell_lost_rois
from fpn_cli.report import ImageResult, Report, format_summary, write_merged
from fpn_cli.run import preview, resume
from fpn_cli.run.choices import DEFAULT_TIMEOUT
from fpn_cli.run.detections import (
    check_detect,
    detector_header,
    detector_resize,
    estimated_shapes,
    load_detector,
)
from fpn_cli.run.distributed import ProcessGroup, combine, torchrun_launch
from fpn_cli.run.engine import Engine, default_workers, default_writers, is_out_of_memory, resolve_device
from fpn_cli.run.finite import NonFinite
from fpn_cli.run.options import (
    Options,
    check_shard,
    report_header,
    roi_spec,
    settings_record,
    with_framework_resize,
)

Levels = dict[str, np.ndarray | torch.Tensor]  # level -> (C, h, w), one image's
OnFailure = Callable[[str, str], None]  # (path as given, reason)
Log = Callable[[str], None]


@dataclass
class Job:
    """One image's work, filled in as it moves through the run."""

    image: InputImage
    missing: tuple[str, ...]  # the arrays to write (levels, pooled vectors, rois and boxes), in order
    have: dict[str, tuple[int, ...]] = field(default_factory=dict)  # arrays kept on disk: shapes
    from_disk: bool = False  # every level is on disk: the rest is derived from the files, no forward pass
    preview: bool = False  # draw preview.png
    rgb: np.ndarray | None = None  # (H, W, 3) uint8, resized: set by decode_ahead, if pixels are needed
    geometry: Geometry | None = None  # sizes and orientation: from the record, else set by decode_ahead
    error: str | None = None  # why it could not be listed, checked or decoded
    # the input's, for its record: as recorded where the resume check found it unchanged (what is
    # kept was made from that input), else taken just before decoding
    fingerprint: resume.Fingerprint | None = None
    recomputed: str | None = None  # why the features it had were not kept

    @property
    def needs_network(self) -> bool:
        """Its levels are computed: some are missing, or nothing is stored to derive the rest from."""
        return not self.from_disk and bool(self.missing or self.preview)

    @property
    def needs_pixels(self) -> bool:
        """For the network or a preview; otherwise its record or header is enough."""
        return self.needs_network or self.preview


def extract(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    options: Options | None = None,
    *,
    stdin_lines: Iterable[str] = (),
    lists: Sequence[str | os.PathLike[str]] = (),
    list_column: str | None = None,
    root: str | os.PathLike[str] | None = None,
    log: Log | None = None,
    on_failure: OnFailure | None = None,
    progress: Callable[[int, int], None] | None = None,
    shard: tuple[int, int] | None = None,
    **kwargs,
) -> Report:
    """Runs a whole extraction: finds the images in ``inputs`` (and in the list files ``lists``,
    paths in their ``list_column``), writes their levels under ``out`` (a folder, or a URL with
    ``format="shards"``) and its report.json, and returns the :class:`Report` (its
    ``exit_status`` is the CLI's).

    ``root``: the folder that files named one by one are keyed relative to (inputs/keys.py).
    ``options`` and keyword arguments set the run: the keywords are fields of :class:`Options` and
    replace those of ``options`` (``extract(inputs, out, base, overwrite=True)`` is ``base`` with
    ``overwrite``); a keyword that is no field is a ``TypeError`` naming it. ``log`` receives
    one-line notices, ``on_failure`` (path, reason) for each image that failed, ``progress``
    (done, total) after each image.

    >>> import tempfile
    >>> report = extract(["examples/"], tempfile.mkdtemp(), arch="seed", device="cpu")
    >>> report.counts, report.exit_status
    ({'ok': 5, 'skipped': 0, 'failed': 0}, 0)
    """
    opts = Options(**kwargs) if options is None else replace(options, **kwargs)
    log = log or (lambda message: None)
    on_failure = on_failure or (lambda path, reason: None)
    if not os.fspath(out):
        raise UsageError("--out is empty: name an output folder")
    out = str(out) if is_url(str(out)) else Path(local_path(os.fspath(out)))
    check_destination(out, opts.format)
    launch = torchrun_launch()
    shard = combine(check_shard(shard), launch)
    device = resolve_device(opts.device, launch.local_rank if launch else None)
    found = _find_images(inputs, stdin_lines, lists, list_column, out, opts.format, root, opts.timeout)
    spec = _resolve_model(opts)
    opts = with_framework_resize(opts, spec)
    # a bad boxes file or --roi-levels stops the run before the model is built (maybe downloaded)
    boxes, roi = (read_boxes(opts.boxes), roi_spec(opts, spec)) if opts.boxes else (None, None)
    if opts.detect:
        check_detect(opts, spec)  # a non-detector refused before the model is built
    unknown = boxes.unknown(image.rel for image in found) if boxes else {}
    images = _own_images(found, shard)
    model = _build_model(spec)
    detector = load_detector(opts, spec) if opts.detect else None
    store = open_store(
        out, opts.format, resolved_levels(spec.config), opts.save_dtype, opts.shard_size, shard
    )
    outputs = Outputs(
        store.levels,
        opts.save_dtype,
        not opts.no_maps,
        opts.pool,
        roi,
        boxes,
        LevelSizes(spec.config),
        detect=detector.names if detector else (),
    )
    report: Report | None = None
    began = False  # an interrupt that escapes before the run began found nothing processed
    try:
        with store.lock(), warnings_to(log):
            _record_settings(store, settings_record(opts, spec), opts.overwrite, out)
            store.sweep_dead_runs()
            _notes(opts, spec, device, log)
            _unknown_images(unknown, opts.boxes, log)
            header = report_header(opts, spec, device, shard)
            if opts.pool or opts.boxes or opts.no_maps:
                header["regions"] = outputs.header(unknown)
            if detector is not None:
                header["detections"] = detector_header(detector, opts)
            report = Report(header, total=len(images), on_add=progress)
            engine = Engine(
                model, device, opts.dtype, opts.save_dtype, spec.preprocess, opts.compile, detector
            )
            with ProcessGroup(launch, device) if launch else contextlib.nullcontext() as group:
                if group is not None:
                    log(f"torchrun: rank {launch.rank} of {launch.world_size} on {device}, {group.backend}")
                began = True
                try:
                    run(images, store, engine, opts, report, on_failure, log, outputs)
                except KeyboardInterrupt as e:
                    report.interrupt(e)
                except FPNError:
                    with contextlib.suppress(OSError):  # a report of what was done, if the disk takes one
                        publish_report(store, report, shard, group, failed=True)
                    raise
                try:
                    if not report.interrupted:
                        store.finish_overwrite()  # every level this run owed is written
                    publish_report(store, report, shard, group)
                except KeyboardInterrupt as e:  # the first: later ones are ignored (signals.py)
                    report.interrupt(e)
                    publish_report(store, report, shard, group)
    except KeyboardInterrupt as e:
        if not began:
            raise
        report.interrupt(e)  # as the run let go of the folder: report.json is written already
    return report


def _record_settings(store: Storage, settings: dict, overwrite: bool, out: Path | str) -> None:
    """The store's first touch of the output folder. Behind a URL that is where a missing
    bucket, missing credentials or a server that takes no writes shows: one line naming --out."""
    try:
        record_format_settings(store, out, settings, overwrite)
    except FPNError:
        raise
    except Exception as e:
        if not isinstance(out, str):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot use --out {out}: {reason}") from None


def _find_images(
    inputs: Sequence[str | os.PathLike[str]],
    stdin_lines: Iterable[str],
    lists: Sequence[str | os.PathLike[str]],
    list_column: str | None,
    out: Path | str,
    format: str,
    root: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> list[InputImage]:
    """Every image of ``inputs`` and the list files (sources.py), a URL listed within ``timeout``
    seconds; inputs whose outputs would land on each other's in ``format`` are a
    :class:`UsageError` before any work (formats.check_layout)."""
    exclude = out if isinstance(out, Path) else None
    images = find_inputs(inputs, stdin_lines, exclude, lists, list_column, root, timeout)
    check_layout(format, ((image.key, str(image.path)) for image in images if image.error is None))
    return images


def _own_images(images: list[InputImage], shard: tuple[int, int] | None) -> list[InputImage]:
    """The images this process is responsible for: all of them, or its shard's."""
    if shard is not None:
        images = [image for image in images if shard_of(image.key, shard[1]) == shard[0]]
    return images


def _unknown_images(unknown: dict[str, int], boxes: str | None, log: Log) -> None:
    """A boxes file may name images this run was not given (a subset of a dataset): a warning
    each, up to a few, not a failure; report.json lists them all."""

    def warning(rel: str, count: int) -> str:
        return f"warning: {boxes} has {count} box(es) for {rel}, which is not among the inputs"

    warn_unknown(unknown, warning, "images not among the inputs (report.json)", log)


def _resolve_model(opts: Options) -> ModelSpec:
    """What model ``opts`` describe (builder.resolve is the one owner of that decision)."""
    return resolve(opts.arch, opts.weights, opts.fpn_style, opts.levels, opts.seed, opts.pad_multiple)


def _build_model(spec: ModelSpec) -> FPN:
    """The network ``spec`` describes, with its weights: the one place a run makes its model."""
    return build(spec)


def _notes(opts: Options, spec: ModelSpec, device: torch.device, log: Log) -> None:
    if opts.dtype == "float16" and device.type == "cpu":
        log("note: --dtype float16 is slow on CPUs (10x slower than float32, measured); use bfloat16")
    if spec.random:
        log(f"note: --weights random (seed {spec.seed}): features are for shapes and plumbing, not meaning")


def run(
    images: Sequence[InputImage],
    store: Storage,
    engine: Engine,
    opts: Options,
    report: Report,
    on_failure: OnFailure,
    log: Log,
    outputs: Outputs | None = None,
) -> None:
    """Every image of ``images`` through the steps, each ending as one entry of ``report``:
    planned, decoded, split from the failures, batched, forwarded, written. ``outputs``: the
    arrays each image gets (default: its levels)."""
    device = engine.device
    batch_size = opts.batch_size or (8 if device.type != "cpu" else 1)
    workers = opts.workers or default_workers(device)
    writers = opts.writers or default_writers(device)
    outputs = outputs or Outputs(store.levels, opts.save_dtype, sizes=LevelSizes(engine.model.config))
    results = Results(store, outputs, report, on_failure, log)
    sizes = outputs.sizes or LevelSizes(engine.model.config)
    # the network's input size: as decoded, or as the detector resizes it on the device
    on_device = engine.detector.resize if engine.detector is not None else None
    decoded_as = Resize() if on_device is not None else opts.resize
    target = on_device or opts.resize
    shapes = partial(_shapes, sizes, target)
    jobs = plan(images, store, opts, outputs, results, shapes, workers, log, target)
    forward = Forward(engine, report, on_failure, log)
    depth = max(2, 2 * batch_size, writers)
    with Writer(store, report, depth, outputs=outputs, results=results, threads=writers) as writer:
        decoded = decode_ahead(
            jobs,
            decoded_as,
            opts.max_pixels,
            workers,
            2 * workers + 2 * batch_size,
            opts.timeout,
            opts.hash,
            on_device,
        )
        readable = split_off_failures(decoded, report, on_failure, opts.fail_fast, writer, sizes)
        for batch in batches(readable, batch_size, max_pending=4 * batch_size):
            for job, levels, ready in forward(batch):
                writer.put(job, levels, ready)


def plan(
    images: Sequence[InputImage],
    store: Storage,
    opts: Options,
    outputs: Outputs,
    results: Results,
    shapes: Callable[[int, int], dict[str, tuple[int, ...]]],
    workers: int,
    log: Log,
    target: Resize | DetectorResize | None = None,
) -> list[Job]:
    """Step 1. Images with every requested array in place and trusted (and their preview, if
    asked) are reported as skipped; the rest are jobs for their missing arrays (all with
    ``overwrite``). A job whose levels are all on disk and trusted derives the rest from the
    files, with no forward pass. Inputs that listing or the resume check found unusable are jobs
    with their ``error`` set, to be reported failed in order.

    What is kept, deleted and recomputed of an image with stored features is resume.py's one
    decision (:func:`resume.decide`), taken here, before anything new is written."""
    present = [image for image in images if image.error is None and store.present(image.key)]
    for image in present if store.in_place else ():  # a whole-image store holds no strays per image
        store.remove_strays(image.key)
    checked = [] if opts.overwrite else [image for image in present if _stores(image, outputs, opts)]
    verdicts = dict(
        zip(
            (image.key for image in checked),
            resume.examine_all(checked, store, shapes, opts.hash, workers, opts.timeout),
            strict=True,
        )
    )
    if outputs.boxes is not None:
        pairs = [(image.rel, image.key) for image in present]
        tell_lost_rois(lost_rois(pairs, outputs, store.is_stored), f"--boxes {opts.boxes}", log)
    unrecorded = 0
    jobs = []
    stored = {image.key for image in present}
    for image in images:
        names = outputs.names(image.rel)
        verdict = verdicts.get(image.key) if image.error is None else None
        if image.error is not None or (verdict is not None and verdict.error is not None):
            jobs.append(Job(image, names, error=image.error or verdict.error))
        elif not _stores(image, outputs, opts):
            if image.key in stored and store.in_place:  # RoI features of another boxes file go
                store.forget_arrays(image.key, outputs.unwanted(image.rel))
            jobs.append(Job(image, ()))  # nothing to store: its header, for the report's geometry
        elif verdict is None:  # a new image, or --overwrite
            jobs.append(Job(image, names, preview=opts.preview))
        else:
            if verdict.recomputed == resume.NO_RECORD:
                unrecorded += 1
            elif verdict.recomputed:
                log(f"recomputing {image.path}: {verdict.recomputed}")
            try:
                job = _resume_job(image, names, verdict, store, outputs, shapes, opts, target)
            except OSError as e:  # an old file it must delete is in the way (a folder by its name)
                where = e.filename or store.where(image.key)
                reason = f"cannot clear its old features: {where}: {e.strerror}"
                jobs.append(Job(image, names, error=reason))
                continue
            if job.missing or job.preview:
                jobs.append(job)
            else:
                results.done(image, "skipped", job.geometry, job.have)
    if unrecorded:
        log(f"note: recomputing {unrecorded} images whose features carry no fingerprint of their input")
    return jobs


def _stores(image: InputImage, outputs: Outputs, opts: Options) -> bool:
    """Whether the run stores anything for ``image`` (not so with --no-maps, for an image with
    no boxes in the file and no --pool)."""
    return bool(outputs.names(image.rel)) or opts.preview


def _resume_job(
    image: InputImage,
    names: tuple[str, ...],
    verdict: resume.Verdict,
    store: Storage,
    outputs: Outputs,
    shapes: Callable[[int, int], dict[str, tuple[int, ...]]],
    opts: Options,
    target: Resize | DetectorResize | None = None,
) -> Job:
    """The job for an image with stored features, as :func:`resume.decide` settles it; one with
    nothing missing and no preview to draw is complete. Detections come from the network only
    (the heads read the levels of the padded input, which are not stored)."""
    decision = resume.decide(image, names, verdict, store, outputs, shapes)
    preview = opts.preview and store.preview_file(image.key) is None
    geometry = _recorded_geometry(verdict, target or opts.resize) if verdict.trusted else None
    from_disk = decision.from_disk and not set(decision.missing) & set(outputs.detect)
    return Job(
        image,
        decision.missing,
        decision.have,
        from_disk,
        preview,
        geometry=geometry,
        fingerprint=verdict.fingerprint,
        recomputed=verdict.recomputed,
    )


def _recorded_geometry(verdict: resume.Verdict, resize: Resize | DetectorResize) -> Geometry:
    """An image's geometry from its record: the input is the one recorded, so nothing is read."""
    return Geometry(verdict.input_size, resize.target(*verdict.input_size), verdict.orientation)


def _shapes(
    sizes: LevelSizes, resize: Resize | DetectorResize, height: int, width: int
) -> dict[str, tuple[int, ...]]:
    """Each level's (C, h, w) for an input of ``height`` x ``width`` as decoded."""
    return sizes(*resize.target(height, width))


def decode_ahead(
    jobs: Sequence[Job],
    resize: Resize,
    max_pixels: int,
    workers: int,
    lookahead: int,
    timeout: float | None = None,
    content_hash: bool = False,
    target: DetectorResize | None = None,
) -> Iterator[Job]:
    """Step 2. ``jobs`` in order, each fingerprinted and decoded (``fingerprint``, ``rgb``,
    ``geometry``), or its header read where no pixels are needed and its geometry is not known,
    or with its ``error``, on ``workers`` threads that run at most ``lookahead`` jobs ahead of
    the consumer. A job still reading after ``timeout`` seconds is failed and left behind
    (deadline.py). ``target``: the resize the device does after decoding (the detector's), which
    gives the network's input size."""

    def late(job: Job) -> Job:
        return replace(job, error=f"timed out after {timeout:g} s reading or decoding it (--timeout)")

    read = partial(
        _decode_job, resize=resize, max_pixels=max_pixels, content_hash=content_hash, target=target
    )
    yield from ordered_map(
        read, jobs, workers=workers, lookahead=lookahead, timeout=timeout, late=late, name="fpn-decode"
    )


def _decode_job(
    job: Job, resize: Resize, max_pixels: int, content_hash: bool, target: DetectorResize | None = None
) -> Job:
    if job.error is not None:  # listing or the resume check found it unusable
        return job
    try:
        if job.needs_pixels:
            if job.fingerprint is None:  # before the pixels: a change meanwhile shows next time
                job.fingerprint = resume.fingerprint(job.image.path, content_hash)
            decoded = decode_image(job.image.path, resize, max_pixels)
            job.rgb = decoded.rgb
            size = target.target(*decoded.rgb.shape[:2]) if target else decoded.rgb.shape[:2]
            job.geometry = Geometry(decoded.size, size, decoded.orientation)
        elif job.geometry is None:
            found = read_header(job.image.path)
            job.geometry = Geometry(found.size, (target or resize).target(*found.size), found.orientation)
    except ImageError as e:
        job.error = str(e)
    except MemoryError:
        job.error = "not enough memory to read it"
    return job


def split_off_failures(
    decoded: Iterable[Job],
    report: Report,
    on_failure: OnFailure,
    fail_fast: bool,
    writer: Writer,
    sizes: LevelSizes | None = None,
) -> Iterator[Job]:
    """Step 3. Images that could not be read, or that are too small for the network (``sizes``:
    the model refuses their input size), are failed inputs (with ``fail_fast``, the first stops
    the run); jobs whose levels are on disk, or that store nothing, go straight to ``writer``;
    the rest go on to the network."""
    for job in decoded:
        if job.error is None and sizes is not None and job.geometry is not None:
            job.error = sizes.refusal(*job.geometry.model_input_size)
        if job.error is not None:
            _fail(job, job.error, report, on_failure)
            if fail_fast:
                raise FPNError(f"stopped at the first failure (--fail-fast): {job.image.path}: {job.error}")
        elif not job.needs_network:
            writer.put_from_disk(job)
        else:
            yield job


def batches(jobs: Iterable[Job], batch_size: int, max_pending: int) -> Iterator[list[Job]]:
    """Step 4. Groups decoded images of equal size into batches, in arrival order; features never
    depend on a neighbour (no padding). At most ``max_pending`` images wait for company."""
    buckets: dict[tuple[int, int], list[Job]] = {}
    pending = 0
    for job in jobs:
        size = job.rgb.shape[:2]
        bucket = buckets.setdefault(size, [])
        bucket.append(job)
        pending += 1
        if len(bucket) == batch_size:
            pending -= len(buckets.pop(size))
            yield bucket
        elif pending > max_pending:
            fullest = max(buckets, key=lambda s: len(buckets[s]))
            pending -= len(buckets[fullest])
            yield buckets.pop(fullest)
    yield from buckets.values()


class Forward:
    """Step 5. The network over a batch. A batch that runs out of device memory is split in halves,
    each tried again; an image that does not fit alone is a failed input."""

    def __init__(self, engine: Engine, report: Report, on_failure: OnFailure, log: Log) -> None:
        self.engine, self.report, self.on_failure, self.log = engine, report, on_failure, log

    def __call__(self, batch: list[Job]) -> Iterator[tuple[Job, Levels, torch.cuda.Event | None]]:
        """(job, its levels {level: (C, h, w) on the CPU}, an event that fires when the device's
        copies into them are done, or None) for each image of ``batch`` that fits."""
        result = self._try(batch)
        if isinstance(result, dict):  # images with NaN or infinite levels fail; the rest run again
            yield from self._without(batch, result)
            return
        if isinstance(result, str):
            yield from self._split(batch, result)
            return
        feats, ready = result
        for i, job in enumerate(batch):
            yield job, {k: v[i] for k, v in feats.items()}, ready

    def _try(self, batch: list[Job]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None] | str:
        """The engine's output, or, when the batch does not fit the device's memory, why (how much
        it needs, where that is known beforehand; else ""). The caller retries after this returns,
        outside the except block: inside it, the exception's traceback keeps the failed forward's
        frames alive, and with them its activations, so the halves would fail too (seen on a GPU)."""
        fits, short = self.engine.fits(len(batch), *batch[0].rgb.shape[:2])
        if not fits:  # the kernel would kill the whole run, not raise MemoryError
            return short
        try:
            pixels = np.stack([job.rgb for job in batch])
            if getattr(self.engine, "detector", None) is None:
                return self.engine(pixels)
            # detections come back in the upright image's pixels, whatever resized it
            return self.engine(pixels, [job.geometry.input_size for job in batch])
        except NonFinite as e:
            return e.images
        except MemoryError:  # the host's memory (the batch's stack, a CPU allocation)
            pass
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(e):
                raise
        return ""

    def _without(
        self, batch: list[Job], bad: dict[int, str]
    ) -> Iterator[tuple[Job, Levels, torch.cuda.Event | None]]:
        """Fails the images ``bad`` names (finite.py) and runs the rest of ``batch`` again."""
        for i, job in enumerate(batch):
            if i in bad:
                _fail(job, bad[i], self.report, self.on_failure)
        rest = [job for i, job in enumerate(batch) if i not in bad]
        if rest:
            yield from self(rest)

    def _split(self, batch: list[Job], short: str) -> Iterator[tuple[Job, Levels, torch.cuda.Event | None]]:
        device = self.engine.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        h, w = batch[0].rgb.shape[:2]
        if len(batch) > 1:  # the images may fit one at a time
            self.log(f"note: out of memory on {device} for {len(batch)} {h}x{w} images: splitting the batch")
            half = len(batch) // 2
            yield from self(batch[:half])
            yield from self(batch[half:])
            return
        why = f" ({short})" if short else ""
        reason = f"out of memory on {device} for a {h}x{w} input{why}; try --max-side or --batch-size"
        _fail(batch[0], reason, self.report, self.on_failure)


class Writer:
    """Step 6. Writes finished images on background threads and reports each: the missing
    levels, the arrays derived from the levels (``outputs``: pooled vectors, RoI features), the
    preview, and last the input's record, which marks the image complete. The queue is bounded,
    so a slow disk slows the producer instead of filling memory. The first error (disk full, say)
    stops all writing: later jobs are drained unwritten, and :meth:`put` and :meth:`close` raise
    it. Used as a context manager, it closes on exit."""

    def __init__(
        self, store: Storage, report: Report, depth: int, outputs: Outputs, results: Results, threads: int = 1
    ) -> None:
        self.store, self.report, self.outputs, self.results = store, report, outputs, results
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: FPNError | None = None
        self._first_error = threading.Lock()
        # one image is always one thread's, written in order, so its record is still written last
        # (npy: an image's folder; shards: its group, in the thread's own open shard)
        self.threads = [
            threading.Thread(target=self._loop, name=f"fpn-writer-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def put(self, job: Job, levels: Levels, ready: torch.cuda.Event | None = None) -> None:
        """Queues ``job``'s computed levels; ``ready``, if given, fires when the device's copies
        into them are done (the writer waits for it before it reads them)."""
        self._enqueue(job, partial(self._write_computed, job, levels, ready))

    def put_from_disk(self, job: Job) -> None:
        """Queues a job whose levels are all on disk: they are read back (memory-mapped) for the
        derived arrays and the preview."""
        self._enqueue(job, partial(self._write_from_disk, job))

    def close(self) -> None:
        """Waits for the queued jobs to be written and puts them in place (``store.flush``: a
        format that packs images closes its pack); raises the first write error, if any."""
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        try:
            self.store.flush()
        except OSError as e:
            where = e.filename or self.store.where("")
            self.error = self.error or FPNError(f"cannot write {where}: {e.strerror or e}")
        except FPNError as e:
            self.error = self.error or e
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _enqueue(self, job: Job, write: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((job, write))

    def _loop(self) -> None:
        while (task := self.queue.get()) is not None:
            job, write = task
            if self.error is not None:
                continue  # after a fatal write error, drain without writing
            try:
                write()
            except Exception as e:  # the thread must live on: a dead writer would hang the producer
                where = self.store.where(job.image.key)
                if isinstance(e, (IsADirectoryError, NotADirectoryError)):
                    # a folder where one of the image's files goes: that image fails, not the disk
                    where = getattr(e, "filename2", None) or e.filename or where
                    _fail(job, f"cannot write {where}: {e.strerror}", self.report, self.results.on_failure)
                    continue
                if isinstance(e, OSError):
                    reason, where = e.strerror or str(e), e.filename or where
                elif isinstance(e, MemoryError):
                    reason = "out of memory"
                else:
                    reason = f"{type(e).__name__}: {e}"
                with self._first_error:  # the first error is the one reported, whichever thread
                    self.error = self.error or FPNError(f"cannot write {where}: {reason}")
                self.report.add(ImageResult(job.image.rel, "failed", f"not written: {reason}"))

    def _write_computed(self, job: Job, levels: Levels, ready: torch.cuda.Event | None) -> None:
        if ready is not None:
            ready.synchronize()  # the device-to-host copies of this batch are done
        self._finish(job, {k: np.asarray(v) for k, v in levels.items()}, "ok")

    def _write_from_disk(self, job: Job) -> None:
        levels = self.store.read_levels(job.image.key) if job.from_disk else {}  # else: nothing to store
        self._finish(job, levels, "ok" if job.missing else "skipped")  # a preview alone: skipped

    def _finish(self, job: Job, levels: dict[str, np.ndarray], status: str) -> None:
        checked = self.outputs.checked(job.image.rel, job.geometry)  # the image's boxes, checked once
        floats = self.outputs.floats(levels)  # bfloat16, int8: decoded, as a reader would see them
        derived = self.outputs.compute(floats, job.missing, job.image.rel, job.geometry, checked)
        every = {**levels, **derived}
        written = {name: every[name] for name in job.missing}
        key = job.image.key
        self.store.write_levels(key, written)  # levels, pooled vectors, rois, then boxes (regions.outputs)
        if job.preview:
            self.store.write_preview(key, preview.render(job.rgb, floats))
        shapes = {**job.have, **{name: array.shape for name, array in written.items()}}
        result = self.results.entry(job.image, status, job.geometry, shapes, job.recomputed, checked)
        if written or job.preview:  # the record last: everything above is in place
            geometry = job.geometry
            record = resume.record(job.image, job.fingerprint, geometry.input_size, geometry.orientation)
            self.store.finish_image(key, record, result.to_json())
        self.results.add(result, job.image, job.geometry, checked)


def publish_report(
    store: Storage,
    report: Report,
    shard: tuple[int, int] | None,
    group: ProcessGroup | None = None,
    failed: bool = False,
) -> None:
    """Step 7. Writes report.json; a shard writes its part, ``.shards/report-I-of-N.json``, and the
    parts are merged into report.json once all are in: under torchrun (``group``) by rank 0 after
    a barrier that waits for every rank's part, otherwise by whichever shard finds the set
    complete. A torchrun rank that ``failed`` writes its part only: the others may never reach the
    barrier. The store's index (shards' index.jsonl) is published with report.json."""
    if shard is None:
        store.write_report(report.write_json)
        return
    store.write_shard_report(*shard, report.write_json)
    if group is not None:
        if failed:
            return
        group.barrier()  # every rank's part is on disk
        if group.rank != 0:
            return
    parts = store.read_shard_reports(shard[1])
    if parts is not None:
        store.write_report(lambda f: write_merged(f, parts))


def _fail(job: Job, reason: str, report: Report, on_failure: OnFailure) -> None:
    """An image that could not be processed: ``on_failure`` is told, the report lists it failed."""
    on_failure(str(job.image.path), reason)
    size = job.geometry.input_size if job.geometry else None
    report.add(ImageResult(job.image.rel, "failed", reason, input_size=size))


class Results:
    """Reports images whose arrays are stored, written now ("ok") or before ("skipped"): their
    report.json entries, and a message per box that was refused (a failure) or clipped (a note)."""

    def __init__(
        self, store: Storage, outputs: Outputs, report: Report, on_failure: OnFailure, log: Log
    ) -> None:
        self.store, self.outputs, self.report = store, outputs, report
        self.on_failure, self.log = on_failure, log

    def done(
        self,
        image: InputImage,
        status: str,
        geometry: Geometry | None,
        shapes: dict[str, tuple[int, ...]],
        recomputed: str | None = None,
    ) -> None:
        checked = self.outputs.checked(image.rel, geometry)  # the image's boxes, checked once
        self.add(self.entry(image, status, geometry, shapes, recomputed, checked), image, geometry, checked)

    def entry(
        self,
        image: InputImage,
        status: str,
        geometry: Geometry | None,
        shapes: dict[str, tuple[int, ...]],
        recomputed: str | None = None,
        checked: Checked | None = None,
    ) -> ImageResult:
        """The image's report.json entry, its arrays where the store says they are."""
        key, location = image.key, self.store.location
        return ImageResult(
            image.rel,
            status,
            recomputed=recomputed,
            input_size=geometry.input_size if geometry else None,
            model_input_size=tuple(geometry.model_input_size) if geometry else None,
            levels={
                level: _level_entry(key, level, shapes, location)
                for level in self.store.levels
                if level in shapes
            },
            preview=self.store.preview_file(key),
            **self.outputs.entries(key, image.rel, shapes, geometry, location, checked),
        )

    def add(
        self,
        result: ImageResult,
        image: InputImage,
        geometry: Geometry | None,
        checked: Checked | None = None,
    ) -> None:
        """``result`` into the report, and a message per refused or clipped box of the image."""
        self.report.add(result)
        if result.rois is not None:
            tell = (self.log, self.on_failure, checked)
            tell_boxes(image.rel, str(image.path), self.outputs, geometry, *tell)


def _level_entry(key: str, level: str, shapes: dict[str, tuple[int, ...]], location: Callable) -> dict:
    """A level's report.json entry: its shape and where it is, and for int8 where its scales are
    (``"scale": {"shape": [C], "file": ...}``)."""
    entry = {"shape": list(shapes[level]), **location(key, level)}
    scale = codecs.scale_name(level)
    if scale in shapes:
        entry["scale"] = {"shape": list(shapes[scale]), **location(key, scale)}
    return entry


def summarize(
    inputs: Sequence[str | os.PathLike[str]],
    spec: ModelSpec,
    resize: Resize,
    input_size: tuple[int, int],
    stdin_lines: Iterable[str] = (),
    on_failure: OnFailure | None = None,
    lists: Sequence[str | os.PathLike[str]] = (),
    list_column: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    pool: Sequence[str] = (),
    maps: bool = True,
    root: str | os.PathLike[str] | None = None,
    detections: Options | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> str:
    """The ``--summary`` text: for ``input_size``, or for each distinct size among the inputs
    (``inputs`` and the list files ``lists``), then the dataset's totals in each format and save
    dtype, of the arrays a run stores (the levels unless not ``maps``, the ``pool`` vectors);
    ``on_failure`` (path, reason) for each input whose size cannot be read or that is too small
    for the network (an ``input_size`` too small is a :class:`UsageError`). Every size is the
    model's (:class:`LevelSizes`); ``root`` as extract's. ``detections``: the options of a
    --detect run, whose det_* arrays are counted at their most (--max-detections boxes each).
    ``timeout``: seconds that listing a URL or reading one image's header may take, as in a run
    (--timeout); a slower one is an input that cannot be read."""
    config = spec.config
    sizes = LevelSizes(config)
    if detections is not None:  # the network's input is the detector's resize of each image
        resize = detector_resize(detections, spec) or resize
    if not inputs and not lists:
        target = resize.target(*input_size)  # the network's input, as a run's for such an image
        refusal = sizes.refusal(*target)
        if refusal is not None:
            raise UsageError(f"--input-size {input_size[0]}x{input_size[1]}: {refusal}")
        shapes = [(target, sizes(*target))]
        text = _resized(format_summary(spec, parameter_count(config), level_info(config), shapes), resize)
        return text + _detection_line(detections, spec, target)
    per_size: Counter[tuple[int, int]] = Counter()
    unreadable = 0
    found = find_inputs(inputs, stdin_lines, None, lists, list_column, root, timeout)
    for image, size in _probe_all(found, timeout):
        if not isinstance(size, str):
            target = resize.target(*size)
            size = sizes.refusal(*target) or target
        if isinstance(size, str):
            unreadable += 1
            if on_failure is not None:
                on_failure(str(image.path), size)
        else:
            per_size[size] += 1
    shapes = [(s, sizes(*s)) for s in sorted(per_size)]
    text = _resized(
        format_summary(spec, parameter_count(config), level_info(config), shapes, per_size), resize
    )
    outputs = Outputs(resolved_levels(config), maps=maps, pool=tuple(pool))
    stored = {size: _stored_shapes(outputs, levels) for size, levels in shapes}
    if detections is not None:
        for size in stored:
            stored[size].update(_detection_shapes(detections, spec, size))
    totals = format_totals(per_size, stored, unreadable, codecs.SAVE_DTYPES, shard_size)
    if per_size:
        text += _detection_line(detections, spec, max(per_size, key=per_size.get))
    return f"{text}\n\n{totals}"


def _resized(text: str, resize: Resize | DetectorResize) -> str:
    """The summary ``text`` with a line after its header that says which resize its input sizes
    are after (the caller's, with the framework's test-time resize where a run applies it:
    options.with_framework_resize, or a detector's own), if any: its sizes are the network's
    inputs, not the images'."""
    how = resize.describe()
    if how is None:
        return text
    lines = text.split("\n")
    lines.insert(2, f"input sizes below are the network's, after resizing the images ({how})")
    return "\n".join(lines)


def _stored_shapes(outputs: Outputs, level_shapes: dict) -> dict[str, tuple[int, ...]]:
    """The shape of each array a run stores for an image of these level shapes (no boxes)."""
    names = outputs.names("")
    return {name: shape for name, shape in outputs.shapes("", level_shapes).items() if name in names}


def _detection_shapes(opts: Options, spec: ModelSpec, size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The det_* arrays of an image at their most: M boxes (--max-detections, --detections-count's
    M, else the detector's 100)."""
    count = opts.detections_count[1] if opts.detections_count else opts.max_detections or 100
    roi = opts.roi_size if isinstance(opts.roi_size, int) else opts.roi_size[0]
    return estimated_shapes(spec.weights, count, roi, opts.detect_extras, size)


def _detection_line(opts: Options | None, spec: ModelSpec, size: tuple[int, int]) -> str:
    """--summary's line for the det_* arrays of one image (of ``size``) at their most."""
    if opts is None:
        return ""
    shapes = _detection_shapes(opts, spec, size)
    count = shapes["det_boxes"][0]
    sizes = [
        (sum(npy_size(shape, codecs.array_dtype(dtype, name, ())) for name, shape in shapes.items()), dtype)
        for dtype in codecs.SAVE_DTYPES
    ]
    per_dtype = ", ".join(f"{human_bytes(total)} {dtype}" for total, dtype in sizes)
    return f"\ndetections per image, at most {count} boxes: {per_dtype}"


def _probe_all(
    images: Sequence[InputImage], timeout: float | None, workers: int = 8
) -> Iterator[tuple[InputImage, tuple[int, int] | str]]:
    """Each image with its size from its header, or the reason it cannot be read; on a few
    threads, since an image behind a URL is a round trip, a bounded number ahead (a million images
    are not a million pending futures); a header still unread after ``timeout`` seconds is a
    reason (deadline.py leaves its thread behind)."""

    def size(image: InputImage) -> tuple[int, int] | str:
        if image.error is not None:
            return image.error
        try:
            return read_header(image.path).size
        except ImageError as e:
            return str(e)

    def late(image: InputImage) -> str:
        return f"timed out after {timeout:g} s reading its header (--timeout)"

    sizes = ordered_map(
        size, images, workers=workers, lookahead=4 * workers, timeout=timeout, late=late, name="fpn-probe"
    )
    yield from zip(images, sizes, strict=True)
