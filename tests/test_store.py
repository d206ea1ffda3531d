"""The output store's file writing: exact .npy bytes by either path, and the fallback."""

from __future__ import annotations

import errno
import io
import os

import numpy as np
import pytest
import torch

from fpn_cli.store import DirectWriter, Store, npy_shape


def np_save_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(256, 13, 19), (3, 1, 2), (512, 64, 64)])
def test_direct_writes_are_exactly_what_np_save_writes(tmp_path, dtype, shape):
    # a slice of a channels-last batch, as the network hands it over: not C-contiguous
    batch = torch.randn(2, *shape).to(dtype).contiguous(memory_format=torch.channels_last)
    array = batch[1].numpy()
    writer = DirectWriter()
    if not writer.write(tmp_path / "x.npy", array):
        pytest.skip("this filesystem does not take O_DIRECT")
    assert (tmp_path / "x.npy").read_bytes() == np_save_bytes(array)
    assert npy_shape(tmp_path / "x.npy", array.dtype) == shape


def test_store_falls_back_to_buffered_writes_where_o_direct_is_refused(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    store = Store(tmp_path, ["p2", "p3"], "float32")
    arrays = {"p2": np.random.rand(8, 5, 7).astype(np.float32), "p3": np.ones((8, 3, 4), np.float32)}
    store.write_levels("a/b", arrays)
    assert store._direct.enabled is False
    for level, array in arrays.items():
        assert (tmp_path / "a" / "b" / f"{level}.npy").read_bytes() == np_save_bytes(array)
    assert store.existing("a/b") == {"p2": (8, 5, 7), "p3": (8, 3, 4)}


@pytest.mark.parametrize("shape", [(256, 37, 45), (7, 1, 1), (64, 1, 33), (2048, 2, 3)])
def test_c_order_copy_of_every_layout(shape):
    from fpn_cli.store import c_order

    base = torch.randn(3, *shape)
    for layout in (base, base.contiguous(memory_format=torch.channels_last)):
        array = layout[2].numpy()
        out = c_order(array)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out, np.asarray(base[2]))
