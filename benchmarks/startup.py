"""What a short run costs before and around its one image: fresh processes of the console script,
each timed (wall and CPU, children's rusage), and which heavy modules each imported.

    python benchmarks/startup.py [--repeats 5]

Cases: `--summary --arch seed` (no image) and a run of one 8x8 image with `--arch seed`. On the
2-core development machine the run took 4.3 s (CPU 4.7 s) against 6.0 s (CPU 6.3 s) for the
previous release, side by side: level shapes are no longer probed on the meta device, whose first
use imports torch._dynamo (docs/geometry.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

HEAVY = ("torch", "torchvision", "torch._dynamo", "timm")


def timed(args: list[str]) -> tuple[float, float, set[str]]:
    """(wall s, CPU s, the HEAVY modules imported) of one ``python -X importtime -m fpn_cli ARGS``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fpn_cli", *args], capture_output=True, text=True
    )
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"fpn-extract {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return wall, cpu, {m for m in HEAVY if m in imported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Image.new("RGB", (8, 8), (90, 120, 200)).save(os.path.join(tmp, "a.png"))
        cases = {
            "--summary --arch seed": ["--summary", "--arch", "seed"],
            "one 8x8 image, --arch seed": [
                tmp,
                "-o",
                str(Path(tmp) / "out"),
                "--arch",
                "seed",
                "-q",
                "--overwrite",
            ],
        }
        for name, case in cases.items():
            runs = [timed(case) for _ in range(args.repeats)]
            wall = sorted(r[0] for r in runs)[len(runs) // 2]
            cpu = sorted(r[1] for r in runs)[len(runs) // 2]
            heavy = ", ".join(sorted(runs[0][2]))
            print(f"{name:<28} median of {args.repeats}: wall {wall:.2f} s, CPU {cpu:.2f} s; imports {heavy}")


if __name__ == "__main__":
    main()
