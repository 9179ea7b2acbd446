"""Fused queue logits + InfoNCE in Triton: one pass over the keys with an online log-sum-exp.

Layers: two `@triton.jit` kernels (a split-K partial pass over the candidate keys and a combine
that adds the positive), a launcher (`infonce_rows_triton`), the autograd.Function shared with
the chunked path (rowwise.py), and the public `infonce_triton`. The N×(1+K) logits never exist,
forward or backward: the forward pass also accumulates Σ_j p_ij·key_j (N×C fp32), so the backward
pass is one scale.

Notation (log2 domain, s = q·key · log2(e)/T): running max `m`, running sum `d` = Σ 2^(s−m),
`acc` = Σ 2^(s−m)·key; the row log-sum-exp is (m + log2 d)·ln 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import check_launchable, interpreter_active
from .rowwise import check_infonce_inputs, rowwise_infonce

LOG2E = 1.4426950408889634


def _infonce_partial_kernel(
    Q, CAND, M_OUT, D_OUT, ACC_OUT, MAXB_OUT, MAXA_OUT,
    N, K, C, stride_q, stride_cand, pos_offset, scale, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    POS_IN_CAND: tl.constexpr, COMPUTE_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """One (row block, split) program: online LSE over its share of the candidate tiles."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    c_ok = offs_c < C
    q = tl.load(Q + rows[:, None] * stride_q + offs_c[None, :],
                mask=row_ok[:, None] & c_ok[None, :], other=0.0)  # BLOCK_N×BLOCK_C
    pos_col = rows + pos_offset  # only meaningful when POS_IN_CAND

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_N], tl.float32)
    max_b = tl.full([BLOCK_N], float("-inf"), tl.float32)
    max_a = tl.full([BLOCK_N], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    n_tiles = tl.cdiv(K, BLOCK_K)
    t_start = split * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        cols = t * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        keys = tl.load(CAND + cols[:, None] * stride_cand + offs_c[None, :],
                       mask=col_ok[:, None] & c_ok[None, :], other=0.0)  # BLOCK_K×BLOCK_C
        if DOT_UPCAST:  # interpreter only: exact, bf16 products are representable in fp32
            s = tl.dot(q.to(tl.float32), tl.trans(keys.to(tl.float32))) * scale
        else:
            s = tl.dot(q, tl.trans(keys), input_precision=INPUT_PRECISION) * scale  # BLOCK_N×BLOCK_K
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if POS_IN_CAND:  # argmax breaks ties to the lowest column: split the max at the positive
            rel = cols[None, :] - pos_col[:, None]
            max_b = tl.maximum(max_b, tl.max(tl.where(rel < 0, s, float("-inf")), 1))
            max_a = tl.maximum(max_a, tl.max(tl.where(rel > 0, s, float("-inf")), 1))
        else:
            max_a = tl.maximum(max_a, tl.max(s, 1))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        d = d * alpha + tl.sum(p, 1)
        if COMPUTE_GRAD:
            if DOT_UPCAST:
                pv = tl.dot(p.to(keys.dtype).to(tl.float32), keys.to(tl.float32))
            else:
                pv = tl.dot(p.to(keys.dtype), keys, input_precision=INPUT_PRECISION)
            acc = acc * alpha[:, None] + pv
        m = m_new
    out = split * N + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(D_OUT + out, d, mask=row_ok)
    tl.store(MAXB_OUT + out, max_b, mask=row_ok)
    tl.store(MAXA_OUT + out, max_a, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(ACC_OUT + out[:, None] * C + offs_c[None, :], acc,
                 mask=row_ok[:, None] & c_ok[None, :])


def _infonce_combine_kernel(
    Q, POS, M_P, D_P, ACC_P, MAXB_P, MAXA_P, LOSS, LSE, CORRECT, G,
    N, C, n_split, stride_q, stride_pos, scale, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    POS_IN_CAND: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    """Merge the split partials (and the positive, in queue mode) into loss, LSE, G = dL_i/dq_i."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    mask = row_ok[:, None] & (offs_c < C)[None, :]
    q = tl.load(Q + rows[:, None] * stride_q + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    kp = tl.load(POS + rows[:, None] * stride_pos + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    l_pos = tl.sum(q * kp, 1) * scale
    if POS_IN_CAND:
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    else:  # the positive is candidate −1: weight 2^(l_pos − m) = 1 with m = l_pos
        m = l_pos
        d = tl.full([BLOCK_N], 1.0, tl.float32)
        acc = kp
    max_b = tl.full([BLOCK_N], float("-inf"), tl.float32)
    max_a = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for sp in range(0, n_split):
        part = sp * N + rows
        m_s = tl.load(M_P + part, mask=row_ok, other=0.0)
        d_s = tl.load(D_P + part, mask=row_ok, other=1.0)
        max_b = tl.maximum(max_b, tl.load(MAXB_P + part, mask=row_ok, other=0.0))
        max_a = tl.maximum(max_a, tl.load(MAXA_P + part, mask=row_ok, other=0.0))
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        d = d * alpha + d_s * beta
        if COMPUTE_GRAD:
            acc_s = tl.load(ACC_P + part[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
            acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m = m_new
    lse2 = m + tl.log2(d)
    tl.store(LOSS + rows, (lse2 - l_pos) * 0.6931471805599453, mask=row_ok)
    tl.store(LSE + rows, lse2 * 0.6931471805599453, mask=row_ok)
    correct = (l_pos > max_b) & (l_pos >= max_a)
    tl.store(CORRECT + rows, correct.to(tl.int8), mask=row_ok)
    if COMPUTE_GRAD:
        g = (acc / d[:, None] - kp) * inv_t
        tl.store(G + rows[:, None] * C + offs_c[None, :], g, mask=mask)


infonce_partial_kernel = triton.jit(_infonce_partial_kernel)
infonce_combine_kernel = triton.jit(_infonce_combine_kernel)


@dataclass(frozen=True)
class PartialConfig:
    """Launch parameters of the partial kernel (one row of the per-BLOCK_C table)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Per BLOCK_C (padded feature width) and element size: keep the BLOCK_N×BLOCK_C fp32 accumulator
# at ≤64 registers per thread and a queue tile stage at ≤64 KB of shared memory
# (checked for sm_80/sm_90 by kernels/compile_check.py).
SUPPORTED_BLOCK_C = (16, 32, 64, 128, 256, 512, 1024)


def partial_config(block_c: int, elem_size: int) -> PartialConfig:
    """The launch configuration for a padded feature width and element size (bytes)."""
    if block_c > 1024:
        raise ValueError(f"infonce: feature dim padded to {block_c} > 1024 unsupported; project to C ≤ 1024")
    if elem_size == 4:  # fp32 (IEEE FMA or TF32 dots): smaller tiles and 8 warps, else it spills
        if block_c <= 64:
            return PartialConfig(32, 32, 4, 2)
        return {128: PartialConfig(32, 32, 8, 2), 256: PartialConfig(16, 32, 8, 2),
                512: PartialConfig(16, 16, 8, 2), 1024: PartialConfig(16, 16, 8, 1)}[block_c]
    if block_c <= 128:
        return PartialConfig(64, 64, 4, 3)
    if block_c == 256:
        return PartialConfig(64, 32, 8, 3)
    if block_c == 512:
        return PartialConfig(32, 32, 8, 2)
    return PartialConfig(16, 32, 8, 2)


COMBINE_WARPS = 8  # 4 warps spilled 8 B at fp32 C=64/128 on sm_80 (kernels/compile_check.py)


def combine_block_n(block_c: int) -> int:
    """Rows per combine program: BLOCK_N×BLOCK_C = 4096 fp32 per tensor."""
    return max(1, 4096 // block_c)


def padded_c(c: int) -> int:
    """BLOCK_C for a feature dim: next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(c))


def num_splits(device: torch.device, row_blocks: int, n_tiles: int) -> int:
    """Split the candidates across programs so a small batch still fills every SM."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, row_blocks)
    tiles_per_split = max(4, triton.cdiv(n_tiles, want))  # ≥4 tiles keep the pipeline busy
    return triton.cdiv(n_tiles, tiles_per_split)


def input_precision(dtype: torch.dtype, block_c: int) -> str:
    """fp32 inputs use TF32 exactly when torch's own matmuls would (the reference's precision).

    At BLOCK_C=1024 TF32 tiles need 192 KB of shared memory (> sm_80's 163 KB): IEEE there.
    """
    if dtype == torch.float32 and (not torch.backends.cuda.matmul.allow_tf32 or block_c > 512):
        return "ieee"
    return "tf32"


def _empty(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap in a NaN-poisoned one so unwritten elements show)."""
    return torch.empty(shape, dtype=dtype, device=device)


def infonce_rows_triton(
    q: torch.Tensor,
    pos: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    pos_offset: Optional[int] = None,
    need_grad: bool = True,
    splits: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-row loss, LSE, correct (int8 0/1) and G = dL_i/dq_i (N×C fp32) from the Triton kernels.

    pos_offset None: queue mode (pos[i] is an extra candidate); an int: in-batch mode where the
    positive of row i is candidates[pos_offset + i] (pos must be that slice).
    """
    check_infonce_inputs(q, pos, candidates, temperature, "infonce_triton")
    check_launchable(q.device, "infonce_triton")
    dtype = q.dtype
    q = q.detach().contiguous()
    pos = pos.detach().to(dtype).contiguous()
    candidates = candidates.detach().to(dtype).contiguous()
    n, c = q.shape
    k_rows = candidates.shape[0]
    block_c = padded_c(c)
    cfg = partial_config(block_c, q.element_size())
    row_blocks = triton.cdiv(n, cfg.block_n)
    n_tiles = triton.cdiv(k_rows, cfg.block_k)
    split = num_splits(q.device, row_blocks, n_tiles) if splits is None else splits
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(split, n_tiles)))
    split = triton.cdiv(n_tiles, tiles_per_split)  # no empty split
    dev = q.device
    m_p, d_p = _empty((split, n), torch.float32, dev), _empty((split, n), torch.float32, dev)
    maxb_p, maxa_p = _empty((split, n), torch.float32, dev), _empty((split, n), torch.float32, dev)
    acc_p = _empty((split, n, c), torch.float32, dev) if need_grad else m_p  # unused pointer
    scale = LOG2E / temperature
    pos_in_cand = pos_offset is not None
    infonce_partial_kernel[(row_blocks, split)](
        q, candidates, m_p, d_p, acc_p, maxb_p, maxa_p,
        n, k_rows, c, q.stride(0), candidates.stride(0), pos_offset or 0, scale, tiles_per_split,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_C=block_c,
        POS_IN_CAND=pos_in_cand, COMPUTE_GRAD=need_grad, INPUT_PRECISION=input_precision(dtype, block_c),
        DOT_UPCAST=dtype == torch.bfloat16 and interpreter_active(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    loss, lse = _empty((n,), torch.float32, dev), _empty((n,), torch.float32, dev)
    correct = _empty((n,), torch.int8, dev)
    grad_rows = _empty((n, c), torch.float32, dev) if need_grad else loss
    bn = combine_block_n(block_c)
    infonce_combine_kernel[(triton.cdiv(n, bn),)](
        q, pos, m_p, d_p, acc_p, maxb_p, maxa_p, loss, lse, correct, grad_rows,
        n, c, split, q.stride(0), pos.stride(0), scale, 1.0 / temperature,
        BLOCK_N=bn, BLOCK_C=block_c, POS_IN_CAND=pos_in_cand, COMPUTE_GRAD=need_grad,
        num_warps=COMBINE_WARPS,
    )
    return loss, lse, correct, grad_rows if need_grad else None


def infonce_triton(
    q: torch.Tensor,
    pos: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    pos_offset: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, top-1 accuracy in percent) through the fused Triton kernels."""
    return rowwise_infonce(infonce_rows_triton, q, pos, candidates, temperature, pos_offset)

