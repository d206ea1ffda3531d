"""Save dtypes side by side: bytes per image, error against float32, conversion cost, compression.

    python benchmarks/savedtypes.py                    # seed arch, examples/ at 800x1333, CPU
    python benchmarks/savedtypes.py --arch resnet50 --images 2

For one 800x1333 image's resnet50 P2-P5 (shapes computed, nothing run) it prints the stored bytes of
each save dtype. It then runs the float32 network (random weights, ``--seed``) on the example photos
resized to ``--size`` and, on those real features, prints for each save dtype and level:

- the error of the decoded float32 against the float32 features: max and RMS, relative to the
  level's largest value, and for int8 also in steps (|error| / the channel's scale, bound 0.5
  plus float32 rounding) and how many codes differ from the exactly rounded quotient's;
- the error of what a run derives from the stored levels, against the same from float32: pooled
  vectors (``--pool avg`` and ``max``) and RoI features of ``--boxes`` random boxes per image;
- the conversion's cost on the CPU (``codecs.encode`` of the whole pyramid, channels-last as the
  Engine holds it, best of ``--repeats``), and its ratio to float16's, on those features and on
  random ones of the same P2-P5 shapes at batch 1 and 4 (int8/float16 and bfloat16/float16 side by
  side, measured in the same rounds); ``--threads N`` sets torch's CPU threads, ``--cpu-time`` times
  in the thread's CPU time (with ``--threads 1``: steady figures on a shared machine);
- whether lossless compression pays on the stored bytes: zlib (levels 1 and 6, stdlib), and
  zstd, alone and after a byte shuffle, where the ``zstandard`` package is installed (the
  ``bench`` extra), as ratio (stored / compressed) and MB/s; ``--compression-only`` prints only
  these (and the bytes per image).
"""

from __future__ import annotations

import argparse
import math
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from timing import best_of

from fpn_cli import build_fpn
from fpn_cli.formats import codecs
from fpn_cli.formats.codecs import SAVE_DTYPES, decode, encode, stored_bytes
from fpn_cli.inputs.images import Resize
from fpn_cli.inputs.images import decode as decode_image
from fpn_cli.regions.pooling import RoiSpec, pooled, roi_features
from fpn_cli.run.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


def pyramid_shapes(height: int, width: int, channels: int = 256) -> dict[str, tuple[int, int, int]]:
    """P2-P5 of an FPN for one height x width image: (channels, ceil(H / s), ceil(W / s))."""
    return {k: (channels, math.ceil(height / s), math.ceil(width / s)) for k, s in STRIDES.items()}


def features(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """The float32 levels {level: (1, C, h, w)} of each example photo, channels last."""
    engine = Engine(build_fpn(arch=args.arch, seed=args.seed), torch.device("cpu"), "float32", "float32")
    paths = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".jpg", ".png"))[: args.images]
    resize = Resize(size=tuple(int(v) for v in args.size.split("x")))
    out = []
    for path in paths:
        rgb, _ = decode_image(path, resize)
        feats, _ = engine(rgb[None].copy())  # decode returns a read-only array
        out.append(feats)
    return out


def errors(
    feats: list[dict[str, torch.Tensor]], save_dtype: str
) -> dict[str, tuple[float, float, float, int, int]]:
    """{level: (max |error| / level's max, RMS error / level's max, max |error| in int8 steps, int8
    codes that differ from the exactly rounded quotient (a float64 quotient), values)}."""
    result = {}
    for level in STRIDES:
        worst = rms = steps = 0.0
        differ = values = 0
        for image in feats:
            x = image[level]
            stored = encode(level, x, save_dtype)
            scale = stored.get(f"{level}_scale")
            scale_np = None if scale is None else scale.numpy()
            decoded = decode(save_dtype, stored[level].numpy(), scale_np).astype(np.float64)
            error = np.abs(decoded - x.double().numpy())
            peak = float(x.abs().max())
            worst = max(worst, float(error.max()) / peak)
            rms = max(rms, float(np.sqrt((error**2).mean())) / peak)
            if scale_np is not None:
                step = np.where(scale_np > 0, scale_np, np.inf).astype(np.float64)
                steps = max(steps, float((error.max(axis=(2, 3)) / step).max()))
                exact = np.rint(x.double().numpy() / step[..., None, None])  # float64: exactly rounded
                differ += int((exact != stored[level].numpy()).sum())
                values += exact.size
        result[level] = (worst, rms, steps, differ, values)
    return result


