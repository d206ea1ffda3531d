"""Save dtypes: how one image's level is stored, and how it is read back as floats.

Each save dtype is a codec from a level's float features (C, H, W) to the arrays written for it,
all plain numpy dtypes, so ``np.load`` reads them without this package:

================  ====================================  ==========================================
save dtype        arrays of level ``p2``                error of the decoded float32
================  ====================================  ==========================================
``float32``       ``p2`` (C, H, W) float32              none
``float16``       ``p2`` (C, H, W) float16              float16 rounding (2**-11 relative)
``bfloat16``      ``p2`` (C, H, W) uint16: the top 16   <= 2**-8 relative (round to nearest even,
                  bits of the float32, rounded           as ``torch.Tensor.to(torch.bfloat16)``)
``int8``          ``p2`` (C, H, W) int8 codes,          <= scale[c] / 2 in channel c (symmetric,
                  ``p2_scale`` (C,) float32              per channel, per image and level)
================  ====================================  ==========================================

:func:`stored_arrays` is the one owner of these names, dtypes and shapes: the writers, verify, the
byte estimate of ``--summary`` and the readers ask it. An array's name is its file's stem in the npy
layout (``p2_scale.npy``) and the ``<name>`` of a WebDataset member ``<key>.<name>.npy``, so it has
no dot. :func:`encode` runs where the forward ran (the device), :func:`decode` and
:func:`decode_torch` turn the stored arrays back into floats; the raw codes are the arrays themselves.

int8, per channel c of one image's level: ``scale[c] = max|x[c]| / 127`` (float32; one float32
step larger where that scale is subnormal and so coarse that a code would pass 127) and
``codes[c] = round(x[c] / scale[c])``, the float32 quotient rounded to nearest, ties to even: the
codes are exactly numpy's ``np.rint(x / scale)`` of the float32 arrays, on the CPU and on CUDA
(whose divisions are correctly rounded; MPS runs the same operations). So ``codes * scale`` is
within ``scale[c] / 2 + |x| * 2**-24`` of ``x``: half a step, plus half a float32 unit of ``x``
where the float32 quotient was rounded onto a half-integer that the exact quotient is not on
(about 31 of the 22.8 million values of an 800x1333 image's P2-P5; docs/compact-storage.md). Decoding to
float32 adds half a unit in the last place of the value, up to ``2**-17`` of a step; decoding to
float64 is exact. A channel that is all zero has scale 0, codes 0 and decodes to 0. A channel with
a non-finite value (the run refuses such levels before they are stored) gets scale NaN and
decodes to NaN throughout; its codes are unspecified. No error is raised.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # torch is imported where a tensor is encoded: the storage layer reads without it
    import torch

SAVE_DTYPES = ("float32", "float16", "bfloat16", "int8")
SCALE_SUFFIX = "_scale"

# The dtype of a level's main array, numpy's and torch's: bfloat16 travels and is stored as its bits.
_CODE_DTYPES = {
    "float32": (np.dtype(np.float32), "float32"),
    "float16": (np.dtype(np.float16), "float16"),
    "bfloat16": (np.dtype(np.uint16), "uint16"),
    "int8": (np.dtype(np.int8), "int8"),
}
# 1.5 * 2**23: adding it to a float32 of magnitude below 2**22 rounds it to an integer (to nearest,
# ties to even) held in the low bits of the mantissa, whose low byte is then the int8 code.
_ROUNDER = 1.5 * 2**23
_CPU_BLOCK = 2**20  # values per block: 4 MiB of float32 quotients, in the shared L3 with their inputs


@dataclass(frozen=True)
class StoredArray:
    """One array written for an image's level."""

    name: str  # file stem (p2_scale.npy), WebDataset member <key>.<name>.npy, Engine output key
    dtype: np.dtype
    shape: tuple[int, ...]  # one image's: (C, H, W) for the level, (C,) for its scales

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))


