"""torchvision: its detectors' FPNs, its state dicts, its ImageNet classifiers.

Keys (-> ours):

- classification ResNet ``layer1.0.conv1.weight`` -> ``body.layer1.0.conv1.weight``; MobileNetV3
  ``features.13.block.0.0.weight`` -> ``body.13.block.0.0.weight``; ``fc.*``, ``classifier.*`` ignored;
- detector ``backbone.body.conv1.weight`` -> ``body.conv1.weight``, ``backbone.fpn.inner_blocks.0.0.weight``
  -> ``fpn.inner_blocks.0.weight``; ``rpn.*``, ``roi_heads.*``, ``head.*`` ignored;
- ``BackboneWithFPN`` ``body.conv1.weight``; ``fpn.layer_blocks.3.0.bias`` -> ``fpn.layer_blocks.3.bias``.

Migration: torchvision 0.13 wrapped each FPN conv in ``Conv2dNormActivation`` (new keys
``inner_blocks.0.0.weight``); files from before have ``inner_blocks.0.weight``. A plain conv is
ours without the ``.0``; with a BatchNorm (the v2 detectors: ``.0.1.running_var``) both stay nested.

Detectors run as their builders run them with the default COCO weights: FrozenBatchNorm, eps 0 where
the builder calls ``overwrite_eps(model, 0.0)``, BatchNorm in the v2 FPNs, P6 max-pool or P6/P7 convs,
RGB / 255 with ImageNet mean/std, no padding (``BackboneWithFPN`` needs none). Test-time resize:
``GeneralizedRCNNTransform(min_size=800, max_size=1333)``, for every detector here. The zoo table
(builders, eps, levels, files) is declared in models/zoo_table.py.
"""

from __future__ import annotations

import os
import re

from torch import Tensor

from fpn_cli.errors import WeightsError
from fpn_cli.models.backbones import get_arch
from fpn_cli.models.frameworks.base import Framework, Pretrained, read_file, register
from fpn_cli.models.hub import WeightsOrigin, cache_root, fetch
from fpn_cli.models.preprocess import IMAGENET
from fpn_cli.models.pyramid import P6P7, FPNSpec, MaxPool
from fpn_cli.models.weights import Checkpoint, KeyFormat, fpn_shape, has_fpn
from fpn_cli.models.zoo_table import TORCHVISION_RESIZE

_NESTED = re.compile(r"^fpn\.(inner_blocks|layer_blocks)\.(\d+)\.0\.(weight|bias)$")


@register
class Torchvision(Framework):
    name = "torchvision"
    keys = KeyFormat(
        (
            (r"backbone\.body\.(.*)", r"body.\1"),
            (r"backbone\.fpn\.(.*)", r"fpn.\1"),
            (r"(body|fpn)\.(.*)", r"\1.\2"),
            (r"(conv1|bn1|layer[1-4])\.(.*)", r"body.\1.\2"),  # a classification ResNet
            (r"features\.(.*)", r"body.\1"),  # a classification MobileNetV3
        ),
        ignored=r"(fc|classifier|rpn|roi_heads|head|anchor_generator)\..*",
    )
    styles = {
        "torchvision": FPNSpec("nearest", extra=MaxPool(), description="torchvision's FeaturePyramidNetwork"),
        "torchvision_v2": FPNSpec(
            "nearest", norm=True, extra=MaxPool(), description="BatchNorm in the FPN convs"
        ),
        "torchvision_retinanet": FPNSpec(
            "nearest", first_input="c3", extra=P6P7("p5"), description="P3-P5, P6/P7 from P5"
        ),
        "torchvision_retinanet_v2": FPNSpec(
            "nearest", first_input="c3", extra=P6P7("c5"), description="P3-P5, P6/P7 from C5"
        ),
    }
    preprocess = IMAGENET
    resize = TORCHVISION_RESIZE
    fallback = True  # a state dict in no other layout is read as torchvision's

    def migrate(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """New-style keys of plain FPN convs (``inner_blocks.0.0.weight``) to ours (``.0.weight``)."""
        if fpn_shape(state)["norm"]:
            return state
        return {_NESTED.sub(r"fpn.\1.\2.\3", k): v for k, v in state.items()}

    def arch_of(self, ckpt: Checkpoint) -> str | None:
        if "body.16.0.weight" in ckpt.state:  # MobileNetV3-Large's last block: its detection backbone
            return "mobilenet_v3_large"
        return super().arch_of(ckpt)

    def style_of(self, ckpt: Checkpoint) -> str | None:
        if not has_fpn(ckpt.state):
            return None
        shape = fpn_shape(ckpt.state)
        if shape["p6_in"] is not None:
            return "torchvision_retinanet_v2" if shape["p6_in"] != 256 else "torchvision_retinanet"
        if shape["norm"]:
            return "torchvision_v2"
        # torchvision's FPN smooths P5 too, so it has as many 3x3 convs as laterals; the reference one fewer
        return "torchvision" if shape["smoothed"] == shape["laterals"] else "reference"

    def imagenet(self, arch: str) -> Pretrained:
        """torchvision's default ImageNet weights for ``arch``, from its cache (downloaded if absent)."""
        found = get_arch(arch)
        name = found.torchvision_name
        if name is None:  # refused when loaded: --summary still describes the model
            return Pretrained(IMAGENET, found.imagenet_bn_eps, lambda: _no_imagenet(arch))
        origin = _imagenet_origin(name)
        return Pretrained(IMAGENET, found.imagenet_bn_eps, lambda: _imagenet_file(name, origin), origin)


def _imagenet_origin(torchvision_name: str) -> WeightsOrigin:
    from torchvision.models import get_model_weights

    url = get_model_weights(torchvision_name).DEFAULT.url
    return WeightsOrigin("imagenet", cache_root() / os.path.basename(url), url)


def _imagenet_file(torchvision_name: str, origin: WeightsOrigin) -> Checkpoint:
    path = fetch(origin.url, origin.path, f"ImageNet {torchvision_name}")
    return read_file(path, f"imagenet ({path.name})")


def _no_imagenet(arch: str) -> Checkpoint:
    raise WeightsError(
        f"arch {arch!r} has no ImageNet weights in torchvision; use --weights random or a file"
    )
