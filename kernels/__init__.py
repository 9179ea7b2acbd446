"""fastmoco.kernels: the two operations MoCo adds to a training step, behind one dispatch each.

`infonce_loss` and `ema_update_` pick the fastest implementation for the device
(backend="auto"), or the one named. The plain-torch references in `reference.py` define them.

infonce backends: "auto" (Triton on CUDA; on CPU the eager reference for small queues and the
chunked online-LSE path from CHUNKED_MIN_CANDIDATES keys up), "triton" (CUDA, or CPU tensors
under TRITON_INTERPRET=1), "torch" (eager reference), "chunked".
ema backends: "auto" (Triton on CUDA, torch on CPU), "triton", "torch" (one lerp_ per flat
buffer, else _foreach_lerp_), "foreach" (always _foreach_lerp_), "loop" (the reference loop).
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch
from torch import nn

from .chunked import infonce_chunked
from .ema import (
    ema_update_flat_,
    ema_update_foreach_,
    flat_layout,
    flatten_parameters_,
    matching_flat_buffers,
)
from .reference import (
    ema_update_reference_,
    infonce_inbatch_loss_reference,
    infonce_loss_reference,
)

try:  # Triton ships for Linux only; everything else works without it
    from .infonce import infonce_triton
except ImportError:  # pragma: no cover - exercised only without triton
    infonce_triton = None

TensorsOrModule = Union[nn.Module, Sequence[torch.Tensor]]

# CPU: from this many candidate keys up the chunked path beats eager (benchmarks/kernels.py:
# at K=4096 it is 1.2-1.5x faster than eager for N=32..1024 on normalised features).
CHUNKED_MIN_CANDIDATES = 4096

INFONCE_BACKENDS = ("auto", "triton", "torch", "chunked")
EMA_BACKENDS = ("auto", "triton", "torch", "foreach", "loop")

__all__ = [
    "infonce_loss",
    "infonce_inbatch_loss",
    "ema_update_",
    "flatten_parameters_",
    "flat_layout",
    "infonce_loss_reference",
    "infonce_inbatch_loss_reference",
    "ema_update_reference_",
    "INFONCE_BACKENDS",
    "EMA_BACKENDS",
]


def _check_backend(backend: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}: choose one of {allowed}")


def _infonce_backend(backend: str, q: torch.Tensor, n_candidates: int) -> str:
    _check_backend(backend, INFONCE_BACKENDS)
    if backend == "auto":
        if q.is_cuda and infonce_triton is not None:
            return "triton"
        return "chunked" if n_candidates >= CHUNKED_MIN_CANDIDATES else "torch"
    if backend == "triton" and infonce_triton is None:
        raise RuntimeError("backend='triton' needs the triton package; use 'chunked' or 'torch'")
    return backend


def infonce_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of −log softmax([q·k, q·queue]/T)[0] over rows, and pretext top-1 in percent.

    q, k: N×C; queue: K×C (one key per row). Only q receives a gradient.
    """
    b = _infonce_backend(backend, q, queue.shape[0])
    if b == "torch":
        return infonce_loss_reference(q, k, queue, temperature)
    if b == "chunked":
        return infonce_chunked(q, k, queue, temperature)
    return infonce_triton(q, k, queue, temperature)


def infonce_inbatch_loss(
    q: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v3 in-batch InfoNCE: positive of row i at column offset + i of keys (M×C)."""
    b = _infonce_backend(backend, q, keys.shape[0])
    n = q.shape[0]
    if not 0 <= offset <= keys.shape[0] - n:
        raise ValueError(
            f"infonce_inbatch_loss: positives at columns {offset}..{offset + n - 1} but keys has "
            f"{keys.shape[0]} rows; offset must be rank·N with keys gathered from all ranks"
        )
    if b == "torch":
        return infonce_inbatch_loss_reference(q, keys, temperature, offset)
    pos = keys[offset : offset + n]
    if b == "chunked":
        return infonce_chunked(q, pos, keys, temperature, pos_offset=offset)
    return infonce_triton(q, pos, keys, temperature, pos_offset=offset)


def _as_tensors(x: TensorsOrModule) -> list[torch.Tensor]:
    return list(x.parameters()) if isinstance(x, nn.Module) else list(x)


@torch.no_grad()
def ema_update_(
    target: TensorsOrModule, source: TensorsOrModule, momentum: float, backend: str = "auto"
) -> None:
    """In place, θ_target ← m·θ_target + (1−m)·θ_source over every parameter (not buffers).

    Modules flattened by `flatten_parameters_` with one layout take one operation per flat buffer.
    """
    _check_backend(backend, EMA_BACKENDS)
    if backend in ("auto", "triton", "torch") and isinstance(target, nn.Module) and isinstance(
        source, nn.Module
    ):
        flat = matching_flat_buffers(target, source)
        if flat is not None:
            use_triton = backend == "triton" or (backend == "auto" and flat[0][0].is_cuda)
            ema_update_flat_(flat[0], flat[1], momentum, use_triton=use_triton)
            return
    t, s = _as_tensors(target), _as_tensors(source)
    if len(t) != len(s):
        raise ValueError(f"ema_update_: {len(t)} target tensors but {len(s)} source tensors")
    if backend == "loop":
        ema_update_reference_(t, s, momentum)
    else:
        ema_update_foreach_(t, s, momentum)
