"""What the MoCo v3 tests share: the batch, the narrow ResNet-18 and the two-block ViT-Tiny they
build, the head widths, and a config composed as `fastmoco train` composes it."""
from __future__ import annotations

from hydra import compose, initialize_config_module

from fastmoco.config import TrainConfig, from_hydra

N, SIZE = 8, 32
DIM, HIDDEN = 16, 32
RESNET = dict(backbone_kwargs=dict(channels=(8, 16, 32, 64)))
VIT = dict(img_size=SIZE, patch_size=8, depth=2, weight_init="moco")  # vit_tiny: width 192


def make(overrides: list[str]) -> TrainConfig:
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=overrides))
