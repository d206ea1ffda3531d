"""Save dtypes (fpn_cli/formats/codecs.py): int8 and bfloat16 round trips at their stated bounds,
against references computed independently (exact fractions, bit arithmetic, torch's own
bfloat16), the stored arrays' names, dtypes and sizes, and the Engine's encoding on the device."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from fpn_cli import build_fpn
from fpn_cli.formats import codecs
from fpn_cli.formats.codecs import (
    SAVE_DTYPES,
    StoredArray,
    decode,
    decode_torch,
    encode,
    stored_arrays,
    stored_bytes,
)
from fpn_cli.run.engine import Engine

# one 800x1333 image's resnet50 P2-P5: ceil(800 / s) x ceil(1333 / s) for strides 4, 8, 16, 32
SHAPES_800x1333 = {"p2": (256, 200, 334), "p3": (256, 100, 167), "p4": (256, 50, 84), "p5": (256, 25, 42)}


def features(seed: int = 0, shape=(2, 6, 9, 11)) -> torch.Tensor:
    """Float32 features with channel magnitudes spread over 1e-3 .. 1e3, channels last."""
    g = torch.Generator().manual_seed(seed)
    spread = 10.0 ** torch.linspace(-3, 3, shape[1]).view(1, -1, 1, 1)
    return (torch.randn(shape, generator=g) * spread).contiguous(memory_format=torch.channels_last)


def int8_within_bound(x: torch.Tensor, out: dict[str, torch.Tensor]) -> np.ndarray:
    """Per (image, channel): is ``|codes * scale - x| <= scale / 2 + |x| * 2**-24`` everywhere, in
    float64 (whose decode is exact): half a step, plus half a float32 unit of x where the float32
    quotient was rounded onto a half-integer that the exact one is not on."""
    exact = decode("int8", out["p2"].numpy(), out["p2_scale"].numpy(), np.float64)
    x64 = x.double().numpy()
    bound = out["p2_scale"].double().numpy()[..., None, None] / 2 + np.abs(x64) * 2**-24
    return (np.abs(exact - x64) <= bound).all(axis=(2, 3))


def int8_error_in_steps(x: torch.Tensor, out: dict[str, torch.Tensor]) -> np.ndarray:
    """max |codes * scale - x| / scale per (image, channel), in exact (float64) arithmetic."""
    exact = decode("int8", out["p2"].numpy(), out["p2_scale"].numpy(), np.float64)
    error = np.abs(exact - x.double().numpy()).max(axis=(2, 3))
    return error / out["p2_scale"].double().numpy()


def numpy_codes(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """numpy's own ``rint(x / scale)`` of float32 (..., C, H, W) features and (..., C) scales: the
    float32 quotient rounded to nearest even, 0 where the scale is 0 (garbage where it is NaN)."""
    s = scale.astype(np.float32)[..., None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(np.rint(x.astype(np.float32) / np.where(s > 0, s, np.inf))).astype(np.int8)


def exact_codes(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """round(x / scale) per channel of one (C, H, W) image, in exact fractions, ties to even."""
    return np.array(
        [
            [round(Fraction(float(v)) / Fraction(float(s))) for v in channel.ravel()]
            for channel, s in zip(x, scale, strict=True)
        ]
    ).reshape(x.shape)


# int8


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_int8_round_trip_is_within_half_a_step_of_each_channel(layout):
    x = features().contiguous(memory_format=layout)
    out = encode("p2", x, "int8")
    assert out["p2"].shape == (2, 6, 9, 11) and out["p2"].dtype == torch.int8
    assert out["p2_scale"].shape == (2, 6) and out["p2_scale"].dtype == torch.float32
    assert np.array_equal(out["p2_scale"].numpy(), (x.abs().amax(dim=(2, 3)) / 127).numpy())
    assert np.array_equal(out["p2"].numpy(), numpy_codes(x.numpy(), out["p2_scale"].numpy()))
    assert int8_within_bound(x, out).all() and int8_error_in_steps(x, out).max() <= 0.5 + 2**-17
    assert out["p2"].abs().amax(dim=(2, 3)).eq(127).all()  # each channel's peak is a full code


def test_int8_codes_near_and_at_ties_are_numpys_float32_rint_within_the_bound():
    """Values one float32 step either side of each half-integer multiple of the scale, and on it:
    the codes are numpy's float32 ``rint(x / scale)``. Where the float32 quotient was rounded onto
    a half-integer the exact quotient is not on (and only there), a code differs from the exactly
    rounded one, and its error passes half a step by less than half a float32 unit of x."""
    scale = np.float32(1.0) / np.float32(127)  # the scale of a channel whose peak is 1
    ties = (np.arange(-127, 127, dtype=np.float64) + 0.5) * np.float64(scale)
    near = np.concatenate(
        [np.nextafter(ties.astype(np.float32), np.float32(np.inf)), ties.astype(np.float32)]
        + [np.nextafter(ties.astype(np.float32), np.float32(-np.inf)), np.array([1.0, -1.0], np.float32)]
    )
    x = torch.from_numpy(near.reshape(1, 1, 1, -1).copy())
    out = encode("p2", x, "int8")
    assert out["p2_scale"].item() == scale
    codes = out["p2"].numpy()[0]
    assert np.array_equal(codes, numpy_codes(x.numpy()[0], out["p2_scale"].numpy()[0]))
    differ = codes != exact_codes(x.numpy()[0], out["p2_scale"].numpy()[0])
    quotient = near / scale  # float32
    assert differ.sum() == 120  # of 764 values (docs/compact-storage.md)
    assert not (differ.ravel() & (quotient - np.floor(quotient) != 0.5)).any()
    for value, code in zip(near[differ.ravel()], codes.ravel()[differ.ravel()], strict=True):
        error = abs(Fraction(int(code)) * Fraction(float(scale)) - Fraction(float(value)))
        assert (
            Fraction(float(scale)) / 2
            < error
            <= Fraction(float(scale)) / 2 + abs(Fraction(float(value))) / 2**24
        )
    assert int8_within_bound(x, out).all()


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_int8_of_a_level_larger_than_one_cpu_block(layout, monkeypatch):
    """(2, 256, 37, 41) image by image, 12 rows a block, each image's last block one row: scales
    as one amax over the level, codes as numpy rounds them."""
    monkeypatch.setattr(codecs, "_CPU_BLOCK", 12 * 41 * 256)
    x = features(8, (2, 256, 37, 41)).contiguous(memory_format=layout)
    out = encode("p2", x, "int8")
    assert torch.equal(out["p2_scale"], x.abs().amax(dim=(2, 3)) / 127)
    assert np.array_equal(out["p2"].numpy(), numpy_codes(x.numpy(), out["p2_scale"].numpy()))
    assert int8_within_bound(x, out).all()


def test_int8_exact_ties_round_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 127.0]).view(1, 1, 1, 5)  # scale 1: these are ties
    out = encode("p2", x, "int8")
    assert out["p2_scale"].item() == 1.0
    assert out["p2"].flatten().tolist() == [0, 2, 2, -2, 127]


def test_int8_of_float16_features_from_autocast():
    x = features(1).half()
    out = encode("p2", x, "int8")
    assert int8_within_bound(x.float(), out).all()


def test_int8_scale_of_a_negative_zero_channel_is_positive_zero_in_blocks_and_at_once(monkeypatch):
    x = features(2, (1, 4, 6, 5)).contiguous(memory_format=torch.channels_last)
    x[0, 2] = -0.0
    for block in (5 * 4, 2**18):  # a row a block; the level in one block
        monkeypatch.setattr(codecs, "_CPU_BLOCK", block)
        scale = encode("p2", x, "int8")["p2_scale"]
        assert scale[0, 2].item() == 0 and not torch.signbit(scale[0, 2])


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 3, 0)])
@pytest.mark.parametrize("save_dtype", SAVE_DTYPES)
def test_an_empty_batch_or_level_encodes_to_empty_arrays(shape, save_dtype):
    """No images (or a level with no pixels): the stored arrays, empty, in their dtypes and shapes;
    int8's scales 0, as for an all-zero channel. int8 raised IndexError."""
    x = torch.empty(shape).contiguous(memory_format=torch.channels_last)
    out = encode("p2", x, save_dtype)
    arrays = stored_arrays("p2", save_dtype, shape[1:])
    assert [(k, v.numpy().dtype, tuple(v.shape)) for k, v in out.items()] == [
        (a.name, a.dtype, (shape[0], *a.shape)) for a in arrays
    ]
    if save_dtype == "int8":
        assert not out["p2_scale"].any()
        assert decode("int8", out["p2"].numpy(), out["p2_scale"].numpy()).shape == shape


