"""What writing one P2 level costs: page cache against O_DIRECT, and the layout copy.

    python benchmarks/writes.py [--dir OUT_DIR]

A (256, 128, 128) float32 level (16 MB, a 512x512 image's P2) in the channels-last layout the
network returns, written as a new .npy 20 times each way. Prints CPU and wall ms per file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fpn_cli.formats.npyio import DirectWriter, c_order, write_npy


def measure(fn, repeats: int = 20) -> tuple[float, float]:
    fn(-1)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(repeats):
        fn(i)
    return (time.process_time() - cpu) / repeats * 1000, (time.perf_counter() - wall) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    level = torch.randn(1, 256, 128, 128).contiguous(memory_format=torch.channels_last)[0].numpy()
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    direct = DirectWriter()

    def buffered(i: int) -> None:
        with open(folder / f"b{i}.npy", "wb") as f:
            write_npy(f, level)

    def unbuffered(i: int) -> None:
        if not direct.write(folder / f"d{i}.npy", level):
            raise SystemExit(f"{folder} does not take O_DIRECT")

    rows = [
        ("layout copy, np.ascontiguousarray", lambda i: np.ascontiguousarray(level)),
        ("layout copy, blocked (ours)", lambda i: c_order(level)),
        ("write through the page cache", buffered),
        ("write with O_DIRECT (ours)", unbuffered),
    ]
    print(f"one (256, 128, 128) float32 level, {level.nbytes / 2**20:.0f} MiB, into {folder}")
    for name, fn in rows:
        cpu, wall = measure(fn)
        print(f"{name:<36} cpu {cpu:6.1f} ms   wall {wall:6.1f} ms")


if __name__ == "__main__":
    main()
