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


# torchvision's (and the default's): 8-bit RGB / 255, ImageNet statistics; frameworks/ hold the others
IMAGENET = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), label="RGB/255, ImageNet mean/std")
