"""The model zoo, offline: each entry against its framework, from files in the frameworks' exact
formats under their official names in a temporary $TORCH_HOME."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from fpn_cli import UsageError, WeightsError, build_fpn, extract
from fpn_cli.cli import main
from fpn_cli.formats import SETTINGS_FILE
from fpn_cli.inputs.images import Resize
from fpn_cli.models import zoo as zoo_mod
from fpn_cli.models.backbones import ARCHS
from fpn_cli.models.builder import resolve
from fpn_cli.models.frameworks import FRAMEWORKS, Framework, detect, read_file, register
from fpn_cli.models.hub import ResizePolicy, WeightsWarning, ZooEntry, cache_root
from fpn_cli.models.levels import LEVELS
from fpn_cli.models.model import FPNConfig, build_model, level_info, output_shapes
from fpn_cli.models.preprocess import Preprocess
from fpn_cli.models.pyramid import FPNSpec, MaxPool
from fpn_cli.models.weights import KeyFormat, RawCheckpoint, load_into
from fpn_cli.models.zoo_table import TABLE
from fpn_cli.models.zoo_table import TORCHVISION as DETECTORS
from fpn_cli.run.engine import Engine

from conftest import randomize_batchnorm, rel_diff
from frameworks import (
    SeedFPN,
    d2_forward,
    d2_state,
    mmdet_forward,
    mmdet_state,
    write_d2_pkl,
    write_mmdet_pth,
)
from imagefactory import save_rgb

R50 = (3, 4, 6, 3)


def crop(t: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    return t[..., : math.ceil(h / stride), : math.ceil(w / stride)]


# --- torchvision ------------------------------------------------------------------------------------

TV_OUTPUTS = {  # our levels, in the order of torchvision's backbone outputs
    "fasterrcnn_resnet50_fpn": ("p2", "p3", "p4", "p5", "p6"),
    "fasterrcnn_resnet50_fpn_v2": ("p2", "p3", "p4", "p5", "p6"),
    "maskrcnn_resnet50_fpn": ("p2", "p3", "p4", "p5", "p6"),
    "maskrcnn_resnet50_fpn_v2": ("p2", "p3", "p4", "p5", "p6"),
    "retinanet_resnet50_fpn": ("p3", "p4", "p5", "p6", "p7"),
    "retinanet_resnet50_fpn_v2": ("p3", "p4", "p5", "p6", "p7"),
    "keypointrcnn_resnet50_fpn": ("p2", "p3", "p4", "p5", "p6"),
    "fcos_resnet50_fpn": ("p3", "p4", "p5", "p6", "p7"),
    "fasterrcnn_mobilenet_v3_large_fpn": ("p5a", "p5", "p6"),
}


def test_every_torchvision_detector_builder_is_in_the_zoo():
    assert set(TV_OUTPUTS) == set(DETECTORS)


@pytest.mark.parametrize("builder", list(TV_OUTPUTS))
def test_the_declared_torchvision_rows_agree_with_torchvisions_weights_and_builders(builder):
    """zoo_table.py restates torchvision's facts so that `fpn-extract models` needs no torch: each
    one against torchvision's weights enum and its builder's transform (built on the meta device)."""
    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights(builder).DEFAULT
    entry = zoo_mod.entry(f"torchvision:{builder}")
    assert entry.url == weights.url
    assert entry.cache_name == os.path.basename(weights.url)  # torch.hub's name, with its SHA-256 prefix
    assert entry.size_mb == weights.meta["_file_size"] and not entry.size_estimated
    assert DETECTORS[builder][-1] == len(weights.meta["categories"])
    with torch.device("meta"):
        detector = get_model(builder, weights=None, weights_backbone=None)
    # in eval mode GeneralizedRCNNTransform resizes the shorter side to min_size[-1]
    resize = (detector.transform.min_size[-1], detector.transform.max_size)
    assert (entry.resize.short_side, entry.resize.max_side) == resize == (800, 1333)


def test_the_declared_table_is_what_the_registered_frameworks_serve():
    declared = [e for entries in TABLE.values() for e in entries]
    assert declared == list(zoo_mod.zoo().values())
    assert [e.name for e in zoo_mod.listing()] == [e.name for e in declared]  # frameworks loaded: theirs
    for entry in declared:
        framework = FRAMEWORKS[entry.family]
        assert (entry.resize, entry.pad_multiple) == (framework.resize, framework.pad_multiple)


def test_the_cache_folder_is_torch_hubs_with_or_without_torch(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_HOME", raising=False)
    for env in ({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {"TORCH_HOME": str(tmp_path / "th")}):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        expected = os.path.join(torch.hub.get_dir(), "checkpoints")
        assert str(cache_root()) == expected
        with monkeypatch.context() as m:
            m.delitem(sys.modules, "torch.hub")  # as before torch is imported
            assert str(cache_root()) == expected


@pytest.mark.parametrize("builder", list(TV_OUTPUTS))
def test_torchvision_entry_equals_the_builders_own_detector(builder, torch_home):
    """The builder run as torchvision runs it (FrozenBN, overwrite_eps, BN in v2 FPNs) on the same
    cached file: every level within 1e-4 relative."""
    import torchvision

    build = torchvision.models.get_model_builder(builder)
    torch.manual_seed(0)
    raw = randomize_batchnorm(build(weights=None, weights_backbone=None), tiny_var=True)
    entry = zoo_mod.entry(f"torchvision:{builder}")
    entry.path().parent.mkdir(parents=True)
    torch.save(raw.state_dict(), entry.path())
    del raw
    reference = build(weights="DEFAULT").eval()  # loads the cached file: no network
    x = torch.randn(1, 3, 75, 101, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = list(reference.backbone(x).values())
    ours = build_fpn(weights=entry.name, levels=TV_OUTPUTS[builder])
    with torch.no_grad():
        got = ours(x)
    assert list(got) == list(TV_OUTPUTS[builder])
    diffs = {}
    for (name, level), ref in zip(got.items(), expected, strict=True):
        assert level.shape == ref.shape, name
        diffs[name] = rel_diff(level, ref)
    print(f"torchvision:{builder}: worst {max(diffs.values()):.1e}")
    assert max(diffs.values()) <= 1e-4, diffs


def test_coco_is_the_alias_of_the_v1_faster_rcnn():
    a, b = resolve(weights="coco"), resolve(weights="torchvision:fasterrcnn_resnet50_fpn")
    assert a.config == b.config and a.weights == b.weights == "torchvision:fasterrcnn_resnet50_fpn"
    assert a.config.bn_eps == 0.0 and a.config.fpn_style == "torchvision"


# --- detectron2 -------------------------------------------------------------------------------------

D2_RCNN = "detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x"
D2_RETINA = "detectron2:COCO-Detection/retinanet_R_50_FPN_1x"


def image_file(tmp_path, h=45, w=71):
    path = tmp_path / "in" / "odd.png"
    save_rgb(path, h, w, seed=3)
    return path


def framework_input(path, mean, std, bgr: bool, pad: int = 32) -> torch.Tensor:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    x = torch.from_numpy(rgb[..., ::-1].copy() if bgr else rgb).permute(2, 0, 1)[None]
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % pad, 0, -h % pad))  # zeros after normalisation, bottom and right


def stored(out, key, levels):
    return {name: torch.from_numpy(np.load(out / key / f"{name}.npy")) for name in levels}


@pytest.mark.parametrize(("name", "retinanet"), [(D2_RCNN, False), (D2_RETINA, True)])
def test_detectron2_entry_equals_detectron2s_semantics(name, retinanet, torch_home, tmp_path):
    """BGR 0-255 minus PIXEL_MEAN, padded to 32, stride on the 1x1 conv, x2 nearest top-down,
    P6 max-pool or P6/P7 from C5; levels cropped to ceil(H/stride). An odd-sized image."""
    entry = zoo_mod.entry(name)
    sd = d2_state(R50, retinanet=retinanet, seed=2)
    write_d2_pkl(sd, entry.path())
    assert entry.path().relative_to(torch_home / "hub" / "checkpoints").parts[0] == "detectron2"
    path = image_file(tmp_path)
    levels = ("p3", "p4", "p5", "p6", "p7") if retinanet else ("p2", "p3", "p4", "p5", "p6")
    report = extract([path], tmp_path / "out", weights=name, levels=levels, device="cpu")
    assert report.exit_status == 0
    x = framework_input(path, (103.530, 116.280, 123.675), (1.0, 1.0, 1.0), bgr=True)
    with torch.no_grad():
        expected = d2_forward(sd, x, R50, 1, stride_in_1x1=True, retinanet=retinanet)
    got = stored(tmp_path / "out", "odd", levels)
    diffs = {}
    for level in levels:
        ref = crop(expected[level], 45, 71, 2 ** int(level[1]))
        assert got[level].shape == ref.shape[1:], level
        diffs[level] = rel_diff(got[level], ref[0])
    print(f"{name}: worst {max(diffs.values()):.1e}")
    assert max(diffs.values()) <= 1e-4, diffs


def test_the_msra_stride_placement_matters(torch_home, tmp_path):
    """The same file read as a torchvision-style ResNet (stride on the 3x3) gives other features:
    the zoo's per-model stride placement is not a no-op."""
    sd = d2_state(R50, seed=2)
    write_d2_pkl(sd, tmp_path / "model_final.pkl")
    x = framework_input(image_file(tmp_path), (103.530, 116.280, 123.675), (1.0, 1.0, 1.0), bgr=True)
    msra = build_fpn(weights=tmp_path / "model_final.pkl", levels=("c3",))
    assert msra.config.arch == "resnet50_msra"
    plain = build_fpn(arch="resnet50", weights=tmp_path / "model_final.pkl", levels=("c3",))
    with torch.no_grad():
        assert rel_diff(plain(x)["c3"], msra(x)["c3"]) > 0.05