def derived_errors(
    feats: list[dict[str, torch.Tensor]], save_dtype: str, boxes: int
) -> dict[str, tuple[float, float, float]]:
    """{"avg"/"max"/"rois": (max |error| / largest |value|, RMS error / largest |value|, for int8
    the max |error| in steps of the channel's scale (RoI features: of its largest over P2-P5))} of
    what a run derives from the stored levels (decoded on the host, then pooled, then stored in
    codecs.derived_dtype) against the same derived from the float32 levels. RoI features of
    ``boxes`` random boxes per image (sides of 8 to 600 pixels), torchvision's MultiScaleRoIAlign
    7x7 over P2-P5 (regions/pooling.py)."""
    derived_dtype = codecs.derived_dtype(save_dtype)
    spec = RoiSpec()
    rng = np.random.default_rng(0)
    worst = {name: [0.0, 0.0, 0.0] for name in ("avg", "max", "rois")}

    def account(name: str, got: np.ndarray, want: np.ndarray, steps_of: np.ndarray | None) -> None:
        error = np.abs(got.astype(np.float64) - want.astype(np.float64))
        peak = float(np.abs(want).max())
        entry = worst[name]
        entry[0] = max(entry[0], float(error.max()) / peak)
        entry[1] = max(entry[1], float(np.sqrt((error**2).mean())) / peak)
        if steps_of is not None:
            entry[2] = max(entry[2], float((error / steps_of).max()))

    for image in feats:
        exact = {level: np.ascontiguousarray(x[0].numpy()) for level, x in image.items()}
        decoded, scales = {}, {}
        for level, x in image.items():
            stored = {name: v[0].numpy() for name, v in encode(level, x, save_dtype).items()}
            scales[level] = stored.get(codecs.scale_name(level))
            decoded[level] = codecs.decode(save_dtype, stored[level], scales[level])
        int8 = save_dtype == "int8"
        for level in exact:
            step = np.where(scales[level] > 0, scales[level], np.inf) if int8 else None
            for kind in ("avg", "max"):
                got = pooled(decoded[level], kind).astype(derived_dtype)
                account(kind, got, pooled(exact[level], kind), step)
        height, width = (4 * s for s in exact["p2"].shape[1:])
        sides = rng.uniform(8, 600, size=(boxes, 2))
        x1 = rng.uniform(0, np.maximum(width - sides[:, 0], 1))
        y1 = rng.uniform(0, np.maximum(height - sides[:, 1], 1))
        box = np.stack([x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], axis=1).astype(np.float32)
        want = roi_features(exact, box, spec)
        got = roi_features(decoded, box, spec).astype(derived_dtype)
        step = None
        if int8:
            largest = np.max([scales[level] for level in spec.levels], axis=0)
            step = np.where(largest > 0, largest, np.inf)[None, :, None, None]
        account("rois", got, want, step)
    return {name: tuple(entry) for name, entry in worst.items()}


def conversion_cost(image: dict[str, torch.Tensor], repeats: int, cpu_time: bool = False) -> dict[str, float]:
    """{save dtype: fastest seconds to encode ``image``'s levels}, the dtypes taking turns in each of
    ``repeats`` rounds so that a busy machine's drift hits all alike; with ``cpu_time`` the CPU time
    of this thread (steady on a shared machine, meaningful with ``--threads 1``), else wall time."""
    best = dict.fromkeys(SAVE_DTYPES, math.inf)
    for _ in range(repeats):
        for save_dtype in SAVE_DTYPES:
            convert = lambda s=save_dtype: [encode(k, v, s) for k, v in image.items()]  # noqa: E731
            if cpu_time:
                convert()
                start = time.thread_time()
                convert()
                seconds = time.thread_time() - start
            else:
                seconds = best_of(convert, 1)
            best[save_dtype] = min(best[save_dtype], seconds)
    return best


