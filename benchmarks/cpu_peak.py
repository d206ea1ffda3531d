"""How close the CPU forward runs to this machine's convolution peak, and what the usual speed-ups buy.

    python benchmarks/cpu_peak.py                 # resnet50 FPN, 512x512, float32
    python benchmarks/cpu_peak.py --dtype bfloat16

Prints, measured side by side in one run:

- the CPU (model, vector width from its flags, clock) and the threads torch uses;
- the reference peak: a GEMM-shaped 1x1 convolution through oneDNN (channels-last, large enough to
  be compute-bound), beside a plain ``a @ b`` (which may take another library's code path);
- the forward's achieved GFLOP/s (counted as direct convolution) as a fraction of that peak;
- ``torch.compile`` with freezing (weights constant-folded and prepacked once) against eager, after
  its compile time;
- batch 4 against batch 1, per image.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from timing import best_of
from torch.utils.flop_counter import FlopCounterMode

from fpn_cli import build_fpn
from fpn_cli.run.engine import Engine


def cpu_description() -> str:
    model, flags, mhz = platform.processor(), set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "cpu MHz" and mhz is None:
                    mhz = float(value)
    except OSError:
        pass
    width = "512-bit (AVX-512)" if "avx512f" in flags else "256-bit (AVX2)" if "avx2" in flags else "?"
    extras = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni") if f in flags]
    clock = f"{mhz / 1000:.2f} GHz reported" if mhz else "clock unknown"
    return f"{model}; vectors {width}{', ' + ', '.join(extras) if extras else ''}; {clock}"


def conv1x1_gflops(dtype: torch.dtype, channels: int = 1024, side: int = 64) -> float:
    """A 1x1 conv is a GEMM (side*side x channels) @ (channels x channels), run by oneDNN."""
    conv = torch.nn.Conv2d(channels, channels, 1, bias=False).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, channels, side, side).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        seconds = best_of(lambda: conv(x))
    return 2 * side * side * channels * channels / seconds / 1e9


def matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_of(lambda: a @ b) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"cpu: {cpu_description()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")

    peak = conv1x1_gflops(dtype)
    mm = matmul_gflops(dtype)
    print(f"oneDNN 1x1 conv (GEMM-shaped) {peak:8.1f} GFLOP/s  <- the reference peak")
    print(f"a @ b                         {mm:8.1f} GFLOP/s  ({mm / peak:.2f} of it)")

    engine = Engine(
        build_fpn(arch=args.arch, fpn_style="torchvision"), torch.device("cpu"), args.dtype, "float32"
    )
    x1 = torch.randn(1, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    x4 = torch.randn(4, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        engine.model(x1)
    flops = counter.get_total_flops()

    def eager(x):
        with torch.inference_mode(), engine._precision():
            return engine.model(x)

    one = best_of(lambda: eager(x1), 3)
    four = best_of(lambda: eager(x4), 2) / 4
    achieved = flops / one / 1e9
    print(f"forward {args.arch} {args.size}x{args.size}: {flops / 1e9:.1f} GFLOP, {one * 1000:.0f} ms, "
          f"{achieved:.0f} GFLOP/s = {achieved / peak:.2f} of the oneDNN peak")  # fmt: skip
    print(f"batch 4 per image / batch 1      {four / one:6.2f}  ({four * 1000:.0f} vs {one * 1000:.0f} ms)")

    if not args.no_compile:
        import torch._inductor.config as inductor

        inductor.freezing = True  # constant-fold and prepack the weights once, not on every call
        compiled = torch.compile(engine.model)
        with torch.inference_mode(), engine._precision():
            start = time.perf_counter()
            compiled(x1)
            compile_s = time.perf_counter() - start
            fast = best_of(lambda: compiled(x1), 3)
        print(f"torch.compile (freezing) / eager {one / fast:6.2f}x faster ({fast * 1000:.0f} vs "
              f"{one * 1000:.0f} ms), after {compile_s:.0f} s of compiling per input size")  # fmt: skip


if __name__ == "__main__":
    main()