@pytest.mark.parametrize(("protocol", "old_numpy"), [(2, True), (3, False), (4, True), (4, False)])
def test_detectron2_pickles_of_every_protocol_and_numpy_load_alike(tmp_path, protocol, old_numpy):
    """Every pickle protocol, and numpy 1's and 2's module paths (each protocol with one of them)."""
    sd = d2_state((1, 1, 1, 1), seed=4)
    write_d2_pkl(sd, tmp_path / "m.pkl", protocol=protocol, old_numpy=old_numpy)
    ckpt = read_file(tmp_path / "m.pkl")
    assert ckpt.format == "detectron2"
    assert torch.equal(
        ckpt.state["body.layer1.0.bn2.running_var"], sd["backbone.bottom_up.res2.0.conv2.norm.running_var"]
    )
    assert torch.equal(ckpt.state["fpn.inner_blocks.3.weight"], sd["backbone.fpn_lateral5.weight"])


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pkl_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {"x": _Payload()}, "__author__": "x"}))
    with pytest.raises(
        WeightsError, match="refusing to load .*evil.pkl.*posix.system|refusing to load .*system"
    ):
        build_fpn(weights=tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()


# --- mmdetection ------------------------------------------------------------------------------------

MM_PYTORCH = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), False)
MM_CAFFE = ((103.530, 116.280, 123.675), (1.0, 1.0, 1.0), True)


