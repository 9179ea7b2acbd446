"""`fastmoco export format=torchvision`: the export loads strictly into
torchvision's ResNet exactly as the command prints and docs/export.md say, and gives the run's
backbone features to fp32 rounding."""
from __future__ import annotations

import json

import torch
import torchvision
from export_cases import assert_same_features

import fastmoco.weights.export as ex


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
