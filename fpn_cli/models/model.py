"""The network: a backbone (backbones.py) with a top-down path (pyramid.py) on it, its seeded
initialisation, BatchNorm folding for inference, and shapes without computation."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpn_cli.errors import UsageError
from fpn_cli.models.backbones import Backbone, LevelInfo, get_arch
from fpn_cli.models.choices import MAX_PAD_MULTIPLE
from fpn_cli.models.frameworks import fpn_spec
from fpn_cli.models.levels import DEFAULT_LEVELS, parse_levels, pyramid_of
from fpn_cli.models.pyramid import FPNSpec, TopDown


@dataclass(frozen=True)
class FPNConfig:
    """Everything that decides the network's structure (the weights come separately)."""

    arch: str = "resnet50"  # backbones.ARCHS name, or timm:<model>
    fpn_style: str = "reference"  # an FPN variant a framework registers (frameworks.styles())
    levels: tuple[str, ...] | None = DEFAULT_LEVELS  # None: P2-P5, or the pyramid the model has
    out_channels: int = 256  # d in the FPN paper
    bn_eps: float = 1e-5  # 0.0 for torchvision's v1 COCO detector weights
    pad_multiple: int = 1  # zero-pad the input's bottom/right to a multiple (detectron2, mmdet: 32)

    def __post_init__(self) -> None:
        get_arch(self.arch)  # an unknown name is a UsageError
        fpn_spec(self.fpn_style)
        if self.levels is not None:
            object.__setattr__(self, "levels", parse_levels(self.levels))
        if not 1 <= self.pad_multiple <= MAX_PAD_MULTIPLE:
            raise UsageError(f"--pad-multiple must be from 1 to {MAX_PAD_MULTIPLE}")

    @property
    def spec(self) -> FPNSpec:
        return fpn_spec(self.fpn_style)


class FPN(nn.Module):
    """Backbone + FPN: (N, 3, H, W) normalised -> {level: (N, C, ⌈H/stride⌉, ⌈W/stride⌉)}, in the
    order asked. Only the stages and top-down steps that the requested levels need are run."""

    def __init__(self, config: FPNConfig) -> None:
        super().__init__()
        self.config = config
        self.body: Backbone = get_arch(config.arch).build()
        spec = config.spec
        names = [f.name for f in self.body.feature_info]
        first = names.index(spec.first_input) if spec.first_input else 0
        self._first = first
        self.fpn = TopDown(self.body.feature_info[first:], spec, config.out_channels)
        self.level_info: dict[str, LevelInfo] = {
            f.name: f for f in [*self.body.feature_info, *self.fpn.level_info(config.out_channels)]
        }
        self.levels = config.levels or self._default_levels()
        lacking = [n for n in self.levels if n not in self.level_info]
        if lacking:
            raise UsageError(
                f"{config.arch} with the {config.fpn_style} FPN has no level {lacking[0]}; "
                f"it has {', '.join(self.level_info)}"
            )
        self._plan()

    def _default_levels(self) -> tuple[str, ...]:
        """P2-P5 where the model has them, else the levels its top-down path makes from the backbone."""
        if all(n in self.level_info for n in DEFAULT_LEVELS):
            return DEFAULT_LEVELS
        return tuple(pyramid_of(f.name) for f in self.fpn.inputs)

    def _plan(self) -> None:
        """Which stages and top-down steps the requested levels need."""
        levels = self.levels
        pyramid = [f.name for f in self.fpn.level_info(self.config.out_channels)]
        lateral = pyramid[: len(self.fpn.inputs)]
        wanted_p = [n for n in levels if n in pyramid]
        self._extras = any(n not in lateral for n in wanted_p)
        wanted_lateral = [lateral.index(n) for n in wanted_p if n in lateral]
        self._lowest = min(wanted_lateral, default=len(lateral) - 1) if wanted_p else None
        backbone = [f.name for f in self.body.feature_info]
        wanted_c = [backbone.index(n) + 1 for n in levels if n in backbone]
        self._stages = len(backbone) if wanted_p else max(wanted_c)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        height, width = x.shape[-2:]
        multiple = self.config.pad_multiple
        if multiple > 1:  # zeros after normalisation, bottom and right, as detectron2's ImageList
            x = F.pad(x, (0, -width % multiple, 0, -height % multiple))
        c = self.body(x, self._stages)
        found = {f.name: t for f, t in zip(self.body.feature_info, c, strict=False)}
        if self._lowest is not None:
            p = self.fpn(c[self._first :], self._lowest, self._extras)
            names = [f.name for f in self.fpn.level_info(self.config.out_channels)]
            found.update({n: t for n, t in zip(names, p, strict=False) if t is not None})
        out = {}
        for name in self.levels:
            t = found[name]
            if multiple > 1:  # each level back to the image's own extent
                s = self.level_info[name].stride
                t = t[..., : math.ceil(height / s), : math.ceil(width / s)]
            out[name] = t
        return out


