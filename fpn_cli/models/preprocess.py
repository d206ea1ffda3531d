"""What a model expects of its input pixels: channel order, scale, mean and standard deviation.

Each framework states these in its own units, and they are kept as stated: torchvision divides
8-bit pixels by 255 and uses the ImageNet statistics in [0, 1]; detectron2 and mmdetection use
0-255 pixels, often in BGR order. The engine applies ``(pixel / scale - mean) / std`` per channel,
in ``channel_order``, as one multiply-add on the device.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocess:
    mean: tuple[float, float, float]  # per channel, in ``channel_order``, in units of pixel / scale
    std: tuple[float, float, float]
    channel_order: str = "RGB"  # or "BGR" (detectron2, mmdetection's caffe-style models)
    scale: float = 255.0  # 8-bit pixels are divided by this first: 255 gives [0, 1], 1 keeps 0-255
    label: str = ""  # a short name for tables

    def to_json(self) -> dict:
        return {
            "channel_order": self.channel_order,
            "pixel_scale": f"1/{self.scale:g}" if self.scale != 1 else "0-255",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def describe(self) -> str:
        units = "[0,1]" if self.scale == 255 else "0-255"
        return f"{self.channel_order} {units}, mean {list(self.mean)}, std {list(self.std)}"


IMAGENET = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), label="RGB/255, ImageNet mean/std")
# MSRA's R-50/R-101 (detectron2, mmdetection's caffe style): the std is folded into conv1
DETECTRON2_BGR = Preprocess((103.530, 116.280, 123.675), (1.0, 1.0, 1.0), "BGR", 1.0, "BGR 0-255, minus mean")
DETECTRON2_X101 = Preprocess(
    (103.530, 116.280, 123.675), (57.375, 57.120, 58.395), "BGR", 1.0, "BGR 0-255, mean/std"
)
MMDET_PYTORCH = Preprocess(
    (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "RGB", 1.0, "RGB 0-255, ImageNet mean/std"
)
