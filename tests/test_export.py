"""fastmoco export and fastmoco.weights.load_backbone (issue 13): every format loads strictly
and gives the run's backbone features to fp32 rounding; bad input stops before anything is
written; exports appear whole or not at all.

The runs are made without training: a MoCo model with perturbed weights and BN statistics
(query and key encoders different), saved as `fastmoco train` saves it."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

import fastmoco.export as ex
from fastmoco.backbone import apply_cifar_stem
from fastmoco.checkpoint import save_checkpoint
from fastmoco.config import BackboneConfig, DataConfig, MethodConfig, TrainConfig
from fastmoco.model import MoCo
from fastmoco.pipelines.recipes import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from fastmoco.weights import backbone_state, load_backbone, resolve_checkpoint

STEP = 7
NARROW = {"channels": [8, 16, 32, 64]}


@torch.no_grad()
def perturb_(encoder: nn.Module, seed: int) -> None:
    """Weights and BN statistics away from their init, so a key mix-up cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for name, t in encoder.state_dict().items():  # shares storage with the module
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g)
        if name.endswith("running_var"):
            t.copy_(1 + 0.3 * torch.rand(t.shape, generator=g))
        elif name.endswith("gamma"):  # ConvNeXt's layer scale (init 1e-6): make the blocks count
            t.copy_(0.5 + 0.1 * noise)
        elif name.endswith(("running_mean", "bias")):
            t.copy_(0.1 * noise)
        elif name.endswith("norm.weight") or ".bn" in name or name.startswith("bn"):
            t.copy_(1 + 0.1 * noise)
        else:
            t.mul_(1 + 0.1 * noise)


