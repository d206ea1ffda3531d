"""What every storage format provides: :class:`Storage`, the writer side that a run's steps use,
:class:`Features`, the reader side that ``open_features`` returns, and :class:`VerifyReader`,
what ``fpn-extract verify`` reads; :class:`Format` bundles them with the rest (estimate, layout
checks, the files it owns) as the registry's entry. A format is one module (npy.py, shards.py)
that defines a ``FORMAT``, and one line in formats/__init__.py's ``FORMATS``."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import numpy as np

from fpn_cli.models.levels import LEVELS

if TYPE_CHECKING:
    from fpn_cli.inputs.urls import Folder

ROIS, BOXES = "rois", "boxes"  # with --boxes: RoI features, and the boxes they came from (regions/)
POOLS = ("avg", "max")  # with --pool: <level>_<kind>, one vector per level
# with --detect (regions/detect.py): a detector's boxes, scores, labels, RoI features, box-head
# vectors, and Mask/Keypoint R-CNN's masks and keypoints, one row per detection
DETECTIONS = (
    "det_boxes", "det_scores", "det_labels", "det_rois", "det_vectors",
    "det_masks", "det_keypoints", "det_keypoint_scores",
)  # fmt: skip
BOX_DTYPE = np.dtype(np.float64)  # boxes.npy: coordinates exactly as given, whatever the save dtype

Shape = tuple[int, ...]
Size = tuple[int, int]  # (H, W)


def pool_name(level: str, kind: str) -> str:
    """``p3_avg``: no dot inside, so the name is one WebDataset member suffix."""
    return f"{level}_{kind}"


def derived_names() -> tuple[str, ...]:
    """Every array a run may derive from an image's levels, whatever its options: each level's
    pooled vectors, the RoI features and their boxes, the detections."""
    return (*(pool_name(level, kind) for level in LEVELS for kind in POOLS), ROIS, BOXES, *DETECTIONS)


def human_bytes(count: int) -> str:
    """``1.0 GB``, ``512 B``: a size for messages and --summary."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def npy_size(shape: Shape, dtype: np.dtype) -> int:
    """Bytes of the ``.npy`` file of an array of ``shape`` and ``dtype`` (header included)."""
    header = io.BytesIO()
    meta = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(header, meta)
    return len(header.getvalue()) + int(np.prod(shape)) * dtype.itemsize


