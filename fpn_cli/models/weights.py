"""Checkpoint files: reading them without running code, mapping their keys onto ours, loading.

Our keys are torchvision's ``BackboneWithFPN`` keys with old-style FPN convs: ``body.layer1.0.conv1.weight``,
``fpn.inner_blocks.0.weight`` (``fpn.inner_blocks.0.0.weight`` and ``.0.1.*`` where the FPN convs
carry a BatchNorm), ``fpn.extra_blocks.p6.weight``. Each framework's module (frameworks/) owns its
:class:`KeyFormat`, a table from its keys to ours with an example of each, and any migration of its
own older keys; this module reads files and applies a format, knowing no framework.

Training wrappers are unwrapped first (a top-level ``state_dict`` or ``model`` entry, a ``module.``
prefix). Files are read with ``torch.load(weights_only=True)`` or, for detectron2's pickles, an
unpickler that builds numpy arrays and plain containers and refuses everything else: never code.
"""

from __future__ import annotations

import collections
import importlib
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fpn_cli.errors import WeightsError
from fpn_cli.models.numerics import non_finite

_SHOWN_KEYS = 5

Rule = tuple[str, str | Callable[[re.Match], str]]


@dataclass(frozen=True)
class KeyFormat:
    """One checkpoint layout: the rules that map its keys onto ours, first match wins, and the keys
    it may ignore. A rule's replacement is a ``re`` template or ``(match, context) -> key``, where
    the context is what the framework reads off the whole state dict (``Framework.context``)."""

    rules: tuple[Rule, ...]
    ignored: str = r"^$"  # keys of heads and buffers with no place in a feature extractor

    def map(self, key: str, context: Mapping[str, int]) -> str | None:
        for pattern, replacement in self.rules:
            m = re.fullmatch(pattern, key)
            if m:
                return replacement(m, context) if callable(replacement) else m.expand(replacement)
        return None


@dataclass(frozen=True)
class RawCheckpoint:
    """A file's state dict under its own keys, unwrapped, and the file's other top-level entries
    (where a framework keeps its records: mmdetection's ``meta``, our ``fpn_extract``)."""

    state: dict[str, Tensor] = field(repr=False)
    extras: Mapping[str, object]
    source: str  # for messages: a file path, or "torchvision:fasterrcnn_resnet50_fpn (file name)"


@dataclass(frozen=True)
class Checkpoint:
    """A state dict mapped onto our keys, and what the file says about the model it needs."""

    state: dict[str, Tensor] = field(repr=False)
    source: str  # for messages: a file path, or "torchvision:fasterrcnn_resnet50_fpn (file name)"
    format: str = "torchvision"  # the framework whose layout it is (frameworks.FRAMEWORKS)
    meta: Mapping[str, object] = field(default_factory=dict)  # our own format's record; mmdet's config


def map_keys(
    state: Mapping[str, Tensor], fmt: KeyFormat, context: Mapping[str, int]
) -> tuple[dict[str, Tensor], list[str]]:
    """(state under our keys, keys that fit nothing in ``fmt``)."""
    mapped: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if re.fullmatch(fmt.ignored, key):
            continue
        new = fmt.map(key, context)
        if new is None:
            unknown.append(key)
        else:
            mapped[new] = value
    return mapped, unknown


def name_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = len(keys) - _SHOWN_KEYS
    return shown + (f" and {more} more" if more > 0 else "")


# --- reading files ---------------------------------------------------------------------------------


def read_raw(path: str | os.PathLike[str], source: str | None = None) -> RawCheckpoint:
    """Reads a checkpoint file of any kind from ``path``, executing nothing in it."""
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise WeightsError(
            f"weights file {path} {what} (--weights takes random, imagenet, a zoo name or a file)"
        )
    if path.suffix == ".pkl":
        raw = _read_pickle(path)
    elif path.suffix == ".safetensors":
        raw = _read_safetensors(path)
    else:
        raw = _read_torch(path)
    return unwrap(raw, source)


