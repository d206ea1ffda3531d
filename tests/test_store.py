"""The output folder: levels written whole by atomic replace, complete images recognised."""

from __future__ import annotations

import numpy as np
import pytest

from fpn_cli.formats.npy import Store
from fpn_cli.layout import replacing


def test_written_levels_are_complete_and_leave_no_temporary_file(tmp_path):
    store = Store(tmp_path, ["p2", "p3"], "float32")
    arrays = {"p2": np.random.rand(8, 5, 7).astype(np.float32), "p3": np.ones((8, 3, 4), np.float32)}
    store.write_levels("a/b", arrays)
    assert store.existing("a/b") == {"p2": (8, 5, 7), "p3": (8, 3, 4)}
    for level, array in store.read_levels("a/b").items():
        np.testing.assert_array_equal(array, arrays[level])
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["p2.npy", "p3.npy"]


def test_levels_of_another_dtype_are_not_complete(tmp_path):
    Store(tmp_path, ["p2"], "float16").write_levels("a", {"p2": np.ones((2, 2, 2), np.float16)})
    assert Store(tmp_path, ["p2"], "float32").existing("a") == {}


def test_a_failed_write_keeps_the_old_file_and_names_the_target(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(OSError) as failure, replacing(target) as tmp:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    assert failure.value.filename == str(target)  # the user needs a file name
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
