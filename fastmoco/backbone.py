"""Backbones come from timm only: `create_model(name, num_classes=0)`, sized by `num_features`.

Two changes to timm's modules MoCo v3 makes to its ViTs (vits.py of facebookresearch/moco-v3):
fixed 2-D sin-cos position embeddings and a patch projection frozen at its random init."""
from __future__ import annotations

import math
from typing import Any

import timm
import torch
from torch import nn


def create_backbone(name: str, *, cifar_stem: bool = False, pos_embed: str = "learned",
                    freeze_patch_embed: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (its forward returns pooled features of `num_features`).

    `cifar_stem` swaps a ResNet's 7×7/2 conv + max-pool for a 3×3/1 conv, as in the MoCo CIFAR demo.
    `pos_embed="sincos"` and `freeze_patch_embed` make a ViT as MoCo v3 trains it.
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
    adapt_vit_(model, pos_embed=pos_embed, freeze_patch_embed=freeze_patch_embed)
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


def is_vit(backbone: nn.Module) -> bool:
    """A vision transformer: its tokens come from a patch embedding (timm's `patch_embed`). MoCo
    v3 gives these the ViT heads, every other backbone the ResNet heads."""
    return isinstance(getattr(backbone, "patch_embed", None), nn.Module)


def adapt_vit_(backbone: nn.Module, *, pos_embed: str = "learned",
               freeze_patch_embed: bool = False) -> nn.Module:
    """Apply `backbone.pos_embed` and `backbone.freeze_patch_embed` to a timm ViT, in place."""
    if pos_embed == "sincos":
        use_sincos_pos_embed_(backbone)
    elif pos_embed != "learned":
        raise ValueError(f"backbone.pos_embed={pos_embed!r}: choose one of learned, sincos")
    if freeze_patch_embed:
        freeze_patch_embed_(backbone)
    return backbone


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(H·W)×dim fixed position embeddings of a row-major H×W patch grid, as MoCo v3's
    `build_2d_sincos_position_embedding`: [sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω)] for the patch
    in row r, column c, with ω_i = temperature^(−i/(dim/4)). (Their meshgrid names the row `w`;
    on their square grids this is the same table.)"""
    if dim % 4:
        raise ValueError(f"backbone.pos_embed=sincos needs an embedding width divisible by 4, "
                         f"not {dim}: set backbone.pos_embed=learned")
    h, w = grid
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                                torch.arange(w, dtype=torch.float32), indexing="ij")
    out_r = rows.flatten()[:, None] * omega[None, :]
    out_c = cols.flatten()[:, None] * omega[None, :]
    return torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)


def use_sincos_pos_embed_(backbone: nn.Module) -> None:
    """Replace a timm ViT's learned position embeddings by the fixed sin-cos table, frozen. The
    prefix tokens that have an entry (timm's class token) get zeros, as in MoCo v3."""
    table = getattr(backbone, "pos_embed", None)
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if not isinstance(table, nn.Parameter) or grid is None:
        raise ValueError(f"backbone.pos_embed=sincos needs a ViT with timm's `pos_embed` and "
                         f"`patch_embed.grid_size`; {type(backbone).__name__} has none: set "
                         f"backbone.pos_embed=learned")
    patches = sincos_2d(tuple(grid), table.shape[-1])
    prefix = table.shape[1] - patches.shape[0]
    if table.ndim != 3 or prefix < 0:
        raise ValueError(f"backbone.pos_embed=sincos: {type(backbone).__name__}'s pos_embed "
                         f"{tuple(table.shape)} does not fit its {tuple(grid)} patch grid: set "
                         f"backbone.pos_embed=learned")
    with torch.no_grad():
        table.zero_()
        table[0, prefix:] = patches.to(table.dtype)
    table.requires_grad_(False)


def freeze_patch_embed_(backbone: nn.Module) -> None:
    """MoCo v3's stop-gradient on the patch projection (--stop-grad-conv1): the projection is
    drawn as the authors draw it (uniform ±√(6/(fan_in + width)), zero bias) and never trained."""
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(f"backbone.freeze_patch_embed=true freezes a ViT's patch projection "
                         f"(timm's patch_embed.proj, a convolution); {type(backbone).__name__} "
                         f"has none: set backbone.freeze_patch_embed=false")
    fan_in = math.prod(proj.weight.shape[1:])  # 3·p·p
    bound = math.sqrt(6.0 / (fan_in + proj.out_channels))
    with torch.no_grad():
        proj.weight.uniform_(-bound, bound)
        if proj.bias is not None:
            proj.bias.zero_()
    proj.requires_grad_(False)
