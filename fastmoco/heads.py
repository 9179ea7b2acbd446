"""Projection heads: v1's linear layer, v2's MLP, v3's projector and predictor."""
from __future__ import annotations

from torch import nn


def linear_head(in_dim: int, dim: int) -> nn.Module:
    """MoCo v1: one fc layer to `dim`."""
    return nn.Linear(in_dim, dim)


def mlp_head(in_dim: int, dim: int, hidden: int | None = None) -> nn.Module:
    """MoCo v2: fc-ReLU-fc (2048-2048-ReLU-128 for ResNet-50)."""
    hidden = hidden or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def bn_mlp(in_dim: int, dim: int, hidden: int, layers: int, last_bn: bool = True) -> nn.Module:
    """MoCo v3: fc-BN-ReLU blocks, the last followed by a BN without affine parameters."""
    mods: list[nn.Module] = []
    for i in range(layers):
        d_in = in_dim if i == 0 else hidden
        d_out = dim if i == layers - 1 else hidden
        mods.append(nn.Linear(d_in, d_out, bias=False))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*mods)


def projection_head(version: str, in_dim: int, dim: int, hidden: int | None = None) -> nn.Module:
    """The query/key projector for a MoCo version."""
    if version == "v1":
        return linear_head(in_dim, dim)
    if version == "v2":
        return mlp_head(in_dim, dim, hidden)
    if version == "v3":
        return bn_mlp(in_dim, dim, hidden or 4096, layers=3)
    raise ValueError(f"unknown MoCo version {version!r}: choose v1, v2 or v3")
