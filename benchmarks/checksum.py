"""What the checksum recorded with every array costs, against the write path that stores it.

    python benchmarks/checksum.py [--dir OUT_DIR] [--repeats N]
    python benchmarks/checksum.py --run [--arch seed] [--images 8] [--rounds 3]


One (256, 150, 225) float32 level (33 MiB: the P2 of a 600x900 image) in the channels-last
layout the network returns, written as a new .npy the way a run writes it (npyio.write_file:
layout copy, O_DIRECT where the filesystem takes it, CRC-32 of the copied bytes), and each
checksum candidate timed alone over the same bytes, side by side in one run. Prints ms per level
and each checksum's cost as a share of the write path's time (CRC-32 is the one recorded).

``--run``: the goal's own measure, the cost on a whole run's throughput. The same extraction
(``--images`` 600x900 images, ``--arch``, CPU, float32 npy) run with the checksum and with it
replaced by a constant, alternately for ``--rounds`` rounds; prints the best images/s of each and
their ratio.
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


def throughput(arch: str, count: int, rounds: int, folder: Path) -> None:
    """images/s of whole runs with and without the checksum, alternately in one process."""
    import types

    import numpy as np
    from PIL import Image

    from fpn_cli.formats import npyio
    from fpn_cli.run.pipeline import extract

    images = folder / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"im{i}.png")
    real = npyio.zlib
    constant = types.SimpleNamespace(crc32=lambda data, value=0: 0)
    best = {"with CRC-32": 0.0, "without": 0.0}
    extract([images], folder / "warm", arch=arch, device="cpu")  # the model built, caches warm
    for r in range(rounds):
        for name, module in (("with CRC-32", real), ("without", constant)):
            npyio.zlib = module
            start = time.perf_counter()
            extract([images], folder / f"{r}-{name}", arch=arch, device="cpu")
            best[name] = max(best[name], count / (time.perf_counter() - start))
    npyio.zlib = real
    print(f"{count} images of 600x900, --arch {arch}, CPU, float32 npy, best of {rounds} rounds:")
    for name, rate in best.items():
        print(f"  {name:<12} {rate:6.2f} img/s")
    print(f"  the checksum costs {(1 - best['with CRC-32'] / best['without']) * 100:.1f}% of throughput")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--run", action="store_true", help="measure whole runs' images/s instead")
    parser.add_argument("--arch", default="seed")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.run:
        throughput(args.arch, args.images, args.rounds, Path(tempfile.mkdtemp(dir=args.dir)))
        return
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
