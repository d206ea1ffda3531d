"""Weight sources (random, imagenet, coco, a file) and the mapping of checkpoint keys onto ours.

Our state dict keys are torchvision's ``BackboneWithFPN`` keys with old-style FPN convs:
``body.layer1.0.conv1.weight``, ``fpn.inner_blocks.0.weight``. Every format below maps onto them
by the table in :func:`map_keys`:

=============================  ==================================================================
format                          example key -> our key
=============================  ==================================================================
torchvision classification      ``layer1.0.conv1.weight`` -> ``body.layer1.0.conv1.weight``;
                                ``fc.*`` ignored
torchvision detector            ``backbone.body.conv1.weight`` -> ``body.conv1.weight``;
                                ``backbone.fpn.inner_blocks.0.0.weight`` -> ``fpn.inner_blocks.0.weight``;
                                ``rpn.*``, ``roi_heads.*`` ignored
``BackboneWithFPN``             ``body.conv1.weight``; ``fpn.layer_blocks.3.0.bias`` -> ``...3.bias``
old-style FPN keys              ``fpn.inner_blocks.0.weight`` (unchanged)
FrozenBatchNorm2d buffers       no ``num_batches_tracked``: ours is left at 0
fpn-extract                     ``{"fpn_extract": {"arch": ..., "fpn_style": ...}, "state_dict": {our keys}}``
=============================  ==================================================================

Training wrappers are unwrapped first: a top-level ``state_dict`` or ``model`` entry, and a
``module.`` prefix on every key (DataParallel / DDP). Files are read with
``torch.load(weights_only=True)``: tensors and plain containers only, never code.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import WeightsError
from .model import ARCHS, FPN

WEIGHT_SOURCES = ("random", "imagenet", "coco")
FORMAT_KEY = "fpn_extract"
OFFLINE_ENV = "FPN_EXTRACT_OFFLINE"  # set to 1 to never try a download

_PREFIXES = (
    ("backbone.body.", "body."),
    ("backbone.fpn.", "fpn."),
    ("body.", "body."),
    ("fpn.", "fpn."),
)
_CLASSIFIER_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
_IGNORED = ("fc.", "rpn.", "roi_heads.")  # heads that have no place in a feature extractor
_NEW_STYLE_FPN = re.compile(r"^fpn\.(inner_blocks|layer_blocks)\.(\d+)\.0\.(weight|bias)$")
_SHOWN_KEYS = 5


@dataclass(frozen=True)
class Checkpoint:
    """A state dict already mapped onto our keys, and what it says about the model it needs."""

    state: dict[str, Tensor]
    source: str  # for messages: a file path or "imagenet (resnet50-11ad3fa6.pth)"
    fpn_style: str | None = None  # None: the checkpoint has no FPN layers
    bn_eps: float = 1e-5
    arch: str | None = None  # only our own format records it


def map_keys(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Returns (state under our keys, keys that fit no known format)."""
    mapped: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key.startswith(_IGNORED):
            continue
        new = next((ours + key[len(theirs) :] for theirs, ours in _PREFIXES if key.startswith(theirs)), None)
        if new is None and key.startswith(_CLASSIFIER_ROOTS):
            new = "body." + key
        if new is None:
            unknown.append(key)
            continue
        mapped[_NEW_STYLE_FPN.sub(r"fpn.\1.\2.\3", new)] = value
    return mapped, unknown


def _fpn_style_of(state: Mapping[str, Tensor]) -> str | None:
    if not any(k.startswith("fpn.") for k in state):
        return None
    # torchvision's FPN smooths P5 too, so it has a fourth 3x3 conv; the reference design has three
    return "torchvision" if "fpn.layer_blocks.3.weight" in state else "reference"


def _name_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = len(keys) - _SHOWN_KEYS
    return shown + (f" and {more} more" if more > 0 else "")


def read_file(path: str | os.PathLike[str]) -> Checkpoint:
    """Reads a checkpoint of any supported format from ``path``, executing nothing in it."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise WeightsError(f"weights file {path} {what} (--weights takes random, imagenet, coco or a file)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if "GLOBAL" in reason:
            raise WeightsError(
                f"refusing to load {path}: it holds more than tensors and plain containers, "
                f"and loading it could run code ({reason})"
            ) from None
        raise WeightsError(f"cannot read weights file {path}: not a PyTorch checkpoint ({reason})") from None
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        raise WeightsError(
            f"cannot read weights file {path}: {type(e).__name__}: {e}".splitlines()[0]
        ) from None
    return _from_raw(raw, str(path))


def _unpickling_reason(e: Exception) -> str:
    """The one informative line of torch's multi-paragraph weights_only error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return (specific or lines or [type(e).__name__])[0]


