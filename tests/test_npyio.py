"""The .npy writer: np.save's bytes by every path (O_DIRECT, its fallbacks, buffered), the blocked
layout copy, and the check that tells a complete file from anything else."""

from __future__ import annotations

import errno
import io
import os

import numpy as np
import pytest
import torch

from fpn_cli.formats.npyio import (
    DIRECT_ALIGN,
    DirectWriter,
    c_order,
    copy_c_order,
    npy_header,
    npy_shape,
    write_file,
)


def np_save_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    return buffer.getvalue()


def channels_last_level(shape: tuple[int, ...], dtype=torch.float32, seed: int = 0) -> np.ndarray:
    """A (C, H, W) slice of a channels-last batch, as the network hands a level over."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randn(2, *shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    return batch[1].numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(256, 13, 19), (3, 1, 2), (7,), (2048, 100, 100), (1, 1, 1)])
def test_header_is_the_one_np_save_writes(dtype, shape):
    array = np.zeros(shape, dtype)
    header = npy_header(array)
    saved = np_save_bytes(array)
    assert saved[: len(header)] == header
    assert len(saved) == len(header) + array.nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape", [(3, 5, 7), (33, 17, 1), (257, 31, 3), (5, 1, 1), (64, 1, 33), (256, 37, 45)]
)
def test_blocked_copy_of_a_channels_last_level_equals_numpys(shape, dtype):
    src = channels_last_level(shape, dtype)
    assert src.transpose(1, 2, 0).flags.c_contiguous  # the layout the blocked path is for
    dst = np.empty(src.shape, src.dtype)
    copy_c_order(dst, src)
    np.testing.assert_array_equal(dst, np.ascontiguousarray(src))
    out = c_order(src)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.ascontiguousarray(src))


def test_a_c_order_array_is_not_copied():
    array = np.ones((4, 3, 2), np.float32)
    assert c_order(array) is array


@pytest.fixture
def direct(tmp_path) -> DirectWriter:
    writer = DirectWriter()
    if not writer.write(tmp_path / "probe.npy", np.zeros(3, np.float32)):
        pytest.skip("this filesystem does not take O_DIRECT")
    return writer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(256, 13, 19), (3, 1, 2), (512, 64, 64), (1, 8, 120)])
def test_o_direct_writes_what_np_save_writes(tmp_path, direct, dtype, shape):
    array = channels_last_level(shape, dtype)
    assert direct.write(tmp_path / "x.npy", array)
    assert (tmp_path / "x.npy").read_bytes() == np_save_bytes(array)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.load(io.BytesIO(np_save_bytes(array))))
    assert npy_shape(tmp_path / "x.npy", array.dtype) == shape


def test_where_o_direct_is_refused_files_are_written_buffered(tmp_path, monkeypatch):
    real_open = os.open
    direct_opens = []

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            direct_opens.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    writer = DirectWriter()
    arrays = [channels_last_level((8, 5, 7), seed=1), np.ones((8, 3, 4), np.float32)]
    for i, array in enumerate(arrays):
        write_file(tmp_path / f"{i}.npy", array, writer)
        assert (tmp_path / f"{i}.npy").read_bytes() == np_save_bytes(array)
    assert writer.enabled is False
    assert len(direct_opens) <= 1  # refused once, then not asked again


def intercept_writes(monkeypatch, first_write):
    """Calls ``first_write(fd, data, real_write)`` for the first write to a file opened with
    O_DIRECT; every other write is the real one."""
    real_open, real_write = os.open, os.write
    direct_fds, seen = set(), []

    def opening(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & getattr(os, "O_DIRECT", 0):
            direct_fds.add(fd)
        return fd

    def writing(fd, data):
        if fd in direct_fds and not seen:
            seen.append(fd)
            return first_write(fd, data, real_write)
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "write", writing)
    return seen


def short(fd, data, real_write):
    return real_write(fd, data[:DIRECT_ALIGN])  # the kernel took one block of many


def refused(fd, data, real_write):
    raise OSError(errno.EINVAL, "Invalid argument")  # as at a file size limit cut to no boundary


@pytest.mark.parametrize("first_write", [short, refused])
def test_a_short_or_refused_direct_write_is_finished_buffered(tmp_path, direct, monkeypatch, first_write):
    array = channels_last_level((256, 13, 19), seed=2)  # 253 kB: many blocks
    seen = intercept_writes(monkeypatch, first_write)
    assert direct.write(tmp_path / "x.npy", array)
    assert seen, "the O_DIRECT write was not intercepted"
    assert (tmp_path / "x.npy").read_bytes() == np_save_bytes(array)
    assert direct.enabled  # the next file tries O_DIRECT again


def test_a_write_that_makes_no_progress_is_an_error_not_a_hang(tmp_path, direct, monkeypatch):
    def then_stalls(fd, data, real_write):  # one block, then the device takes nothing more
        monkeypatch.setattr(os, "write", lambda fd, data: 0)
        return real_write(fd, data[:DIRECT_ALIGN])

    intercept_writes(monkeypatch, then_stalls)
    with pytest.raises(OSError, match="no progress"):
        direct.write(tmp_path / "x.npy", channels_last_level((64, 9, 9), seed=3))


def test_npy_shape_accepts_only_a_complete_c_order_file_of_the_dtype(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    good = tmp_path / "good.npy"
    np.save(good, array)
    assert npy_shape(good, np.dtype(np.float32)) == (2, 3, 5)
    assert npy_shape(good, np.dtype(np.float16)) is None  # another dtype
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(good.read_bytes()[:-4])
    assert npy_shape(truncated, np.dtype(np.float32)) is None
    longer = tmp_path / "longer.npy"
    longer.write_bytes(good.read_bytes() + b"\0" * 4)
    assert npy_shape(longer, np.dtype(np.float32)) is None
    fortran = tmp_path / "fortran.npy"
    np.save(fortran, np.asfortranarray(array))
    assert np.load(fortran).flags.f_contiguous
    assert npy_shape(fortran, np.dtype(np.float32)) is None
    header_only = tmp_path / "header.npy"
    header_only.write_bytes(npy_header(array))
    assert npy_shape(header_only, np.dtype(np.float32)) is None
    (tmp_path / "text.npy").write_text("not an array")
    assert npy_shape(tmp_path / "text.npy", np.dtype(np.float32)) is None
    assert npy_shape(tmp_path / "absent.npy", np.dtype(np.float32)) is None


def test_npy_shape_reads_a_version_2_header(tmp_path):
    array = np.ones((4, 6), np.float16)
    with open(tmp_path / "v2.npy", "wb") as f:
        np.lib.format.write_array(f, array, version=(2, 0))
    assert npy_shape(tmp_path / "v2.npy", np.dtype(np.float16)) == (4, 6)
