"""Writing and checking ``.npy`` files, fast: the header, the channels-last to C-order copy in
cache-sized blocks, and O_DIRECT writes from one reusable aligned buffer with their fallbacks.
Every file is byte for byte what ``np.save`` writes for the same array (C order, version 1.0).

    write_file(path, array, direct)   O_DIRECT where the filesystem takes it, else buffered;
                                      returns the array's checksum
    npy_shape(path, dtype)            the shape of a complete file of that dtype, else None
    file_checksum(path)               the checksum of a ``.npy`` file's array bytes, as written

**Checksums.** Every array's bytes (C order, as stored after the header) get a CRC-32, written
``"crc32:1a2b3c4d"``, recorded with the image (the npy record, the shard index): what verify and
a resume check the content against. CRC-32 because it is the fastest check numpy's host has
built in (zlib's: about 3 GB/s here, against blake2b's 0.6 GB/s; benchmarks/checksum.py), and it
catches every burst of up to 32 flipped bits and any single edited value; it guards against
accidents (a sync tool, a cut copy, a slip of the hand), not against someone forging features.

An array too large to hold whole (the RoI features of 100,000 boxes: 5 GB) comes as a
:class:`ChunkedArray`, made and written a block of rows at a time.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import stat
import threading
import tokenize
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fpn_cli.errors import FPNError
from fpn_cli.layout import file_kind

TRANSPOSE_BLOCK = 32  # positions per block when writing channels-last levels in C order (fastest measured)
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: multiples of the logical block size
CHECKSUM = "crc32"  # the prefix of every recorded checksum: another algorithm would be another name
_CHUNK = 1 << 22  # bytes hashed at a time when reading a file back


def checksum(data) -> str:
    """``"crc32:1a2b3c4d"``: the checksum of ``data`` (bytes or any C-contiguous buffer)."""
    return f"{CHECKSUM}:{zlib.crc32(data):08x}"


def array_checksum(array: np.ndarray) -> str:
    """The checksum of ``array``'s bytes as a ``.npy`` file stores them (C order)."""
    return checksum(memoryview(c_order(array)).cast("B") if array.size else b"")


def is_checksum(value: object) -> bool:
    """Whether ``value`` is a checksum this version can check (other values count as none)."""
    return isinstance(value, str) and value.startswith(f"{CHECKSUM}:") and len(value) == len(CHECKSUM) + 9


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """An output file opened for reading without ever blocking: a FIFO, socket or device in its
    place is an :class:`FPNError` naming it at once (a FIFO's open would wait for a writer
    forever). FileNotFoundError and other OSErrors pass through."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | os.PathLike[str]) -> None:
    """An :class:`FPNError` naming ``path`` if it exists and is no regular file (stat follows links)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    _require_regular(path, mode)


