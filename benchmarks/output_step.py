"""The CPU cost of the engine's output step per save dtype: the finiteness check and the conversion
to the stored arrays (run/engine.py encode_finite, as Engine.forward calls it), side by side in one run.

    python benchmarks/output_step.py [--batch 1] [--threads 1] [--repeats 10]

P2-P5 of an 800x1333 input in the engine's channels-last layout. float32/float16/bfloat16 check
every level (finite.check_finite) and then convert; int8's per-channel peaks read every value
anyway, so its check reads only the scales (finite.check_finite_scales). Prints CPU and wall ms
per batch and each dtype's ratios to float16. With one thread CPU time is the steadier figure on
a shared machine; with several, wall time is the one that counts (idle OpenMP threads spin, and
their spinning is CPU time).
"""

from __future__ import annotations

import argparse
import time

import torch

from fpn_cli.formats import codecs
from fpn_cli.run.engine import encode_finite

SHAPES = {"p2": (200, 334), "p3": (100, 167), "p4": (50, 84), "p5": (25, 42)}


def costs(fn, repeats: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call, each the best of three rounds."""
    fn()
    cpu = wall = float("inf")
    for _ in range(3):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for _ in range(repeats):
            fn()
        cpu = min(cpu, (time.process_time() - start_cpu) / repeats * 1000)
        wall = min(wall, (time.perf_counter() - start_wall) / repeats * 1000)
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    feats = {
        name: torch.randn(args.batch, 256, h, w).contiguous(memory_format=torch.channels_last)
        for name, (h, w) in SHAPES.items()
    }
    with torch.inference_mode():
        measured = {d: costs(lambda d=d: encode_finite(feats, d), args.repeats) for d in codecs.SAVE_DTYPES}
    print(f"P2-P5 of 800x1333, batch {args.batch}, {args.threads} thread(s): ms per batch")
    cpu16, wall16 = measured["float16"]
    for name, (cpu, wall) in measured.items():
        ratios = f"CPU {cpu:7.1f} ms ({cpu / cpu16:.2f}x float16)  wall {wall:7.1f} ms ({wall / wall16:.2f}x)"
        print(f"  {name:<9} {ratios}")


if __name__ == "__main__":
    main()
