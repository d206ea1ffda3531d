"""What the detector's heads cost beside the FPN's forward, on the CPU.

    python benchmarks/detect.py                        # fasterrcnn_resnet50_fpn, 480x640, batch 1
    python benchmarks/detect.py --size 800x1088 --threads 2

Prints, measured side by side in one run (best of --repeats, after one untimed call):

- the FPN's forward (our torchvision-style ResNet-50 FPN, P2-P6);
- the heads (RPN, RoIHeads, rescaling, and the box head again at the final boxes for ``vectors``
  and ``rois``) with the detector's defaults (score > 0.05, at most 100);
- the heads in the fixed-count mode (10 to 100 boxes), which runs the per-class NMS over every
  candidate, the worst case;
- each as a ratio of the FPN's time.

Both networks have random weights (no download): the heads then keep few boxes at 0.05, as a trained
detector does on most images, and the fixed-count mode bounds the cost from above. The input is
taken as the network's input (no resize); a size that is not a multiple of 32 is padded, as the
detector's transform pads.
"""

from __future__ import annotations

import argparse
import math

import torch
from timing import best_of
from torchvision.models import get_model

from fpn_cli import build_fpn
from fpn_cli.regions.detect import DetectionHeads, DetectOptions

BUILDER = "fasterrcnn_resnet50_fpn"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="480x640", help="network input HxW")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))
    padded = (math.ceil(h / 32) * 32, math.ceil(w / 32) * 32)

    torch.manual_seed(0)
    fpn = build_fpn(arch="resnet50", fpn_style="torchvision", levels="p2,p3,p4,p5,p6")
    state = get_model(BUILDER, weights=None, weights_backbone=None).state_dict()
    heads = {
        "heads, defaults": DetectionHeads(BUILDER, state),
        "heads, 10 to 100 boxes": DetectionHeads(BUILDER, state, DetectOptions(min_detections=10)),
    }
    x = torch.zeros(args.batch, 3, *padded)
    x[:, :, :h, :w] = torch.randn(args.batch, 3, h, w)
    sizes = [(h, w)] * args.batch

    with torch.no_grad():
        levels = fpn(x)
        fpn_s = best_of(lambda: fpn(x), args.repeats)
        print(f"{BUILDER} on the CPU ({torch.get_num_threads()} threads), {h}x{w}, batch {args.batch}")
        print(f"{'FPN forward':<26}{fpn_s * 1000:9.1f} ms   1.00x")
        for name, module in heads.items():
            seconds = best_of(lambda m=module: m(levels, sizes, sizes), args.repeats)
            count = sum(len(d) for d in module(levels, sizes, sizes)) / args.batch
            ratio = seconds / fpn_s
            print(f"{name:<26}{seconds * 1000:9.1f} ms   {ratio:.2f}x   ({count:.0f} boxes per image)")


if __name__ == "__main__":
    main()
