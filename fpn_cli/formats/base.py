"""What every storage format provides: :class:`Storage`, the writer side that a run's steps use,
and :class:`Features`, the reader side that ``open_features`` returns. A format is one module
with one of each (npy.py, shards.py)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol

import numpy as np

Shape = tuple[int, ...]
Size = tuple[int, int]  # (H, W)


def npy_size(shape: Shape, dtype: np.dtype) -> int:
    """Bytes of the ``.npy`` file of an array of ``shape`` and ``dtype`` (header included)."""
    header = io.BytesIO()
    meta = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(header, meta)
    return len(header.getvalue()) + int(np.prod(shape)) * dtype.itemsize


def read_npy_header(f: BinaryIO) -> tuple[Shape, np.dtype]:
    """(shape, dtype) from the ``.npy`` header at ``f``'s position; ``f`` is left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), dtype


class Storage(Protocol):
    """An output folder in one format, as the pipeline uses it: who may write (:meth:`lock`,
    :meth:`record_settings`), what a resumed run keeps (:meth:`resume`), writing an image
    (:meth:`write_levels` ... :meth:`finish_image`), and the files of the whole run (reports,
    :meth:`publish_index`). Array names are the levels (``p2``) and any other per-image array
    (``rois``): each is stored as ``<name>.npy``."""

    format: str
    levels: tuple[str, ...]

    def lock(self) -> AbstractContextManager[None]:
        """Holds the folder against other runs (and makes it) for the length of the run."""

    def record_settings(self, settings: Mapping[str, object], overwrite: bool) -> None:
        """Checks ``settings`` against those the folder's features were made with (a
        UsageError unless ``overwrite``) and records them."""

    def sweep_dead_runs(self) -> None:
        """Deletes what runs that died on this host left half-written."""

    def finish_overwrite(self) -> None:
        """Marks an ``overwrite`` run finished: the folder no longer mixes old and new."""

    def resume(self, key: str, overwrite: bool) -> dict[str, Shape]:
        """Shapes of the levels of ``key`` that are complete and kept (none with ``overwrite``),
        after clearing whatever a killed run left of ``key``."""

    def recorded_sizes(self, key: str) -> tuple[Size | None, Size | None] | None:
        """(input size, network input size) of a complete ``key`` if the format records them;
        None: the caller probes the image."""

    def preview_file(self, key: str) -> str | None:
        """The preview of ``key``, relative to the folder, if there is one."""

    def location(self, key: str, name: str) -> dict[str, str]:
        """Where array ``name`` of ``key`` is, for report.json: ``{"file": ...}`` and more."""

    def where(self, key: str) -> str:
        """The file or folder that ``key`` is written to, for messages."""

    def write_levels(self, key: str, arrays: Mapping[str, np.ndarray]) -> None: ...

    def write_preview(self, key: str, picture) -> None: ...

    def read_levels(self, key: str) -> dict[str, np.ndarray]: ...

    def finish_image(self, key: str, entry: dict) -> None:
        """``key`` is written whole; ``entry`` is its report.json entry."""

    def flush(self) -> None:
        """Puts everything written so far in place (a format that packs images closes its pack)."""

    def write_report(self, write: Callable[[BinaryIO], object]) -> None: ...

    def write_shard_report(self, index: int, count: int, write: Callable[[BinaryIO], object]) -> None: ...

    def read_shard_reports(self, count: int) -> list[dict] | None: ...

    def publish_index(self) -> None:
        """Writes the index of every complete image, where the format has one."""


class Features(Mapping[str, dict[str, np.ndarray]]):
    """Stored features, read-only: key (the image's path relative to its input root, without
    extension) -> {name: array} for every array stored with the image (levels ``p2``..., and any
    other, such as ``rois``), memory-mapped where the storage allows. Keys iterate sorted;
    :meth:`key_at` reaches the i-th directly (what a Dataset needs), :meth:`entry` gives an
    image's report.json entry."""

    format: str

    def __getitem__(self, key: str) -> dict[str, np.ndarray]:
        return self.read(key)

    def __iter__(self) -> Iterator[str]:
        return (self.key_at(i) for i in range(len(self)))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._find(key) is not None

    def __len__(self) -> int:
        raise NotImplementedError

    def key_at(self, index: int) -> str:
        raise NotImplementedError

    def read(self, key: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays of ``key`` (those in ``names``, or all); KeyError for an unknown key."""
        raise NotImplementedError

    def entry(self, key: str) -> dict:
        raise NotImplementedError

    def _find(self, key: str) -> object | None:
        raise NotImplementedError
