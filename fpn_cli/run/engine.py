"""Device and precision: which device a run uses, and the model prepared to run on it.

``Engine`` turns decoded uint8 batches into features: normalisation on the device, BatchNorm
folded into the convolutions, channels-last layout, inference mode and autocast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fpn_cli.errors import UsageError
from fpn_cli.formats import codecs
from fpn_cli.models.backbones import get_arch
from fpn_cli.models.model import FPN, fold_batchnorm, level_info
from fpn_cli.models.preprocess import IMAGENET, Preprocess
from fpn_cli.regions.detect import Detector, pad_to
from fpn_cli.run.choices import DTYPE_NAMES
from fpn_cli.run.finite import check_finite, check_finite_scales

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; one this
    machine lacks is a :class:`UsageError` naming it. Under torchrun, ``auto`` and ``cuda`` mean
    ``cuda:LOCAL_RANK``."""
    spec = spec.strip().lower()
    if local_rank is not None and spec in ("auto", "cuda") and torch.cuda.is_available():
        spec = f"cuda:{local_rank}"
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} is not available: this machine has no usable CUDA GPU")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"device {spec!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) here"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not has_mps:
            raise UsageError(f"device {spec!r} is not available: this machine has no MPS (Apple GPU)")
        return device
    raise UsageError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps")


def default_writers(device: torch.device) -> int:
    """Writer threads: on a GPU host one thread's writes (1.6 GB/s measured, O_DIRECT) leave the
    disk and the idle cores unused; on the CPU the cores are the network's."""
    return 4 if device.type != "cpu" else 1