def _require_regular(path: str | os.PathLike[str], mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise FPNError(f"{path} is {file_kind(mode)}, not a regular file: move it away and run again")


def range_checksum(f: BinaryIO, offset: int, length: int) -> str:
    """The checksum of ``length`` bytes of the open file ``f`` from ``offset`` (short: a cut file
    gives another checksum)."""
    crc = 0
    fd = f.fileno()
    done = 0
    while done < length:
        block = os.pread(fd, min(_CHUNK, length - done), offset + done)
        if not block:
            break
        crc = zlib.crc32(block, crc)
        done += len(block)
    return f"{CHECKSUM}:{crc:08x}"


# what numpy's header parser raises, besides ValueError, for bytes that are not a .npy header
_NOT_A_HEADER = (SyntaxError, EOFError, tokenize.TokenError)


def read_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from the ``.npy`` header at ``f``'s position; ``f`` is left at
    the data. Any header that is not one is a ValueError: numpy's parser also raises SyntaxError,
    EOFError and, for a header cut inside a bracket, tokenize.TokenError."""
    try:
        version = np.lib.format.read_magic(f)
        npy = np.lib.format
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except _NOT_A_HEADER as e:
        raise ValueError(f"not a .npy header ({e})") from None
    return tuple(shape), bool(fortran), dtype


def load(file: str | os.PathLike[str] | BinaryIO, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of one ``.npy``, a header that is not one a ValueError (see :func:`read_header`)."""
    try:
        return np.load(file, mmap_mode=mmap_mode)
    except _NOT_A_HEADER as e:
        raise ValueError(f"not a .npy file ({e})") from None


def file_checksum(path: str | os.PathLike[str]) -> str | None:
    """The checksum of the array bytes of the ``.npy`` file ``path`` (after its header); None if
    it cannot be read as one."""
    try:
        with open_regular(path) as f:
            read_header(f)
            start = f.tell()
            return range_checksum(f, start, os.fstat(f.fileno()).st_size - start)
    except (OSError, ValueError, FPNError):
        return None


class ChunkedArray:
    """An array of ``shape`` and ``dtype`` made a block of rows (its first axis) at a time, never
    whole: ``make(start, stop)`` returns rows ``start:stop``, valid until the next block is asked
    for (``make`` may reuse one buffer). The writers stream it (a file holds the header, then each
    block as it is made); ``np.asarray`` makes it whole."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: np.dtype,
        make: Callable[[int, int], np.ndarray],
        rows_per_chunk: int,
    ) -> None:
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self._make, self.rows_per_chunk = make, max(1, rows_per_chunk)

    def __len__(self) -> int:
        return self.shape[0]

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) for each block, in order, each made when asked for."""
        for start in range(0, self.shape[0], self.rows_per_chunk):
            stop = min(start + self.rows_per_chunk, self.shape[0])
            chunk = np.ascontiguousarray(self._make(start, stop), self.dtype)
            if chunk.shape != (stop - start, *self.shape[1:]):
                raise ValueError(
                    f"rows {start}:{stop} came as {chunk.shape}, not {(stop - start, *self.shape[1:])}"
                )
            yield start, chunk
            del chunk  # not held while the next block is made: the peak is one block, not two

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        for start, chunk in self.chunks():
            out[start : start + len(chunk)] = chunk
        return out if dtype is None else out.astype(dtype)


def npy_header(array: np.ndarray) -> bytes:
    """The ``.npy`` (version 1.0) header of ``array`` stored in C order."""
    header = io.BytesIO()
    meta = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape}
    np.lib.format.write_array_header_1_0(header, meta)
    return header.getvalue()


