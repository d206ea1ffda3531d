"""Weight sources and checkpoint formats, checked against torchvision as the independent reference."""

from __future__ import annotations

import copy
import os
import urllib.error
import zipfile
from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner
from torchvision.models import resnet18, resnet50, resnext50_32x4d
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from fpn_cli import UsageError, WeightsError, build_fpn
from fpn_cli.cli import main
from fpn_cli.models.frameworks.own import save

from conftest import randomize_batchnorm, rel_diff
from imagefactory import save_rgb

P_LEVELS = ("p2", "p3", "p4", "p5", "p6")
TV_NAMES = {"p2": "0", "p3": "1", "p4": "2", "p5": "3", "p6": "pool"}


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 67, 91, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def detector():
    """A COCO-layout Faster R-CNN: FrozenBatchNorm2d buffers, new-style FPN keys, rpn/roi heads."""
    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    return randomize_batchnorm(FasterRCNN(backbone, num_classes=91), tiny_var=True)


def tv_fpn_outputs(backbone, x):
    with torch.no_grad():
        out = backbone(x)
    return {ours: out[theirs] for ours, theirs in TV_NAMES.items()}


def assert_levels_match(model, reference, x):
    with torch.no_grad():
        ours = model(x)
    for name, ref in reference.items():
        assert rel_diff(ours[name], ref) <= 1e-4, name


def test_detector_state_dict_matches_torchvision_backbone(tmp_path, detector, image):
    path = tmp_path / "detector.pth"
    torch.save(detector.state_dict(), path)
    model = build_fpn(weights=path, levels=P_LEVELS)
    assert model.config.fpn_style == "torchvision"  # selected by the checkpoint
    assert_levels_match(model, tv_fpn_outputs(detector.backbone, image), image)


def test_backbone_with_fpn_state_dict_matches_torchvision(tmp_path, image):
    torch.manual_seed(1)
    backbone = randomize_batchnorm(
        resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=torch.nn.BatchNorm2d)
    )
    path = tmp_path / "backbone.pt"
    torch.save(backbone.state_dict(), path)
    assert any(k.endswith("num_batches_tracked") for k in backbone.state_dict())
    assert_levels_match(build_fpn(weights=path, levels=P_LEVELS), tv_fpn_outputs(backbone, image), image)


def test_old_style_fpn_keys_load(tmp_path, detector, image):
    old = OrderedDict(
        (k.replace(".0.weight", ".weight").replace(".0.bias", ".bias") if ".fpn." in k else k, v)
        for k, v in detector.state_dict().items()
    )
    assert "backbone.fpn.inner_blocks.0.weight" in old
    path = tmp_path / "old.pth"
    torch.save(old, path)
    assert_levels_match(
        build_fpn(weights=path, levels=P_LEVELS), tv_fpn_outputs(detector.backbone, image), image
    )


def test_coco_from_torch_home_uses_eps_zero_as_torchvision(torch_home, detector, image):
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    target = (
        torch_home / "hub" / "checkpoints" / os.path.basename(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url)
    )
    target.parent.mkdir(parents=True)
    torch.save(detector.state_dict(), target)
    as_torchvision_runs_it = copy.deepcopy(detector)
    overwrite_eps(as_torchvision_runs_it, 0.0)
    reference = tv_fpn_outputs(as_torchvision_runs_it.backbone, image)
    model = build_fpn(weights="coco", levels=P_LEVELS)
    assert model.config.fpn_style == "torchvision"
    assert_levels_match(model, reference, image)
    # the same file as a plain path keeps eps = 1e-5, which the tiny variances make visible
    with torch.no_grad():
        plain = build_fpn(weights=target)(image)["p2"]
    assert rel_diff(plain, reference["p2"]) > 1e-3


def tv_stage_outputs(net, x):
    getter = IntermediateLayerGetter(net, {f"layer{i}": f"c{i + 1}" for i in range(1, 5)})
    with torch.no_grad():
        return dict(getter(x))


@pytest.mark.parametrize("arch,builder", [("resnet18", resnet18), ("resnext50_32x4d", resnext50_32x4d)])
def test_classification_state_dict_gives_torchvision_stage_outputs(tmp_path, image, arch, builder):
    torch.manual_seed(2)
    net = randomize_batchnorm(builder())
    path = tmp_path / "cls.pth"
    torch.save(net.state_dict(), path)
    model = build_fpn(arch=arch, weights=path, levels=("c2", "c3", "c4", "c5"))
    assert_levels_match(model, tv_stage_outputs(net, image), image)


