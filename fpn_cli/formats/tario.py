"""Writing and scanning tar files fast: the shard format's byte layer.

A member is a header (512 bytes; PAX extension blocks first for long or non-ASCII names), its
data, and zeros to the next 512-byte boundary, so every member's data starts 512-aligned and an
``.npy`` member's array can be memory-mapped straight out of the tar. The archive ends with two
zero blocks; tarfile and GNU tar also pad it to a 10 kB record, which only tape drives need, and
which could push the close of a shard after a write error past a full disk.

:class:`TarWriter` streams one file front to back from one reusable buffer, written with
O_DIRECT where the filesystem takes it (as npyio.DirectWriter does for ``.npy`` files, and for
the same reason: no page-cache copy on the cores the network needs), buffered otherwise.
"""

from __future__ import annotations

import errno
import mmap
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fpn_cli.formats.npyio import CHECKSUM, DIRECT_ALIGN, ChunkedArray, checksum, copy_c_order, npy_header

BLOCK = 512  # tar's block: headers and data start on multiples of it
_MIN_BUFFER = 1 << 20
_PIECE = _MIN_BUFFER // 2  # bytes of a streamed array copied into the buffer at a time


def padded(size: int) -> int:
    """``size`` rounded up to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


def member_header(name: str, size: int) -> bytes:
    """The header block(s) of a regular-file member. mtime 0, owner root, mode 0644: the same
    images give byte-identical shards, whenever and by whoever they are made."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


@dataclass(frozen=True)
class Member:
    """Where a member's data is in its tar: ``offset`` of its first byte, ``size`` in bytes;
    an ``.npy`` member written by :meth:`TarWriter.add_array` tells its array's ``checksum``."""

    name: str
    offset: int
    size: int
    checksum: str | None = None


