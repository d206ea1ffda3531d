"""JPEG decoding: Pillow on the CPU (what fpn-extract does) against nvJPEG on the GPU.

    python benchmarks/decode.py                 # CUDA needed for the nvJPEG column
    python benchmarks/decode.py --side 1333     # photos of this longer side

Decodes the same JPEGs (the example photos, rescaled and re-encoded at quality 90, repeated) and
prints ms/image for Pillow on one thread, Pillow on a pool of threads, and
``torchvision.io.decode_jpeg(device="cuda")`` in batches, with the largest pixel difference.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fpn_cli.inputs.images import Resize, decode

ROOT = Path(__file__).resolve().parents[1]


def make_jpegs(side: int, count: int, folder: Path) -> list[Path]:
    sources = sorted((ROOT / "examples").glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        scale = side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        path = folder / f"{i:04d}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1333)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--folder", default="/tmp/fpn-decode-bench")
    args = parser.parse_args()
    paths = make_jpegs(args.side, args.count, Path(args.folder))

    start = time.perf_counter()
    pil = [decode(p, Resize())[0] for p in paths]
    one = (time.perf_counter() - start) / len(paths)
    with ThreadPoolExecutor(args.workers) as pool:
        start = time.perf_counter()
        list(pool.map(lambda p: decode(p, Resize()), paths))
        pooled = (time.perf_counter() - start) / len(paths)
    print(f"Pillow, 1 thread          {1000 * one:7.2f} ms/image")
    print(f"Pillow, {args.workers} threads         {1000 * pooled:7.2f} ms/image")
    if not torch.cuda.is_available():
        print("nvJPEG: no CUDA GPU here")
        return
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    decode_jpeg(data[:8], device="cuda")  # warm-up: nvJPEG's handles
    torch.cuda.synchronize()
    start = time.perf_counter()
    gpu = []
    for i in range(0, len(data), 16):
        gpu += decode_jpeg(data[i : i + 16], device="cuda")
    torch.cuda.synchronize()
    nv = (time.perf_counter() - start) / len(paths)
    diff = max(
        int(np.abs(g.permute(1, 2, 0).cpu().numpy().astype(int) - p).max())
        for g, p in zip(gpu, pil, strict=True)
    )
    print(
        f"nvJPEG, batches of 16     {1000 * nv:7.2f} ms/image  (largest pixel difference from Pillow {diff})"
    )
    print(f"nvJPEG / Pillow {args.workers} threads  {pooled / nv:7.2f}x")


if __name__ == "__main__":
    main()
