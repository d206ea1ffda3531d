"""The per-image memory guard (run/engine.py ``Engine.host_bytes``) against the peak RSS a CPU run
really takes, for each backbone family, one process per measurement.

    python benchmarks/memory_guard.py                          # every family at 2000x2000, 3000x3000
    python benchmarks/memory_guard.py --arch resnet18 --size 2000

Each measurement runs ``fpn-extract IMAGE -o OUT --arch A --device cpu --batch-size 1`` on one
image of that size in its own process and reads the process's peak RSS (``os.wait4``'s rusage);
the same run on a 64x64 image gives the fixed part (Python, torch, the model), which the guard
does not count. Printed per row: the forward's share of the peak (peak minus the fixed part), the
guard's estimate for the image, and their ratio; the guard is conservative where the ratio is at
least 1 for every family.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FAMILIES = ("seed", "resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "timm:convnext_tiny")
SIZES = (2000, 3000)
BASE = 64  # the fixed part's image: a forward of it costs a few MB


def peak_rss(arch: str, size: int, folder: Path) -> int:
    """Peak RSS in bytes of one CPU run of ``arch`` on a ``size`` x ``size`` image."""
    image = folder / f"{size}.png"
    if not image.exists():
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        planes = [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], size)]
        rgb = np.stack(planes, -1)
        Image.fromarray(rgb.astype(np.uint8)).save(image, compress_level=1)
    out = folder / f"out-{arch.replace(':', '_')}-{size}"
    command = [sys.executable, "-m", "fpn_cli", str(image), "-o", str(out), "--arch", arch]
    command += ["--device", "cpu", "--batch-size", "1", "--overwrite", "-q", "--max-pixels", str(10**9)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def estimate(arch: str, size: int) -> int:
    """What the guard expects a CPU forward of one ``size`` x ``size`` image to take."""
    import torch

    from fpn_cli import build_fpn
    from fpn_cli.run.engine import Engine

    model = build_fpn(arch=arch, weights="random")
    return Engine(model, torch.device("cpu"), "float32", "float32").host_bytes(1, size, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="a family's architecture (repeatable)")
    parser.add_argument("--size", action="append", type=int, help="the image's side (repeatable)")
    args = parser.parse_args()
    archs, sizes = args.arch or FAMILIES, args.size or SIZES
    columns = ("peak GiB", "fixed GiB", "forward GiB", "guard GiB", "ratio")
    print(f"{'arch':<20} {'size':>9} " + " ".join(f"{c:>{max(9, len(c))}}" for c in columns))
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            fixed = peak_rss(arch, BASE, Path(tmp))
            for size in sizes:
                peak = peak_rss(arch, size, Path(tmp))
                guess = estimate(arch, size)
                forward = peak - fixed
                print(
                    f"{arch:<20} {f'{size}x{size}':>9} {peak / 2**30:9.2f} {fixed / 2**30:9.2f} "
                    f"{forward / 2**30:11.2f} {guess / 2**30:9.2f} {guess / forward:9.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
