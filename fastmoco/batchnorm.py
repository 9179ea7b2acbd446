"""How the key encoder's BatchNorm is kept from leaking the positive (the paper's shuffle BN)."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from fastmoco.backbone import has_batchnorm
from fastmoco.config import SHUFFLE_BN_MODES, SYNC_BN_VERSIONS, splits_bn

log = logging.getLogger(__name__)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm for one process that simulates `bn_splits` GPUs (the MoCo CIFAR demo's split BN).

    The encoder runs once per sub-batch (`forward_in_splits`), so each call normalises with its own
    sub-batch's statistics; the running statistics then take one momentum step towards the mean of
    the sub-batch statistics, exactly as the demo's reshaped BN does. Running the sub-batches one
    after another keeps every tensor channels-last and in cache, where the demo's reshape
    copies each activation to NCHW and back. Called any other way it is a plain BatchNorm2d.
    """

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        # Sums of the sub-batch statistics since the last commit: not part of the state dict.
        self.register_buffer("split_mean_sum", torch.zeros(num_features), persistent=False)
        self.register_buffer("split_var_sum", torch.zeros(num_features), persistent=False)
        self.register_buffer("split_calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.collecting = False  # set by forward_in_splits around its sub-batch calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.collecting and self.training and self.track_running_stats):
            return super().forward(x)
        out, mean, invstd = torch.native_batch_norm(
            x, self.weight, self.bias, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            self.split_mean_sum.add_(mean)
            # Running variance is unbiased, as in nn.BatchNorm2d.
            self.split_var_sum.add_((invstd.pow(-2) - self.eps).clamp_min(0) * (n / max(n - 1, 1)))
            self.split_calls.add_(1)
        return out

    @torch.no_grad()
    def commit_(self) -> None:
        """One momentum step of the running statistics towards the mean over the sub-batches."""
        self.num_batches_tracked.add_(1)
        # momentum=None is nn.BatchNorm2d's cumulative average.
        factor = (1.0 / self.num_batches_tracked.double()).item() if self.momentum is None \
            else self.momentum
        calls = self.split_calls.clamp(min=1)
        self.running_mean.lerp_(self.split_mean_sum / calls, factor)
        self.running_var.lerp_(self.split_var_sum / calls, factor)
        self.discard_()

    @torch.no_grad()
    def discard_(self) -> None:
        """Forget the sub-batch statistics collected since the last commit."""
        self.split_mean_sum.zero_()
        self.split_var_sum.zero_()
        self.split_calls.zero_()


def forward_in_splits(
    module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int,
    norms: list[SplitBatchNorm2d],
) -> torch.Tensor:
    """`module` over `splits` contiguous sub-batches of x, then one running-statistics step."""
    n = x.shape[0]
    if n % splits != 0:
        raise ValueError(
            f"batch per process {n} is not a multiple of method.bn_splits={splits}: "
            f"change the batch size or bn_splits"
        )
    for bn in norms:
        bn.collecting = True
    try:
        out = torch.cat([module(chunk) for chunk in x.chunk(splits)])
    except BaseException:  # e.g. out of memory: leave no half-collected statistics behind
        for bn in norms:
            bn.discard_()
        raise
    finally:
        for bn in norms:
            bn.collecting = False
    for bn in norms:
        bn.commit_()
    return out


def split_norms(module: nn.Module) -> list[SplitBatchNorm2d]:
    """The split BN layers of `module` that collect sub-batch statistics (training mode)."""
    return [m for m in module.modules()
            if isinstance(m, SplitBatchNorm2d) and m.training and m.track_running_stats]


def unsplittable_norms(module: nn.Module) -> list[str]:
    """Names of the BatchNorm layers split BN cannot take over: subclasses such as timm's
    BatchNormAct2d, which carry extra behaviour in their forward."""
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and type(m) not in (nn.BatchNorm2d, SplitBatchNorm2d)]


def convert_split_bn_(module: nn.Module) -> nn.Module:
    """Replace every plain nn.BatchNorm2d (exact type: subclasses carry extra behaviour) in place."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SplitBatchNorm2d(
                child.num_features, eps=child.eps, momentum=child.momentum,
                affine=child.affine, track_running_stats=child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_split_bn_(child)
    return module


def convert_sync_bn_(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` (a container) becomes a SyncBatchNorm sharing its parameters
    and buffers, in place: torch's convert_sync_batchnorm, through timm's version, which keeps
    the activation of timm's BatchNormAct2d (torch's would drop it)."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(module)


def resolve_shuffle_bn(mode: str, world_size: int, backbone: nn.Module, version: str = "v2",
                       device_type: str | None = None) -> str:
    """'auto' → v1/v2: the paper's cross-process shuffle with several processes, split BN in one
    process, nothing to do for a backbone without BatchNorm (ViT, ConvNeXt). v3: SyncBatchNorm
    over the whole model with several CUDA processes (the authors' code); in one process plain
    BN, which normalises over the global batch as SyncBatchNorm would; with several CPU
    processes, where torch has no SyncBatchNorm, the cross-process shuffle, with a warning.
    `device_type` is where the model will run."""
    if mode not in SHUFFLE_BN_MODES:
        raise ValueError(f"unknown shuffle_bn {mode!r}: choose one of {SHUFFLE_BN_MODES}")
    if mode == "split" and not has_batchnorm(backbone):
        raise ValueError(
            f"method.shuffle_bn=split runs the backbone once per sub-batch so that each BatchNorm "
            f"sees one sub-batch; {type(backbone).__name__} has no BatchNorm (a ViT or ConvNeXt "
            f"normalises each token with LayerNorm): set method.shuffle_bn=auto or none")
    others = unsplittable_norms(backbone)
    if mode == "split" and others:
        raise ValueError(
            f"shuffle_bn=split runs the backbone per sub-batch and needs plain nn.BatchNorm2d "
            f"layers; {type(backbone).__name__} has {len(others)} others (e.g. {others[0]}: "
            f"{type(backbone.get_submodule(others[0])).__name__}): train with 2+ processes "
            f"(shuffle_bn=ddp), use shuffle_bn=sync on GPUs, or accept the in-batch BN leak "
            f"with shuffle_bn=none")
    if mode != "auto":
        return mode
    if version in SYNC_BN_VERSIONS:
        if world_size == 1:
            return "none"
        if device_type == "cuda":
            return "sync"
        log.warning("MoCo %s synchronises BatchNorm over all processes, and torch's SyncBatchNorm "
                    "runs on CUDA only: on %s each of the %d processes normalises over its own "
                    "batch, with the keys shuffled between processes (method.shuffle_bn=ddp, v1/v2's "
                    "shuffle BN) so that a query and its key do not share BN statistics. Train on "
                    "GPUs for the authors' BN; set method.shuffle_bn=ddp or none to choose",
                    version, device_type or "this device", world_size)
        return "ddp"
    if not has_batchnorm(backbone):
        return "none"
    if not splits_bn(mode, world_size):
        return "ddp"
    if others:
        log.warning("one process and %d BatchNorm layers split BN cannot take over (e.g. %s): "
                    "shuffle_bn=none, so BN statistics are shared within the batch; train with "
                    "2+ processes for the paper's shuffle BN", len(others), others[0])
        return "none"
    return "split"
