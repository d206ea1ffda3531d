"""The extraction run: inputs to plan, decode prefetch, same-size batching, the forward pass
(engine.py), and a background writer, so that decoding and disk writes overlap the network.

    find_images -> [skip complete] -> decode (thread pool, bounded look-ahead)
      -> batches of equal size -> forward (inference mode, autocast) -> writer thread (bounded queue)
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import preview
from .builder import build_fpn
from .distributed import ProcessGroup, combine, shard_of, torchrun_launch
from .engine import Engine, default_workers, is_out_of_memory, resolve_device
from .errors import FPNError, ImageError
from .images import InputImage, Resize, decode, find_images, probe_size
from .locks import finish_overwrite, lock_folder, record_settings
from .model import FPNConfig, output_shapes, parameter_count
from .options import Options, report_header, settings_record
from .report import ImageResult, Report, format_summary, write_merged
from .store import PREVIEW_FILE, Store


@dataclass
class _Decoded:
    image: InputImage
    missing: tuple[str, ...]  # the levels to write
    rgb: np.ndarray | None = None  # (H, W, 3) uint8, resized
    size: tuple[int, int] | None = None  # as decoded
    error: str | None = None


class Writer:
    """Writes finished images on a background thread. The queue is bounded, so a slow disk slows
    the producer instead of filling memory. The first OS error (disk full, say) stops all writing."""

    def __init__(self, store: Store, report: Report, depth: int, preview: bool) -> None:
        self.store, self.report, self.preview = store, report, preview
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: FPNError | None = None
        self.thread = threading.Thread(target=self._loop, name="fpn-writer", daemon=True)
        self.thread.start()

    def put(self, item: _Decoded, arrays: dict[str, np.ndarray | torch.Tensor] | None, ready=None) -> None:
        """Queues ``item``'s computed levels; ``arrays`` None: its levels are on disk already and
        only its preview is missing."""
        if self.error is not None:
            raise self.error
        self.queue.put((item, arrays, ready))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            item, arrays, ready = job
            if self.error is not None:
                continue  # after a fatal write error, drain without writing
            key = item.image.key
            try:
                if ready is not None:
                    ready.synchronize()  # the device-to-host copies of this batch are done
                if arrays is None:
                    numpy = self.store.read_levels(key)
                else:
                    numpy = {k: np.asarray(v) for k, v in arrays.items()}
                    self.store.write_levels(key, {k: numpy[k] for k in item.missing})
                if self.preview:
                    self.store.write_preview(key, preview.render(item.rgb, numpy))
            except Exception as e:  # the thread must live on: a dead writer would hang the producer
                if isinstance(e, OSError):
                    reason, where = e.strerror or str(e), e.filename or self.store.root / key
                else:
                    reason, where = f"{type(e).__name__}: {e}", self.store.root / key
                self.error = FPNError(f"cannot write {where}: {reason}")
                self.report.add(ImageResult(item.image.rel, "failed", f"not written: {reason}"))
                continue
            status = "skipped" if arrays is None else "ok"
            self.report.add(_written_result(item, self.store, {k: v.shape for k, v in numpy.items()}, status))


def _written_result(
    item: _Decoded, store: Store, shapes: dict[str, tuple[int, ...]], status: str
) -> ImageResult:
    assert item.rgb is not None
    return ImageResult(
        item.image.rel,
        status,
        input_size=item.size,
        model_input_size=tuple(item.rgb.shape[:2]),
        levels=_level_entries(item.image.key, store, shapes),
        preview=_preview_entry(item.image.key, store),
    )


def _preview_entry(key: str, store: Store) -> str | None:
    return f"{key}/{PREVIEW_FILE}" if store.preview_path(key).is_file() else None


def _level_entries(key: str, store: Store, shapes: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    return {
        level: {"shape": list(shapes[level]), "file": f"{key}/{level}.npy"}
        for level in store.levels
        if level in shapes
    }


def _prefetch(
    pool: ThreadPoolExecutor, jobs: Sequence[_Decoded], fn: Callable[[_Decoded], _Decoded], lookahead: int
) -> Iterator[_Decoded]:
    """``fn`` over ``jobs`` on the pool, at most ``lookahead`` in flight, results in input order."""
    pending: list[Future] = []
    it = iter(jobs)
    for job in it:
        pending.append(pool.submit(fn, job))
        if len(pending) >= lookahead:
            break
    while pending:
        done = pending.pop(0).result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield done


def _batches(items: Iterable[_Decoded], batch_size: int, max_pending: int) -> Iterator[list[_Decoded]]:
    """Groups decoded images of equal size into batches, in arrival order; features never depend
    on a neighbour (no padding). At most ``max_pending`` images wait for company."""
    buckets: dict[tuple[int, int], list[_Decoded]] = {}
    pending = 0
    for item in items:
        size = item.rgb.shape[:2]
        bucket = buckets.setdefault(size, [])
        bucket.append(item)
        pending += 1
        if len(bucket) == batch_size:
            pending -= len(buckets.pop(size))
            yield bucket
        elif pending > max_pending:
            fullest = max(buckets, key=lambda s: len(buckets[s]))
            pending -= len(buckets[fullest])
            yield buckets.pop(fullest)
    yield from buckets.values()


def extract(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    options: Options | None = None,
    *,
    stdin_lines: Iterable[str] = (),
    log: Callable[[str], None] | None = None,
    on_failure: Callable[[str, str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    shard: tuple[int, int] | None = None,
    **kwargs,
) -> Report:
    """Runs a whole extraction: finds the images in ``inputs``, writes their levels under ``out``
    and ``out/report.json``, and returns the :class:`Report` (its ``exit_status`` is the CLI's).

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
    out = Path(out)
    launch = torchrun_launch()
    shard = combine(shard, launch)
    device = resolve_device(opts.device, launch.local_rank if launch else None)
    images = find_images(inputs, stdin_lines, exclude=out)
    for image in images:
        Store.check_key(image.key, image.path)
    if shard is not None:
        images = [image for image in images if shard_of(image.key, shard[1]) == shard[0]]
    model = build_fpn(opts.arch, opts.weights, opts.fpn_style, opts.levels, opts.seed)
    store = Store(out, opts.levels, opts.save_dtype)
    with lock_folder(out, shard):
        record_settings(out, settings_record(opts, model.config.fpn_style), opts.overwrite, shard)
        store.sweep_dead_runs()
        if opts.dtype == "float16" and device.type == "cpu":
            log("note: --dtype float16 is slow on CPUs (10x slower than float32, measured); use bfloat16")
        if opts.weights == "random":
            log(
                f"note: --weights random (seed {opts.seed}): "
                "features are for shapes and plumbing, not meaning"
            )
        report = Report(report_header(opts, model.config, device, shard), total=len(images), on_add=progress)
        engine = Engine(model, device, opts.dtype, opts.save_dtype)
        with ProcessGroup(device) if launch else contextlib.nullcontext() as group:
            if group is not None:
                log(f"torchrun: rank {launch.rank} of {launch.world_size} on {device}, {group.backend}")
            try:
                _run(images, store, engine, opts, device, report, on_failure, log)
            except KeyboardInterrupt as e:
                report.interrupt(e)
            except FPNError:
                with contextlib.suppress(OSError):  # a report of what was done, if the disk takes one
                    _write_reports(store, report, shard, merge=launch is None)
                raise
            _write_reports(store, report, shard, merge=launch is None)
            if not report.interrupted:
                finish_overwrite(out, shard)
            if group is not None:
                group.barrier()  # every rank's part is on disk
                if launch.rank == 0:
                    _merge(store, shard[1])
    return report


def _write_reports(store: Store, report: Report, shard: tuple[int, int] | None, merge: bool) -> None:
    """report.json, or for a shard its part; with ``merge``, the shard that completes the set
    merges them (under torchrun, rank 0 merges after the barrier instead)."""
    if shard is None:
        store.write_report(report.write_json)
        return
    store.write_shard_report(*shard, report.write_json)
    if merge:
        _merge(store, shard[1])


def _merge(store: Store, count: int) -> None:
    parts = store.read_shard_reports(count)
    if parts is not None:
        store.write_report(lambda f: write_merged(f, parts))


def _plan(images: Sequence[InputImage], store: Store, opts: Options, report: Report) -> list[_Decoded]:
    """Images with every requested level in place are reported as skipped; the rest are jobs for
    their missing levels (all levels with ``overwrite``)."""
    jobs = []
    for image in images:
        if not (store.root / image.key).is_dir():  # a new image: one stat, no more
            jobs.append(_Decoded(image, store.levels))
            continue
        store.remove_strays(image.key)
        have = {} if opts.overwrite else store.existing(image.key)
        missing = tuple(level for level in store.levels if level not in have)
        if missing or (opts.preview and not store.preview_path(image.key).is_file()):
            jobs.append(_Decoded(image, missing))  # no missing level: draw the preview alone
        else:
            size = probe_size(image.path)
            report.add(
                ImageResult(
                    image.rel,
                    "skipped",
                    input_size=size,
                    model_input_size=opts.resize.target(*size) if size else None,
                    levels=_level_entries(image.key, store, have),
                    preview=_preview_entry(image.key, store),
                )
            )
    return jobs


def _run(
    images: Sequence[InputImage],
    store: Store,
    engine: Engine,
    opts: Options,
    device: torch.device,
    report: Report,
    on_failure: Callable[[str, str], None],
    log: Callable[[str], None],
) -> None:
    jobs = _plan(images, store, opts, report)
    batch_size = opts.batch_size or (8 if device.type != "cpu" else 1)
    workers = opts.workers or default_workers(device)

    def decode_job(job: _Decoded) -> _Decoded:
        try:
            job.rgb, job.size = decode(job.image.path, opts.resize, opts.max_pixels)
        except ImageError as e:
            job.error = str(e)
        return job

    def decoded_ok() -> Iterator[_Decoded]:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="fpn-decode")
        try:
            for job in _prefetch(pool, jobs, decode_job, lookahead=2 * workers + 2 * batch_size):
                if job.error is None and not job.missing:
                    writer.put(job, None)
                    continue
                if job.error is None:
                    yield job
                    continue
                on_failure(job.image.path, job.error)
                report.add(ImageResult(job.image.rel, "failed", job.error))
                if opts.fail_fast:
                    raise FPNError(
                        f"stopped at the first failure (--fail-fast): {job.image.path}: {job.error}"
                    )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    writer = Writer(store, report, depth=max(2, 2 * batch_size), preview=opts.preview)

    def compute(batch: list[_Decoded]) -> None:
        feats = None
        try:
            feats, ready = engine(np.stack([job.rgb for job in batch]))
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(e):
                raise
        if feats is None:
            # Retried outside the except block: inside it, the exception's traceback keeps the
            # failed forward's frames alive, and with them its activations, so halves fail too.
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) > 1:  # the images may fit one at a time
                h, w = batch[0].rgb.shape[:2]
                log(f"note: out of memory on {device} for {len(batch)} {h}x{w} images: splitting the batch")
                half = len(batch) // 2
                compute(batch[:half])
                compute(batch[half:])
                return
            job = batch[0]
            h, w = job.rgb.shape[:2]
            reason = (
                f"out of memory on {device} for a {h}x{w} input; try --max-side or a smaller --batch-size"
            )
            on_failure(job.image.path, reason)
            report.add(ImageResult(job.image.rel, "failed", reason, input_size=job.size))
            return
        for i, job in enumerate(batch):
            writer.put(job, {k: v[i] for k, v in feats.items()}, ready)

    try:
        for batch in _batches(decoded_ok(), batch_size, max_pending=4 * batch_size):
            compute(batch)
    finally:
        writer.close()


def summarize(
    inputs: Sequence[str | os.PathLike[str]],
    config: FPNConfig,
    resize: Resize,
    input_size: tuple[int, int],
    stdin_lines: Iterable[str] = (),
) -> str:
    """The ``--summary`` text: for ``input_size``, or for each distinct size among ``inputs``."""
    if inputs:
        sizes = []
        for image in find_images(inputs, stdin_lines):
            size = probe_size(image.path)
            if size is not None:
                sizes.append(resize.target(*size))
        sizes = sorted(set(sizes))
    else:
        sizes = [input_size]
    return format_summary(config, parameter_count(config), [(s, output_shapes(config, *s)) for s in sizes])
