"""`fastmoco export format=timm`: the export loads strictly in timm, by name and
from its folder, and gives the run's backbone features to fp32 rounding, for a ResNet, a
ConvNeXt, the key encoder and a CIFAR-stem ResNet (with the stem swapped in as docs/export.md
says)."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from export_cases import NARROW, STEP, assert_same_features, images
from fastmoco.pipelines.recipes import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from safetensors.torch import load_file
from torch import nn

import fastmoco.weights.export as ex
from fastmoco.backbone import apply_cifar_stem
from fastmoco.weights.load import load_backbone, resolve_checkpoint


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