def synthetic_pyramid(batch: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """Random float32 P2-P5 {level: (batch, 256, ceil(H / s), ceil(W / s))}, channels last."""
    generator = torch.Generator().manual_seed(0)
    return {
        level: torch.randn((batch, *shape), generator=generator).contiguous(memory_format=torch.channels_last)
        for level, shape in pyramid_shapes(height, width).items()
    }


def print_cost(cost: dict[str, float]) -> None:
    for save_dtype, seconds in cost.items():
        print(f"  {save_dtype:9s} {1000 * seconds:8.1f} ms   {seconds / cost['float16']:5.2f} x float16's")


def compression(feats: list[dict[str, torch.Tensor]], save_dtype: str) -> dict[str, tuple[float, float]]:
    """{codec: (stored bytes / compressed bytes, MB/s of stored bytes)} over every image's arrays.
    With ``zstandard``, also zstd (levels 1 and 3), and for dtypes of more than one byte zstd
    after a byte shuffle (each array's first bytes of every value, then their second bytes: what
    Blosc and HDF5's shuffle filter do, and what gains on floats; the shuffle's time counted)."""
    arrays = [
        np.ascontiguousarray(v[0].numpy())
        for image in feats
        for level, x in image.items()
        for v in encode(level, x, save_dtype).values()
    ]
    total = sum(a.nbytes for a in arrays)
    compressors = {"zlib-1": lambda a: zlib.compress(a, 1), "zlib-6": lambda a: zlib.compress(a, 6)}
    try:
        import zstandard
    except ImportError:
        zstandard = None
    for level in (1, 3) if zstandard is not None else ():
        zstd = zstandard.ZstdCompressor(level=level).compress
        compressors[f"zstd-{level}"] = zstd
        if codecs.code_dtype(save_dtype).itemsize > 1:
            compressors[f"shuffle+zstd-{level}"] = lambda a, zstd=zstd: zstd(byte_shuffle(a))
    result = {}
    for name, compress in compressors.items():
        start = time.perf_counter()
        packed = sum(len(compress(a)) for a in arrays)
        result[name] = (total / packed, total / 1e6 / (time.perf_counter() - start))
    return result


def byte_shuffle(array: np.ndarray) -> bytes:
    """The bytes of ``array`` grouped by their place in a value: every value's byte 0, then byte 1..."""
    return array.view(np.uint8).reshape(-1, array.itemsize).T.tobytes()


def accuracy_and_cost(args: argparse.Namespace, feats: list[dict[str, torch.Tensor]]) -> None:
    """Prints the errors against float32, of the levels and of what a run derives, and the
    conversion's cost on the CPU."""
    print(f"\nerror vs float32: {args.arch}, random weights (seed {args.seed}), {len(feats)} example photos "
          f"at {args.size};\nrelative to each level's largest value (max / RMS), int8 also in steps "
          "(bound 0.5, plus float32 rounding: the quotient's and the decode's) and the codes that differ "
          "from the exactly rounded quotient")  # fmt: skip
    for save_dtype in SAVE_DTYPES[1:]:
        for level, (worst, rms, steps, differ, values) in errors(feats, save_dtype).items():
            extra = f"   max {steps:.6f} steps, {differ} of {values} codes" if save_dtype == "int8" else ""
            print(f"  {save_dtype:9s} {level}   max {worst:.2e}   RMS {rms:.2e}{extra}")

    print(f"\nerror of what a run derives from the stored levels (--pool avg/max, {args.boxes} random "
          "RoIs per image, 7x7 over P2-P5), against the same from float32, relative to the largest "
          "value; int8 also in steps (bound 0.5)")  # fmt: skip
    for save_dtype in SAVE_DTYPES[1:]:
        for name, (worst, rms, steps) in derived_errors(feats, save_dtype, args.boxes).items():
            extra = f"   max {steps:.6f} steps" if save_dtype == "int8" else ""
            print(f"  {save_dtype:9s} {name:5s}  max {worst:.2e}   RMS {rms:.2e}{extra}")

    print(f"\nconversion on the CPU ({torch.get_num_threads()} threads), one image's P2-P5 at {args.size}, "
          f"best of {args.repeats}:")  # fmt: skip
    print_cost(conversion_cost(feats[0], args.repeats, args.cpu_time))
    height, width = (int(v) for v in args.size.split("x"))
    for batch in (1, 4):
        print(f"random P2-P5 of {batch} x {args.size}, channels last, best of {args.repeats}:")
        print_cost(conversion_cost(synthetic_pyramid(batch, height, width), args.repeats, args.cpu_time))


def print_compression(feats: list[dict[str, torch.Tensor]]) -> None:
    print("\nlossless compression of the stored bytes (stored / compressed, MB/s of stored bytes):")
    for save_dtype in ("float16", "bfloat16", "int8"):
        measured = compression(feats, save_dtype)
        for name, (ratio, speed) in measured.items():
            print(f"  {save_dtype:9s} {name:14s} {ratio:6.3f} x   {speed:7.1f} MB/s")
    if "zstd-1" not in measured:
        print("  (zstd: the zstandard package is not installed here; pip install -e '.[bench]')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="800x1333", help="HxW the example photos are resized to")
    parser.add_argument("--images", type=int, default=5, help="example photos used (at most 5)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--boxes", type=int, default=200, help="random RoIs per image")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: its own)")
    parser.add_argument("--cpu-time", action="store_true", help="time conversions in this thread's CPU time")
    parser.add_argument("--compression-only", action="store_true", help="only the compression figures")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    shapes = pyramid_shapes(800, 1333)
    print("bytes per image, 800x1333 resnet50 P2-P5 (arrays only, no .npy headers):")
    base = stored_bytes("float32", shapes)
    for save_dtype in SAVE_DTYPES:
        size = stored_bytes(save_dtype, shapes)
        print(f"  {save_dtype:9s} {size / 1e6:8.2f} MB   {size / base:.4f} of float32")

    feats = features(args)
    if not args.compression_only:
        accuracy_and_cost(args, feats)
    print_compression(feats)


if __name__ == "__main__":
    main()
