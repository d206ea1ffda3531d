"""The network's structure: shapes, levels, seeded initialisation, the reference top-down design."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fpn_cli import build_fpn
from fpn_cli.model import ARCHS, LEVELS, STRIDES, FPNConfig, fold_batchnorm, output_shapes, parameter_count

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


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_gives_ceil_size_over_stride_at_odd_sizes(arch):
    model = build_fpn(arch=arch, levels=LEVELS)
    h, w = 37, 53
    with torch.no_grad():
        feats = model(torch.randn(2, 3, h, w))
    assert list(feats) == list(LEVELS)
    stage_channels = ARCHS[arch].channels
    for name, f in feats.items():
        c = 256 if name.startswith("p") else stage_channels[int(name[1]) - 2]
        assert tuple(f.shape) == (2, c, math.ceil(h / STRIDES[name]), math.ceil(w / STRIDES[name])), name
        assert torch.isfinite(f).all(), name
        assert f.abs().max() < 100, f"{name}: random features should stay O(1), got {f.abs().max()}"


def test_meta_shapes_equal_real_shapes():
    config = FPNConfig("seed", levels=LEVELS)
    model = build_fpn(arch="seed", levels=LEVELS)
    with torch.no_grad():
        real = {k: tuple(v.shape[1:]) for k, v in model(torch.randn(1, 3, 45, 61)).items()}
    assert output_shapes(config, 45, 61) == real
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


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


def test_seeded_init_is_pinned():
    """The same numbers on every machine: the CPU generator, not the device, draws them."""
    w = build_fpn(arch="seed", seed=0).state_dict()["body.conv1.weight"]
    assert w.shape == (64, 3, 7, 7)
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (64 * 49)), rel=0.05)


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
