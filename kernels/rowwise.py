"""What both InfoNCE paths share: input checks and the autograd.Function over a rows function.

A rows function (`infonce_rows_chunked` in chunked.py, `infonce_rows_triton` in infonce.py) takes
(q, pos, candidates, temperature, pos_offset, need_grad=...) and returns per-row loss, log-sum-exp,
correctness and each row's dL/dq (N×C fp32, or None), so backward is one scale for either path.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

RowsFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]


def check_infonce_inputs(
    q: torch.Tensor, pos: torch.Tensor, candidates: torch.Tensor, temperature: float, name: str
) -> None:
    """Raise a ValueError naming the fix when shapes, dtypes or devices do not fit."""
    if q.dim() != 2 or pos.dim() != 2 or candidates.dim() != 2:
        raise ValueError(
            f"{name}: q, keys and queue must be 2-D (N×C, N×C, K×C), got "
            f"{tuple(q.shape)}, {tuple(pos.shape)}, {tuple(candidates.shape)}"
        )
    if q.shape[0] < 1 or candidates.shape[0] < 1:
        raise ValueError(f"{name}: need at least one query and one candidate key")
    if pos.shape != q.shape or candidates.shape[1] != q.shape[1]:
        raise ValueError(
            f"{name}: feature dims differ: q {tuple(q.shape)}, positive keys {tuple(pos.shape)}, "
            f"candidates {tuple(candidates.shape)}; project all to the same C"
        )
    if not (q.device == pos.device == candidates.device):
        raise ValueError(f"{name}: q, keys and queue on different devices; move them together")
    for t in (q, pos, candidates):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: dtype {t.dtype} unsupported; use float32, bfloat16 or float16")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"{name}: temperature must be a positive finite float, got {temperature}")


class RowwiseInfoNCE(torch.autograd.Function):
    """Mean InfoNCE loss from a rows function that also returns each row's dL/dq: backward only
    scales that gradient."""

    @staticmethod
    def forward(ctx, rows_fn, q, pos, candidates, temperature, pos_offset):  # type: ignore[override]
        loss_rows, _, correct, grad_rows = rows_fn(
            q, pos, candidates, temperature, pos_offset, need_grad=ctx.needs_input_grad[1]
        )
        # pos/candidates are saved for their version counters only: an in-place enqueue before
        # backward raises torch's "modified by an inplace operation" instead of a silent mismatch.
        ctx.save_for_backward(grad_rows, pos, candidates)
        ctx.n, ctx.q_dtype = q.shape[0], q.dtype
        correct = correct.bool()
        ctx.mark_non_differentiable(correct)
        return loss_rows.mean(), correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):  # type: ignore[override]
        grad_rows, _, _ = ctx.saved_tensors
        grad_q = None if grad_rows is None else (grad_rows * (grad_loss / ctx.n)).to(ctx.q_dtype)
        return None, grad_q, None, None, None, None


def rowwise_infonce(
    rows_fn: RowsFn,
    q: torch.Tensor,
    pos: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    pos_offset: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, top-1 accuracy in percent) through `rows_fn`; only q gets a gradient."""
    loss, correct = RowwiseInfoNCE.apply(rows_fn, q, pos, candidates.detach(), temperature, pos_offset)
    return loss, correct.float().mean() * 100.0