def default_workers(device: torch.device) -> int:
    """Decode threads: an accelerator wants them all; on the CPU they take cores from the network."""
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type != "cpu" else max(1, cores // 4)


# Host memory a CPU forward takes per input pixel: for each float per pixel of the network's levels
# (sum of channels / stride**2 over its backbone and pyramid levels), its backbone's
# host_bytes_per_level_float (models/backbones.py: measured per family by benchmarks/memory_guard.py,
# e.g. 8 for Bottleneck ResNets, 11 for basic-block ones), plus this for the image itself
HOST_BYTES_PER_PIXEL = 16  # the decoded uint8 image and its float copy


def available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable, capped by a cgroup's
    limit (a container's); None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def encode_finite(feats: dict[str, torch.Tensor], save_dtype: str) -> dict[str, torch.Tensor]:
    """The levels {name: (N, C, h, w)} as the stored arrays of ``save_dtype`` (codecs.encode), on
    their device; :class:`~fpn_cli.run.finite.NonFinite` if a level of an image holds a NaN or an
    infinity (that image fails). int8's per-channel peaks read every value anyway, and its scales
    say where one was not finite: one read of the level for both, not two."""
    if save_dtype != "int8":
        check_finite(feats)
    stored = {}
    for level, v in feats.items():
        stored.update(codecs.encode(level, v, save_dtype))
    if save_dtype == "int8":
        check_finite_scales({level: stored[codecs.scale_name(level)] for level in feats})
    return stored


class Engine:
    """A model on a device, ready to turn uint8 batches into features: BatchNorm folded into the
    convolutions and, on CPU and CUDA, channels-last layout (the layout oneDNN and cuDNN run
    fastest); the decoded uint8 NHWC batch is that layout already, so the input needs no transpose.

    ``save_dtype`` is any of :data:`fpn_cli.formats.codecs.SAVE_DTYPES`. The conversion to it runs on
    the device, before the copy back (for int8 a GPU copies a quarter of float32's bytes), through
    :func:`fpn_cli.formats.codecs.encode`, and the forward's output holds the stored arrays of
    :func:`fpn_cli.formats.codecs.stored_arrays` with the batch in front, keyed by their names:

    - float32, float16: ``{"p2": (N, C, h, w) float32 | float16, ...}`` (as ever);
    - bfloat16: ``{"p2": (N, C, h, w) uint16, ...}``, the bits of bfloat16;
    - int8: ``{"p2": (N, C, h, w) int8, "p2_scale": (N, C) float32, ...}``, each level followed by its
      scales, so ``{k: v[i] for k, v in out.items()}`` is image i's arrays, named as stored.

    ``save_dtype`` (the attribute) is the torch dtype of the levels' own arrays: float32, float16,
    uint16 or int8; ``save_dtype_name`` the name given."""

    def __init__(
        self,
        model: FPN,
        device: torch.device,
        dtype: str,
        save_dtype: str,
        preprocess: Preprocess = IMAGENET,
        compile: bool = False,
        detector: Detector | None = None,
    ) -> None:
        self.memory_format = (
            torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
        )
        self.model = fold_batchnorm(model).to(device, memory_format=self.memory_format)
        self.network = _compiled(self.model) if compile else self.model
        self.device = device
        self.detector = detector.to(device) if detector is not None else None
        self.autocast = dtype != "float32"
        self.dtype = DTYPES[dtype]
        self.save_dtype_name = codecs.check_save_dtype(save_dtype)
        self.save_dtype = codecs.torch_code_dtype(save_dtype)
        # (x / s - mean) / std == x * scale + shift, one fused multiply-add per pixel
        std = torch.tensor(preprocess.std, device=device, dtype=torch.float64).view(1, 3, 1, 1)
        mean = torch.tensor(preprocess.mean, device=device, dtype=torch.float64).view(1, 3, 1, 1)
        self.scale = (1.0 / (preprocess.scale * std)).float()
        self.shift = (-mean / std).float()
        self.bgr = preprocess.channel_order == "BGR"
        floats = sum(info.channels / info.stride**2 for info in level_info(self.model.config).values())
        per_float = get_arch(self.model.config.arch).host_bytes_per_level_float
        self._host_bytes_per_pixel = per_float * floats + HOST_BYTES_PER_PIXEL

    def host_bytes(self, count: int, height: int, width: int) -> int:
        """About the host memory a CPU forward of ``count`` images of ``height`` x ``width`` takes."""
        return int(count * height * width * self._host_bytes_per_pixel)

    def fits(self, count: int, height: int, width: int) -> tuple[bool, str]:
        """Whether a forward of that batch fits the host's free memory, and if not, why: on the
        CPU, an allocation past it is met by the kernel's OOM killer, which ends the whole run
        before Python sees a MemoryError. Elsewhere (and where the free memory is unknown) yes."""
        free = available_memory() if self.device.type == "cpu" else None
        need = self.host_bytes(count, height, width) if free is not None else 0
        if free is None or need <= free:
            return True, ""
        return False, f"needs about {need / 2**30:.1f} GiB of memory, {max(free, 0) / 2**30:.1f} GiB free"

    def preprocess(self, batch: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised, on the device."""
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        x = x.permute(0, 3, 1, 2)
        if self.bgr:
            x = x.flip(1)
        x = torch.addcmul(self.shift, x.float(), self.scale)
        return x.contiguous(memory_format=self.memory_format)

    def __call__(
        self, batch: np.ndarray, original_sizes: Sequence[tuple[int, int]] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """(N, H, W, 3) uint8 -> :meth:`forward` of the normalised batch."""
        with torch.inference_mode():
            return self.forward(self.preprocess(batch), original_sizes)

    @torch.inference_mode()
    def forward(
        self, x: torch.Tensor, original_sizes: Sequence[tuple[int, int]] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """(N, 3, H, W) normalised, on the device -> ({level: (N, C, h, w) on the CPU in the save
        dtype, and the codec's other arrays (class docstring)}, an event that fires when the copies
        back are done, or None when they are).

        With a :class:`~fpn_cli.regions.detect.Detector`, the output also holds its det_* arrays,
        each a list of N numpy arrays (one image's detections each, in ``original_sizes``' pixels;
        default: the input's), and the levels are the detector's: computed on the input resized
        as it resizes and zero-padded to its multiple (32), then cropped to the resized input."""
        x = x.contiguous(memory_format=self.memory_format)
        if self.detector is not None:
            feats, detections = self._detect(x, original_sizes)
        else:
            with self._precision():
                feats = self.network(x)
            detections = {}
        stored = encode_finite(feats, self.save_dtype_name)
        if self.device.type == "cpu":
            return {**stored, **detections}, None
        # the layout change to C order costs the GPU nothing and spares the host's cores a copy; every
        # array, scales included, is copied on the stream that the event below is recorded on
        out = {k: _to_host(v) for k, v in stored.items()}
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            return {**out, **detections}, event
        torch.mps.synchronize()  # MPS has no event to hand over: wait here
        return {**out, **detections}, None

    def _detect(
        self, x: torch.Tensor, original_sizes: Sequence[tuple[int, int]] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[np.ndarray]]]:
        """The levels as the detector computes them and its det_* arrays (see :meth:`forward`):
        the batch resized as torchvision's transform does, on the normalised floats, then padded
        at the bottom/right (its ``batch_images``), then the heads on the padded levels."""
        detector = self.detector
        original_sizes = list(original_sizes or [tuple(x.shape[-2:])] * len(x))
        if detector.resize is not None:
            x = detector.resize(x).contiguous(memory_format=self.memory_format)
        height, width = x.shape[-2:]
        with self._precision():
            padded = self.network(pad_to(x, detector.heads.size_divisible))
        check_finite(padded)  # before the heads: a NaN level fails its image, not the batch's NMS
        with _no_tf32() if self.device.type == "cuda" else contextlib.nullcontext():
            found = detector.heads(padded, [(height, width)] * len(x), original_sizes)
        feats = {}
        for level, v in padded.items():  # each level back to the resized input's extent
            stride = level_info(self.model.config)[level].stride
            feats[level] = v[..., : -(-height // stride), : -(-width // stride)]
        per_image = [detector.arrays(d) for d in found]
        return feats, {name: [arrays[name] for arrays in per_image] for name in detector.names}

    def _precision(self) -> contextlib.AbstractContextManager:
        """Autocast below float32. For float32 on CUDA, TF32 is switched off for the forward:
        cuDNN would otherwise round convolution inputs to 10-bit mantissas (errors near 1e-3)."""
        if self.autocast:
            return torch.autocast(self.device.type, dtype=self.dtype)
        if self.device.type == "cuda":
            return _no_tf32()
        return contextlib.nullcontext()


def _to_host(v: torch.Tensor) -> torch.Tensor:
    """A device tensor -> its C-order copy on the CPU, issued without waiting. bfloat16's bits
    travel as int16, a dtype every backend's copy kernels have (torch's uint16 is a late addition)."""
    if v.dtype == torch.uint16:
        return v.view(torch.int16).contiguous().to("cpu", non_blocking=True).view(torch.uint16)
    return v.contiguous().to("cpu", non_blocking=True)


def _compiled(model: FPN) -> torch.nn.Module:
    """``torch.compile`` with freezing: weights constant-folded and prepacked once instead of being
    reordered for oneDNN on every call (1.8-2.1x for bfloat16, 1.14-1.20x for float32 on a 2-core Xeon,
    benchmarks/cpu_peak.py), paid for by a compile per input size (5-16 s): for fixed --size runs."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    return torch.compile(model, dynamic=False)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    cudnn = torch.backends.cudnn
    previous, cudnn.allow_tf32 = cudnn.allow_tf32, False
    try:
        yield
    finally:
        cudnn.allow_tf32 = previous


def is_out_of_memory(e: RuntimeError) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text