def test_int8_zero_channel_has_scale_zero_codes_zero_and_decodes_to_zero():
    x = features(2)
    x[1, 3] = 0
    out = encode("p2", x, "int8")
    assert out["p2_scale"][1, 3].item() == 0
    assert not out["p2"][1, 3].any()
    decoded = decode("int8", out["p2"].numpy(), out["p2_scale"].numpy())
    assert not np.isnan(decoded).any() and not decoded[1, 3].any()
    assert not decode_torch("int8", out["p2"], out["p2_scale"])[1, 3].any()


def test_int8_non_finite_channel_decodes_to_nan_and_leaves_the_others_alone():
    x = features(3)
    x[0, 1, 2, 3] = float("inf")
    x[1, 4, 0, 0] = float("nan")
    out = encode("p2", x, "int8")
    scale = out["p2_scale"].numpy()
    assert np.isnan(scale[0, 1]) and np.isnan(scale[1, 4]) and np.isfinite(scale).sum() == 10
    decoded = decode("int8", out["p2"].numpy(), scale)
    assert np.isnan(decoded[0, 1]).all() and np.isnan(decoded[1, 4]).all()
    assert int8_within_bound(x, out)[np.isfinite(scale)].all()


def near_ties(peak: np.float32) -> np.ndarray:
    """A channel with peak ``peak``: each half-integer multiple of its scale as float32, and one
    and two float32 steps either side of it (a float32 quotient rounds some of these onto the
    tie), plus +-peak, clipped to the peak."""
    scale = np.float32(peak) / np.float32(127)
    ties = ((np.arange(-127, 127) + 0.5) * np.float64(scale)).astype(np.float32)
    up, down = np.float32(np.inf), np.float32(-np.inf)
    steps = [ties, np.nextafter(ties, up), np.nextafter(ties, down)]
    steps += [np.nextafter(steps[1], up), np.nextafter(steps[2], down)]
    return np.clip(np.concatenate(steps + [np.array([peak, -peak], np.float32)]), -peak, peak)


