"""The CPU cost of the engine's output step per save dtype: the finiteness check and the conversion
to the stored arrays (run/engine.py encode_finite, as Engine.forward calls it), side by side in one run.

    python benchmarks/output_step.py [--batch 1] [--threads 1] [--repeats 5] [--rounds 10]
    python benchmarks/output_step.py --after-forward resnet50 [--batch 1] [--threads 2] [--rounds 8]

P2-P5 of an 800x1333 input in the engine's channels-last layout. float32/float16/bfloat16 check
every level (finite.check_finite) and then convert; int8's per-channel peaks read every value
anyway, so its check reads only the scales (finite.check_finite_scales). Prints CPU and wall ms
per batch (the best of the rounds, in which the dtypes take turns), each dtype's ratios to
float16's best, and the median and range of its ratio to float16 within a round. With one
thread CPU time is the steadier figure on a shared machine; with several, wall time is the one
that counts (idle OpenMP threads spin, and their spinning is CPU time).

``--after-forward ARCH`` measures the step where a run meets it: each conversion gets the levels
of a forward of that network, run just before it (untimed) on a random 800x1333 batch, so that the
caches and the allocator are as the forward leaves them; one call per round and dtype (the order
reversed every other round). It also prints the forward's time and the step's share of it.

``--with-writer`` adds what the writer thread then does to every stored array before the disk: its
copy to C order (npyio.c_order; the levels are channels-last) and its checksum. ``--passes`` times
float16's and int8's passes over the levels alone instead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from fpn_cli import build_fpn
from fpn_cli.formats import codecs, npyio
from fpn_cli.run.engine import Engine, encode_finite
from fpn_cli.run.finite import check_finite

SHAPES = {"p2": (200, 334), "p3": (100, 167), "p4": (50, 84), "p5": (25, 42)}
Levels = dict[str, torch.Tensor]


def costs(
    fns: dict[str, Callable[[Levels], object]],
    levels: Callable[[], Levels],
    repeats: int,
    rounds: int,
    alternate: bool = False,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """({name: CPU ms per call, the best of ``rounds``}, {name: its wall ms per call, per round}).
    Each call gets ``levels()`` (untimed). The functions take turns in each round (in reverse order
    every other round if ``alternate``), so that a change in the machine's load falls on all of
    them alike."""
    for fn in fns.values():
        fn(levels())
    cpus = {name: float("inf") for name in fns}
    walls: dict[str, list[float]] = {name: [] for name in fns}
    for turn in range(rounds):
        order = list(fns)[::-1] if alternate and turn % 2 else list(fns)
        for name in order:
            cpu = wall = 0.0
            for _ in range(repeats):
                feats = levels()
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                fns[name](feats)
                cpu += time.process_time() - start_cpu
                wall += time.perf_counter() - start_wall
                del feats
            walls[name].append(wall / repeats * 1000)
            cpus[name] = min(cpus[name], cpu / repeats * 1000)
    return cpus, walls


def passes() -> dict[str, Callable[[Levels], object]]:
    """Each save dtype's passes over the levels, alone: float16's finiteness sum and conversion,
    int8's per-channel peaks (its finiteness check too) and codes (with unit scales)."""

    def channels_last(feats: Levels) -> Iterator[tuple[torch.Tensor, list]]:
        for v in feats.values():
            v = v.permute(0, 2, 3, 1)
            yield v, codecs._blocks(v)

    return {
        "float16: finiteness sum": check_finite,
        "float16: conversion": lambda f: [v.to(torch.float16) for v in f.values()],
        "int8: peaks": lambda f: [codecs._peak(v, blocks) for v, blocks in channels_last(f)],
        "int8: codes": lambda f: [
            codecs._codes(v, blocks, torch.ones(v.shape[0], v.shape[3])) for v, blocks in channels_last(f)
        ],
    }


def with_writer(save_dtype: str) -> Callable[[Levels], object]:
    """The output step of ``save_dtype`` and then, image by image, the writer's C-order copy and
    checksum of each stored array (npyio.array_checksum, as write_npy does)."""

    def step(feats: Levels) -> list[str]:
        stored = {k: v.numpy() for k, v in encode_finite(feats, save_dtype).items()}
        count = len(next(iter(stored.values())))
        return [npyio.array_checksum(v[i]) for i in range(count) for v in stored.values()]

    return step


def forward_levels(arch: str, batch: int) -> tuple[Callable[[], Levels], list[float]]:
    """(a function returning fresh float32 levels of one forward of ``arch`` on a random 800x1333
    batch, the list its forwards' wall ms are appended to)."""
    engine = Engine(build_fpn(arch=arch, seed=0), torch.device("cpu"), "float32", "float32")
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 800, 1333, 3), dtype=np.uint8)
    x = engine.preprocess(pixels)
    times: list[float] = []

    def levels() -> Levels:
        start = time.perf_counter()
        feats = engine.network(x)
        times.append((time.perf_counter() - start) * 1000)
        return feats

    return levels, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="calls per dtype, round (1 after a forward)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--after-forward", metavar="ARCH", default=None, help="convert the levels of a real forward of ARCH"
    )
    parser.add_argument("--passes", action="store_true", help="time float16's and int8's passes alone")
    parser.add_argument(
        "--with-writer", action="store_true", help="add the writer's C-order copy and checksum"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    forward_ms: list[float] = []
    with torch.inference_mode():
        if args.after_forward:
            levels, forward_ms = forward_levels(args.after_forward, args.batch)
            repeats = 1
        else:
            feats = {
                name: torch.randn(args.batch, 256, h, w).contiguous(memory_format=torch.channels_last)
                for name, (h, w) in SHAPES.items()
            }
            levels, repeats = (lambda: feats), args.repeats
        if args.passes:
            fns = passes()
        elif args.with_writer:
            fns = {d: with_writer(d) for d in ("float16", "float32", "bfloat16", "int8")}
        else:
            fns = {d: lambda f, d=d: encode_finite(f, d) for d in ("float16", "float32", "bfloat16", "int8")}
        cpus, walls = costs(fns, levels, repeats, args.rounds, alternate=bool(args.after_forward))
    where = f"after a {args.after_forward} forward each" if args.after_forward else "same levels each call"
    what = ", the step and the writer's C-order copy and checksum" if args.with_writer else ""
    print(f"P2-P5 of 800x1333, batch {args.batch}, {args.threads} thread(s), {where}{what}: ms per batch")
    if args.passes:
        for name, wall in walls.items():
            print(
                f"  {name:<24} wall: best {min(wall):6.1f}, median {statistics.median(wall):6.1f};"
                f" every round: {' '.join(f'{w:.1f}' for w in wall)}"
            )
        return
    print(f"  (best of {args.rounds} rounds)")
    wall16 = min(walls["float16"])
    for name in codecs.SAVE_DTYPES:
        wall = min(walls[name])
        spread = sorted(w / w16 for w, w16 in zip(walls[name], walls["float16"], strict=True))
        print(
            f"  {name:<9} CPU {cpus[name]:7.1f} ms ({cpus[name] / cpus['float16']:.2f}x float16)  "
            f"wall {wall:7.1f} ms ({wall / wall16:.2f}x);"
            f" wall / float16's in the same round: median {statistics.median(spread):.2f},"
            f" {spread[0]:.2f}-{spread[-1]:.2f}"
        )
    if forward_ms:
        forward = statistics.median(forward_ms)
        print(
            f"  the forward: median {forward:.0f} ms per batch; float16's best step is "
            f"{wall16 / forward:.2%} of it, int8's {min(walls['int8']) / forward:.2%}"
        )


if __name__ == "__main__":
    main()