def _from_raw(raw: object, source: str, bn_eps: float = 1e-5) -> Checkpoint:
    meta: dict = {}
    if isinstance(raw, Mapping) and FORMAT_KEY in raw:
        meta = dict(raw[FORMAT_KEY])
        raw = raw.get("state_dict")
    elif isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise WeightsError(f"weights file {source} holds no state dict of tensors")
    if all(k.startswith("module.") for k in raw):
        raw = {k[len("module.") :]: v for k, v in raw.items()}
    state, unknown = map_keys(raw)
    if unknown:
        raise WeightsError(f"weights file {source} has keys that fit no known format: {_name_keys(unknown)}")
    return Checkpoint(
        state,
        source,
        fpn_style=meta.get("fpn_style", _fpn_style_of(state)),
        bn_eps=float(meta.get("bn_eps", bn_eps)),
        arch=meta.get("arch"),
    )


def cached_path(url: str) -> Path:
    """Where torchvision's cache keeps the file for ``url``: ``$TORCH_HOME/hub/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _fetch(url: str, what: str) -> Path:
    path = cached_path(url)
    if path.is_file():
        return path
    hint = f"download {url} and place it at {path}"
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise WeightsError(f"{what} weights are not in the cache and {OFFLINE_ENV} is set: {hint}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the file name carries the first hex digits of its SHA-256; torch checks them
        digest = re.search(r"-([a-f0-9]*)\.", path.name)
        prefix = digest.group(1) if digest else None
        torch.hub.download_url_to_file(url, str(path), prefix, progress=sys.stderr.isatty())
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"cannot download {what} weights ({reason}): {hint}") from None
    return path


def imagenet(arch: str) -> Checkpoint:
    """torchvision's default ImageNet weights for ``arch``, from its cache (downloaded if absent)."""
    import torchvision

    tv_name = ARCHS[arch].torchvision_name
    if tv_name is None:
        raise WeightsError(f"arch {arch!r} has no ImageNet weights; use --weights random or a file")
    url = torchvision.models.get_model_weights(tv_name).DEFAULT.url
    ckpt = read_file(_fetch(url, f"ImageNet {tv_name}"))
    return Checkpoint(ckpt.state, f"imagenet ({os.path.basename(url)})")


def coco(arch: str) -> Checkpoint:
    """torchvision's COCO Faster R-CNN ResNet-50 FPN (v1) weights, backbone and FPN both."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    if arch != "resnet50":
        raise WeightsError(f"--weights coco exists for resnet50 only, not {arch!r}")
    url = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url
    ckpt = read_file(_fetch(url, "COCO Faster R-CNN"))
    # torchvision runs the v1 COCO weights with BatchNorm eps = 0 (overwrite_eps in its builder)
    return Checkpoint(ckpt.state, f"coco ({os.path.basename(url)})", ckpt.fpn_style, bn_eps=0.0)


def resolve(spec: str | os.PathLike[str], arch: str) -> Checkpoint | None:
    """``random`` -> None; ``imagenet`` / ``coco`` / a path -> the checkpoint, keys mapped."""
    if spec == "random":
        return None
    if spec == "imagenet":
        return imagenet(arch)
    if spec == "coco":
        return coco(arch)
    return read_file(spec)


def load_into(model: FPN, ckpt: Checkpoint) -> None:
    """Copies ``ckpt`` into ``model``. Every checkpoint key must exist in the model; every model
    key must be in the checkpoint, except the FPN's when the checkpoint has none (those keep
    their seeded initialisation) and BatchNorm's ``num_batches_tracked``."""
    own = model.state_dict()
    unexpected = [k for k in ckpt.state if k not in own]
    if unexpected:
        raise WeightsError(
            f"{ckpt.source} has keys that {model.config.arch} ({model.config.fpn_style} FPN) lacks: "
            f"{_name_keys(unexpected)} (does --arch match the checkpoint?)"
        )
    needed = [
        k
        for k in own
        if not k.endswith("num_batches_tracked") and (ckpt.fpn_style is not None or k.startswith("body."))
    ]
    missing = [k for k in needed if k not in ckpt.state]
    if missing:
        raise WeightsError(
            f"{ckpt.source} lacks keys that {model.config.arch} needs: {_name_keys(missing)} "
            "(does --arch match the checkpoint?)"
        )
    wrong = [k for k, v in ckpt.state.items() if v.shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise WeightsError(
            f"{ckpt.source}: {k} has shape {tuple(ckpt.state[k].shape)}, {model.config.arch} needs "
            f"{tuple(own[k].shape)} (does --arch match the checkpoint?)"
        )
    model.load_state_dict(ckpt.state, strict=False)


def save(model: FPN, path: str | os.PathLike[str]) -> None:
    """Writes ``model`` in fpn-extract's own format, readable by ``--weights PATH``."""
    meta = {"arch": model.config.arch, "fpn_style": model.config.fpn_style, "bn_eps": model.config.bn_eps}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({FORMAT_KEY: meta, "state_dict": state}, path)