def test_int8_codes_near_and_at_ties_for_scales_from_1e_minus_30_to_1e30(monkeypatch):
    """Twelve channels, peaks spread over 60 decades, blocks of 10 pixels (a row's columns): every
    code is numpy's float32 ``rint(x / scale)``, within the bound, whichever block and channel it is
    in, and differs from the exactly rounded quotient (exact fractions) only where the float32
    quotient is a half-integer."""
    monkeypatch.setattr(codecs, "_CPU_BLOCK", 10 * 12)
    peaks = (np.float32(1.7) * np.float32(10.0) ** np.linspace(-30, 30, 12)).astype(np.float32)
    x = torch.from_numpy(np.stack([near_ties(p) for p in peaks])).view(1, 12, 1, -1)
    x = x.contiguous(memory_format=torch.channels_last)
    out = encode("p2", x, "int8")
    assert np.array_equal(out["p2_scale"].numpy()[0], peaks / np.float32(127))
    codes, scale = out["p2"].numpy()[0], out["p2_scale"].numpy()[0]
    assert np.array_equal(codes, numpy_codes(x.numpy()[0], scale))
    assert int8_within_bound(x, out).all()
    quotient = x.numpy()[0] / scale[:, None, None]
    differ = codes != exact_codes(x.numpy()[0], scale)
    assert differ.any() and not (differ & (quotient - np.floor(quotient) != 0.5)).any()


