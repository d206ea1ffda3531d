"""What the command line offers and checks about the model, without importing torch: the
architecture names, the weights keyword, the seed range, the user's FPN styles and the padding
bound. The modules that build the model take these from here, so ``fpn-extract --help`` and a
usage error come back at once (torch takes seconds to import)."""

from __future__ import annotations

import re

from fpn_cli.errors import UsageError

# the keys of backbones.ARCHS, in its order (a test keeps the two equal)
ARCH_NAMES = (
    "seed",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_32x4d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnet50_msra",
    "resnet101_msra",
    "mobilenet_v3_large",
)
TIMM_PREFIX = "timm:"
# what follows timm:, a timm model name (every one timm lists: name[.pretrained_tag]) or a Hugging
# Face repository (hf-hub:ORG/REPO[@revision]); anything else (a path, "../x") is refused before
# timm would take it as one
_TIMM_NAME = re.compile(
    r"[a-z0-9_]+(\.[a-z0-9_]+)?"
    r"|hf[-_]hub:(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?"
)
RANDOM, IMAGENET_WEIGHTS = "random", "imagenet"
# what torch's generators take, each seed its own weights (torch also takes negatives down to
# -2**63, as aliases of 2**64 + seed: refused, so that a seed and its weights are one to one)
SEED_RANGE = (0, 2**64 - 1)
USER_STYLES = ("reference", "torchvision")  # --fpn-style; the model zoo's entries bring their own
MAX_PAD_MULTIPLE = 1024  # detectron2 and mmdetection pad to 32; more is no padding anyone uses


def check_arch(name: str) -> str:
    """``name`` if it is a registered architecture or ``timm:<model>`` (a timm model name or
    ``hf-hub:ORG/REPO``); else a :class:`UsageError` that lists the choices."""
    if name.startswith(TIMM_PREFIX):
        if not _TIMM_NAME.fullmatch(name[len(TIMM_PREFIX) :]):
            raise UsageError(
                f"{name!r} is not a timm model name (like timm:convnext_tiny.fb_in1k, or "
                "timm:hf-hub:ORG/REPO for a Hugging Face repository)"
            )
    elif name not in ARCH_NAMES:
        raise UsageError(f"unknown arch {name!r}; choose from {', '.join(ARCH_NAMES)} or timm:<model>")
    return name