class TarWriter:
    """One tar file written front to back. :meth:`add_bytes` and :meth:`add_array` return where
    the member's data landed; :meth:`rollback` cuts the archive back to an earlier :attr:`position`
    (the end of the last whole image); :meth:`close` ends the archive.

    Bytes gather in a page-aligned buffer; each drain writes its whole ``DIRECT_ALIGN`` blocks and
    keeps the rest (less than one block) at the buffer's start. With O_DIRECT that keeps offsets
    and lengths aligned as the kernel needs; the last block goes out padded and the file is cut
    to its length. A write that O_DIRECT refuses midway (a file size limit cuts it short) switches
    the file to buffered writes, which then write the rest or raise the reason (ENOSPC, EFBIG)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = hasattr(os, "O_DIRECT")
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # this filesystem refuses O_DIRECT (tmpfs)
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self._buffer = mmap.mmap(-1, _MIN_BUFFER)  # page-aligned, as O_DIRECT needs
        self._fill = 0  # bytes at the buffer's start not yet written
        self._written = 0  # bytes in the file: where the buffer's first byte goes

    @property
    def position(self) -> int:
        """The archive's length so far: where the next member's header goes."""
        return self._written + self._fill

    def add_bytes(self, name: str, data: bytes) -> Member:
        header = member_header(name, len(data))
        start = self._reserve(len(header) + padded(len(data))) + len(header)
        self._buffer[start - len(header) : start] = header
        self._buffer[start : start + len(data)] = data
        return self._end_member(name, start, len(data))

    def add_array(self, name: str, array: np.ndarray) -> Member:
        """``array`` as an ``.npy`` member, byte for byte what ``np.save`` writes (C order); a
        channels-last array is transposed as it is copied into the buffer, its only copy."""
        if isinstance(array, ChunkedArray):
            return self._add_chunked(name, array)
        npy = npy_header(array)
        size = len(npy) + array.nbytes
        header = member_header(name, size)
        start = self._reserve(len(header) + padded(size)) + len(header)
        self._buffer[start - len(header) : start] = header
        self._buffer[start : start + len(npy)] = npy
        copy_c_order(np.ndarray(array.shape, array.dtype, self._buffer, start + len(npy)), array)
        with memoryview(self._buffer) as view:  # hashed while the bytes are in cache
            digest = checksum(view[start + len(npy) : start + size])
        return self._end_member(name, start, size, digest)

    def _add_chunked(self, name: str, array: ChunkedArray) -> Member:
        """A :class:`ChunkedArray` as an ``.npy`` member, streamed: its size is known up front, so
        the header goes first and each block of rows follows as it is made, copied into the
        buffer half a MiB at a time and drained after each: the buffer keeps its first size (1 MiB),
        however large a block, and holds no copy of one."""
        npy = npy_header(array)
        size = len(npy) + array.nbytes
        header = member_header(name, size)
        start = self._reserve(len(header) + len(npy))
        self._buffer[start : start + len(header)] = header
        self._buffer[start + len(header) : start + len(header) + len(npy)] = npy
        offset = self._written + start + len(header)  # where the member's data begins in the file
        self._fill = start + len(header) + len(npy)
        crc = 0
        for _, chunk in array.chunks():
            data = memoryview(chunk).cast("B")
            for i in range(0, len(data), _PIECE):  # the buffer stays its first size, not a chunk's
                piece = data[i : i + _PIECE]
                at = self._reserve(len(piece))
                self._buffer[at : at + len(piece)] = piece
                crc = zlib.crc32(piece, crc)
                self._fill = at + len(piece)
                self._drain()
            chunk = data = piece = None  # released before the next block is made
        tail = (-size) % BLOCK
        at = self._reserve(tail)
        self._buffer[at : at + tail] = bytes(tail)
        self._fill = at + tail
        return Member(name, offset, size, f"{CHECKSUM}:{crc:08x}")

    def flush(self) -> None:
        """Writes what is buffered (but for less than one block with O_DIRECT): a write error
        shows here, for the member that caused it, not later for a whole shard."""
        self._drain()

    def rollback(self, position: int) -> None:
        """Cuts the archive back to ``position`` (an earlier :attr:`position`): what a failed
        image began is gone, the images before it stay whole."""
        if position >= self._written:
            self._fill = position - self._written
            return
        keep = position - position % DIRECT_ALIGN if self.direct else position
        with open(self.path, "rb") as f:  # the bytes between the last aligned offset and position
            head = os.pread(f.fileno(), position - keep, keep)
        os.ftruncate(self.fd, keep)
        self._buffer[: len(head)] = head
        self._written, self._fill = keep, len(head)

    def close(self) -> None:
        """Ends the archive (two zero blocks) and closes the file."""
        zeros = 2 * BLOCK
        start = self._reserve(zeros)
        self._buffer[start : start + zeros] = bytes(zeros)
        self._fill += zeros
        length = self.position
        self._drain(final=True)
        os.ftruncate(self.fd, length)  # O_DIRECT wrote the last block whole
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        """Closes and deletes the unfinished file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)

    def _reserve(self, size: int) -> int:
        """Room for ``size`` more bytes in the buffer; returns where they start in it."""
        if self._fill + size > len(self._buffer):
            self._drain()
        if self._fill + size > len(self._buffer):
            grown = mmap.mmap(-1, max(2 * len(self._buffer), self._fill + size + DIRECT_ALIGN))
            grown[: self._fill] = self._buffer[: self._fill]
            self._buffer.close()
            self._buffer = grown
        return self._fill

    def _end_member(self, name: str, start: int, size: int, digest: str | None = None) -> Member:
        member = Member(name, self._written + start, size, digest)
        end = start + size
        tail = (-end) % BLOCK
        self._buffer[end : end + tail] = bytes(tail)
        self._fill = end + tail
        if self._fill >= _MIN_BUFFER:  # large members go out at once; small ones wait for flush()
            self._drain()
        return member

    def _drain(self, final: bool = False) -> None:
        """Writes the buffer's whole blocks and moves the rest (less than a block) to its start;
        ``final`` writes everything, the last block padded with zeros."""
        fill = self._fill
        if not self.direct:
            count = fill
        elif final:
            count = -(-fill // DIRECT_ALIGN) * DIRECT_ALIGN
            self._buffer[fill:count] = bytes(count - fill)
        else:
            count = fill - fill % DIRECT_ALIGN
        done = 0
        with memoryview(self._buffer) as view:
            while done < count:
                try:
                    n = os.pwrite(self.fd, view[done:count], self._written + done)
                except OSError as e:
                    if e.errno != errno.EINVAL or not self.direct:
                        raise
                    self._go_buffered()  # refused midway: the rest goes buffered
                    continue
                if n == 0:
                    raise OSError(errno.EIO, "write made no progress")
                done += n
                if self.direct and n % DIRECT_ALIGN:
                    self._go_buffered()  # cut short at no particular boundary
        if final:
            self._written, self._fill = self._written + fill, 0
        else:
            rest = fill - count
            self._buffer[:rest] = self._buffer[count:fill]
            self._written, self._fill = self._written + count, rest

    def _go_buffered(self) -> None:
        import fcntl  # POSIX only, as O_DIRECT is

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False


def scan(f: BinaryIO) -> Iterator[Member]:
    """The regular members of the tar file ``f`` (seekable), reading only their headers."""
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if info.isreg():
                yield Member(info.name, info.offset_data, info.size)