def _read_torch(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise WeightsError(f"cannot read weights file {path}: {e.strerror or e}") from None
    # torch.save writes a zip archive, or (before torch 1.6) a pickle; torch.load meets anything
    # else with errors such as IndexError that say nothing of the file
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise WeightsError(
            f"cannot read weights file {path}: not a checkpoint (a PyTorch .pth/.pt file is a zip "
            "archive or a pickle; .pkl and .safetensors files are read by their suffix)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if "GLOBAL" in reason:
            raise WeightsError(
                f"refusing to load {path}: it holds more than tensors and plain containers, "
                f"and loading it could run code ({reason})"
            ) from None
        raise WeightsError(f"cannot read weights file {path}: not a PyTorch checkpoint ({reason})") from None
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        raise _unreadable(path, "a PyTorch checkpoint, torch.save's zip archive or pickle", e) from None


def _read_safetensors(path: Path) -> object:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"{path} is a safetensors file: pip install safetensors to read it") from None
    try:
        return load_file(path)
    except Exception as e:
        raise WeightsError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from None


def _unpickling_reason(e: Exception) -> str:
    """The one informative line of torch's multi-paragraph weights_only error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return (specific or lines or [type(e).__name__])[0]


def _numpy_global(module: str, name: str) -> object:
    # numpy 2 moved numpy.core to numpy._core; pickles name either, depending on who wrote them
    for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} is not available in this numpy")


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays, dtypes and plain containers; any other global is refused, never imported."""

    _numpy = {"_reconstruct", "scalar"}

    def find_class(self, module: str, name: str) -> object:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in self._numpy:
            return _numpy_global(module, name)
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("_codecs", "encode"):  # protocol-2 pickles of bytes written by Python 3
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _read_pickle(path: Path) -> object:
    """A detectron2 model-zoo pickle: ``{"model": {key: numpy array}, "__author__": ...}``."""
    try:
        with open(path, "rb") as f:
            raw = _ArraysOnly(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"refusing to load {path}: it holds more than numpy arrays and plain containers ({e})"
        ) from None
    except Exception as e:
        raise _unreadable(path, "a pickle of numpy arrays, as detectron2's zoo files are", e) from None
    return raw


def _unreadable(path: Path, what: str, e: BaseException) -> WeightsError:
    """The one line for a weights file that is not what its kind must be: what it is not, and
    the reader's own reason in brief (a cut or empty file says so)."""
    if isinstance(e, EOFError):
        reason = "it is empty or cut short"
    else:
        detail = (str(e).strip().splitlines() or [""])[0]
        detail = detail.split("] ", 1)[-1].lstrip(". ") if detail.startswith("[enforce fail") else detail
        reason = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
    return WeightsError(f"cannot read weights file {path}: not {what} ({reason})")


def unwrap(raw: object, source: str) -> RawCheckpoint:
    """The state dict inside a training wrapper (a top-level ``state_dict`` or ``model``, a
    ``module.`` prefix), numpy arrays as tensors; anything but a mapping of tensors is an error."""
    extras: dict = {}
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), Mapping):
                extras = {k: v for k, v in raw.items() if k != wrapper}
                raw = raw[wrapper]
                break
    if isinstance(raw, Mapping):
        odd = [str(k) for k, v in raw.items() if isinstance(v, np.ndarray) and v.dtype.kind not in "biuf"]
        if odd:  # strings, objects: torch has no tensor of them
            raise WeightsError(f"weights file {source}: {name_keys(odd)} hold no numbers (not a state dict)")
        raw = {
            k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in raw.items()
        }
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise WeightsError(f"weights file {source} holds no state dict of tensors")
    if all(k.startswith("module.") for k in raw):
        raw = {k[len("module.") :]: v for k, v in raw.items()}
    return RawCheckpoint(dict(raw), extras, source)


# --- what a state dict says about its model ---------------------------------------------------------


def has_fpn(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("fpn.") for k in state)


def fpn_shape(state: Mapping[str, Tensor]) -> dict[str, object]:
    """What the FPN keys show: lateral count, smoothing count, BatchNorm in the convs, extra convs
    and the P6 conv's input channels (2048: from C5; 256: from P5)."""
    inner = {int(m[1]) for k in state if (m := re.match(r"fpn\.inner_blocks\.(\d+)\.", k))}
    layer = {int(m[1]) for k in state if (m := re.match(r"fpn\.layer_blocks\.(\d+)\.", k))}
    p6 = state.get("fpn.extra_blocks.p6.weight")
    return {
        "laterals": len(inner),
        "smoothed": len(layer),
        "norm": any(re.match(r"fpn\.inner_blocks\.\d+\.1\.running_var", k) for k in state),
        "p6_in": None if p6 is None else int(p6.shape[1]),
    }


