"""How fast fpn-extract finds its inputs: 10,000 images in nested folders.

    python benchmarks/listing.py [--count 10000]

Prints the time of `find_images` (what every run does first) beside `os.walk` over the same tree
(a plain listing, the floor), per thousand images. The files are empty: listing never opens them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from timing import best_of

from fpn_cli.inputs.images import find_images


def make_tree(root: Path, count: int) -> None:
    """``count`` files spread over three levels of folders, with a few non-images among them."""
    for i in range(count):
        folder = root / f"set{i % 10}" / f"day{i % 37:02d}" / f"cam{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:06d}.{'JPG' if i % 5 == 0 else 'png'}").touch()
        if i % 100 == 0:
            (folder / f"notes{i}.txt").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tree(root, args.count)
        found = find_images([root])
        assert len(found) == args.count, len(found)
        ours = best_of(lambda: find_images([root]), warmup=False)
        floor = best_of(lambda: sum(len(files) for _, _, files in os.walk(root)), warmup=False)
    per_k = 1000 / args.count
    print(f"images listed:            {args.count}")
    for name, seconds in (("find_images:", ours), ("os.walk (plain listing):", floor)):
        print(f"{name:<26}{seconds * 1000:8.1f} ms  ({seconds * 1000 * per_k:.2f} ms per 1000 images)")
    print(f"ratio find_images/os.walk: {ours / floor:.2f}")


if __name__ == "__main__":
    main()
