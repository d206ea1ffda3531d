"""Peak memory of RoI features for many boxes on one image: pooled and written a chunk at a time
(regions/pooling.py ROI_CHUNK_BYTES, one reused buffer, ROI_BATCH_BYTES per roi_align call), the
peak stays near the image's levels and about one chunk, whatever the box count; made whole
(``--whole``: the array, then the file), it is rois.npy's size and more.

    python benchmarks/roi_memory.py                    # 20,000, 50,000 and 100,000 boxes
    python benchmarks/roi_memory.py --boxes 20000 --whole
    python benchmarks/roi_memory.py --format shards --save-dtype float16

Each count runs in its own process: random levels of an 800x1216 image (seed FPN shapes, float32),
that many random boxes, ``Outputs.compute`` then the npy writer into a temporary folder, as a run
with ``--boxes`` does. Printed: rois.npy's size, the memory the process held before pooling (the
levels, torch), its peak RSS (``resource.getrusage``) and the peak's growth over that, in GiB and
in chunks.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 800, 1216


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(count: int, whole: bool, folder: Path, fmt: str, save_dtype: str) -> None:
    """In this process: pool ``count`` boxes and write rois.npy (or a shard's member); print one line."""
    import torchvision.ops  # noqa: F401  (imported where pooling starts: not counted as its memory)

    from fpn_cli.formats.npyio import write_file
    from fpn_cli.formats.tario import TarWriter
    from fpn_cli.regions.boxes import BoxFile, ImageBoxes
    from fpn_cli.regions.geometry import Geometry
    from fpn_cli.regions.outputs import Outputs
    from fpn_cli.regions.pooling import ROI_CHUNK_BYTES, RoiSpec

    rng = np.random.default_rng(0)
    levels = {
        f"p{k}": rng.standard_normal((256, -(-HEIGHT // 2**k), -(-WIDTH // 2**k)), dtype=np.float32)
        for k in (2, 3, 4, 5)
    }
    xy = rng.uniform(0, (WIDTH - 64, HEIGHT - 64), (count, 2))
    wh = rng.uniform(8, 400, (count, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, (WIDTH, HEIGHT))], 1)
    table = BoxFile(
        "boxes.csv", {"a.png": ImageBoxes([tuple(b) for b in boxes], [f"line {i}" for i in range(count)])}
    )
    outputs = Outputs(tuple(levels), save_dtype, maps=False, roi=RoiSpec(), boxes=table)
    before = rss()
    began = time.perf_counter()
    rois = outputs.compute(levels, ("rois", "boxes"), "a.png", Geometry((HEIGHT, WIDTH), (HEIGHT, WIDTH), 1))[
        "rois"
    ]
    rois = np.asarray(rois) if whole else rois
    if fmt == "shards":  # one member of a shard, as --format shards writes it
        writer = TarWriter(folder / "shard.tar")
        writer.add_array("a.rois.npy", rois)
        writer.close()
    else:
        write_file(folder / "rois.npy", rois)
    took = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = (folder / ("shard.tar" if fmt == "shards" else "rois.npy")).stat().st_size
    print(
        f"{count:>8,} {fmt:>7} {save_dtype:>8} {'whole' if whole else 'chunked':>8} "
        f"{size / 2**30:9.2f} {before / 2**30:10.2f} "
        f"{peak / 2**30:9.2f} {(peak - before) / 2**30:11.2f} {(peak - before) / ROI_CHUNK_BYTES:7.2f} "
        f"{took:7.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, action="append", help="box count (repeatable)")
    parser.add_argument("--whole", action="store_true", help="make the whole array, then write it")
    parser.add_argument("--format", choices=("npy", "shards"), default="npy", help="the writer")
    parser.add_argument("--save-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = args.boxes or [20_000, 50_000, 100_000]
    if args.child:
        measure(counts[0], args.whole, Path(args.folder), args.format, args.save_dtype)
        return
    heads = f"{'boxes':>8} {'format':>7} {'dtype':>8} {'pooled':>8} {'file GiB':>9} {'before GiB':>10} "
    print(heads + f"{'peak GiB':>9} {'growth GiB':>11} {'chunks':>7} {'s':>7}")
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, __file__, "--child", "--folder", tmp, "--boxes", str(count)]
            command += ["--format", args.format, "--save-dtype", args.save_dtype]
            subprocess.run(command + (["--whole"] if args.whole else []), check=True)


if __name__ == "__main__":
    main()
