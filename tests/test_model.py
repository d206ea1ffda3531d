"""The network's structure: shapes, levels, seeded initialisation, the reference top-down design."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fpn_cli import build_fpn
from fpn_cli.models.backbones import ARCHS
from fpn_cli.models.model import FPNConfig, fold_batchnorm, level_info, output_shapes, parameter_count

from conftest import randomize_batchnorm, rel_diff


def test_seed_arch_gives_the_documented_shapes_for_600x900():
    model = build_fpn(arch="seed")
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 600, 900))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "p2": (1, 256, 150, 225),
        "p3": (1, 256, 75, 113),
        "p4": (1, 256, 38, 57),
        "p5": (1, 256, 19, 29),
    }


LEVELS = ("p2", "p3", "p4", "p5", "p6", "c2", "c3", "c4", "c5")
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32, "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_gives_ceil_size_over_stride_at_odd_sizes(arch):
    """Every registered architecture, every level it has: a new one is tested by being registered."""
    levels = tuple(level_info(FPNConfig(arch)))
    model = build_fpn(arch=arch, levels=levels)
    h, w = 37, 53
    with torch.no_grad():
        feats = model(torch.randn(2, 3, h, w))
    assert list(feats) == list(levels)
    for name, f in feats.items():
        info = model.level_info[name]
        assert info.stride == {**STRIDES, "c5a": 32, "p5a": 32}[name]
        assert tuple(f.shape) == (2, info.channels, math.ceil(h / info.stride), math.ceil(w / info.stride)), (
            name
        )
        assert torch.isfinite(f).all(), name
        assert f.abs().max() < 100, f"{name}: random features should stay O(1), got {f.abs().max()}"


def test_meta_shapes_equal_real_shapes():
    config = FPNConfig("seed", levels=LEVELS)
    model = build_fpn(arch="seed", levels=LEVELS)
    with torch.no_grad():
        real = {k: tuple(v.shape[1:]) for k, v in model(torch.randn(1, 3, 45, 61)).items()}
    assert output_shapes(config, 45, 61) == real
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


# one architecture per kind of layers: basic and bottleneck blocks, grouped and wide convolutions,
# MSRA's stride placement, torchvision's MobileNet, and timm's ConvNeXt (which refuses small inputs)
PROBED = ["seed", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet50_msra",
          "mobilenet_v3_large", "timm:convnext_atto"]  # fmt: skip


@pytest.mark.parametrize("arch", PROBED)
def test_the_empty_batch_probe_gives_the_meta_devices_shapes_and_refusals(arch):
    """The shapes of an empty batch on the CPU equal a meta-device forward's at odd sizes, and an
    input too small for one is too small for the other (the probe's fallback is never needed)."""
    from fpn_cli.models import model as model_mod

    def outcome(model, x):
        try:
            return model_mod._level_shapes(model, x)
        except RuntimeError:
            return "refused"

    config = FPNConfig(arch, levels=tuple(level_info(FPNConfig(arch))))
    outcomes = []
    for h, w in ((1, 1), (129, 67)):  # odd in both residues mod 4 that ceil, floor and round tell apart
        empty = outcome(model_mod._shapes_model(config), torch.empty(0, 3, h, w))
        assert empty == outcome(model_mod._meta_model(config), torch.empty(1, 3, h, w, device="meta"))
        outcomes.append(empty)
    assert outcomes[1] != "refused"
    assert (outcomes[0] == "refused") == arch.startswith("timm:convnext")  # its 4x4 stride-4 stem


def test_levels_come_back_in_the_order_asked():
    model = build_fpn(arch="seed", levels=("c3", "p5", "p2"))
    with torch.no_grad():
        assert list(model(torch.randn(1, 3, 64, 64))) == ["c3", "p5", "p2"]


def test_seeded_init_is_identical_across_builds_and_differs_by_seed():
    a, b = build_fpn(arch="seed", seed=0).state_dict(), build_fpn(arch="seed", seed=0).state_dict()
    c = build_fpn(arch="seed", seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.conv1.weight"], c["body.conv1.weight"])
    assert not torch.equal(a["fpn.inner_blocks.0.weight"], c["fpn.inner_blocks.0.weight"])


PINNED = {  # (arch, style): {key: (first three values, sum)}, as every release has drawn them
    ("seed", "reference"): {
        "body.conv1.weight": ([-0.028431749, -0.029101489, -0.0063280649], -2.47388571688316),
        "body.layer4.1.conv1.weight": ([0.021078793, -0.088715978, -0.11548747], -68.4932079868857),
        "fpn.inner_blocks.0.weight": ([0.06518805, 0.027474221, -0.043454923], -13.013256492002256),
        "fpn.layer_blocks.2.weight": ([-0.0051128711, 0.017088441, -0.021822626], 1.489431813761561),
        "body.layer4.1.bn3.weight": ([0.3535533845424652] * 3, 0.3535533845424652 * 2048),
    },
    ("resnet50", "torchvision"): {
        "body.layer4.1.conv1.weight": ([0.015542837, 0.0045939446, 0.075914547], -6.722384395672066),
        "fpn.inner_blocks.0.weight": ([-0.037962582, -0.042250521, -0.076560937], 11.811127413851409),
        "fpn.layer_blocks.2.weight": ([-0.016485892, -0.015876558, 0.0115663], -15.589861583000424),
        "body.layer4.2.bn3.weight": ([0.25] * 3, 0.25 * 2048),
    },
}


@pytest.mark.parametrize(("arch", "style"), list(PINNED))
def test_seeded_init_is_pinned(arch, style):
    """The same numbers on every machine and release: one CPU generator, in module order."""
    state = build_fpn(arch=arch, fpn_style=style, seed=0).state_dict()
    for key, (first, total) in PINNED[(arch, style)].items():
        assert state[key].flatten()[:3].tolist() == pytest.approx(first, rel=1e-6), key
        assert float(state[key].double().sum()) == pytest.approx(total, rel=1e-6), key


def test_reference_top_down_follows_the_design():
    """P5 = lateral(C5) unsmoothed; Pk = bilinear-up(Pk+1) + lateral(Ck), smoothed by a 3x3 conv."""
    model = build_fpn(arch="seed", levels=("c2", "c3", "c4", "c5", "p2", "p3", "p4", "p5"))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 75, 99))
        sd = model.state_dict()

        def lateral(i, c):
            return F.conv2d(c, sd[f"fpn.inner_blocks.{i}.weight"], sd[f"fpn.inner_blocks.{i}.bias"])

        inner = lateral(3, out["c5"])
        torch.testing.assert_close(out["p5"], inner)
        for i, k in ((2, 4), (1, 3), (0, 2)):
            lat = lateral(i, out[f"c{k}"])
            inner = lat + F.interpolate(inner, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            w, b = sd[f"fpn.layer_blocks.{i}.weight"], sd[f"fpn.layer_blocks.{i}.bias"]
            torch.testing.assert_close(out[f"p{k}"], F.conv2d(inner, w, b, padding=1))


def test_reference_style_has_no_p5_smoothing_conv_and_torchvision_style_has():
    ref = build_fpn(arch="seed").state_dict()
    tv = build_fpn(arch="seed", fpn_style="torchvision").state_dict()
    assert "fpn.layer_blocks.3.weight" not in ref
    assert "fpn.layer_blocks.3.weight" in tv


@pytest.mark.parametrize("arch", ["seed", "resnet18", "resnext50_32x4d"])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_folded_batchnorm_agrees_with_the_unoptimised_model(arch, eps):
    model = build_fpn(arch=arch, levels=("c2", "c5", "p2", "p3", "p4", "p5", "p6"))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = eps
    randomize_batchnorm(model, seed=4)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 45, 67)
    with torch.no_grad():
        ref, fast = model(x), folded(x.contiguous(memory_format=torch.channels_last))
        for name in ref:
            assert rel_diff(fast[name], ref[name]) <= 1e-4, name