@pytest.mark.parametrize(
    ("name", "retinanet"),
    [("mmdet:faster-rcnn_r50_fpn_1x_coco", False), ("mmdet:retinanet_r50_fpn_1x_coco", True)],
)
def test_mmdet_entry_equals_mmdetections_semantics(name, retinanet, torch_home, tmp_path):
    """RGB with mean/std in 0-255, padded to 32, stride on the 3x3 conv, nearest to size, P6
    max-pool or (RetinaNet) P6 from C5 and P7 from P6 with no ReLU between."""
    entry = zoo_mod.entry(name)
    sd = mmdet_state(R50, retinanet=retinanet, seed=5)
    write_mmdet_pth(sd, entry.path(), config="model = dict(backbone=dict(style='pytorch'))")
    path = image_file(tmp_path, 53, 38)
    levels = ("p3", "p4", "p5", "p6", "p7") if retinanet else ("p2", "p3", "p4", "p5", "p6")
    assert extract([path], tmp_path / "out", weights=name, levels=levels, device="cpu").exit_status == 0
    mean, std, bgr = MM_PYTORCH
    with torch.no_grad():
        expected = mmdet_forward(sd, framework_input(path, mean, std, bgr), R50, 1, False, retinanet)
    got = stored(tmp_path / "out", "odd", levels)
    diffs = {
        level: rel_diff(got[level], crop(expected[level], 53, 38, 2 ** int(level[1]))[0]) for level in levels
    }
    print(f"{name}: worst {max(diffs.values()):.1e}")
    assert max(diffs.values()) <= 1e-4, diffs