def test_imagenet_resnet50_loads_from_torch_home_without_network(torch_home, image):
    from torchvision.models import ResNet50_Weights

    torch.manual_seed(3)
    net = randomize_batchnorm(resnet50())
    target = torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert target.name == os.path.basename(ResNet50_Weights.DEFAULT.url)
    target.parent.mkdir(parents=True)
    torch.save(net.state_dict(), target)
    model = build_fpn(weights="imagenet", levels=("c2", "c3", "c4", "c5", "p2"))
    assert_levels_match(model, tv_stage_outputs(net, image), image)
    # the top-down layers keep the seeded initialisation
    seeded = build_fpn().state_dict()
    assert torch.equal(model.state_dict()["fpn.inner_blocks.0.weight"], seeded["fpn.inner_blocks.0.weight"])


def test_missing_imagenet_file_offline_is_one_line_naming_file_and_place(torch_home):
    with pytest.raises(WeightsError) as e:
        build_fpn(weights="imagenet")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in msg
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in msg


def test_failed_download_is_one_line_naming_file_and_place(torch_home, monkeypatch):
    monkeypatch.delenv("FPN_EXTRACT_OFFLINE")

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError) as e:
        build_fpn(weights="coco")
    msg = str(e.value)
    assert "\n" not in msg and "name resolution" in msg
    assert str(torch_home / "hub" / "checkpoints" / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth") in msg


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    _RunsCode.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode()}, path)
    with pytest.raises(WeightsError, match="refusing to load"):
        build_fpn(weights=path)
    assert not _RunsCode.marker.exists()


def test_unknown_keys_are_named(tmp_path):
    state = build_fpn(arch="seed").state_dict()
    state["decoder.cls.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(WeightsError, match=r"fit no known format: decoder\.cls\.weight"):
        build_fpn(arch="seed", weights=tmp_path / "x.pt")


def test_missing_keys_are_named(tmp_path):
    state = build_fpn(arch="seed").state_dict()
    del state["body.layer2.1.conv2.weight"]
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(WeightsError, match=r"lacks keys .*body\.layer2\.1\.conv2\.weight"):
        build_fpn(arch="seed", weights=tmp_path / "x.pt")


def test_checkpoint_of_another_arch_is_refused_with_a_hint(tmp_path):
    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="holds a resnet18 backbone, not resnet50: pass --arch resnet18"):
        build_fpn(arch="resnet50", weights=tmp_path / "r18.pth")
    assert build_fpn(weights=tmp_path / "r18.pth").config.arch == "resnet18"  # without --arch: the file's


def test_explicit_style_that_contradicts_the_checkpoint_is_an_error(tmp_path, detector):
    torch.save(detector.state_dict(), tmp_path / "det.pth")
    with pytest.raises(WeightsError, match="torchvision-style FPN"):
        build_fpn(weights=tmp_path / "det.pth", fpn_style="reference")