def copy_c_order(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for a C-order ``dst``. A channels-last (C, H, W) ``src``, the network's
    layout, is transposed in blocks of positions that stay in cache: 3.0 ms against numpy's
    6.7 ms for a 256x128x128 float32 level (benchmarks/writes.py). A :class:`ChunkedArray` is
    copied a block at a time."""
    if isinstance(src, ChunkedArray):
        for start, chunk in src.chunks():
            dst[start : start + len(chunk)] = chunk
    elif src.ndim == 3 and not src.flags.c_contiguous and src.transpose(1, 2, 0).flags.c_contiguous:
        channels = src.shape[0]
        positions = src.transpose(1, 2, 0).reshape(-1, channels)  # (H*W, C), a view
        out = dst.reshape(channels, -1)
        for i in range(0, positions.shape[0], TRANSPOSE_BLOCK):
            out[:, i : i + TRANSPOSE_BLOCK] = positions[i : i + TRANSPOSE_BLOCK].T
    else:
        np.copyto(dst, src)


def c_order(array: np.ndarray) -> np.ndarray:
    if array.flags.c_contiguous:
        return array
    out = np.empty(array.shape, array.dtype)
    copy_c_order(out, array)
    return out


def write_npy(f: BinaryIO, array: np.ndarray) -> str:
    """``np.save`` through ``f.write``, so a full disk raises ENOSPC (numpy's ``tofile`` reports
    only a short count). Always C order: a (C, 1, W) slice can be Fortran-contiguous, and readers
    that memory-map the file expect the usual layout. A :class:`ChunkedArray` is written a block
    at a time, as it is made. Returns the checksum of the array bytes written."""
    f.write(npy_header(array))
    if isinstance(array, ChunkedArray):
        crc = 0
        for _, chunk in array.chunks():
            data = memoryview(chunk).cast("B")
            f.write(data)
            crc = zlib.crc32(data, crc)
            del chunk, data  # released before the next block is made
        return f"{CHECKSUM}:{crc:08x}"
    data = memoryview(c_order(array)).cast("B")
    f.write(data)
    return checksum(data)


def _clear_o_direct(fd: int) -> None:
    import fcntl  # POSIX only, as O_DIRECT is: imported here, so the package imports on Windows

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def _no_progress() -> int:
    raise OSError(errno.EIO, "write made no progress")


class DirectWriter:
    """Writes ``.npy`` files with O_DIRECT from one reusable page-aligned buffer, bypassing the
    page cache. Measured by benchmarks/writes.py: 4 ms of CPU for a 16 MB level against 38 ms
    through the page cache, CPU that the network needs on a host whose cores it keeps busy. The
    array's copy into the buffer is the C-order copy that a buffered write makes anyway.
    Filesystems without O_DIRECT (or platforms: macOS) make :meth:`write` return False once, and
    the caller writes buffered."""

    def __init__(self) -> None:
        self.enabled = hasattr(os, "O_DIRECT")
        self._local = threading.local()  # one buffer per writer thread, so writers never wait on each other

    def write(self, path: Path, array: np.ndarray) -> str | None:
        """Writes the file; returns the array's checksum (taken from the buffer, while its bytes
        are in cache), or None where O_DIRECT is not to be had (nothing written), as for a
        :class:`ChunkedArray`, never whole: that one goes buffered."""
        if not self.enabled or isinstance(array, ChunkedArray):
            return None
        header = npy_header(array)
        length = len(header) + array.nbytes
        padded = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < padded:
            if buffer is not None:
                buffer.close()
            buffer = self._local.buffer = mmap.mmap(-1, padded)  # page-aligned, as O_DIRECT needs
        buffer[: len(header)] = header
        copy_c_order(np.ndarray(array.shape, array.dtype, buffer=buffer, offset=len(header)), array)
        with memoryview(buffer) as view:
            digest = checksum(view[len(header) : length])
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.enabled = False  # this filesystem refuses O_DIRECT
            return None
        try:
            with memoryview(buffer)[:padded] as view:
                try:
                    written = os.write(fd, view)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    written = 0  # cut to an unaligned length (a file size limit): go buffered
                if written < padded:
                    # a short write ends at no particular boundary: the rest goes buffered,
                    # which writes it or raises the reason (ENOSPC, EFBIG)
                    _clear_o_direct(fd)
                    while written < padded:
                        written += os.write(fd, view[written:]) or _no_progress()
            os.ftruncate(fd, length)  # the padding goes; the file is exactly the .npy
        finally:
            os.close(fd)
        return digest


def npy_shape(path: Path, dtype: np.dtype) -> tuple[int, ...] | None:
    """The shape stored in a complete ``.npy`` of ``dtype``; None if absent, of another dtype, or short."""
    try:
        with open_regular(path) as f:
            shape, fortran, stored = read_header(f)
            data_start = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, FPNError):
        return None
    if stored != dtype or fortran or size != data_start + int(np.prod(shape)) * dtype.itemsize:
        return None
    return tuple(shape)


def write_file(path: Path, array: np.ndarray, direct: DirectWriter | None = None) -> str:
    """Writes ``array`` as the ``.npy`` file ``path``: with O_DIRECT through ``direct`` where the
    filesystem takes it, buffered otherwise. The bytes are ``np.save``'s either way. Returns the
    array's checksum."""
    digest = direct.write(path, array) if direct is not None else None
    if digest is None:
        with open(path, "wb") as f:
            digest = write_npy(f, array)
    return digest