def test_a_local_mmdet_caffe_file_brings_its_style(tmp_path):
    """A file given by path: its meta config says caffe style (stride on the 1x1 conv, BGR)."""
    sd = mmdet_state(R50, seed=6)
    write_mmdet_pth(sd, tmp_path / "faster.pth", config="backbone=dict(type='ResNet', style='caffe')")
    spec = resolve(weights=tmp_path / "faster.pth")
    assert spec.config.arch == "resnet50_msra" and spec.preprocess.channel_order == "BGR"
    path = image_file(tmp_path, 40, 66)
    assert extract([path], tmp_path / "out", weights=tmp_path / "faster.pth", device="cpu").exit_status == 0
    mean, std, bgr = MM_CAFFE
    with torch.no_grad():
        expected = mmdet_forward(sd, framework_input(path, mean, std, bgr), R50, 1, True, False)
    got = stored(tmp_path / "out", "odd", ("p2", "p3", "p4", "p5"))
    for level, t in got.items():
        assert rel_diff(t, crop(expected[level], 40, 66, 2 ** int(level[1]))[0]) <= 1e-4, level


# --- the seed project's own checkpoints -------------------------------------------------------------


@pytest.mark.parametrize(("blocks", "arch"), [((2, 2, 2, 2), "seed"), ((3, 4, 6, 3), "resnet50")])
def test_seed_code_checkpoints_load_and_equal_its_forward(tmp_path, blocks, arch):
    torch.manual_seed(0)
    seed_model = randomize_batchnorm(SeedFPN(blocks))
    torch.save(seed_model.state_dict(), tmp_path / "fpn.pth")
    ours = build_fpn(arch=arch, weights=tmp_path / "fpn.pth")
    assert ours.config.fpn_style == "reference"
    x = torch.randn(1, 3, 67, 93, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = seed_model(x)
        got = ours(x)
    for level, ref in zip(("p2", "p3", "p4", "p5"), expected, strict=True):
        assert rel_diff(got[level], ref) <= 1e-4, level


# --- timm ---------------------------------------------------------------------------------------------


def test_timm_backbone_gives_timms_features_and_our_fpn_on_top():
    timm = pytest.importorskip("timm")
    ours = build_fpn(arch="timm:resnet18", levels=("c2", "c3", "c4", "c5", "p2", "p5"))
    reference = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    reference.load_state_dict(ours.body.net.state_dict())
    x = torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        got = ours(x)
        fast, _ = Engine(ours, torch.device("cpu"), "float32", "float32").forward(x)
    for level, ref in zip(("c2", "c3", "c4", "c5"), expected, strict=True):
        assert rel_diff(got[level], ref) <= 1e-5, level
    assert got["p2"].shape == (1, 256, 18, 23) and got["p5"].shape == (1, 256, 3, 3)
    for level in got:
        assert rel_diff(fast[level], got[level]) <= 1e-4, level  # BatchNorm folded, channels-last


def test_timm_imagenet_offline_is_one_line(tmp_path, monkeypatch, torch_home):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    save_rgb(tmp_path / "a.png", 32, 32)
    result = CliRunner().invoke(
        main,
        [
            str(tmp_path / "a.png"),
            "-o",
            str(tmp_path / "out"),
            "--arch",
            "timm:resnet18",
            "--weights",
            "imagenet",
        ],
    )
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "timm:resnet18" in result.output
    assert "Traceback" not in result.output
    # the repository and file to place, and where
    assert "model.safetensors of the Hugging Face repository timm/resnet18.a1_in1k" in result.output
    assert str(tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k") in result.output


def test_timm_imagenet_without_network_fails_at_once_not_after_the_hubs_retries(tmp_path, monkeypatch):
    """No FPN_EXTRACT_OFFLINE, and the hub's host does not resolve: the error comes before timm
    tries a download (which would retry for a minute)."""
    timm = pytest.importorskip("timm")
    import socket

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("FPN_EXTRACT_OFFLINE", raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_download(*args, **kwargs):
        raise AssertionError("timm reached for the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_download)
    with pytest.raises(WeightsError, match="timm/resnet18.a1_in1k.* huggingface.co cannot be reached"):
        build_fpn(arch="timm:resnet18", weights="imagenet")


def test_a_timm_model_without_stride_4_features_is_refused():
    pytest.importorskip("timm")
    result = CliRunner().invoke(main, ["--summary", "--arch", "timm:vit_tiny_patch16_224"])
    assert result.exit_code == 2 and "FPN needs 4, 8, 16 and 32" in result.output


def test_timm_missing_is_a_one_line_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    result = CliRunner().invoke(main, ["--summary", "--arch", "timm:resnet18"])
    assert result.exit_code == 2 and "pip install 'fpn-extract[timm]'" in result.output


# --- every entry, offline -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(zoo_mod.zoo()))
def test_summary_of_every_entry_needs_no_download(name, torch_home):
    result = CliRunner().invoke(main, ["--summary", "--weights", name, "--input-size", "333x517"])
    assert result.exit_code == 0, result.output
    entry = zoo_mod.entry(name)
    assert result.output.startswith(f"{entry.arch}, {entry.fpn_style} FPN")
    rows = [
        line.split()[0] for line in result.output.splitlines() if line[:1] in "PC" and line[1:2].isdigit()
    ]
    assert rows == [level.upper() for level in entry.levels]
    assert not any(torch_home.rglob("*.p*"))


def test_offline_zoo_file_error_names_url_and_exact_path(torch_home, tmp_path):
    save_rgb(tmp_path / "a.png", 32, 32)
    result = CliRunner().invoke(
        main, [str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--weights", D2_RCNN]
    )
    assert result.exit_code == 2
    entry = zoo_mod.entry(D2_RCNN)
    assert entry.url in result.output and str(entry.path()) in result.output
    assert "/detectron2/COCO-Detection/faster_rcnn_R_50_FPN_3x/137849458/model_final_280758.pkl" in str(
        entry.path()
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", D2_RCNN, "--arch", "resnet50"], "--arch resnet50 contradicts --weights"),
        (["--weights", D2_RETINA, "--levels", "p2"], "has no level p2"),
        (["--weights", "coco", "--fpn-style", "reference"], "--fpn-style reference contradicts"),
        (["--weights", "detectron2:COCO-Detection/nope"], "no such model in the zoo"),
    ],
)
def test_zoo_contradictions_are_usage_errors(args, message):
    result = CliRunner().invoke(main, ["--summary", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_pad_multiple_pads_with_zeros_and_crops_back():
    model = build_fpn(arch="seed", fpn_style="torchvision", levels=("p2", "p5"), pad_multiple=32)
    plain = build_fpn(arch="seed", fpn_style="torchvision", levels=("p2", "p5"))
    x = torch.randn(1, 3, 45, 70, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x)
        expected = plain(F.pad(x, (0, 26, 0, 19)))
    for level, stride in (("p2", 4), ("p5", 32)):
        assert got[level].shape[-2:] == (math.ceil(45 / stride), math.ceil(70 / stride))
        torch.testing.assert_close(got[level], crop(expected[level], 45, 70, stride))


def test_models_lists_every_entry_with_its_columns(torch_home):
    entry = zoo_mod.entry(D2_RCNN)
    write_d2_pkl(d2_state((1, 1, 1, 1)), entry.path())  # one cached file
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = {
        line.split()[0]: line.split() for line in result.output.splitlines()[1:] if ":" in line.split(" ")[0]
    }
    assert set(lines) == set(zoo_mod.zoo())
    assert lines[D2_RCNN][1:3] == ["resnet50_msra", "p2,p3,p4,p5"] and lines[D2_RCNN][-1] == "yes"
    assert "short 800, max 1333" in " ".join(lines[D2_RCNN])  # detectron2's ResizeShortestEdge
    assert lines["torchvision:fcos_resnet50_fpn"][-1] == "no"
    assert "124 MB" in " ".join(lines["torchvision:fcos_resnet50_fpn"])  # torchvision's stated size
    assert str(torch_home) in result.output


def test_models_filters_and_an_input_named_models_is_reached_as_a_path(tmp_path, monkeypatch):
    result = CliRunner().invoke(main, ["models", "fcos"])
    assert result.exit_code == 0 and len(result.output.strip().splitlines()) == 4  # header, row, blank, note
    monkeypatch.chdir(tmp_path)
    save_rgb(tmp_path / "models" / "a.png", 16, 16)
    result = CliRunner().invoke(main, ["./models", "-o", "out", "--arch", "seed", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a" / "p2.npy").exists()


# --- every registered framework and zoo entry, by being registered --------------------------------------


def _torchvision_layout(entry) -> dict[str, torch.Tensor]:
    """The builder's own detector, on the meta device: its exact keys and shapes."""
    import torchvision

    with torch.device("meta"):
        detector = torchvision.models.get_model_builder(entry.name.split(":", 1)[1])(
            weights=None, weights_backbone=None
        )
    return detector.state_dict()


def _resnet_layout(make):
    def layout(entry) -> dict[str, torch.Tensor]:
        arch = ARCHS[entry.arch]
        return make(arch.layers, arch.groups, arch.width_per_group, retinanet="p7" in entry.levels, meta=True)

    return layout


# each family's checkpoint layout, written from the framework's sources (tests/frameworks.py)
LAYOUTS = {
    "torchvision": _torchvision_layout,
    "detectron2": _resnet_layout(d2_state),
    "mmdet": _resnet_layout(mmdet_state),
}


# torch's BatchNorm fills a missing num_batches_tracked with a CPU zero, a no-op on the meta device
@pytest.mark.filterwarnings("ignore:for .*num_batches_tracked:UserWarning")
@pytest.mark.parametrize("name", sorted(zoo_mod.zoo()))
def test_every_zoo_entry_loads_its_frameworks_exact_layout_on_the_meta_device(name):
    """A checkpoint in the family's exact key layout (shapes only) is recognised as the family's,
    fills every parameter of the entry's model with nothing left over, and the model gives the
    entry's levels at ⌈H/stride⌉ x ⌈W/stride⌉. No real forward (an empty batch): heavy backbones
    cost nothing."""
    entry = zoo_mod.entry(name)
    assert entry.family in LAYOUTS, f"add a synthetic {entry.family} layout to LAYOUTS (tests/frameworks.py)"
    state = {k: v.to("meta") for k, v in LAYOUTS[entry.family](entry).items()}  # shapes only
    raw = RawCheckpoint(state, {}, name)
    owner = detect(raw)
    assert owner.name == entry.family
    model = build_model(resolve(weights=name).config, device="meta")
    load_into(model, owner.read(raw), fpn_required=True)  # every key placed, none missing, shapes equal
    with torch.no_grad():  # an empty batch through uninitialised memory: the layer arithmetic alone
        out = model.to_empty(device="cpu")(torch.empty(0, 3, 333, 517))
    assert list(out) == list(entry.levels)
    for level, t in out.items():
        stride = LEVELS[level].stride
        assert tuple(t.shape) == (0, 256, math.ceil(333 / stride), math.ceil(517 / stride)), level
    assert entry.resize == owner.resize and entry.resize is not None  # every zoo detector has its resize


@pytest.mark.parametrize("style", sorted(style for fw in FRAMEWORKS.values() for style in fw.styles))
def test_every_registered_fpn_style_gives_ceil_shapes_on_the_meta_device(style):
    config = FPNConfig("resnet50", style, levels=None)
    every = tuple(level_info(config))
    shapes = output_shapes(FPNConfig("resnet50", style, levels=every), 129, 67)
    for level, (_, h, w) in shapes.items():
        stride = LEVELS[level].stride
        assert (h, w) == (math.ceil(129 / stride), math.ceil(67 / stride)), level


def test_built_in_layouts_are_claimed_by_their_framework_alone():
    """Detection is by claims, not by order: no file of one framework is claimed by another."""
    for family, layout in LAYOUTS.items():
        entry = next(e for e in zoo_mod.zoo().values() if e.family == family)
        assert detect(RawCheckpoint(layout(entry), {}, entry.name)).name == family


# --- a new family is one module and one registry line ------------------------------------------------------

TOY_RESIZE = ResizePolicy(32, 48, "toy's test config")


@pytest.fixture
def toy_family(torch_home):
    """A framework defined and registered here, as a new module would: its own key layout
    (``toy_body.*``, ``toy_fpn.*``), FPN variant, preprocessing, resize policy and zoo table."""

    @register
    class Toy(Framework):
        name = "toy"
        keys = KeyFormat(((r"toy_body\.(.*)", r"body.\1"), (r"toy_fpn\.(.*)", r"fpn.\1")))
        styles = {"toy": FPNSpec("nearest", extra=MaxPool(), description="torchvision's, renamed")}
        preprocess = Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), label="RGB/255, toy mean/std")
        resize = TOY_RESIZE

        def claims(self, raw):
            return any(k.startswith("toy_body.") for k in raw.state)

        def style_of(self, ckpt):
            return "toy"

        def entries(self):
            return [
                ZooEntry(
                    "toy:tiny", "seed", "toy", ("p2", "p3", "p4", "p5", "p6"), self.preprocess,
                    "https://example.invalid/toy/tiny.pth", "toy/tiny.pth", 1.0, read_file,
                    resize=self.resize,
                )
            ]  # fmt: skip

    try:
        reference = build_fpn(arch="seed", fpn_style="torchvision", levels=("p2", "p6"), seed=7)
        state = {re.sub(r"^(body|fpn)\.", r"toy_\1.", k): v for k, v in reference.state_dict().items()}
        path = zoo_mod.entry("toy:tiny").path()
        path.parent.mkdir(parents=True)
        torch.save(state, path)
        yield reference
    finally:
        del FRAMEWORKS["toy"]


def test_a_registered_family_is_listed_resolved_and_built_through(toy_family, tmp_path):
    x = torch.randn(1, 3, 45, 70, generator=torch.Generator().manual_seed(0))
    model = build_fpn(weights="toy:tiny", levels=("p2", "p6"))
    assert model.config.fpn_style == "toy"
    with torch.no_grad():
        got, expected = model(x), toy_family(x)
    for level in ("p2", "p6"):
        torch.testing.assert_close(got[level], expected[level], rtol=0, atol=0)
    spec = resolve(weights=zoo_mod.entry("toy:tiny").path())  # a file by path: detected as the toy's
    assert spec.config.fpn_style == "toy" and spec.preprocess.mean == (0.5, 0.5, 0.5)
    assert spec.resize == TOY_RESIZE
    result = CliRunner().invoke(main, ["models", "toy:"])
    assert result.exit_code == 0 and "toy:tiny" in result.output and "short 32, max 48" in result.output
    result = CliRunner().invoke(main, ["--summary", "--weights", "toy:nope"])
    assert result.exit_code == 2 and "did you mean toy:tiny?" in result.output


def test_the_framework_resize_is_recorded_and_applied_only_when_asked(toy_family, tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 20, 30)
    plain = extract([tmp_path / "in"], tmp_path / "plain", weights="toy:tiny", levels=("p2",), device="cpu")
    assert plain.exit_status == 0
    assert np.load(tmp_path / "plain" / "a" / "p2.npy").shape == (256, 5, 8)  # native 20x30
    header = json.loads((tmp_path / "plain" / "report.json").read_text())["preprocess"]
    assert header["framework_resize"] == {**TOY_RESIZE.to_json(), "applied": False}
    resized = extract(
        [tmp_path / "in"], tmp_path / "resized", weights="toy:tiny", levels=("p2",), device="cpu",
        framework_resize=True,
    )  # fmt: skip
    assert resized.exit_status == 0
    assert np.load(tmp_path / "resized" / "a" / "p2.npy").shape == (256, 8, 12)  # 32x48: short 32, max 48
    header = json.loads((tmp_path / "resized" / "report.json").read_text())["preprocess"]
    assert header["framework_resize"]["applied"] is True
    assert (header["short_side"], header["max_side"]) == (32, 48)


def test_the_framework_resize_needs_weights_that_have_one_and_no_other_resize(toy_family, tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 20, 30)
    with pytest.raises(UsageError, match="--weights random brings no framework test-time resize"):
        extract([tmp_path / "in"], tmp_path / "o1", arch="seed", device="cpu", framework_resize=True)
    with pytest.raises(UsageError, match="cannot be combined with --size"):
        extract(
            [tmp_path / "in"], tmp_path / "o2", weights="toy:tiny", device="cpu", framework_resize=True,
            resize=Resize(size=(16, 16)),
        )  # fmt: skip
    assert not (tmp_path / "o1" / "report.json").exists()


# --- the weights' identity ------------------------------------------------------------------------------


def test_report_and_settings_hold_the_loaded_files_identity(toy_family, tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 20, 30)
    path = zoo_mod.entry("toy:tiny").path()
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert extract([tmp_path / "in"], tmp_path / "out", weights="toy:tiny", device="cpu").exit_status == 0
    model = json.loads((tmp_path / "out" / "report.json").read_text())["model"]
    assert model["weights_file"] == {
        "name": "toy:tiny",
        "url": "https://example.invalid/toy/tiny.pth",
        "file": str(path),
        "sha256": sha256,
    }
    settings = json.loads((tmp_path / "out" / SETTINGS_FILE).read_text())
    assert settings["weights_sha256"] == sha256
    # another file under the same name: its features are not this folder's
    state = build_fpn(arch="seed", fpn_style="torchvision", seed=8).state_dict()
    torch.save({re.sub(r"^(body|fpn)\.", r"toy_\1.", k): v for k, v in state.items()}, path)
    with pytest.raises(UsageError, match="other settings .*weights_sha256"):
        extract([tmp_path / "in"], tmp_path / "out", weights="toy:tiny", device="cpu")


def test_random_weights_record_no_file(tmp_path):
    save_rgb(tmp_path / "in" / "a.png", 20, 30)
    assert extract([tmp_path / "in"], tmp_path / "out", arch="seed", device="cpu").exit_status == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["model"]["weights_file"] is None
    assert "weights_sha256" not in json.loads((tmp_path / "out" / SETTINGS_FILE).read_text())


@pytest.mark.parametrize(("name", "kind"), [("coco", "SHA-256"), (D2_RCNN, "MD5")])
def test_a_cached_zoo_file_unlike_its_name_is_used_with_a_warning(name, kind, torch_home):
    """torch.hub checks a download's hash, not a file placed in the cache by hand."""
    spec = resolve(weights=name)
    spec.origin.path.parent.mkdir(parents=True)
    spec.origin.path.write_bytes(b"not the published file")
    message = f"its {kind} begins .* not the .* its name carries.*download it anew"
    with pytest.warns(WeightsWarning, match=message):
        identity = spec.identity()
    assert identity["sha256"] == hashlib.sha256(b"not the published file").hexdigest()
    assert identity["url"] == zoo_mod.entry(name).url and identity["file"] == str(spec.origin.path)
