"""The CPU cost of the engine's output step per save dtype: the finiteness check and the conversion
to the stored arrays (run/engine.py encode_finite, as Engine.forward calls it), side by side in one run.

    python benchmarks/output_step.py [--batch 1] [--threads 1] [--repeats 5] [--rounds 10]

P2-P5 of an 800x1333 input in the engine's channels-last layout. float32/float16/bfloat16 check
every level (finite.check_finite) and then convert; int8's per-channel peaks read every value
anyway, so its check reads only the scales (finite.check_finite_scales). Prints CPU and wall ms
per batch (the best of the rounds, in which the dtypes take turns), each dtype's ratios to
float16's best, and the median and range of its ratio to float16 within a round. With one
thread CPU time is the steadier figure on a shared machine; with several, wall time is the one
that counts (idle OpenMP threads spin, and their spinning is CPU time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fpn_cli.formats import codecs
from fpn_cli.run.engine import encode_finite

SHAPES = {"p2": (200, 334), "p3": (100, 167), "p4": (50, 84), "p5": (25, 42)}


def costs(
    fns: dict[str, Callable[[], object]], repeats: int, rounds: int
) -> tuple[dict[str, tuple[float, float]], dict[str, list[float]]]:
    """({name: (CPU ms, wall ms) per call, each the best of ``rounds``}, {name: its wall time over
    the first function's, per round}). The functions take turns in each round, so that a change
    in the machine's load falls on all of them alike."""
    for fn in fns.values():
        fn()
    best = {name: (float("inf"), float("inf")) for name in fns}
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        walls = {}
        for name, fn in fns.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            for _ in range(repeats):
                fn()
            cpu = (time.process_time() - start_cpu) / repeats * 1000
            walls[name] = (time.perf_counter() - start_wall) / repeats * 1000
            best[name] = (min(best[name][0], cpu), min(best[name][1], walls[name]))
        first = next(iter(walls.values()))
        for name, wall in walls.items():
            ratios[name].append(wall / first)
    return best, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    feats = {
        name: torch.randn(args.batch, 256, h, w).contiguous(memory_format=torch.channels_last)
        for name, (h, w) in SHAPES.items()
    }
    with torch.inference_mode():
        fns = {d: lambda d=d: encode_finite(feats, d) for d in ("float16", "float32", "bfloat16", "int8")}
        measured, ratios = costs(fns, args.repeats, args.rounds)
    print(
        f"P2-P5 of 800x1333, batch {args.batch}, {args.threads} thread(s): "
        f"ms per batch (best of {args.rounds} rounds)"
    )
    cpu16, wall16 = measured["float16"]
    for name in codecs.SAVE_DTYPES:
        cpu, wall = measured[name]
        spread = sorted(ratios[name])
        median = statistics.median(spread)
        print(
            f"  {name:<9} CPU {cpu:7.1f} ms ({cpu / cpu16:.2f}x float16)  "
            f"wall {wall:7.1f} ms ({wall / wall16:.2f}x);"
            f" wall / float16's in the same round: median {median:.2f}, {spread[0]:.2f}-{spread[-1]:.2f}"
        )


if __name__ == "__main__":
    main()
