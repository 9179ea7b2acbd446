"""How the key encoder's BatchNorm is kept from leaking the positive (the paper's shuffle BN)."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from fastmoco.backbone import has_batchnorm
from fastmoco.config import SHUFFLE_BN_MODES, SYNC_BN_VERSIONS, splits_bn

log = logging.getLogger(__name__)


SPLIT_LAYOUTS = ("auto", "sub_batches", "sliced")


class _SlicedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm with its statistics per contiguous slice of the batch, each slice
    normalised straight into its part of one output (no per-slice tensors, no concatenation)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slices: int, eps: float):
        out = torch.empty_like(x)  # keeps channels-last; a slice along N of it is contiguous too
        # Statistics in the input's dtype, float32 for reduced precisions (as native_batch_norm).
        stat_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        mean = x.new_empty(slices, x.shape[1], dtype=stat_dtype)
        invstd = torch.empty_like(mean)
        for i, (x_i, out_i) in enumerate(zip(x.chunk(slices), out.chunk(slices))):
            torch.ops.aten.native_batch_norm.out(x_i, weight, bias, None, None, True, 0.0, eps,
                                                 out=out_i, save_mean=mean[i], save_invstd=invstd[i])
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.slices, ctx.eps = slices, eps
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last) \
            if x.is_contiguous(memory_format=torch.channels_last) else grad_out.contiguous()
        grad_x = torch.empty_like(x)
        affine = weight is not None
        # Without affine parameters the input gradient is the one with weight 1 (exactly): the
        # out= overload wants all three outputs.
        w = weight if affine else mean.new_ones(x.shape[1])
        grad_w = w.new_empty(ctx.slices, x.shape[1])
        grad_b = torch.empty_like(grad_w)
        for i, (g_i, x_i, gx_i) in enumerate(zip(grad_out.chunk(ctx.slices), x.chunk(ctx.slices),
                                               grad_x.chunk(ctx.slices))):
            torch.ops.aten.native_batch_norm_backward.out(
                g_i, x_i, w, None, None, mean[i], invstd[i], True, ctx.eps, [True, True, True],
                out0=gx_i, out1=grad_w[i], out2=grad_b[i])
        if not affine:
            return grad_x, None, None, None, None
        return grad_x, grad_w.sum(0), grad_b.sum(0), None, None


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm for one process that simulates `bn_splits` GPUs (the MoCo CIFAR demo's split BN).

    `forward_in_splits` makes each BN normalise every sub-batch with its own statistics, in one
    of two layouts with the same result: `sub_batches` runs the encoder once per sub-batch (each
    tensor small, channels-last and in cache: the faster on AVX-512 CPUs), `sliced` runs it once
    over the batch and slices only inside each BN (the convolutions see the whole batch: the
    faster where small convolutions are slow). The running statistics then take one momentum step
    towards the mean of the sub-batch statistics, exactly as the demo's reshaped BN does, without
    its copies to NCHW and back. Called any other way it is a plain BatchNorm2d.
    """

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        # Sums of the sub-batch statistics since the last commit: not part of the state dict.
        self.register_buffer("split_mean_sum", torch.zeros(num_features), persistent=False)
        self.register_buffer("split_var_sum", torch.zeros(num_features), persistent=False)
        self.register_buffer("split_calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.collecting = False  # set by forward_in_splits around its sub-batch calls
        self.slices = 1  # set by forward_in_splits: sub-batches inside one call (layout "sliced")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.collecting and self.training and self.track_running_stats):
            return super().forward(x)
        if self.slices > 1:
            out, mean, invstd = _SlicedBatchNorm.apply(x, self.weight, self.bias, self.slices, self.eps)
        else:
            out, mean, invstd = torch.native_batch_norm(
                x, self.weight, self.bias, None, None, True, 0.0, self.eps)
            mean, invstd = mean[None], invstd[None]
        with torch.no_grad():
            n = x.numel() // x.shape[1] // self.slices
            self.split_mean_sum.add_(mean.sum(0))
            # Running variance is unbiased, as in nn.BatchNorm2d.
            var = (invstd.pow(-2) - self.eps).clamp_min(0) * (n / max(n - 1, 1))
            self.split_var_sum.add_(var.sum(0))
            self.split_calls.add_(self.slices)
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


def resolve_split_layout(layout: str, device: torch.device) -> str:
    """'auto' → `sub_batches` on CPUs, where small tensors stay in cache (benchmarks/split_bn.py
    times both layouts); `sliced` on GPUs, where one launch per layer beats one per sub-batch
    (a prediction: not yet timed on a GPU)."""
    if layout not in SPLIT_LAYOUTS:
        raise ValueError(f"unknown split BN layout {layout!r}: choose one of {SPLIT_LAYOUTS}")
    if layout != "auto":
        return layout
    return "sub_batches" if device.type == "cpu" else "sliced"


def forward_in_splits(
    module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int,
    norms: list[SplitBatchNorm2d], layout: str = "auto",
) -> torch.Tensor:
    """`module` over x with each split BN normalising `splits` contiguous sub-batches on their own
    statistics (in `layout`, see SplitBatchNorm2d), then one running-statistics step."""
    n = x.shape[0]
    if n % splits != 0:
        raise ValueError(
            f"batch per process {n} is not a multiple of method.bn_splits={splits}: "
            f"change the batch size or bn_splits"
        )
    sliced = resolve_split_layout(layout, x.device) == "sliced" and splits > 1
    for bn in norms:
        bn.collecting = True
        bn.slices = splits if sliced else 1
    try:
        out = module(x) if sliced else torch.cat([module(chunk) for chunk in x.chunk(splits)])
    except BaseException:  # e.g. out of memory: leave no half-collected statistics behind
        for bn in norms:
            bn.discard_()
        raise
    finally:
        for bn in norms:
            bn.collecting = False
            bn.slices = 1
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