def test_own_format_round_trips_and_records_arch(tmp_path, image):
    model = build_fpn(arch="seed", seed=5)
    save(model, tmp_path / "own.pt")
    loaded = build_fpn(arch="seed", weights=tmp_path / "own.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image), rtol=0, atol=0)
    with pytest.raises(WeightsError, match="holds a seed backbone, not resnet50"):
        build_fpn(arch="resnet50", weights=tmp_path / "own.pt")


def test_training_wrappers_are_unwrapped(tmp_path, image):
    model = build_fpn(arch="seed", seed=7)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ddp.pt")
    loaded = build_fpn(arch="seed", weights=tmp_path / "ddp.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image), rtol=0, atol=0)


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_fpn(weights=tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="is not a file"):
        build_fpn(weights=tmp_path)
    with pytest.raises(WeightsError, match="takes random, imagenet, a zoo name or a file"):
        build_fpn(weights="foo:bar")
    with pytest.raises(WeightsError, match="did you mean imagenet"):
        build_fpn(weights="imagnet")  # a typo of a source name
    with pytest.raises(UsageError, match="did you mean mmdet:faster-rcnn_r50_fpn_1x_coco"):
        build_fpn(weights="mmdet:faster_rcnn_r50_fpn_1x_coco")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        build_fpn(weights=tmp_path / "junk.pth")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(WeightsError, match="not a pickle of numpy arrays.*empty or cut short"):
        build_fpn(weights=tmp_path / "empty.pkl")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("t.txt", "hi")
    with pytest.raises(WeightsError, match=r"not a PyTorch checkpoint, .*\(RuntimeError: file in archive"):
        build_fpn(weights=tmp_path / "other.zip")


def test_cli_with_imagenet_weights_missing_offline_is_one_line_exit_2(torch_home, tmp_path):
    save_rgb(tmp_path / "a.png", 16, 16)
    args = [str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--weights", "imagenet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "resnet50-11ad3fa6.pth" in lines[0] and str(torch_home) in lines[0]
    assert not (tmp_path / "out").exists()


def test_same_keys_but_other_shapes_are_named(tmp_path):
    state = build_fpn(arch="seed").state_dict()
    state["fpn.inner_blocks.1.weight"] = torch.zeros(256, 500, 1, 1)
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(WeightsError, match=r"fpn\.inner_blocks\.1\.weight has shape \(256, 500, 1, 1\)"):
        build_fpn(arch="seed", weights=tmp_path / "x.pth")


def test_weights_with_nan_or_inf_are_refused(tmp_path):
    """A diverged training run's checkpoint: every feature would be NaN."""
    state = build_fpn(arch="seed").state_dict()
    state["fpn.layer_blocks.0.weight"][0, 0, 0, 0] = float("nan")
    state["body.bn1.running_var"][3] = float("inf")
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(WeightsError, match=r"bn1\.running_var.*hold NaN or infinite values"):
        build_fpn(arch="seed", weights=tmp_path / "x.pth")


def test_non_finite_names_exactly_the_tensors_with_nan_or_inf():
    """The one test behind the weights' and the levels' checks: a finite tensor whose sum overflows
    is finite; NaN, +inf and -inf are found in any dtype."""
    from fpn_cli.models.numerics import non_finite

    tensors = {
        "big": torch.full((4,), 3e38),
        "nan": torch.tensor([1.0, float("nan")], dtype=torch.float16),
        "empty": torch.zeros(0),
        "infs": torch.tensor([float("inf"), float("-inf")], dtype=torch.float64),
        "ones": torch.ones(3, 3),
        "neg": torch.tensor([-float("inf")], dtype=torch.bfloat16),
    }
    assert non_finite(tensors) == ["nan", "infs", "neg"]
    assert non_finite({}) == []


def test_a_resnext_file_selects_resnext(tmp_path):
    torch.save(resnext50_32x4d().state_dict(), tmp_path / "rx.pth")
    assert build_fpn(weights=tmp_path / "rx.pth").config.arch == "resnext50_32x4d"


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="holds no state dict of tensors"):
        build_fpn(arch="seed", weights=tmp_path / "list.pt")


def test_named_sources_that_do_not_exist_for_an_arch(torch_home):
    with pytest.raises(WeightsError, match="'seed' has no ImageNet weights"):
        build_fpn(arch="seed", weights="imagenet")
    with pytest.raises(WeightsError, match="--arch resnet18 contradicts --weights coco .* needs resnet50"):
        build_fpn(arch="resnet18", weights="coco")


def test_the_fasterrcnn_builders_own_state_dict_matches_its_backbone(tmp_path, image):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(5)
    detector = randomize_batchnorm(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None))
    torch.save(detector.state_dict(), tmp_path / "frcnn.pth")
    model = build_fpn(weights=tmp_path / "frcnn.pth", levels=P_LEVELS)
    assert_levels_match(model, tv_fpn_outputs(detector.backbone, image), image)


def test_a_missing_file_is_downloaded_into_torchvisions_cache(torch_home, monkeypatch, image):
    monkeypatch.delenv("FPN_EXTRACT_OFFLINE")
    net = randomize_batchnorm(resnet18())
    fetched = []

    def fake_download(url, dst, hash_prefix, progress):
        fetched.append((url, dst, hash_prefix))
        torch.save(net.state_dict(), dst)  # what the real server would send

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_fpn(arch="resnet18", weights="imagenet", levels=("c2", "c3", "c4", "c5"))
    assert fetched == [
        (
            "https://download.pytorch.org/models/resnet18-f37072fd.pth",
            str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"),
            "f37072fd",
        )
    ]
    assert_levels_match(model, tv_stage_outputs(net, image), image)