def check_save_dtype(save_dtype: str) -> str:
    """``save_dtype`` if it is one of :data:`SAVE_DTYPES`, else a ValueError naming the choices."""
    if save_dtype not in _CODE_DTYPES:
        raise ValueError(f"unknown save dtype {save_dtype!r}; choose from {', '.join(SAVE_DTYPES)}")
    return save_dtype


def scale_name(level: str) -> str:
    """The name of an int8 level's scales: ``p2`` -> ``p2_scale``."""
    return level + SCALE_SUFFIX


def code_dtype(save_dtype: str) -> np.dtype:
    """The numpy dtype of a level's main array: float32, float16, uint16 (bfloat16 bits) or int8."""
    return _CODE_DTYPES[check_save_dtype(save_dtype)][0]


def torch_code_dtype(save_dtype: str) -> torch.dtype:
    """:func:`code_dtype` in torch: float32, float16, uint16 (bfloat16 bits) or int8."""
    import torch

    return getattr(torch, _CODE_DTYPES[check_save_dtype(save_dtype)][1])


def stored_arrays(level: str, save_dtype: str, shape: tuple[int, int, int]) -> tuple[StoredArray, ...]:
    """The arrays written for one image's ``level`` of ``shape`` (C, H, W), the level's own first:
    ``(p2 (C, H, W) code dtype,)``, and for int8 also ``p2_scale (C,) float32``."""
    main = StoredArray(level, code_dtype(save_dtype), tuple(shape))
    if save_dtype != "int8":
        return (main,)
    return main, StoredArray(scale_name(level), np.dtype(np.float32), (shape[0],))


def array_names(level: str, save_dtype: str) -> tuple[str, ...]:
    """The names of :func:`stored_arrays` of ``level``: ``("p2",)``, for int8 ``("p2", "p2_scale")``."""
    return (level, scale_name(level)) if check_save_dtype(save_dtype) == "int8" else (level,)


def derived_dtype(save_dtype: str) -> np.dtype:
    """The dtype of the arrays derived from the levels (pooled vectors, RoI features): float16 for
    a float16 run, else float32. bfloat16 and int8 runs store them in float32: they are small next
    to the maps, and rounding them again would add a second error on top of the codec's."""
    return np.dtype(np.float16) if check_save_dtype(save_dtype) == "float16" else np.dtype(np.float32)


# arrays stored in one dtype whatever --save-dtype: a detector's boxes, scores, labels (--detect)
EXACT_DTYPES = {
    "det_boxes": np.dtype(np.float32),
    "det_scores": np.dtype(np.float32),
    "det_labels": np.dtype(np.int64),
    "det_keypoints": np.dtype(np.float32),
    "det_keypoint_scores": np.dtype(np.float32),
}


def array_dtype(save_dtype: str, name: str, levels: Collection[str]) -> np.dtype:
    """The stored dtype of an image's array ``name`` in a ``save_dtype`` run: a level among
    ``levels`` in the code dtype, an int8 level's scales float32, anything else (pooled vectors,
    RoI features) :func:`derived_dtype`, but detections' boxes, scores and labels exactly
    (:data:`EXACT_DTYPES`)."""
    if name in EXACT_DTYPES:
        return EXACT_DTYPES[name]
    if name in levels:
        return code_dtype(save_dtype)
    if save_dtype == "int8" and name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in levels:
        return np.dtype(np.float32)
    return derived_dtype(save_dtype)


def decode_levels(
    save_dtype: str,
    arrays: Mapping[str, np.ndarray],
    levels: Iterable[str],
    dtype: npt.DTypeLike = np.float32,
) -> dict[str, np.ndarray]:
    """``{level: (C, H, W) floats}`` of the ``levels`` present in the stored ``arrays`` (their
    codes and, for int8, ``<level>_scale``)."""
    return {
        level: decode(save_dtype, arrays[level], arrays.get(scale_name(level)), dtype)
        for level in levels
        if level in arrays
    }