def make_run(root, name, *, cifar_stem=False, kwargs=None, image_size=64, recipe="v2"):
    """A run directory holding one checkpoint as training writes it; returns the MoCo model."""
    torch.manual_seed(0)
    kwargs = dict(kwargs or {})
    cfg = TrainConfig(
        method=MethodConfig(dim=16, queue_size=32, mlp_hidden=32),
        backbone=BackboneConfig(name=name, cifar_stem=cifar_stem, kwargs=kwargs),
        data=DataConfig(name="synthetic", image_size=image_size, recipe=recipe),
    )
    cfg.run.dir = str(root)
    moco = MoCo(name, version="v2", dim=16, queue_size=32, mlp_hidden=32, cifar_stem=cifar_stem,
                backbone_kwargs=kwargs)
    perturb_(moco.query_encoder, 1)
    perturb_(moco.key_encoder, 2)
    moco.eval()
    save_checkpoint(root, STEP, {"model": moco.state_dict(), "config": dataclasses.asdict(cfg),
                                 "progress": {"step": STEP}})
    return moco


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A ResNet-18 run (torchvision's widths, standard stem) at 64 px, recipe v2."""
    root = tmp_path_factory.mktemp("r18_run")
    return root, make_run(root, "resnet18")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A narrow ResNet-18 with the CIFAR stem at 32 px, recipe cifar."""
    root = tmp_path_factory.mktemp("cifar_run")
    return root, make_run(root, "resnet18", cifar_stem=True, kwargs=NARROW, image_size=32,
                          recipe="cifar")


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    root = tmp_path_factory.mktemp("convnext_run")
    return root, make_run(root, "convnext_atto")


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


@torch.no_grad()
def assert_same_features(model: nn.Module, reference: nn.Module, size: int) -> None:
    x = images(size)
    got, want = model.eval()(x), reference.eval()(x)
    assert got.shape == want.shape
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


# ------------------------------------------------------------------------------- load_backbone


def test_load_backbone_from_run_checkpoint_and_name(r18):
    root, moco = r18
    model, info = load_backbone(root)
    assert not model.training
    assert_same_features(model, moco.backbone, 64)
    assert (info.name, info.cifar_stem, info.num_features, info.image_size) == ("resnet18", False,
                                                                               512, 64)
    assert (info.mean, info.std, info.encoder, info.step) == (IMAGENET_MEAN, IMAGENET_STD,
                                                              "query", STEP)
    assert info.source == str(resolve_checkpoint(root)) and info.source.endswith(".pt")

    key_model, key_info = load_backbone(resolve_checkpoint(root), encoder="key")
    assert key_info.encoder == "key"
    assert_same_features(key_model, moco.key_encoder[0], 64)

    random, rinfo = load_backbone("resnet18")
    assert rinfo.encoder == "random" and rinfo.source == "timm:resnet18"
    assert rinfo.num_features == 512 and rinfo.image_size == 224 and not random.training


def test_backbone_state_strips_the_encoder_prefix(r18):
    _, moco = r18
    state = backbone_state(moco.state_dict(), "key")
    assert set(state) == set(moco.key_encoder[0].state_dict())
    assert all(t.is_contiguous() for t in state.values())
    with pytest.raises(ValueError, match="encoder='momentum'"):
        backbone_state(moco.state_dict(), "momentum")


# ------------------------------------------------------------------------------- timm


def test_timm_export_loads_strictly_in_timm(r18, tmp_path, monkeypatch):
    root, moco = r18
    out = tmp_path / "r18-timm"
    files = ex.export(root, "timm", out)
    assert files == [out / "model.safetensors", out / "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18-timm"]  # nothing left beside it
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["num_features"] == 512
    assert cfg["num_classes"] == 0 and "model_args" not in cfg
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, 64, 64] and pre["num_classes"] == 0
    assert pre["mean"] == list(IMAGENET_MEAN) and pre["std"] == list(IMAGENET_STD)
    assert cfg["fastmoco"]["encoder"] == "query" and cfg["fastmoco"]["step"] == STEP
    assert cfg["fastmoco"]["checkpoint"] == str(resolve_checkpoint(root).resolve())
    state = load_file(out / "model.safetensors")
    assert set(state) == set(moco.backbone.state_dict())

    # timm's own loaders, offline, strict (recorded): the documented calls
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stricts = []
    original = nn.Module.load_state_dict

    def recording(self, state_dict, strict=True, **kw):
        stricts.append(strict)
        return original(self, state_dict, strict=strict, **kw)
    monkeypatch.setattr(nn.Module, "load_state_dict", recording)
    by_name = timm.create_model("resnet18", pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                            num_classes=0))
    assert_same_features(by_name, moco.backbone, 64)
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert by_dir.num_classes == 0 and tuple(by_dir.pretrained_cfg["input_size"]) == (3, 64, 64)
    assert_same_features(by_dir, moco.backbone, 64)
    assert stricts == [True, True]
    monkeypatch.undo()

    model, info = load_backbone(out)
    assert_same_features(model, moco.backbone, 64)
    assert (info.image_size, info.step, info.encoder, info.source) == (64, STEP, "query", str(out))
    model, _ = load_backbone(out / "model.safetensors", name="resnet18")
    assert_same_features(model, moco.backbone, 64)


def test_key_encoder_export(r18, tmp_path):
    root, moco = r18
    out = tmp_path / "key"
    ex.export(root, "timm", out, encoder="key")
    model, info = load_backbone(out)
    assert info.encoder == "key"
    assert_same_features(model, moco.key_encoder[0], 64)
    with torch.no_grad():
        assert not torch.allclose(model(images(64)), moco.backbone(images(64)))
    with pytest.raises(ValueError, match="holds the key encoder.*encoder=query"):
        load_backbone(out, encoder="query")


def test_timm_export_of_a_convnext(convnext, tmp_path, monkeypatch):
    root, moco = convnext
    out = tmp_path / "cnx"
    ex.export(root, "timm", out)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_features(timm.create_model(f"local-dir:{out}", pretrained=True), moco.backbone, 64)
    assert_same_features(load_backbone(out)[0], moco.backbone, 64)


def test_timm_export_of_a_cifar_stem_resnet(cifar, tmp_path):
    root, moco = cifar
    out = tmp_path / "cifar-timm"
    ex.export(root, "timm", out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fastmoco"]["cifar_stem"] is True and cfg["model_args"] == NARROW
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert cfg["pretrained_cfg"]["mean"] == list(CIFAR_MEAN)
    assert cfg["pretrained_cfg"]["std"] == list(CIFAR_STD)
    model, info = load_backbone(out)
    assert info.cifar_stem and info.mean == CIFAR_MEAN
    assert_same_features(model, moco.backbone, 32)
    # timm alone cannot build the stem by name (docs/export.md) ...
    with pytest.raises(RuntimeError, match="conv1.weight"):
        timm.create_model("resnet18", pretrained=True, num_classes=0, **NARROW,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                      num_classes=0))
    # ... the documented way: apply the stem, then load strictly
    plain = timm.create_model("resnet18", num_classes=0, **NARROW)
    plain.conv1 = nn.Conv2d(3, plain.conv1.out_channels, 3, 1, 1, bias=False)
    plain.maxpool = nn.Identity()
    plain.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    assert_same_features(plain, moco.backbone, 32)
    ref = timm.create_model("resnet18", num_classes=0, **NARROW)
    apply_cifar_stem(ref)  # fastmoco's helper does the same
    ref.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    assert_same_features(ref, moco.backbone, 32)



def test_timm_export_of_a_narrow_cifar_stem_loads_with_its_width(tmp_path):
    """The CPU demo's network: a CIFAR stem as narrow as its first stage (stem_width)."""
    kwargs = {**NARROW, "stem_width": 8}
    moco = make_run(tmp_path / "run", "resnet18", cifar_stem=True, kwargs=kwargs, image_size=32,
                    recipe="cifar")
    out = tmp_path / "narrow-timm"
    ex.export(tmp_path / "run", "timm", out)
    assert json.loads((out / "config.json").read_text())["model_args"] == kwargs
    model, info = load_backbone(out)
    assert model.conv1.out_channels == 8 and model.layer1[0].downsample is None
    assert_same_features(model, moco.backbone, 32)
    plain = timm.create_model("resnet18", num_classes=0, **kwargs)  # as docs/export.md says
    apply_cifar_stem(plain, 8)
    plain.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    assert_same_features(plain, moco.backbone, 32)

# ------------------------------------------------------------------------------- torchvision


def test_torchvision_export_loads_strictly(r18, tmp_path, capsys):
    root, moco = r18
    out = tmp_path / "r18-tv"
    ex.run([f"checkpoint={root}", "format=torchvision", f"out={out}"])
    printed = capsys.readouterr().out
    assert str(out / "model.pth") in printed
    assert "torchvision.models.resnet18(); m.fc = torch.nn.Identity()" in printed
    # exactly as docs/export.md says
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(out / "model.pth", weights_only=True), strict=True)
    assert_same_features(model, moco.backbone, 64)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fastmoco"]["format"] == "torchvision"