def edge_channels(batch: int) -> torch.Tensor:
    """(batch, 10, 7, 9) features whose channels 0-8 are edge cases (see the test) and 9 ordinary."""
    g = torch.Generator().manual_seed(batch)
    x = torch.randn((batch, 10, 7, 9), generator=g)
    biggest = torch.finfo(torch.float32).max
    x[:, 0] = 0.0
    x[:, 1] = -0.0
    x[:, 2, 3, 4] = float("nan")
    x[:, 3, 0, 0] = float("inf")
    x[:, 4, 6, 8] = float("-inf")
    x[:, 5] = x[:, 5] * 1e37
    x[:, 5, 0, 0] = biggest  # the largest float32: scale and codes stay finite
    x[:, 5, 0, 1] = -biggest
    x[:, 6] = x[:, 6] * 1e-30
    # peak 127 * 2**-126: scale 2**-126, the smallest normal float32, whose half-integer multiples
    # (ties among them) are subnormal
    x[:, 7] = torch.from_numpy(
        np.array([k * 2.0**-127 for k in range(-8, 8)] * 3 + [127 * 2.0**-126] * 15, np.float32).reshape(7, 9)
    )
    x[:, 8] = torch.from_numpy(np.nextafter(x[:, 7].numpy(), np.float32(np.inf)))
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_int8_edge_channels_at_batch_1_and_4(batch, layout, monkeypatch):
    """Zero, -0.0, NaN, +inf, -inf, the largest float32, tiny values, subnormal ties, in blocks of
    two rows: finite channels' codes are the exact ones, zero channels have scale +0 and codes 0,
    and a channel with a NaN or an infinity has a NaN scale, alone, in every image."""
    monkeypatch.setattr(codecs, "_CPU_BLOCK", 2 * 9 * 10)
    x = edge_channels(batch).contiguous(memory_format=layout)
    out = encode("p2", x, "int8")
    codes, scale = out["p2"].numpy(), out["p2_scale"].numpy()
    assert codes.shape == (batch, 10, 7, 9) and scale.shape == (batch, 10)
    assert np.isnan(scale[:, 2:5]).all() and np.isfinite(scale[:, [0, 1, 5, 6, 7, 8, 9]]).all()
    assert (scale[:, :2] == 0).all() and not np.signbit(scale[:, :2]).any() and not codes[:, :2].any()
    assert (scale[:, 7] == np.float32(2.0**-126)).all()
    finite = [5, 6, 7, 8, 9]
    assert np.array_equal(scale[:, finite], (x.abs().amax(dim=(2, 3)) / 127).numpy()[:, finite])
    assert np.array_equal(codes[:, finite], numpy_codes(x.numpy()[:, finite], scale[:, finite]))
    assert int8_within_bound(x, out)[:, finite].all()
    assert np.abs(codes[:, finite]).max() == 127


