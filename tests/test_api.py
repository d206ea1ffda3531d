"""The library's front door: ``from fpn_cli import build_fpn, extract`` and how ``extract`` takes
its options; reading the features back for training (dtype, collate)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fpn_cli import FeatureDataset, Options, collate_features, extract, open_features

from conftest import Forked
from imagefactory import save_rgb


def test_keywords_replace_the_fields_of_the_options_given(tmp_path):
    save_rgb(tmp_path / "a.png", 32, 32)
    base = Options(arch="seed", device="cpu", levels=("p2", "p3"))
    report = extract([tmp_path / "a.png"], tmp_path / "out", base, levels="p5", save_dtype="float16")
    assert report.exit_status == 0
    assert sorted(p.name for p in (tmp_path / "out" / "a").iterdir()) == ["input.json", "p5.npy"]
    assert np.load(tmp_path / "out" / "a" / "p5.npy").dtype == np.float16
    model = json.loads((tmp_path / "out" / "report.json").read_text())["model"]
    assert model["arch"] == "seed" and model["levels"] == ["p5"] and model["save_dtype"] == "float16"


@pytest.mark.parametrize("options", [None, Options(arch="seed", device="cpu")])
def test_a_keyword_that_is_no_option_is_an_error_naming_it(tmp_path, options):
    save_rgb(tmp_path / "a.png", 16, 16)
    with pytest.raises(TypeError, match="batchsize"):
        extract([tmp_path / "a.png"], tmp_path / "out", options, arch="seed", batchsize=4)
    assert not (tmp_path / "out").exists()


def test_the_library_imports_and_builds_without_posix_only_modules():
    """As on Windows: ``fcntl`` (the run's locks, O_DIRECT's fallback) is imported only where used.
    The package is imported afresh in a fork of this process (torch, which needs no fcntl, stays)."""

    def without_fcntl() -> None:
        for name in [m for m in sys.modules if m == "fpn_cli" or m.startswith("fpn_cli.")]:
            del sys.modules[name]
        sys.modules["fcntl"] = None  # any import of it fails
        torch.set_num_threads(1)  # a fork keeps no thread pool of this process
        from fpn_cli import build_fpn, extract

        assert callable(extract)  # the run's modules import too
        feats = build_fpn(arch="seed")(torch.zeros(1, 3, 64, 64))
        print(sorted(feats), tuple(feats["p5"].shape))

    proc = Forked(without_fcntl)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "['p2', 'p3', 'p4', 'p5'] (1, 256, 2, 2)"


# --- reading for training: dtype and collate (docs/reading.md) ---------------------------------------


@pytest.fixture(scope="module")
def half_folders(tmp_path_factory) -> dict[str, Path]:
    """Four 32x48 images stored in float16, boxes for two of them, in either format."""
    root = tmp_path_factory.mktemp("half")
    for i in range(4):
        save_rgb(root / "in" / f"im{i}.png", 32, 48, seed=i)
    boxes = root / "boxes.csv"
    boxes.write_text("path,x1,y1,x2,y2\nim0.png,0,0,20,16\nim0.png,4,4,40,30\nim2.png,1,1,30,20\n")
    folders = {}
    for fmt in ("npy", "shards"):
        out = root / fmt
        base = Options(arch="seed", device="cpu", save_dtype="float16", boxes=str(boxes), format=fmt)
        assert extract([root / "in"], out, base).exit_status == 0
        folders[fmt] = out
    return folders


@pytest.mark.parametrize("fmt", ["npy", "shards"])
def test_readers_return_float32_unless_asked_otherwise(half_folders, fmt):
    out = half_folders[fmt]
    stored = open_features(out, dtype=None)["im0"]
    assert stored["p3"].dtype == np.float16 and stored["rois"].dtype == np.float16
    read = open_features(out)["im0"]
    assert read["p3"].dtype == np.float32 and read["rois"].dtype == np.float32
    assert read["boxes"].dtype == np.float64  # boxes stay exact
    assert np.array_equal(read["p3"], stored["p3"].astype(np.float32))
    assert open_features(out, dtype=np.float16)["im0"]["p3"].dtype == np.float16
    item = FeatureDataset(out)[0]
    assert item["p5"].dtype == torch.float32 and item["p5"].shape == (256, 1, 2)
    assert FeatureDataset(out, dtype=None)[0]["p5"].dtype == torch.float16
    assert FeatureDataset(out, dtype=torch.bfloat16)[0]["p5"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="floating torch dtype"):
        FeatureDataset(out, dtype=torch.int8)


def test_float32_features_stay_memory_mapped(tmp_path):
    save_rgb(tmp_path / "a.png", 32, 32)
    extract([tmp_path / "a.png"], tmp_path / "out", arch="seed", device="cpu", format="shards")
    p2 = open_features(tmp_path / "out")["a"]["p2"]
    assert p2.dtype == np.float32 and not p2.flags.owndata and not p2.flags.writeable


@pytest.mark.parametrize("fmt", ["npy", "shards"])
def test_a_dataloader_batches_images_with_and_without_boxes_and_a_model_trains(half_folders, fmt):
    from torch.utils.data import DataLoader

    loader = DataLoader(FeatureDataset(half_folders[fmt]), batch_size=4, collate_fn=collate_features)
    (batch,) = list(loader)
    assert batch["key"] == ["im0", "im1", "im2", "im3"]
    assert batch["p5"].shape == (4, 256, 1, 2) and batch["p5"].dtype == torch.float32
    assert [len(r) for r in batch["rois"]] == [2, 0, 1, 0]
    assert {tuple(r.shape[1:]) for r in batch["rois"]} == {(256, 7, 7)}
    assert [tuple(b.shape) for b in batch["boxes"]] == [(2, 4), (0, 4), (1, 4), (0, 4)]
    assert all(r.dtype == torch.float32 for r in batch["rois"])
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    before = head.weight.detach().clone()
    logits = head(batch["p5"].mean(dim=(2, 3)))  # pooled p5: (4, 256) -> (4, 2)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(head.weight, before)


def test_levels_of_different_sizes_come_as_a_list(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 32, 32)
    save_rgb(tmp_path / "in" / "b.png", 64, 32)
    extract([tmp_path / "in"], tmp_path / "out", arch="seed", device="cpu", levels="p5")
    batch = collate_features([item for item in FeatureDataset(tmp_path / "out")])
    assert [tuple(t.shape) for t in batch["p5"]] == [(256, 1, 1), (256, 2, 1)]