# ------------------------------------------------------------------------------- detectron2

NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# detectron2's ResNet-18 (modeling/backbone/resnet.py: BasicStem, BasicBlock): every conv with
# its norm, shortcuts where a stage changes shape.
D2_R18_CONVS = [
    "stem.conv1",
    "res2.0.conv1", "res2.0.conv2", "res2.1.conv1", "res2.1.conv2",
    "res3.0.conv1", "res3.0.conv2", "res3.0.shortcut", "res3.1.conv1", "res3.1.conv2",
    "res4.0.conv1", "res4.0.conv2", "res4.0.shortcut", "res4.1.conv1", "res4.1.conv2",
    "res5.0.conv1", "res5.0.conv2", "res5.0.shortcut", "res5.1.conv1", "res5.1.conv2",
]
D2_R18_KEYS = sorted([f"{c}.weight" for c in D2_R18_CONVS]
                     + [f"{c}.norm.{n}" for c in D2_R18_CONVS for n in NORM])


def d2_pairs(depth: int) -> list[tuple[str, str]]:
    """(torchvision/timm key, detectron2 key) of a ResNet, spelled out from both naming schemes
    (not from the exporter's string rules): stem.conv1 + norm; res2–res5; BottleneckBlock
    conv1–3 or BasicBlock conv1–2, each with .norm; shortcut + shortcut.norm in the first block
    of a stage whose shape changes."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    bottleneck = depth >= 50
    pairs = [("conv1.weight", "stem.conv1.weight")]
    pairs += [(f"bn1.{n}", f"stem.conv1.norm.{n}") for n in NORM]
    for stage, count in enumerate(blocks):
        for b in range(count):
            tv, d2 = f"layer{stage + 1}.{b}", f"res{stage + 2}.{b}"
            for c in range(1, 4 if bottleneck else 3):
                pairs.append((f"{tv}.conv{c}.weight", f"{d2}.conv{c}.weight"))
                pairs += [(f"{tv}.bn{c}.{n}", f"{d2}.conv{c}.norm.{n}") for n in NORM]
            if b == 0 and (stage > 0 or bottleneck):
                pairs.append((f"{tv}.downsample.0.weight", f"{d2}.shortcut.weight"))
                pairs += [(f"{tv}.downsample.1.{n}", f"{d2}.shortcut.norm.{n}") for n in NORM]
    return pairs


def test_detectron2_export(r18, tmp_path):
    root, moco = r18
    out = tmp_path / "r18-d2"
    ex.export(root, "detectron2", out)
    with open(out / "model.pkl", "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    weights = obj["model"]
    assert sorted(weights) == D2_R18_KEYS == sorted(d2 for _, d2 in d2_pairs(18))
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    reference = moco.backbone.state_dict()
    for tv, d2 in d2_pairs(18):
        assert np.array_equal(weights[d2], reference[tv].numpy()), d2
    # the weights, renamed back, load strictly and give the run's features
    back = timm.create_model("resnet18", num_classes=0)
    back.load_state_dict({tv: torch.from_numpy(weights[d2]) for tv, d2 in d2_pairs(18)},
                         strict=True)
    assert_same_features(back, moco.backbone, 64)
    d2cfg = json.loads((out / "config.json").read_text())["fastmoco"]["detectron2"]
    assert d2cfg["MODEL.RESNETS.DEPTH"] == 18 and d2cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64
    assert d2cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is False and d2cfg["INPUT.FORMAT"] == "RGB"
    assert d2cfg["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]


@pytest.mark.parametrize("depth", [50, 101])
def test_detectron2_names_of_bottleneck_resnets(depth):
    """The renaming on torchvision's ResNet-50/101 keys (meta device: no weights needed)."""
    with torch.device("meta"):
        tv = getattr(torchvision.models, f"resnet{depth}")()
    keys = [k for k in tv.state_dict() if not k.startswith("fc.")]
    assert sorted(map(ex.detectron2_key, keys)) == sorted(d2 for _, d2 in d2_pairs(depth))
    assert "res2.0.shortcut.norm.running_var" in map(ex.detectron2_key, keys)