def stored_bytes(save_dtype: str, shapes: Mapping[str, tuple[int, int, int]]) -> int:
    """Bytes of the arrays (without file headers) of one image's levels ``{level: (C, H, W)}``."""
    return sum(a.nbytes for level, shape in shapes.items() for a in stored_arrays(level, save_dtype, shape))


def encode(level: str, x: torch.Tensor, save_dtype: str) -> dict[str, torch.Tensor]:
    """A batch of one level (N, C, H, W), any float dtype, on any device -> the stored arrays of
    :func:`stored_arrays` with the batch in front, on the same device: ``{"p2": (N, C, H, W)}`` in
    the code dtype, and for int8 also ``{"p2_scale": (N, C) float32}``. float32 and float16 are
    ``x.to(dtype)`` (the same tensor when it is that dtype already); the memory layout follows ``x``."""

    if check_save_dtype(save_dtype) == "int8":
        codes, scale = encode_int8(x)
        return {level: codes, scale_name(level): scale}
    if save_dtype == "bfloat16":
        return {level: encode_bfloat16(x)}
    return {level: x.to(torch_code_dtype(save_dtype))}


def encode_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """(..., ) float -> (..., ) uint16: the bits of ``x.to(torch.bfloat16)`` (round to nearest even;
    infinities and NaN kept, values past bfloat16's range become infinities, as torch does)."""
    import torch

    return x.to(torch.bfloat16).view(torch.uint16)


def encode_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) float -> (codes (N, C, H, W) int8, scale (N, C) float32), symmetric per image
    and channel: ``scale = max|x[n, c]| / 127``, ``codes = round(x / scale)`` (ties to even), 0 where
    the scale is 0; NaN scales for channels with a non-finite value (see the module docstring)."""
    import torch

    if x.numel() == 0:  # no images, or an empty level: nothing to quantise; scales 0, as for zeros
        scale = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
        return torch.empty_like(x, dtype=torch.int8), scale
    # channels last: the reductions and the per-channel division run along the contiguous axis when
    # x is channels-last (the Engine's layout on CPU and CUDA); a view, never a copy
    v = x.permute(0, 2, 3, 1)
    blocks = _blocks(v) if x.device.type == "cpu" else [(slice(None),) * 3]
    scale = _int8_scale(_peak(v, blocks).float())
    return _codes(v, blocks, scale).permute(0, 3, 1, 2), scale


def _codes(v: torch.Tensor, blocks: list[tuple[slice, slice, slice]], scale: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) float and its (N, C) scales -> (N, H, W, C) int8 codes ``round(v / scale)``, block
    by block. A float32 rounder plus the float32 quotient (correctly rounded on CPU and CUDA) is
    ``round(v / scale)``, to nearest even, in one operation whose output's low byte is the code;
    the division by infinity makes an all-zero channel's codes 0."""
    import torch

    divisor = torch.where(scale > 0, scale, torch.inf)[:, None, None, :]
    rounder = torch.tensor(_ROUNDER, dtype=torch.float32, device=v.device)
    codes = torch.empty_like(v, dtype=torch.int8)
    quotient = torch.empty(v[blocks[0]].shape, dtype=torch.float32, device=v.device)  # the largest
    for block in blocks:
        values = v[block]
        out = quotient[:, : values.shape[1], : values.shape[2]]
        torch.addcdiv(rounder, values, divisor[block[0]], out=out)
        codes[block] = out.view(torch.int32)  # the low byte: two's complement code
    return codes


def _int8_scale(peak: torch.Tensor) -> torch.Tensor:
    """float32 ``peak / 127`` (NaN for a non-finite peak), one float32 step larger where it is so
    coarse that ``peak / scale`` would reach 127.5, whose code is not an int8: only a subnormal
    scale (a peak below about 1.5e-36), whose rounding may be a large part of it (a peak of
    189 * 2**-149 made scale 2**-149 and codes of 189, stored as -67). One step is always enough,
    and ``codes * scale`` stays within ``scale / 2`` of x, with every code in [-127, 127]."""
    import torch

    scale = torch.where(torch.isfinite(peak), peak / 127, torch.nan)
    wide = torch.float32 if peak.device.type == "mps" else torch.float64  # exact products below
    coarse = (peak > 0) & (peak.to(wide) >= scale.to(wide) * 127.5)
    return torch.where(coarse, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)


