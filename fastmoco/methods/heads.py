"""Projection heads and predictors: MoCo v1's linear layer, v2's MLP, v3's projector and
predictor, BYOL's and SimSiam's.

v3's heads are built as moco-v3's builder.py builds them: its ResNet and ViT variants differ.
BYOL's (its networks.MLP) and SimSiam's (its builder.py) are the same fc-BN-ReLU blocks with
other depths, biases and last layers, so all three go through `bn_mlp`."""
from __future__ import annotations

from torch import nn


def linear_head(in_dim: int, dim: int) -> nn.Module:
    """MoCo v1: one fc layer to `dim`."""
    return nn.Linear(in_dim, dim)


def mlp_head(in_dim: int, dim: int, hidden: int | None = None) -> nn.Module:
    """MoCo v2: fc-ReLU-fc (2048-2048-ReLU-128 for ResNet-50)."""
    hidden = hidden or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def bn_mlp(in_dim: int, dim: int, hidden: int, layers: int, last_bn: bool = True,
           bias: bool = False, last_bias: bool = False) -> nn.Module:
    """MoCo v3's `_build_mlp`: fc-BN-ReLU blocks, the last fc followed by a BN without affine
    parameters when `last_bn`. `bias`: the hidden fcs have biases (BYOL's); `last_bias`: the
    last one has (BYOL's, SimSiam's predictor)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        d_in = in_dim if i == 0 else hidden
        d_out = dim if i == layers - 1 else hidden
        mods.append(nn.Linear(d_in, d_out, bias=last_bias if i == layers - 1 else bias))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*mods)


V3_HIDDEN = 4096  # --moco-mlp-dim


def v3_projector(in_dim: int, dim: int, hidden: int | None = None, vit: bool = False) -> nn.Module:
    """MoCo v3's projector: 3 layers after a ViT, 2 after a ResNet (in place of its fc), both
    ending in BN without affine."""
    return bn_mlp(in_dim, dim, hidden or V3_HIDDEN, layers=3 if vit else 2)


def v3_predictor(dim: int, hidden: int | None = None, vit: bool = False) -> nn.Module:
    """MoCo v3's predictor: 2 layers, ending in BN without affine for a ViT and without BN for a
    ResNet (`last_bn=False`)."""
    return bn_mlp(dim, dim, hidden or V3_HIDDEN, layers=2, last_bn=vit)


def projection_head(version: str, in_dim: int, dim: int, hidden: int | None = None,
                    vit: bool = False) -> nn.Module:
    """The query/key projector for a MoCo version (`vit`: v3's ViT variant)."""
    if version == "v1":
        return linear_head(in_dim, dim)
    if version == "v2":
        return mlp_head(in_dim, dim, hidden)
    if version == "v3":
        return v3_projector(in_dim, dim, hidden, vit)
    raise ValueError(f"unknown MoCo version {version!r}: choose v1, v2 or v3")


BYOL_HIDDEN = 4096  # projector_hidden_size, predictor_hidden_size


def byol_mlp(in_dim: int, dim: int, hidden: int | None = None) -> nn.Module:
    """BYOL's projector g and predictor q (one shape): fc-BN-ReLU-fc, biases on both fcs (haiku's
    Linear), the output not batch-normalised (4096 hidden, 256 out for ResNet-50)."""
    return bn_mlp(in_dim, dim, hidden or BYOL_HIDDEN, layers=2, last_bn=False, bias=True,
                  last_bias=True)


SIMSIAM_PREDICTOR_HIDDEN = 512  # --pred-dim


def simsiam_projector(in_dim: int, dim: int, hidden: int | None = None) -> nn.Module:
    """SimSiam's projector: 3 fc layers of the backbone's width (`hidden`), BN after each, the
    output BN without affine. Their last fc keeps a bias frozen at init (`requires_grad=False`)
    ahead of that BN, which cancels it: here it has none, the same function."""
    return bn_mlp(in_dim, dim, hidden or in_dim, layers=3)


def simsiam_predictor(dim: int, hidden: int | None = None) -> nn.Module:
    """SimSiam's predictor: the bottleneck fc-BN-ReLU-fc (2048 → 512 → 2048), its output fc with
    a bias and no BN."""
    return bn_mlp(dim, dim, hidden or SIMSIAM_PREDICTOR_HIDDEN, layers=2, last_bn=False,
                  last_bias=True)