# ------------------------------------------------------------------------------- bad input


def test_run_without_checkpoints(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "empty_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no checkpoints in .*checkpoints: train first"):
        ex.export(run_dir, "timm", out)
    with pytest.raises(FileNotFoundError, match="train first"):
        load_backbone(run_dir)
    assert not out.exists()
    with pytest.raises(SystemExit, match="checkpoint=<file.pt>"):
        ex.run([f"checkpoint={run_dir}", f"out={out}"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ex.export(tmp_path / "nowhere", "timm", out)
    with pytest.raises(FileNotFoundError, match="neither a path nor a timm model name"):
        load_backbone(str(tmp_path / "nowhere"))
    assert not out.exists()


def test_backbone_mismatch(r18, tmp_path):
    root, _ = r18
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"holds a resnet18 backbone, not resnet50.*name=resnet18"):
        ex.export(root, "timm", out, name="resnet50")
    with pytest.raises(ValueError, match="not resnet50"):
        load_backbone(root, name="resnet50")
    assert not out.exists()
    load_backbone(root, name="resnet18")  # the right name passes


@pytest.mark.parametrize("fmt", ["torchvision", "detectron2"])
def test_formats_a_backbone_cannot_take(convnext, cifar, tmp_path, fmt):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"convnext_atto is not one.*export format=timm"):
        ex.export(convnext[0], fmt, out)
    with pytest.raises(ValueError, match=r"cifar_stem=true: its stem .*differs.*format=timm"):
        ex.export(cifar[0], fmt, out)
    assert not out.exists()


