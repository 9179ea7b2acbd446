"""`fastmoco export format=detectron2`: the keys against detectron2's ResNet naming,
spelled out here (detectron2 itself is not a dependency), for basic-block and bottleneck ResNets;
the weights, renamed back, load strictly and give the run's backbone features."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from export_cases import assert_same_features

import fastmoco.weights.export as ex

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
