"""Backbones come from timm only: `create_model(name, num_classes=0)`, sized by `num_features`."""
from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn


def create_backbone(name: str, *, cifar_stem: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (its forward returns pooled features of `num_features`).

    `cifar_stem` swaps a ResNet's 7×7/2 conv + max-pool for a 3×3/1 conv, as in the MoCo CIFAR demo.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(
            f"unknown timm backbone {name!r}; choose a name from timm.list_models(), "
            f"e.g. {', '.join(close) or 'resnet18, resnet50, vit_small_patch16_224'}"
        )
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if cifar_stem:
        apply_cifar_stem(model)
    return model


def apply_cifar_stem(model: nn.Module) -> None:
    """3×3 stride-1 first conv and no max-pool, for 32-px inputs (ResNet family only)."""
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"backbone.cifar_stem=true needs a ResNet-style model with conv1 and maxpool; "
            f"{type(model).__name__} has none: set backbone.cifar_stem=false"
        )
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


def feature_dim(backbone: nn.Module) -> int:
    """Width of the backbone's pooled output."""
    dim = getattr(backbone, "num_features", None)
    if not isinstance(dim, int):
        raise ValueError(
            f"{type(backbone).__name__} has no integer `num_features`; pass a timm model or set "
            "`num_features` on your module to the width of its output"
        )
    return dim


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
