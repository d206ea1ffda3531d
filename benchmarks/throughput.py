"""Throughput of the extraction pipeline against the forward pass and the loop a user writes first.

    python benchmarks/throughput.py                    # resnet50 on examples/, CPU (CUDA if present)
    python benchmarks/throughput.py --small 4 --large 16 --arch seed
    python benchmarks/throughput.py --save-dtype float16 --out-dir /dev/shm   # where the time goes
    python benchmarks/throughput.py --dtype bfloat16 --size 800x1333          # the detection setting
    python benchmarks/throughput.py --format both --arch seed                 # shards against npy
    python benchmarks/throughput.py --device cuda --writers 1,4               # writer threads, side by side
    python benchmarks/throughput.py --save-dtype float16,int8 --cli-only      # save dtypes, side by side

On identical inputs (the example photos, repeated), one run prints images/s and ms/image for:

- cli:        the `fpn-extract` console script, steady state: the slope between a small and a large
              run, so start-up cancels; with each run's peak RSS. ``--format both`` runs it for
              npy and for shards, alternating on the same inputs, and prints shards / npy;
              ``--writers 1,4`` likewise runs it with each count of writer threads, and
              ``--save-dtype float16,int8`` with each save dtype (and prints their img/s ratio)
- forward:    the same model's bare forward (folded, channels-last, inference mode) on tensors
              already decoded and on the device; nothing else
- naive:      torchvision's resnet_fpn_backbone("resnet50"), batch 1, PIL decode, np.save per
              level, nothing overlapped
- torchvision forward vs ours, torchvision-style FPN with the same weights, and the largest
  relative difference of our outputs from the unoptimised model's

plus the forward's achieved GFLOP/s beside this machine's measured float32 matmul GFLOP/s, and
where the time goes (each stage alone, for each save dtype). ``--cli-only`` prints the CLI runs
and the bare forward only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from fpn_cli import build_fpn
from fpn_cli.inputs.images import IMAGE_EXTENSIONS, Resize, decode
from fpn_cli.models.preprocess import IMAGENET
from fpn_cli.run.engine import Engine, encode_finite, resolve_device

ROOT = Path(__file__).resolve().parents[1]
# runs the CLI in-process and prints its own peak RSS and CPU time, so each run's are its own
CLI_WITH_RSS = (
    "import resource, sys\n"
    "from fpn_cli.cli import main\n"
    "try:\n    main(sys.argv[1:])\n"
    "except SystemExit as e:\n    code = e.code\n"
    "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print('maxrss_kb', usage.ru_maxrss, 'cpu_s', usage.ru_utime + usage.ru_stime, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(folder: Path, count: int) -> list[Path]:
    sources = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        src = sources[i % len(sources)]
        paths.append(folder / f"{i:04d}{src.suffix}")
        shutil.copy(src, paths[-1])
    return paths


def run_cli(inputs: Path, out: Path, args: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, CPU seconds) of one `fpn-extract` process."""
    cmd = [sys.executable, "-c", CLI_WITH_RSS, str(inputs), "-o", str(out), "-q", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"fpn-extract failed: {proc.stderr}")
    fields = proc.stderr.split("maxrss_kb")[-1].split()
    return seconds, int(fields[0]) / 1024, float(fields[2])


def time_per_image(fn, items, device: torch.device, warmup: int = 1) -> float:
    for item in items[:warmup]:
        fn(item)
    sync(device)
    start = time.perf_counter()
    for item in items:
        fn(item)
    sync(device)
    return (time.perf_counter() - start) / len(items)


def naive_loop(paths: list[Path], out: Path, device: torch.device, size: tuple[int, int] | None) -> float:
    """What a user writes first: batch 1, PIL, torchvision's backbone, np.save, all in series."""
    model = resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval().to(device)

    def one(path: Path) -> None:
        image = Image.open(path).convert("RGB")
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        x = TF.normalize(TF.to_tensor(image), IMAGENET.mean, IMAGENET.std)[None].to(device)
        with torch.no_grad():
            feats = model(x)
        for name, level in zip(("p2", "p3", "p4", "p5"), ("0", "1", "2", "3"), strict=True):
            np.save(out / f"{path.stem}_{name}.npy", feats[level][0].cpu().numpy())

    out.mkdir()
    return time_per_image(one, paths, device)


def precision_error(engine: Engine, x: torch.Tensor) -> dict[str, float]:
    """Per level, max |autocast - float32| / max |float32|."""
    with torch.inference_mode():
        exact = engine.model(x)
        with torch.autocast(engine.device.type, engine.dtype):
            low = engine.model(x)
    return {k: float((low[k].float() - exact[k]).abs().max() / exact[k].abs().max()) for k in exact}


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def forward_flops(engine: Engine, batches: list[np.ndarray]) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        for batch in batches:
            engine.model(engine.preprocess(batch))
    return counter.get_total_flops()


