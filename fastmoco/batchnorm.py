"""How the key encoder's BatchNorm is kept from leaking the positive (the paper's shuffle BN)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHUFFLE_BN_MODES = ("auto", "ddp", "split", "sync", "none")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from `num_splits` interleaved sub-batches,
    as if each were on its own GPU (the MoCo CIFAR demo's single-process shuffle BN)."""

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % s != 0:
            raise ValueError(
                f"batch per process {n} is not a multiple of method.bn_splits={s}: "
                f"change the batch size or bn_splits"
            )
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(-1, c * s, h, w), mean, var,
            self.weight.repeat(s), self.bias.repeat(s),
            True, self.momentum, self.eps,
        ).view(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        if x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def convert_split_bn_(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every plain nn.BatchNorm2d (exact type: subclasses carry extra behaviour) in place."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SplitBatchNorm2d(
                child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                affine=child.affine, track_running_stats=child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_split_bn_(child, num_splits)
    return module


def resolve_shuffle_bn(mode: str, world_size: int, has_bn: bool) -> str:
    """'auto' → the paper's cross-process shuffle with several processes, split BN in one
    process, nothing to do for a backbone without BatchNorm (ViT, ConvNeXt)."""
    if mode not in SHUFFLE_BN_MODES:
        raise ValueError(f"unknown shuffle_bn {mode!r}: choose one of {SHUFFLE_BN_MODES}")
    if mode != "auto":
        return mode
    if not has_bn:
        return "none"
    return "ddp" if world_size > 1 else "split"