def test_int8_codes_fit_int8_for_every_subnormal_scale():
    """Peaks of p * 2**-149 for every p up to 20,000 (scales down to the smallest subnormal, where
    rounding peak / 127 is a large part of it): every code in [-127, 127] with x's sign, and
    ``codes * scale`` within the bound, exactly (float64). peak / 127 rounded to nearest
    gave 2**-149 for p = 189, whose codes of 189 were stored as -67, and 0 for p < 64, whose
    channel decoded to 0."""
    units = np.arange(1, 20_001, dtype=np.float64)
    peaks = (units * 2.0**-149).astype(np.float32)
    assert np.array_equal(peaks.astype(np.float64) / 2.0**-149, units)  # every one exact
    # each channel: +peak, -peak, and values at a third and two thirds of it
    values = np.stack([peaks, -peaks, (units // 3 * 2.0**-149), -(units * 2 // 3 * 2.0**-149)], axis=1)
    x = torch.from_numpy(values.astype(np.float32)).view(1, -1, 1, 4)
    out = encode("p2", x.contiguous(memory_format=torch.channels_last), "int8")
    codes, scale = out["p2"].numpy()[0, :, 0].astype(np.int64), out["p2_scale"].numpy()[0].astype(np.float64)
    assert np.abs(codes).max() <= 127 and (codes[:, 0] > 0).all() and (codes[:, 1] < 0).all()
    assert int8_within_bound(x, out).all()
    bumped = scale != (peaks / np.float32(127)).astype(np.float64)  # one float32 step up, and only
    assert np.array_equal(scale[bumped], np.nextafter(peaks / np.float32(127), np.inf)[bumped])
    assert bumped[:63].all()  # peak / 127 rounded to 0: the channel would have decoded to 0
    assert units[bumped].max() < 16193  # past it, peak / 127 is never more than half a unit off


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_int8_with_several_threads_is_the_one_thread_encoding(layout, monkeypatch):
    """torch's threads share each block's operations: the same codes and scales as one thread,
    numpy's, in blocks of a third of a row (the last of each row shorter), 3 images."""
    monkeypatch.setattr(codecs, "_CPU_BLOCK", 7 * 64)
    x = features(9, (3, 64, 21, 17)).contiguous(memory_format=layout)
    assert len(codecs._blocks(x.permute(0, 2, 3, 1))) == 3 * 21 * 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = encode("p2", x, "int8")
        torch.set_num_threads(3)
        several = encode("p2", x, "int8")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(several["p2"], one["p2"]) and torch.equal(several["p2_scale"], one["p2_scale"])
    assert torch.equal(several["p2_scale"], x.abs().amax(dim=(2, 3)) / 127)
    assert np.array_equal(several["p2"].numpy(), numpy_codes(x.numpy(), several["p2_scale"].numpy()))


# bfloat16


def bfloat16_bits_reference(x: np.ndarray) -> np.ndarray:
    """float32 -> the top 16 bits rounded to nearest even, from the bits (NaN: the quiet NaN 0x7FC0
    with the sign, as torch writes it)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), (bits >> 16).astype(np.uint16) | 0x7FC0, rounded)


BFLOAT16_CASES = {
    "tie, even below": 0x3F808000,  # 1 + 2**-8: halfway between 0x3F80 and 0x3F81 -> 0x3F80
    "tie, even above": 0x3F818000,  # -> 0x3F82
    "just above a tie": 0x3F808001,
    "just below a tie": 0x3F807FFF,
    "denormal tie": 0x00008000,  # -> 0
    "denormal tie up": 0x00018000,  # -> 0x0002
    "denormal": 0x00012345,
    "largest float32": 0x7F7FFFFF,  # rounds past bfloat16's largest: infinity
    "infinity": 0x7F800000,
    "-infinity": 0xFF800000,
    "-0": 0x80000000,
    "negative tie": 0xBF808000,
}


@pytest.mark.parametrize("bits", BFLOAT16_CASES.values(), ids=BFLOAT16_CASES.keys())
def test_bfloat16_bits_are_torchs_rounded_to_nearest_even(bits):
    x = np.array([bits], np.uint32).view(np.float32)
    got = encode("p2", torch.from_numpy(x).view(1, 1, 1, 1), "bfloat16")["p2"]
    assert got.dtype == torch.uint16
    assert got.numpy().ravel()[0] == bfloat16_bits_reference(x)[0]
    assert got.view(torch.bfloat16).equal(torch.from_numpy(x).to(torch.bfloat16).view(1, 1, 1, 1))


def test_bfloat16_nan_stays_nan():
    out = encode("p2", torch.full((1, 1, 1, 2), float("nan")), "bfloat16")["p2"]
    assert np.isnan(decode("bfloat16", out.numpy())).all()


def test_bfloat16_round_trip_is_within_2_to_the_minus_8_relative():
    x = features(4, (1, 8, 33, 47))
    out = encode("p2", x, "bfloat16")["p2"]
    assert np.array_equal(out.numpy(), bfloat16_bits_reference(x.numpy()))
    decoded = decode("bfloat16", out.numpy())
    assert decoded.dtype == np.float32
    relative = np.abs(decoded.astype(np.float64) - x.numpy()) / np.abs(x.numpy())
    assert relative.max() <= 2**-8
    assert relative.max() > 2**-10  # the bound is the real one, not a loose one


# stored arrays, reading


def test_stored_arrays_name_dtype_and_shape_of_each_array():
    assert stored_arrays("p2", "int8", (256, 10, 20)) == (
        StoredArray("p2", np.dtype(np.int8), (256, 10, 20)),
        StoredArray("p2_scale", np.dtype(np.float32), (256,)),
    )
    assert stored_arrays("c5", "bfloat16", (2048, 3, 4)) == (
        StoredArray("c5", np.dtype(np.uint16), (2048, 3, 4)),
    )
    assert stored_arrays("p3", "float16", (256, 5, 6)) == (
        StoredArray("p3", np.dtype(np.float16), (256, 5, 6)),
    )
    for save_dtype in SAVE_DTYPES:
        assert all("." not in a.name for a in stored_arrays("p2", save_dtype, (1, 1, 1)))  # WebDataset


def test_stored_arrays_are_what_encode_produces():
    x = features(5)
    for save_dtype in SAVE_DTYPES:
        out = encode("p4", x, save_dtype)
        expected = stored_arrays("p4", save_dtype, tuple(x.shape[1:]))
        assert [(k, v.numpy().dtype, v.shape[1:]) for k, v in out.items()] == [
            (a.name, a.dtype, a.shape) for a in expected
        ]


@pytest.mark.parametrize(
    ("save_dtype", "megabytes"),
    [("float32", 90.88), ("float16", 45.44), ("bfloat16", 45.44), ("int8", 22.724096)],
)
def test_bytes_of_an_800x1333_resnet50_pyramid(save_dtype, megabytes):
    assert stored_bytes(save_dtype, SHAPES_800x1333) == round(megabytes * 1e6)


def test_unknown_save_dtype_and_int8_without_scales_are_errors():
    with pytest.raises(
        ValueError, match="unknown save dtype 'int4'; choose from float32, float16, bfloat16, int8"
    ):
        stored_arrays("p2", "int4", (1, 1, 1))
    with pytest.raises(ValueError, match="int8 codes need their scales"):
        decode("int8", np.zeros((1, 1, 1), np.int8))


@pytest.mark.parametrize("save_dtype", SAVE_DTYPES)
def test_plain_numpy_files_memory_mapped_decode_to_the_features(tmp_path, save_dtype):
    x = features(6, (1, 4, 5, 7))
    for name, array in encode("p2", x, save_dtype).items():
        np.save(tmp_path / f"{name}.npy", array[0].numpy())
    codes = np.load(tmp_path / "p2.npy", mmap_mode="r")
    scale = np.load(tmp_path / "p2_scale.npy") if save_dtype == "int8" else None
    before = np.array(codes)
    decoded = decode(save_dtype, codes, scale)
    assert decoded.dtype == np.float32 and decoded.shape == (4, 5, 7)
    tolerance = {"float32": 0, "float16": 2**-11, "bfloat16": 2**-8, "int8": None}[save_dtype]
    if tolerance is None:
        assert (np.abs(decoded - x[0].numpy()).max(axis=(1, 2)) <= scale * (0.5 + 2**-16)).all()
    else:
        # float16's subnormals (below 2**-14) keep a step of 2**-24, not a relative precision
        assert (np.abs(decoded - x[0].numpy()) <= np.abs(x[0].numpy()) * tolerance + 2**-25).all()
    assert np.array_equal(np.asarray(codes), before)
    assert decode(save_dtype, codes, scale, np.float16).dtype == np.float16
    torch_decoded = decode_torch(
        save_dtype, torch.from_numpy(before), None if scale is None else torch.from_numpy(scale)
    )
    assert torch_decoded.dtype == torch.float32 and np.array_equal(torch_decoded.numpy(), decoded)


# the Engine


@pytest.fixture(scope="module")
def seed_model():
    return build_fpn(arch="seed", weights="random", seed=0)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 96, 130, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def float32_output(seed_model, batch):
    out, event = Engine(seed_model, torch.device("cpu"), "float32", "float32").forward(batch)
    assert event is None
    return out


def test_engine_float16_output_is_as_before(seed_model, batch, float32_output):
    engine = Engine(seed_model, torch.device("cpu"), "float32", "float16")
    assert engine.save_dtype == torch.float16 and engine.save_dtype_name == "float16"
    out, _ = engine.forward(batch)
    assert list(out) == ["p2", "p3", "p4", "p5"]
    for level, v in out.items():
        assert v.dtype == torch.float16 and v.device.type == "cpu"
        assert v.equal(float32_output[level].to(torch.float16))
    assert [tuple(v.shape) for v in float32_output.values()] == [
        (2, 256, 24, 33),
        (2, 256, 12, 17),
        (2, 256, 6, 9),
        (2, 256, 3, 5),
    ]


def test_engine_int8_output_decodes_within_the_bound_of_float32(seed_model, batch, float32_output):
    engine = Engine(seed_model, torch.device("cpu"), "float32", "int8")
    assert engine.save_dtype == torch.int8
    out, event = engine.forward(batch)
    assert event is None
    assert list(out) == ["p2", "p2_scale", "p3", "p3_scale", "p4", "p4_scale", "p5", "p5_scale"]
    for level, reference in float32_output.items():
        codes, scale = out[level], out[f"{level}_scale"]
        assert codes.dtype == torch.int8 and codes.shape == reference.shape
        assert scale.dtype == torch.float32 and scale.shape == reference.shape[:2]
        exact = decode_torch("int8", codes, scale, torch.float64)
        bound = scale.double()[..., None, None] / 2 + reference.double().abs() * 2**-24
        assert ((exact - reference.double()).abs() <= bound).all(), level
        assert (scale > 0).all()


def test_engine_bfloat16_output_is_the_float32_rounded(seed_model, batch, float32_output):
    out, _ = Engine(seed_model, torch.device("cpu"), "float32", "bfloat16").forward(batch)
    assert list(out) == ["p2", "p3", "p4", "p5"]
    for level, reference in float32_output.items():
        assert out[level].dtype == torch.uint16
        assert out[level].view(torch.bfloat16).equal(reference.to(torch.bfloat16))
        decoded = decode_torch("bfloat16", out[level])
        assert ((decoded - reference).abs() <= reference.abs() * 2**-8).all()


@pytest.mark.parametrize("save_dtype", SAVE_DTYPES)
def test_engine_forwards_an_empty_batch_in_every_save_dtype(seed_model, save_dtype):
    """Zero images: every stored array, empty, in its dtype (int8 raised IndexError)."""
    out, _ = Engine(seed_model, torch.device("cpu"), "float32", save_dtype).forward(torch.zeros(0, 3, 64, 96))
    shapes = {"p2": (256, 16, 24), "p3": (256, 8, 12), "p4": (256, 4, 6), "p5": (256, 2, 3)}
    expected = [a for level, shape in shapes.items() for a in stored_arrays(level, save_dtype, shape)]
    assert [(k, v.numpy().dtype, tuple(v.shape)) for k, v in out.items()] == [
        (a.name, a.dtype, (0, *a.shape)) for a in expected
    ]


def test_engine_batch_slices_are_one_images_stored_arrays(seed_model, batch):
    """What the pipeline does with the output ({k: v[i]}): image i's arrays, named as stored."""
    out, _ = Engine(seed_model, torch.device("cpu"), "float32", "int8").forward(batch)
    image = {k: v[1] for k, v in out.items()}
    shapes = {level: tuple(image[level].shape) for level in ("p2", "p3", "p4", "p5")}
    expected = [a for level, shape in shapes.items() for a in stored_arrays(level, "int8", shape)]
    assert [(k, v.numpy().dtype, tuple(v.shape)) for k, v in image.items()] == [
        (a.name, a.dtype, a.shape) for a in expected
    ]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("save_dtype", ["int8", "bfloat16"])
def test_engine_encodes_on_cuda_as_on_the_cpu(seed_model, batch, save_dtype):
    """The codes copied back from the GPU (after the event) are the CPU encoding of the GPU's
    float32 features: the encoding ran on the device and every array came back whole."""
    reference, event = Engine(seed_model, torch.device("cuda"), "float32", "float32").forward(batch.cuda())
    event.synchronize()
    out, event = Engine(seed_model, torch.device("cuda"), "float32", save_dtype).forward(batch.cuda())
    event.synchronize()
    for level, v in reference.items():
        for name, array in encode(level, v, save_dtype).items():
            assert out[name].device.type == "cpu"
            assert out[name].equal(array), name