def resnet_shape(state: Mapping[str, Tensor]) -> dict[str, object] | None:
    """Block kind, blocks per stage, groups and width per group of a ResNet body; None otherwise."""
    if "body.layer1.0.conv1.weight" not in state:
        return None
    layers = []
    for stage in range(1, 5):
        blocks = {int(m[1]) for k in state if (m := re.match(rf"body\.layer{stage}\.(\d+)\.", k))}
        layers.append(max(blocks) + 1 if blocks else 0)
    bottleneck = "body.layer1.0.conv3.weight" in state
    conv2 = state["body.layer1.0.conv2.weight"]
    groups = conv2.shape[0] // conv2.shape[1] if bottleneck else 1
    return {
        "bottleneck": bottleneck,
        "layers": tuple(layers),
        "groups": groups,
        "width_per_group": conv2.shape[0] // groups if bottleneck else 64,
    }


def load_into(model: torch.nn.Module, ckpt: Checkpoint, fpn_required: bool) -> None:
    """Copies ``ckpt`` into ``model``. Every checkpoint key must exist in the model; every model
    key must be in the checkpoint, except the FPN's when ``fpn_required`` is False (they keep
    their seeded initialisation) and BatchNorm's ``num_batches_tracked``."""
    own = model.state_dict()
    state = ckpt.state
    describe = f"{model.config.arch} ({model.config.fpn_style} FPN)"
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise WeightsError(
            f"{ckpt.source} has keys that {describe} lacks: {name_keys(unexpected)} "
            "(does --arch match the checkpoint?)"
        )
    needed = [
        k for k in own if not k.endswith("num_batches_tracked") and (fpn_required or k.startswith("body."))
    ]
    missing = [k for k in needed if k not in state]
    if missing:
        raise WeightsError(
            f"{ckpt.source} lacks keys that {describe} needs: {name_keys(missing)} "
            "(does --arch match the checkpoint?)"
        )
    wrong = [k for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise WeightsError(
            f"{ckpt.source}: {k} has shape {tuple(state[k].shape)}, {describe} needs "
            f"{tuple(own[k].shape)} (does --arch match the checkpoint?)"
        )
    check_values(state, own, ckpt.source)
    model.load_state_dict(state, strict=False)
    check_output(model, ckpt.source)


def check_values(state: Mapping[str, Tensor], own: Mapping[str, Tensor], source: str) -> None:
    """Refuses, naming the tensors, values that would make every feature wrong: integers where the
    model holds floats (load_state_dict would cast them silently), NaN or infinity, and negative
    BatchNorm variances (whose square root is NaN). Tensors on the meta device carry shapes only."""
    integer = [k for k, v in state.items() if own[k].is_floating_point() and not v.is_floating_point()]
    if integer:
        dtypes = sorted({str(state[k].dtype).removeprefix("torch.") for k in integer})
        raise WeightsError(
            f"{source}: {name_keys(integer)} hold {'/'.join(dtypes)} values where the model's are floats"
        )
    values = {k: v for k, v in state.items() if v.is_floating_point() and v.device.type != "meta"}
    broken = non_finite(values)
    if broken:  # every feature would be NaN: a diverged training run's checkpoint
        raise WeightsError(f"{source}: {name_keys(broken)} hold NaN or infinite values")
    negative = [k for k, v in values.items() if k.endswith("running_var") and bool((v < 0).any())]
    if negative:  # a variance is never below 0: a damaged file
        raise WeightsError(f"{source}: {name_keys(negative)} hold negative variances")


_PROBE_SIZE = 64  # a multiple of every stride (P2-P7: 4-128 rounds up): all levels, in milliseconds


def check_output(model: torch.nn.Module, source: str) -> None:
    """Runs ``model`` once on a seeded (1, 3, 64, 64) input: weights that are finite but make
    its levels NaN or infinite (a value of 1e38, a BatchNorm eps of 0 beside a zero variance)
    would do so for every image, so they are refused here, naming the levels and the tensor of
    the largest magnitude, before anything is written. Models on the meta device are skipped."""
    params = [*model.parameters(), *model.buffers()]
    if not params or any(p.device.type == "meta" for p in params):
        return
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, _PROBE_SIZE, _PROBE_SIZE, generator=generator)
    with torch.inference_mode():
        levels = model(x.to(params[0].device))
    bad = [name.upper() for name in non_finite(levels)]
    if not bad:
        return
    state = model.state_dict()
    sizes = {k: float(v.abs().max()) for k, v in state.items() if v.is_floating_point() and v.numel()}
    largest = max(sizes, key=sizes.__getitem__)
    raise WeightsError(
        f"{source}: the network's {', '.join(bad)} come out NaN or infinite for any image "
        f"(largest value: {largest} = {sizes[largest]:.3g})"
    )