class Storage(Protocol):
    """An output folder in one format, as the pipeline uses it: who may write (:meth:`lock`,
    :meth:`record_settings`), what is stored for an image and where (:meth:`present` ...
    :meth:`location`; resume.decide settles what a resume keeps, asking these), writing an image
    whole (:meth:`write_levels`, then :meth:`finish_image` with its record), and the run's
    reports. A format whose arrays can be changed one by one is an :class:`InPlaceStorage`.

    Array names are the levels (``p2``) and every array derived from them (``p3_avg``, ``rois``,
    ``boxes``: regions.outputs); each is stored as ``<name>.npy`` in its own dtype (boxes are
    float64 whatever the save dtype). ``in_place``: whether the store is an
    :class:`InPlaceStorage` (npy); otherwise an image is written whole each time (shards: a
    resume that lacks anything writes a new group, reading what it keeps back from the old one,
    and leaves out what may not stay).

    Several writer threads (``--writers``) write images at once, each image whole by one thread,
    from :meth:`write_levels` to :meth:`finish_image`; :meth:`flush` comes after them all."""

    format: str
    levels: tuple[str, ...]
    save_dtype: str  # one of codecs.SAVE_DTYPES: what each array is stored as (codecs.array_dtype)
    dtype: np.dtype  # the levels' own arrays (codecs.code_dtype: uint16 for bfloat16)
    in_place: bool

    def lock(self) -> AbstractContextManager[None]:
        """Holds the folder against other runs (and makes it) for the length of the run."""

    def record_settings(self, settings: Mapping[str, object], overwrite: bool) -> dict | None:
        """Checks ``settings`` against those the folder's features were made with (a
        UsageError unless ``overwrite``) and records them; returns those recorded before (None
        if none): the registry removes another format's files on ``overwrite``."""

    def sweep_dead_runs(self) -> None:
        """Deletes what runs that died on this host left half-written."""

    def finish_overwrite(self) -> None:
        """Marks an ``overwrite`` run finished: the folder no longer mixes old and new."""

    def present(self, key: str) -> bool:
        """Whether anything is stored for ``key`` (a new image costs no more than this)."""

    def read_record(self, key: str) -> dict | None:
        """``key``'s record (resume.py's), or None if there is none."""

    def stored_shape(self, key: str, name: str, dtype: np.dtype) -> Shape | None:
        """The shape of array ``name`` of ``key`` if it is stored complete, in ``dtype``."""

    def content_matches(self, key: str, name: str) -> bool:
        """Whether stored array ``name`` of ``key`` has the checksum recorded with the image
        (True where none is recorded: an earlier version's, checked by its shape alone)."""

    def is_stored(self, key: str, name: str) -> bool:
        """Whether anything named ``name`` is stored for ``key``, complete or not."""

    def shapes(
        self, key: str, names: Iterable[str], dtypes: Mapping[str, np.dtype] | None = None
    ) -> dict[str, Shape]:
        """Shapes of the arrays among ``names`` stored complete for ``key``, in the save dtype
        or the one ``dtypes`` gives for the name, of their recorded checksums."""

    def read_array(self, key: str, name: str) -> np.ndarray:
        """Stored array ``name`` of ``key``, memory-mapped where possible."""

    def read_levels(self, key: str) -> dict[str, np.ndarray]:
        """The levels of a complete ``key``, memory-mapped where possible."""

    def preview_file(self, key: str) -> str | None:
        """The preview of ``key``, relative to the folder, if there is one."""

    def location(self, key: str, name: str) -> dict[str, str]:
        """Where array ``name`` of ``key`` is, for report.json: ``{"file": ...}`` and more."""

    def where(self, key: str) -> str:
        """The file or folder that ``key`` is written to, for messages."""

    def write_levels(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes ``key``'s arrays (levels and derived ones), in ``arrays``' order."""

    def write_preview(self, key: str, picture) -> None: ...

    def finish_image(self, key: str, record: Mapping[str, object] | None, entry: dict) -> None:
        """``key`` is written: its ``record`` (resume.py's; None: none) is stored after its
        arrays, which it marks complete; ``entry`` is its report.json entry."""

    def flush(self) -> None:
        """Puts everything written so far in place (a format that packs images closes its pack)."""

    def write_report(self, write: Callable[[BinaryIO], object]) -> None:
        """report.json (``write(file)``), and the format's index of its images where it has one."""

    def write_shard_report(self, index: int, count: int, write: Callable[[BinaryIO], object]) -> None: ...

    def read_shard_reports(self, count: int) -> list[dict] | None: ...


class InPlaceStorage(Storage, Protocol):
    """A :class:`Storage` whose arrays are files of their own (npy): a resume deletes what may not
    stay, array by array (resume.decide), and a killed run's temporary files are swept per image."""

    def remove_strays(self, key: str) -> None:
        """Deletes whatever a killed run left half-written of ``key``."""

    def relocate_record(self, key: str, record: Mapping[str, object]) -> None:
        """Records that ``key``'s unchanged input is now found where ``record`` says."""

    def forget(self, key: str) -> None:
        """Drops every stored array of ``key`` and its record: its input changed."""

    def forget_derived(self, key: str) -> None:
        """Drops what was derived from ``key``'s levels: a level they came from was wrong."""

    def forget_arrays(self, key: str, names: Iterable[str]) -> None:
        """Drops the arrays ``names`` of ``key``."""


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


class VerifyReader(Protocol):
    """An output folder as ``fpn-extract verify`` reads it (run/verify.py asks, the format answers)."""

    root: Path

    def array(self, key: str, info: dict, dtype: np.dtype) -> tuple[str, str | None, Shape | None]:
        """For report.json's ``info`` of one of ``key``'s arrays: (how to name it in a message,
        why it is not there at all or None, its shape if it is complete in ``dtype``)."""

    def content(self, key: str, info: dict) -> bool | None:
        """Whether the array listed as ``info`` has the checksum recorded with ``key`` (its
        record, its index line): True, False, or None where none is recorded (an earlier
        version's folder: the array is checked by its shape alone)."""

    def boxes(self, rois: dict) -> dict:
        """report.json's ``info`` of the boxes beside the RoI features listed as ``rois``."""

    def record(self, key: str) -> tuple[dict | None, str]:
        """(``key``'s record of its input or None, where it is, for messages)."""

    def folder_problems(self) -> list[str]:
        """Problems of the folder as a whole, one line each (shards: a stray copy of a tar)."""


@dataclass(frozen=True)
class Format:
    """One storage format, as the registry (``formats.FORMATS``) holds it: everything the rest of
    the code asks of a format, so that adding one is its module and one registry line."""

    name: str  # --format's value, and the settings record's "format"
    # (out, levels, save dtype, shard size, job-array shard, holds_features) -> the run's writer
    open_store: Callable[..., Storage]
    open_features: Callable[[Folder], Features]  # the reader of open_features
    verify_reader: Callable[[Path], VerifyReader]  # fpn-extract verify's reader of a local folder
    # (per image: (count, {name: shape}), save dtype, shard size) -> (bytes, files), for --summary
    estimate: Callable[[Sequence[tuple[int, Mapping[str, Shape]]], str, int], tuple[int, int]]
    note: Callable[[int], str]  # --summary: what its files are, for a --shard-size
    check_layout: Callable[[Iterable[tuple[str, str]]], None]  # (key, input) pairs that clash: refused
    holds: Callable[[Path], bool]  # whether a local output folder holds files of this format
    remove: Callable[[Path], None]  # deletes them (--overwrite into another format)
    urls: bool = False  # whether --out may be a URL
