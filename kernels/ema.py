"""In-place EMA of parameters, θ_t ← m·θ_t + (1−m)·θ_s, as one operation per flat buffer.

`flatten_parameters_` re-points every parameter of a module into one flat buffer per
(device, dtype), keeping each parameter's strides (channels_last conv weights stay channels_last).
When target and source were both flattened with the same layout, `ema_update_flat_` is one lerp
(torch) or one Triton launch per buffer; otherwise `ema_update_foreach_` is torch's multi-tensor
`_foreach_lerp_`. Buffers (BN running stats) are never touched: the key encoder keeps its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

try:  # Triton is optional (Linux wheels only); the torch paths never need it
    import triton
    import triton.language as tl

    from .launch import check_launchable
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

ALIGN = 16  # elements: every parameter view starts 64-byte aligned in fp32, 32 in bf16
_ATTR = "_fastmoco_flat"


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter of a flattened module lives: buffers and per-parameter views."""

    buffers: tuple[torch.Tensor, ...]
    ptrs: tuple[int, ...]  # each parameter's data_ptr right after flattening
    key: tuple  # (buffer dtypes/sizes, per-parameter (buffer, offset, shape, stride)): comparable


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in some dimension order (contiguous, channels_last, …)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


@torch.no_grad()
def flatten_parameters_(module: nn.Module) -> list[torch.Tensor]:
    """Re-point every parameter's .data into one flat buffer per (device, dtype); return them.

    Strides are kept (channels_last stays channels_last); a parameter that is not dense in any
    order is stored contiguous. Call after moving the module to its device and memory format.
    """
    params = list(module.parameters())
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    buffers, placement = [], [None] * len(params)
    for b, ((device, dtype), idx) in enumerate(groups.items()):
        offset = 0
        for i in idx:
            placement[i] = (b, offset)
            offset += -(-params[i].numel() // ALIGN) * ALIGN
        buffers.append(torch.zeros(offset, device=device, dtype=dtype))
    key_params = []
    for p, (b, offset) in zip(params, placement):
        stride = p.stride() if _is_dense(p) else torch.empty(p.shape, device="meta").stride()
        view = buffers[b].as_strided(p.shape, stride, offset)
        view.copy_(p.data)
        p.data = view
        key_params.append((b, offset, tuple(p.shape), tuple(stride)))
    key = (tuple((buf.dtype, buf.numel()) for buf in buffers), tuple(key_params))
    layout = FlatLayout(tuple(buffers), tuple(p.data_ptr() for p in params), key)
    object.__setattr__(module, _ATTR, layout)
    return buffers


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers (they share its parameters)."""
    while True:
        inner = getattr(module, "_orig_mod", None) or (
            module.module if isinstance(module, nn.parallel.DistributedDataParallel) else None
        )
        if inner is None:
            return module
        module = inner


def flat_layout(module: nn.Module) -> Optional[FlatLayout]:
    """The module's flat layout if its parameters still live in it (else None)."""
    module = _unwrap(module)
    layout = getattr(module, _ATTR, None)
    if layout is None:
        return None
    if tuple(p.data_ptr() for p in module.parameters()) != layout.ptrs:
        return None  # re-pointed since (e.g. .to(device)): the flat buffers are stale
    return layout


def matching_flat_buffers(
    target: nn.Module, source: nn.Module
) -> Optional[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """(target buffers, source buffers) when both modules are flattened with one layout."""
    lt, ls = flat_layout(target), flat_layout(source)
    if lt is None or ls is None or lt.key != ls.key:
        return None
    return lt.buffers, ls.buffers


def _ema_kernel(TARGET, SOURCE, n, weight, BLOCK: tl.constexpr):
    """target ← lerp(target, source, weight) in fp32, exact at weight 0 and 1 (as torch.lerp)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(TARGET + offs, mask=mask).to(tl.float32)
    s = tl.load(SOURCE + offs, mask=mask).to(tl.float32)
    diff = s - t
    out = tl.where(weight < 0.5, t + weight * diff, s - diff * (1.0 - weight))
    tl.store(TARGET + offs, out.to(TARGET.dtype.element_ty), mask=mask)


ema_kernel = triton.jit(_ema_kernel) if triton is not None else None
EMA_BLOCK, EMA_WARPS = 4096, 8  # memory bound: 16 KB in flight per program saturates HBM


def ema_flat_triton_(target: torch.Tensor, source: torch.Tensor, momentum: float) -> None:
    """One Triton launch: the flat target buffer moves (1−m) of the way to the source buffer."""
    if triton is None:
        raise RuntimeError("ema backend 'triton' needs the triton package; use backend='torch'")
    if target.shape != source.shape or target.dtype != source.dtype or not target.is_contiguous():
        raise ValueError("ema_flat_triton_: target/source must be equal-shaped contiguous buffers")
    check_launchable(target.device, "ema_update_")
    n = target.numel()
    ema_kernel[(triton.cdiv(n, EMA_BLOCK),)](
        target, source.contiguous(), n, 1.0 - momentum, BLOCK=EMA_BLOCK, num_warps=EMA_WARPS
    )


@torch.no_grad()
def ema_update_foreach_(
    target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], momentum: float
) -> None:
    """torch's multi-tensor lerp over equal-length lists (a handful of launches in all)."""
    torch._foreach_lerp_(list(target), [s.detach() for s in source], 1.0 - momentum)


@torch.no_grad()
def ema_update_flat_(
    target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], momentum: float, use_triton: bool
) -> None:
    """One lerp_ (torch) or one Triton launch per flat buffer pair."""
    for t, s in zip(target, source, strict=True):
        if use_triton:
            ema_flat_triton_(t, s, momentum)
        else:
            t.lerp_(s, 1.0 - momentum)
