"""fastmoco.weights.load_backbone and what every format of `fastmoco export` shares:
loading from a run, a checkpoint or a timm name; bad input stops before anything is written;
exports appear whole or not at all. Each format's own checks: test_export_timm.py,
test_export_torchvision.py, test_export_detectron2.py."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from export_cases import NARROW, STEP, assert_same_features
from fastmoco.pipelines.recipes import IMAGENET_MEAN, IMAGENET_STD

import fastmoco.weights.export as ex
from fastmoco.config import BackboneConfig, DataConfig, MethodConfig, TrainConfig
from fastmoco.weights.checkpoint import save_checkpoint
from fastmoco.weights.load import backbone_state, load_backbone, resolve_checkpoint

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
    with pytest.raises(ValueError, match=r"convnext_atto is not one.*export format=timm"):
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
    from fastmoco.methods.simsiam import SimSiam

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