def build_model(config: FPNConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> FPN:
    """An FPN in eval mode; ``seed`` gives the same weights on every machine, ``None`` leaves them
    uninitialised (for a checkpoint to fill, or on the meta device for shapes alone)."""
    if torch.device(device).type == "meta" or get_arch(config.arch).init_covered:
        # every parameter is a conv's or a BatchNorm's, all set below: no work for a default init
        with torch.device("meta"):
            model = FPN(config)
        if torch.device(device).type != "meta":
            model = model.to_empty(device="cpu")
    else:  # a network with parameters of its own kinds (timm): its own init, seeded
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            model = FPN(config)
    if torch.device(device).type != "meta":
        _reset_buffers(model, config.bn_eps)
        if seed is not None:
            seeded_init(model, seed)
        model = model.to(device)
    return model.eval().requires_grad_(False)


def _reset_buffers(model: nn.Module, eps: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.eps = eps
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.num_batches_tracked.zero_()


@torch.no_grad()
def seeded_init(model: FPN, seed: int) -> None:
    """Initialise every conv and BatchNorm from one CPU generator, in module order, so the result
    is identical on every machine: torchvision's schemes (Kaiming normal for the backbone, Kaiming
    uniform with a=1 for the FPN, unit BatchNorm) plus depth scaling of the residual branches."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = torch.empty(m.weight.shape)
            if name.startswith("fpn."):
                nn.init.kaiming_uniform_(w, a=1, generator=g)
            else:
                nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=g)
            m.weight.copy_(w)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            m.weight.fill_(1.0)
            m.bias.zero_()
    # Eval-mode BatchNorm with unit statistics does not normalise, so the residual stream grows
    # with depth (ResNet-152 reached 1e8, past float16's range). Scaling each branch's last
    # BatchNorm by 1/sqrt(blocks), as Fixup-style depth scaling does, keeps features O(1).
    branches = [m.branch_norm for m in model.modules() if hasattr(type(m), "branch_norm")]
    for norm in branches:
        norm.weight.fill_(len(branches) ** -0.5)


def output_shapes(config: FPNConfig, height: int, width: int) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) per requested level for one H x W image: (C, ⌈H/stride⌉, ⌈W/stride⌉) where the
    model's layer arithmetic gives that (checked once per configuration, by forward passes of an
    empty batch: :func:`_probed_shapes`), else such a forward pass for this size. A resume checks
    every stored image's shapes, and photos come in thousands of sizes."""
    rule = _ceil_rule(config)
    if rule is None:
        return _probed_shapes(config, height, width)
    return {name: (c, -(-height // s), -(-width // s)) for name, (c, s) in rule.items()}


@functools.lru_cache(maxsize=4)
def _ceil_rule(config: FPNConfig) -> dict[str, tuple[int, int]] | None:
    """level -> (channels, stride) if every level is ⌈H/stride⌉ x ⌈W/stride⌉, else None."""
    model = _meta_model(config)
    rule = {name: (model.level_info[name].channels, model.level_info[name].stride) for name in model.levels}
    # sizes that are not multiples of 4 in both residues mod 4 that ceil, floor and round tell apart
    for h, w in ((129, 67), (254, 383)):
        try:
            if _probed_shapes(config, h, w) != {n: (c, -(-h // s), -(-w // s)) for n, (c, s) in rule.items()}:
                return None
        except RuntimeError:  # a backbone that needs other sizes: no rule
            return None
    return rule


@functools.lru_cache(maxsize=1024)
def _probed_shapes(config: FPNConfig, height: int, width: int) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) per requested level by a forward pass of an empty batch, (0, 3, H, W) on the CPU:
    the real layer arithmetic and its size checks (an input too small raises as a real one does),
    with no value computed and no feature memory. Should an op refuse the empty batch, the meta
    device decides (the same arithmetic in Python decompositions, which import torch._dynamo on
    first use: 1.5 s of a run's start, so not the first choice)."""
    try:
        return _level_shapes(_shapes_model(config), torch.empty(0, 3, height, width))
    except RuntimeError:
        return _level_shapes(_meta_model(config), torch.empty(1, 3, height, width, device="meta"))


def _level_shapes(model: FPN, x: Tensor) -> dict[str, tuple[int, int, int]]:
    with torch.no_grad():
        return {k: tuple(v.shape[1:]) for k, v in model(x).items()}


@functools.lru_cache(maxsize=4)
def _shapes_model(config: FPNConfig) -> FPN:
    """The model for shape probes: every BatchNorm an identity (it changes no shape) and the other
    parameters uninitialised CPU memory, which an empty batch never reads (nor, being untouched,
    makes resident)."""
    model = build_model(config, device="meta")
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
    return model.to_empty(device="cpu")


def level_info(config: FPNConfig) -> dict[str, LevelInfo]:
    """Every level the configured model can produce (not only the requested ones)."""
    return dict(_meta_model(dataclasses.replace(config, levels=None)).level_info)


def resolved_levels(config: FPNConfig) -> tuple[str, ...]:
    """The levels a run of ``config`` writes: those asked for, or the model's default."""
    return _meta_model(config).levels


def parameter_count(config: FPNConfig) -> int:
    """Parameters of the whole network (every level's layers), counted on the meta device."""
    return sum(p.numel() for p in _meta_model(config).parameters())


@functools.lru_cache(maxsize=4)
def _meta_model(config: FPNConfig) -> FPN:
    """One shapes-only model per configuration: a summary of many image sizes builds it once."""
    return build_model(config, device="meta")


def conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, BatchNorm name) for every BatchNorm that directly normalises a conv's
    output: registered right after it in the same parent, and fed exactly that conv's output
    tensor in a forward pass of ``example`` (so a ReLU or a sum in between is never folded)."""
    candidates = {}
    for parent in model.modules():
        children = list(parent.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:], strict=False):
            if (
                type(conv) is nn.Conv2d
                and type(bn) is nn.BatchNorm2d
                and conv.out_channels == bn.num_features
            ):
                candidates[bn] = (parent, cname, bname, conv)
    outputs: dict[int, nn.Module] = {}
    kept: list[Tensor] = []  # alive until the end, so no tensor id is reused
    confirmed = []

    def after_conv(module, args, output):
        kept.append(output)
        outputs[id(output)] = module

    def before_bn(module, args):
        parent, cname, bname, conv = candidates[module]
        if outputs.get(id(args[0])) is conv:
            confirmed.append((parent, cname, bname))

    convs = {c[3] for c in candidates.values()}
    handles = [c.register_forward_hook(after_conv) for c in convs]
    handles += [bn.register_forward_pre_hook(before_bn) for bn in candidates]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return confirmed


@torch.no_grad()
def fold_batchnorm(model: FPN) -> FPN:
    """A copy of ``model`` for inference with every BatchNorm folded into the conv before it
    (w' = w * g / sqrt(v + eps), b' = beta + (b - m) * g / sqrt(v + eps), in float64): one pass over
    each activation instead of two. Outputs agree with ``model`` to float rounding."""
    folded = copy.deepcopy(model)
    device = next(folded.parameters()).device
    every_level = copy.copy(folded)  # the same modules, asked for every level once
    every_level.levels = tuple(folded.level_info)
    every_level._plan()
    example = torch.zeros(1, 3, 64, 64, device=device)
    for parent, conv_name, bn_name in conv_bn_pairs(every_level, example):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else 0.0
        fused = nn.utils.skip_init(  # no random initialisation: every value is set below
            nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
            conv.padding, conv.dilation, conv.groups, bias=True, device=conv.weight.device,
        )  # fmt: skip
        fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias.double() + (bias - bn.running_mean.double()) * scale)
        setattr(parent, conv_name, fused)
        setattr(parent, bn_name, nn.Identity())
    return folded.eval().requires_grad_(False)
