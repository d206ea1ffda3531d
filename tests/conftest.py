"""Shared helpers: torchvision reference models with non-trivial BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def randomize_batchnorm(model: nn.Module, seed: int = 1, tiny_var: bool = False) -> nn.Module:
    """Gives every (Frozen)BatchNorm non-trivial statistics, so a test notices a BN mapped wrongly.
    ``tiny_var`` makes some of the stem's running variances 1e-4, where eps = 0 vs 1e-5 shows."""
    g = torch.Generator().manual_seed(seed)
    first = True
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.weight.shape[0]
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                var = torch.rand(n, generator=g) * 1.5 + 0.5
                if tiny_var and first:
                    var[::3] = 1e-4
                first = False
                m.running_var.copy_(var)
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the issue's 'relative difference'."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME, and no downloads: a missing file must fail, not reach the network."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("FPN_EXTRACT_OFFLINE", "1")
    return home