def test_unknown_format_and_bad_arguments(r18, tmp_path):
    root, _ = r18
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="format='onnx': choose timm"):
        ex.export(root, "onnx", out)
    with pytest.raises(ValueError, match="encoder='momentum'"):
        ex.export(root, "timm", out, encoder="momentum")
    with pytest.raises(ValueError, match="format='onnx'"):
        ex.parse_args([f"checkpoint={root}", "format=onnx", f"out={out}"])
    with pytest.raises(ValueError, match="out= is missing"):
        ex.parse_args([f"checkpoint={root}"])
    with pytest.raises(ValueError, match="unknown export argument 'fromat'"):
        ex.parse_args([f"checkpoint={root}", "fromat=timm", f"out={out}"])
    with pytest.raises(ValueError, match="key=value"):
        ex.parse_args([str(root)])
    with pytest.raises(SystemExit, match="format='onnx'"):
        ex.run([f"checkpoint={root}", "format=onnx", f"out={out}"])
    assert ex.parse_args([f"checkpoint={root}", f"out={out}", "encoder=key"]) == {
        "checkpoint": str(root), "format": "timm", "out": str(out), "encoder": "key", "name": None}
    assert not out.exists()


def test_out_holding_other_files_is_refused(r18, tmp_path):
    root, _ = r18
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files: choose a new folder"):
        ex.export(root, "timm", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------- atomicity


def failing_json(obj, path):
    """config.json is written last: the weights are already in the staging folder."""
    with open(path, "w") as f:
        f.write('{"half": ')
    raise OSError("disk full")


def test_failed_write_leaves_nothing(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    out = tmp_path / "exports" / "cifar"
    monkeypatch.setattr(ex, "_write_json", failing_json)
    with pytest.raises(OSError, match="disk full"):
        ex.export(root, "timm", out)
    assert not out.exists()
    assert list((tmp_path / "exports").iterdir()) == []  # no staging folder left


def test_failed_rewrite_keeps_the_earlier_export(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    out = tmp_path / "cifar"
    ex.export(root, "timm", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(ex, "_write_json", failing_json)
    with pytest.raises(OSError, match="disk full"):
        ex.export(root, "timm", out, encoder="key")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["cifar"]
    ex.export(root, "timm", out, encoder="key")  # a successful rewrite replaces it whole
    assert json.loads((out / "config.json").read_text())["fastmoco"]["encoder"] == "key"
    assert sorted(os.listdir(tmp_path)) == ["cifar"]


def test_simsiam_has_no_key_encoder_to_export(tmp_path):
    """SimSiam keeps no momentum copy: encoder=key names the method and the fix, before anything
    is written; encoder=query exports its encoder."""
    from fastmoco.simsiam import SimSiam

    root = tmp_path / "simsiam_run"
    torch.manual_seed(0)
    cfg = TrainConfig(
        method=MethodConfig(name="simsiam", dim=16, mlp_hidden=32, predictor_hidden=8,
                            queue_size=0, momentum=0.0, symmetric=True),
        backbone=BackboneConfig(name="resnet18", cifar_stem=True, kwargs=NARROW),
        data=DataConfig(name="synthetic", image_size=32, recipe="cifar"))
    model = SimSiam("resnet18", dim=16, mlp_hidden=32, predictor_hidden=8, cifar_stem=True,
                    backbone_kwargs=NARROW)
    save_checkpoint(root, STEP, {"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                                 "progress": {"step": STEP}})
    out = tmp_path / "key"
    with pytest.raises(ValueError, match=r"encoder=key: .* is a SimSiam checkpoint, and SimSiam "
                                         r"has no momentum \(key\) encoder.*use encoder=query"):
        ex.export(root, "timm", out, encoder="key")
    assert not out.exists()
    ex.export(root, "timm", tmp_path / "query", encoder="query")
    exported, info = load_backbone(tmp_path / "query")
    assert info.encoder == "query"
    assert_same_features(exported, model.query_encoder[0], 32)
