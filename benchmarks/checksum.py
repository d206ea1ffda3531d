"""What the checksum recorded with every array costs, against the write path that stores it.

    python benchmarks/checksum.py [--dir OUT_DIR] [--repeats N]

One (256, 150, 225) float32 level (33 MiB: the P2 of a 600x900 image) in the channels-last
layout the network returns, written as a new .npy the way a run writes it (npyio.write_file:
layout copy, O_DIRECT where the filesystem takes it, CRC-32 of the copied bytes), and each
checksum candidate timed alone over the same bytes, side by side in one run. Prints ms per level
and each checksum's cost as a share of the write path's time (CRC-32 is the one recorded).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import zlib
from pathlib import Path

import torch

from fpn_cli.formats.npyio import DirectWriter, c_order, write_file


def measure(fn, repeats: int) -> float:
    """Wall ms per call, the best of three rounds of ``repeats`` (the least disturbed)."""
    fn(-1)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(repeats):
            fn(i)
        best = min(best, (time.perf_counter() - start) / repeats * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    level = torch.randn(1, 256, 150, 225).contiguous(memory_format=torch.channels_last)[0].numpy()
    data = memoryview(c_order(level)).cast("B")
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    direct = DirectWriter()

    def write(i: int) -> None:
        write_file(folder / f"{i % 2}.npy", level, direct)  # with its CRC-32, as a run writes

    written = measure(write, args.repeats)
    crc = measure(lambda i: zlib.crc32(data), args.repeats)
    print(f"one (256, 150, 225) float32 level, {level.nbytes / 2**20:.0f} MiB, into {folder}")
    print(f"{'write path (layout copy, write, CRC-32)':<42} {written:7.1f} ms")
    print(f"{'  of which the write alone (no checksum)':<42} {written - crc:7.1f} ms")
    for name, fn in (
        ("crc32 (zlib; recorded)", lambda i: zlib.crc32(data)),
        ("adler32 (zlib)", lambda i: zlib.adler32(data)),
        ("blake2b, 16-byte digest", lambda i: hashlib.blake2b(data, digest_size=16).digest()),
        ("sha256", lambda i: hashlib.sha256(data).digest()),
    ):
        cost = crc if name.startswith("crc32") else measure(fn, args.repeats)
        share = cost / (written - crc) * 100
        print(f"{name:<42} {cost:7.1f} ms   {share:5.1f}% of the write alone")


if __name__ == "__main__":
    main()