def _blocks(v: torch.Tensor) -> list[tuple[slice, slice, slice]]:
    """(images, rows, columns) slices of (N, H, W, C) that tile it image by image, in blocks of
    about ``_CPU_BLOCK`` values (whole rows, or a row's columns where a row is larger): a block's
    float32 quotients (or absolute values) stay in the cache, whatever the batch size, and no
    temporary has the level's size (nor its page faults). Each block's operations run on torch's
    threads; a pool of Python threads sharing smaller blocks was tried and was 2-4x slower in wall
    time on two idle cores (docs/compact-storage.md)."""
    n, h, w, c = v.shape
    if w * c <= _CPU_BLOCK or w == 1:
        rows = max(1, _CPU_BLOCK // max(1, w * c))
        return [
            (slice(i, i + 1), slice(r, r + rows), slice(None)) for i in range(n) for r in range(0, h, rows)
        ]
    columns = max(1, _CPU_BLOCK // max(1, c))
    return [
        (slice(i, i + 1), slice(r, r + 1), slice(k, k + columns))
        for i in range(n)
        for r in range(h)
        for k in range(0, w, columns)
    ]


def _peak(v: torch.Tensor, blocks: list[tuple[slice, slice, slice]]) -> torch.Tensor:
    """max |v| over dims 1 and 2 of (N, H, W, C) -> (N, C), in v's dtype; NaN where a channel has
    one. One read of v, block by block, each block's absolute values in the cache (a separate amax
    and amin read v twice, and were most of the int8 conversion's cost)."""
    import torch

    if len(blocks) == 1:  # the level at once: no temporary of its size
        return torch.maximum(v.amax(dim=(1, 2)), -v.amin(dim=(1, 2))).abs()
    peak = torch.zeros((v.shape[0], v.shape[3]), dtype=v.dtype, device=v.device)
    magnitude = torch.empty(v[blocks[0]].shape, dtype=v.dtype, device=v.device)  # the largest
    for block in blocks:
        values = v[block]
        found = torch.abs(values, out=magnitude[:, : values.shape[1], : values.shape[2]]).amax(dim=(1, 2))
        torch.maximum(peak[block[0]], found, out=peak[block[0]])
    return peak


def decode(
    save_dtype: str, codes: np.ndarray, scale: np.ndarray | None = None, dtype: npt.DTypeLike = np.float32
) -> np.ndarray:
    """Stored arrays -> float features in ``dtype`` (float32 unless asked): ``codes`` (..., C, H, W)
    of the level's code dtype, and for int8 its ``scale`` (..., C). A memory-mapped ``codes`` is
    read, not modified. float64 decodes int8 exactly (``codes * scale`` has at most 32 bits)."""
    check_save_dtype(save_dtype)
    if save_dtype == "int8":
        if scale is None:
            raise ValueError("int8 codes need their scales to decode")
        return codes.astype(dtype) * np.asarray(scale).astype(dtype)[..., None, None]
    if save_dtype == "bfloat16":
        return (np.asarray(codes).astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)
    return np.asarray(codes).astype(dtype, copy=False)


def decode_torch(
    save_dtype: str,
    codes: torch.Tensor,
    scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`decode` for tensors, on their device: (..., C, H, W) codes and (..., C) int8 scales;
    ``dtype`` float32 unless asked."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    check_save_dtype(save_dtype)
    if save_dtype == "int8":
        if scale is None:
            raise ValueError("int8 codes need their scales to decode")
        return codes.to(dtype) * scale.to(dtype)[..., None, None]
    if save_dtype == "bfloat16":
        return codes.view(torch.bfloat16).to(dtype)
    return codes.to(dtype)