def compare_with_torchvision(arch: str, x: torch.Tensor, device: torch.device) -> tuple[float, float, float]:
    """(torchvision s/image, ours s/image, max relative difference of ours from unoptimised)."""
    tv = resnet_fpn_backbone(backbone_name=arch, weights=None, trainable_layers=5).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(tv.state_dict(), Path(tmp) / "tv.pth")
        ours = build_fpn(arch=arch, weights=Path(tmp) / "tv.pth")  # selects the torchvision style
    tv = tv.to(device)
    engine = Engine(ours, device, "float32", "float32")
    batch = x.to(device)
    with torch.inference_mode(), engine._precision():  # float32: TF32 off on CUDA, for the comparison
        reference = ours.to(device)(batch)
        fast = engine.model(batch.contiguous(memory_format=engine.memory_format))
        diff = max(float((fast[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference)
        times = {"tv": [], "ours": []}
        for _ in range(3):  # interleaved, so drift in the machine's speed hits both alike
            times["tv"].append(time_per_image(lambda b: tv(b), [batch] * 2, device))
            cl = batch.contiguous(memory_format=engine.memory_format)
            times["ours"].append(time_per_image(lambda b: engine.model(b), [cl] * 2, device))
    return min(times["tv"]), min(times["ours"]), diff


def stage_breakdown(
    paths: list[Path], resize: Resize, engine: Engine, out: Path, batch_size: int
) -> dict[str, float]:
    """ms/image of each stage alone, one after the other on the same images: decode (one thread),
    copy to the device, forward, copy back (to the save dtype), write the .npy files, and write
    the same arrays into tar shards (--format shards; the one stage where the formats differ)."""
    from fpn_cli.formats.npy import Store
    from fpn_cli.formats.shards import ShardStore

    device = engine.device
    start = time.perf_counter()
    decoded = [decode(p, resize)[0] for p in paths]
    times = {"decode (1 thread)": time.perf_counter() - start}
    sizes: dict[tuple, list[np.ndarray]] = {}
    for rgb in decoded:
        sizes.setdefault(rgb.shape, []).append(rgb)
    batches = [
        np.stack(group[i : i + batch_size])
        for group in sizes.values()
        for i in range(0, len(group), batch_size)
    ]
    engine(batches[0])  # warm-up
    sync(device)
    stages = {"copy to device": 0.0, "forward": 0.0, "copy back": 0.0, "write npy": 0.0, "write shards": 0.0}
    save_dtype = engine.save_dtype_name
    store = Store(out / "npy", ("p2", "p3", "p4", "p5"), save_dtype)
    shards = ShardStore(out / "shards", ("p2", "p3", "p4", "p5"), save_dtype)
    shards.folder.makedirs("shards/.index")
    n = 0
    with torch.inference_mode():
        for batch in batches:
            t0 = time.perf_counter()
            x = torch.from_numpy(batch)
            x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
            sync(device)
            t1 = time.perf_counter()
            x = torch.addcmul(engine.shift, x.permute(0, 3, 1, 2).float(), engine.scale)
            with engine._precision():
                feats = engine.model(x.contiguous(memory_format=engine.memory_format))
            sync(device)
            t2 = time.perf_counter()
            # the Engine's own conversion to the save dtype, on the device (codecs.encode)
            host = {k: v.contiguous() for k, v in encode_finite(feats, save_dtype).items()}
            host = {k: v.to("cpu", non_blocking=True) for k, v in host.items()}
            sync(device)
            host = {k: v.numpy() for k, v in host.items()}
            t3 = time.perf_counter()
            written = {}
            # the formats take turns going first, so neither always follows the other's writes
            order = ("write shards", "write npy") if (n // batch_size) % 2 else ("write npy", "write shards")
            for stage in order:
                start = time.perf_counter()
                for i in range(len(batch)):
                    key, arrays = f"im{n + i}", {k: v[i] for k, v in host.items()}
                    if stage == "write npy":
                        store.write_levels(key, arrays)
                    else:
                        shards.write_levels(key, arrays)
                        shards.finish_image(key, None, {"path": f"{key}.png", "status": "ok"})
                written[stage] = time.perf_counter() - start
            n += len(batch)
            timed = {"copy to device": t1 - t0, "forward": t2 - t1, "copy back": t3 - t2, **written}
            for name, dt in timed.items():
                stages[name] += dt
    t6 = time.perf_counter()
    shards.flush()  # the last shard's close, counted with its writes
    stages["write shards"] += time.perf_counter() - t6
    times.update(stages)
    bytes_per_image = sum(v[0].nbytes for v in host.values())
    return {k: 1000 * v / len(paths) for k, v in times.items()} | {"MB per image": bytes_per_image / 1e6}


def row(name: str, seconds: float) -> str:
    return f"{name:<34}{1 / seconds:8.2f} img/s {seconds * 1000:9.1f} ms/image"


def print_cli_rows(
    steady: dict[str, tuple[float, float, float]], cpu: dict[str, float], bare: float | None
) -> None:
    """Each CLI variant's images/s and CPU ms per image; with ``bare``, also its ratio to the bare
    forward's seconds per image."""
    for v, (seconds, _, _) in steady.items():
        print(row(f"cli pipeline, --format {v}", seconds) + f"  ({cpu[v] * 1000:.1f} ms of CPU)")
        if bare is not None:
            print(f"{'  cli / bare forward':<34}{bare / seconds:8.3f}")


def print_save_dtype_ratios(
    steady: dict[str, tuple[float, float, float]], prefix: str, save_dtypes: list[str]
) -> None:
    """Each later save dtype's images/s over the first's, among the variants labelled ``prefix``
    (issue 22: int8 / float16, goal >= 1.8 where the disk is what limits)."""
    if len(save_dtypes) < 2:
        return
    base = steady[f"{prefix}, --save-dtype {save_dtypes[0]}"][0]
    for d in save_dtypes[1:]:
        ratio = base / steady[f"{prefix}, --save-dtype {d}"][0]
        print(f"{f'{d} / {save_dtypes[0]} throughput':<34}{ratio:8.3f}   (img/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--small", type=int, default=8, help="images in the small CLI run")
    parser.add_argument("--large", type=int, default=48, help="images in the large CLI run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--save-dtype", default="float32", help="the CLI's --save-dtype; a comma list runs each, side by side"
    )
    parser.add_argument(
        "--cli-only",
        action="store_true",
        help="only the CLI runs and the bare forward (no naive loop, "
        "torchvision comparison, FLOP count or stage breakdown)",
    )
    parser.add_argument("--out-dir", default=None, help="where the CLI writes (default: a temporary folder)")
    parser.add_argument("--size", default=None, help="HxW: resize every image, e.g. 800x1333")
    parser.add_argument("--batch-size", type=int, default=None, help="for the CLI runs and the breakdown")
    parser.add_argument(
        "--format",
        choices=("npy", "shards", "both"),
        default="npy",
        help="the CLI's --format; both: side by side",
    )
    parser.add_argument(
        "--writers", default=None, help="the CLI's --writers; a comma list runs each, side by side"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="CLI runs per format and size (the fastest counts)"
    )
    args = parser.parse_args()
    resize = Resize(size=tuple(int(v) for v in args.size.split("x"))) if args.size else Resize()
    device = resolve_device(args.device)
    common = ["--arch", args.arch, "--device", str(device), "--dtype", args.dtype]
    common += ["--size", args.size] if args.size else []
    common += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    save_dtypes = args.save_dtype.split(",")
    where = args.out_dir or tempfile.gettempdir()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, arch {args.arch}, "
          f"dtype {args.dtype}, save dtype {args.save_dtype}, CLI writes to {where}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = tmp / "small", tmp / "large"
        make_inputs(small, args.small)
        paths = make_inputs(large, args.large)
        outs = Path(tempfile.mkdtemp(dir=args.out_dir)) if args.out_dir else tmp
        formats = ("npy", "shards") if args.format == "both" else (args.format,)
        writers = args.writers.split(",") if args.writers else [None]
        # one CLI variant per format, writer count and save dtype: its label and its extra arguments
        variants = {
            f
            + (f", --writers {w}" if w and len(writers) > 1 else "")
            + (f", --save-dtype {d}" if len(save_dtypes) > 1 else ""): ["--format", f, "--save-dtype", d]
            + (["--writers", w] if w else [])
            for f in formats
            for w in writers
            for d in save_dtypes
        }
        first = formats[0] + (f", --writers {writers[0]}" if writers[0] and len(writers) > 1 else "")
        runs = {(v, n): [] for v in variants for n in ("small", "large")}
        for repeat in range(args.repeats):
            for n, folder in (("small", small), ("large", large)):
                for i, (v, extra) in enumerate(variants.items()):  # alternating: drift hits all alike
                    out = outs / f"out_{i}_{n}_{repeat}"
                    runs[v, n].append(run_cli(folder, out, [*common, *extra]))
                    shutil.rmtree(out)
        if args.out_dir:
            shutil.rmtree(outs)
        steady, cpu = {}, {}
        for v in variants:
            t_small, rss_small, _ = min(runs[v, "small"])
            t_large, rss_large, _ = min(runs[v, "large"])
            steady[v] = (t_large - t_small) / (args.large - args.small), rss_small, rss_large
            # CPU seconds an image: what other processes on a shared machine barely move
            cpu[v] = (min(r[2] for r in runs[v, "large"]) - min(r[2] for r in runs[v, "small"])) / (
                args.large - args.small
            )
            if steady[v][0] <= 0:
                raise SystemExit(
                    "the large run was not slower than the small one: start-up noise; raise --large"
                )
        cli, rss_small, rss_large = next(iter(steady.values()))

        engine = Engine(build_fpn(arch=args.arch), device, args.dtype, "float32")
        batches = [np.stack([decode(p, resize)[0]]) for p in paths]
        tensors = [engine.preprocess(b) for b in batches]

        def forward(x: torch.Tensor) -> None:
            with torch.inference_mode(), torch.autocast(device.type, engine.dtype, enabled=engine.autocast):
                engine.model(x)

        bare = time_per_image(forward, tensors, device)
        if args.cli_only:
            print_cli_rows(steady, cpu, bare)
            print_save_dtype_ratios(steady, first, save_dtypes)
            print(row("bare forward (same model)", bare))
            return
        dtype_error = precision_error(engine, tensors[0]) if engine.autocast else None
        naive = naive_loop(paths[: max(8, args.small)], tmp / "naive", device, resize.size)
        flops = forward_flops(engine, batches) / len(batches)
        breakdowns = {
            d: stage_breakdown(
                paths, resize, Engine(build_fpn(arch=args.arch), device, args.dtype, d),
                tmp / f"stages-{d}", args.batch_size or (8 if device.type != "cpu" else 1),
            )
            for d in save_dtypes
        }  # fmt: skip

    x = tensors[0].float().contiguous()
    tv_s, ours_s, diff = compare_with_torchvision(args.arch if args.arch != "seed" else "resnet50", x, device)
    peak = matmul_gflops(device, engine.dtype)

    print_cli_rows(steady, cpu, None)
    if "npy" in steady and "shards" in steady:
        print(f"{'shards / npy throughput':<34}{steady['npy'][0] / steady['shards'][0]:8.3f}   (goal >= 1.0)")
        print(f"{'shards / npy, by CPU time':<34}{cpu['npy'] / cpu['shards']:8.3f}   (steadier when shared)")
    if len(writers) > 1:
        base = steady[f"{formats[0]}, --writers {writers[0]}"][0]
        for w in writers[1:]:
            ratio = base / steady[f"{formats[0]}, --writers {w}"][0]
            print(f"{f'--writers {w} / --writers {writers[0]}':<34}{ratio:8.3f}   (throughput)")
    print_save_dtype_ratios(steady, first, save_dtypes)
    print(row("bare forward (same model)", bare))
    print(row("naive loop (torchvision, np.save)", naive))
    if dtype_error is not None:
        print(f"{args.dtype} error, max |diff| / max |float32| per level: "
              + ", ".join(f"{k} {v:.2e}" for k, v in dtype_error.items()))  # fmt: skip
    print(f"{'cli / bare forward':<34}{bare / cli:8.3f}   (goal >= 0.95)")
    print(f"{'cli / naive loop':<34}{naive / cli:8.3f}   (goal >= 1.2)")
    print(f"torchvision-style FPN, one {x.shape[2]}x{x.shape[3]} image, same weights:")
    print(row("  torchvision BackboneWithFPN", tv_s))
    print(row("  ours (folded, channels-last)", ours_s))
    print(f"{'  ours / torchvision':<34}{tv_s / ours_s:8.3f}   (goal >= 1.1)")
    print(f"{'  max relative diff vs unoptimised':<34}{diff:10.2e} (goal <= 1e-4)")
    for f, (_, rss_small, rss_large) in steady.items():
        print(f"peak RSS, --format {f}: {args.small} images {rss_small:.0f} MiB, {args.large} images "
              f"{rss_large:.0f} MiB, ratio {rss_large / rss_small:.3f} (goal <= 1.15)")  # fmt: skip
    achieved = flops / bare / 1e9
    print(f"forward: {flops / 1e9:.1f} GFLOP/image, {achieved:.1f} GFLOP/s achieved; {args.dtype} "
          f"matmul on this machine {peak:.1f} GFLOP/s ({achieved / peak:.0%} of it)")  # fmt: skip
    for d, breakdown in breakdowns.items():
        print(f"where the time goes, --save-dtype {d}, each stage alone (ms/image): " + ", ".join(
            f"{k} {v:.1f}" for k, v in breakdown.items() if k != "MB per image"))  # fmt: skip
        print(f"bytes written per image, --save-dtype {d}: {breakdown['MB per image']:.1f} MB")
    print(f"cores {os.cpu_count()}")
    if device.type == "cuda":
        print(f"gpu {torch.cuda.get_device_name(device)}")


if __name__ == "__main__":
    main()
