"""How a disk takes O_DIRECT writes: one at a time, or several in flight.

    python benchmarks/disk.py [--dir OUT_DIR] [--total-mb 4096] [--threads 4]

Writes ``--total-mb`` four ways, each an image's 45 MB (800x1333 P2-P5 in float16) at a time, taking
turns so drift in the disk's speed hits all alike, and prints GB/s for each:

- files, 1 thread:     a new file per image, one after the other (the npy format, --writers 1)
- files, N threads:    the same files from N threads (--writers N)
- one file, in order:  appended to one file, one write at a time (a tar shard)
- one file, N chunks:  appended to one file, each image's bytes split into N aligned pieces written
                       at their offsets by N threads at once
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

IMAGE = 45 * 2**20  # bytes of one image's levels, a multiple of 4096 as O_DIRECT needs
ALIGN = 4096


def open_direct(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)


def write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--total-mb", type=int, default=4096, help="bytes written each way")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    images = max(1, args.total_mb * 2**20 // IMAGE)
    buffer = mmap.mmap(-1, IMAGE)  # page-aligned
    buffer.write(os.urandom(2**20) * (IMAGE // 2**20))
    view = memoryview(buffer)
    pool = ThreadPoolExecutor(args.threads)
    n = args.threads

    def files_serial(folder: Path) -> None:
        for i in range(images):
            fd = open_direct(folder / f"{i}.npy")
            write_all(fd, view, 0)
            os.close(fd)

    def files_parallel(folder: Path) -> None:
        def one(i: int) -> None:
            fd = open_direct(folder / f"{i}.npy")
            write_all(fd, view, 0)
            os.close(fd)

        list(pool.map(one, range(images)))

    def one_file_serial(folder: Path) -> None:
        fd = open_direct(folder / "shard.tar")
        for i in range(images):
            write_all(fd, view, i * IMAGE)
        os.close(fd)

    def one_file_chunks(folder: Path) -> None:
        fd = open_direct(folder / "shard.tar")
        piece = -(-IMAGE // n // ALIGN) * ALIGN
        for i in range(images):
            starts = range(0, IMAGE, piece)
            list(pool.map(lambda s: write_all(fd, view[s : s + piece], i * IMAGE + s), starts))  # noqa: B023
        os.close(fd)

    ways = {
        "files, 1 thread": files_serial,
        f"files, {n} threads": files_parallel,
        "one file, in order": one_file_serial,
        f"one file, {n} chunks at once": one_file_chunks,
    }
    best = dict.fromkeys(ways, 0.0)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        for _ in range(args.repeats):
            for name, way in ways.items():
                folder = root / "w"
                folder.mkdir()
                start = time.perf_counter()
                way(folder)
                seconds = time.perf_counter() - start
                best[name] = max(best[name], images * IMAGE / seconds / 1e9)
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    where = args.dir or tempfile.gettempdir()
    print(f"{images} images of {IMAGE / 1e6:.1f} MB each way, O_DIRECT, into {where}")
    for name, rate in best.items():
        print(f"{name:<30}{rate:7.2f} GB/s")


if __name__ == "__main__":
    main()
