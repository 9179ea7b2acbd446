"""Convolutions whose weight gradient is one GEMM per chunk of unfolded input.

On CPUs without AVX-512, oneDNN computes the weight gradient of a 3×3 convolution with an older
kernel (jit:avx2) at about half the rate of its own forward pass, where MKL's GEMM over the
unfolded (im2col) input runs near the mm rate on small maps of wide layers (benchmarks/RESULTS.md,
session of 2026-12-07). `run.conv_weight_grad` chooses: `native` (the framework's kernel),
`gemm` (this module, for output maps of at most MAX_OUTPUT_PIXELS from at least MIN_IN_CHANNELS
channels) or `auto` (gemm for fp32 on AVX2-only CPUs, where it measured ~4 % on the ResNet-18
CIFAR step; native elsewhere). The forward pass and the input gradient stay the framework's; the
weight gradient is the same sum in another order. `use_fast_convolutions_` applies this and
`run.conv_winograd` (fastmoco/winograd.py: wide 3×3 stride-1 layers, all three passes; its auto
measures one such layer both ways at start) to a model.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastmoco.config import CONV_WEIGHT_GRADS, CONV_WINOGRAD, choose
from fastmoco.device import cpu_kind
from fastmoco.winograd import MIN_CHANNELS as WINOGRAD_MIN_CHANNELS
from fastmoco.winograd import WinogradConv2d, winograd_eligible, zero_padded_nhwc

# The GEMM path only for output maps of at most 8×8 from at least 256 input channels: there it
# ran 1.2-1.9× oneDNN's weight gradient alone (ResNet-18 at 32 px, AVX2 EPYC); from 16×16 up,
# and for narrower layers (the CPU demo's 64-128 channels), the two tied or oneDNN won, and the
# unfolded input (9× the activations) costs memory traffic the step shares.
MAX_OUTPUT_PIXELS = 64
MIN_IN_CHANNELS = 256
# Unfolded input per GEMM: small enough to stay in the last-level cache. On the AVX2 EPYC
# (32 MiB L3) 8 MiB was the fastest of 1-64 MiB for every ResNet-18 CIFAR shape.
CHUNK_BYTES = 8 << 20


def weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: tuple[int, int],
                stride: tuple[int, int], padding: tuple[int, int],
                chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """dL/dW of conv2d(x, W, stride=stride, padding=padding) (one group, no dilation) from
    dL/dy, as Σ over chunks of images of grad_outᵀ @ im2col(x); (C_out, C_in, kh, kw) with
    channels-last strides, the layout of a channels-last weight."""
    n, c = x.shape[:2]
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    c_out, h_out, w_out = grad_out.shape[1:]
    xp = zero_padded_nhwc(x, ph, ph, pw, pw)  # every window in bounds
    g = grad_out.permute(0, 2, 3, 1)  # NHWC: a free view when grad_out is channels-last
    s_n, s_h, s_w, s_c = xp.stride()
    per_image = h_out * w_out * kh * kw * c * x.element_size()
    step = max(1, min(n, chunk_bytes // per_image))
    dw = x.new_empty(c_out, kh * kw * c)
    for i in range(0, n, step):
        j = min(n, i + step)
        cols = xp[i:j].as_strided((j - i, h_out, w_out, kh, kw, c),
                                  (s_n, s_h * sh, s_w * sw, s_h, s_w, s_c)).reshape(-1, kh * kw * c)
        g_rows = g[i:j].reshape(-1, c_out).t()
        if i == 0:
            torch.mm(g_rows, cols, out=dw)
        else:
            dw.addmm_(g_rows, cols)
    return dw.view(c_out, kh, kw, c).permute(0, 3, 1, 2)


class _GemmWeightGradConv(torch.autograd.Function):
    """conv2d forward and input gradient by the framework; weight gradient by `weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
               else torch.contiguous_format)
        grad_out = grad_out.contiguous(memory_format=fmt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False,
                [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, grad_out, weight.shape[2:], ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class GemmGradConv2d(nn.Conv2d):
    """nn.Conv2d whose backward computes the weight gradient by `weight_grad` when it trains in
    fp32 (or fp64) on an output map of at most MAX_OUTPUT_PIXELS from at least MIN_IN_CHANNELS
    channels; otherwise (no grad, autocast, another dtype, a larger map, a narrower layer)
    exactly nn.Conv2d. Same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and self.weight.requires_grad
                and x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled(x.device.type)
                and self.in_channels >= MIN_IN_CHANNELS
                and self._output_pixels(x) <= MAX_OUTPUT_PIXELS):
            return _GemmWeightGradConv.apply(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)

    def _output_pixels(self, x: torch.Tensor) -> int:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return ((x.shape[-2] + 2 * ph - kh) // sh + 1) * ((x.shape[-1] + 2 * pw - kw) // sw + 1)


def gemm_eligible(conv: nn.Module) -> bool:
    """A plain spatial convolution `weight_grad` computes: one group, no dilation, zero or no
    padding given as numbers, a kernel larger than 1×1 (1×1 was not measured slower natively)."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.kernel_size != (1, 1))


def _swap_(module: nn.Module, eligible: Callable[[nn.Module], bool], cls: type) -> int:
    """Give every eligible convolution under `module` the class `cls` in place (the same
    parameters and state dict); returns how many."""
    count = 0
    for conv in module.modules():
        if eligible(conv):
            conv.__class__ = cls
            count += 1
    return count


def use_gemm_weight_grad_(module: nn.Module) -> int:
    """Turn every eligible nn.Conv2d under `module` into a GemmGradConv2d in place."""
    return _swap_(module, gemm_eligible, GemmGradConv2d)


class WinogradGemmConv2d(WinogradConv2d, GemmGradConv2d):
    """Winograd where it applies; where a call falls back (few tiles, autocast, compile), the
    GEMM weight gradient where that applies (the method order puts GemmGradConv2d's forward
    behind WinogradConv2d's)."""


def use_winograd_(module: nn.Module, gemm_fallback: bool = False) -> int:
    """Turn every Winograd-eligible nn.Conv2d under `module` into a WinogradConv2d (with
    `gemm_fallback`, a WinogradGemmConv2d) in place."""
    return _swap_(module, winograd_eligible,
                  WinogradGemmConv2d if gemm_fallback else WinogradConv2d)


def use_native_convolutions_(module: nn.Module) -> nn.Module:
    """Undo `use_fast_convolutions_` (e.g. before handing the backbone to other code)."""
    for conv in module.modules():
        if isinstance(conv, (GemmGradConv2d, WinogradConv2d)):
            conv.__class__ = nn.Conv2d
    return module


def _fp32_on_avx2(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and cpu_kind() == "AVX2"


def resolve_conv_weight_grad(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    """auto: gemm for fp32 training on AVX2-only CPUs (measured faster there); native on GPUs,
    on AVX-512 CPUs (oneDNN has its brgemm weight-gradient kernels there; not measured) and in
    bf16/fp16 (the gemm path runs fp32 only)."""
    choose("run.conv_weight_grad", mode, CONV_WEIGHT_GRADS)
    if mode != "auto":
        return mode
    return "gemm" if _fp32_on_avx2(device, dtype) else "native"


# auto runs Winograd on a CPU in fp32 where one wide layer (ResNet-18's layer3 at split BN's
# sub-batch of 32), forward and both gradients, measures at least this much faster by it. On the
# AVX2 EPYC that layer measured 1.20-1.46x in fresh processes (1.05-1.55x beside a neighbour's
# matmuls) and the whole R18 CIFAR step ran 1.14-1.17x (benchmarks/RESULTS.md). A tie costs only
# memory, a wrong "off" the step's 1.15x, hence a bar this low.
WINOGRAD_MIN_SPEEDUP = 1.1
# The measured speedup, once per run: set by the first measurement, read by child processes (the
# bench's arms); a user may set it to skip the measurement (e.g. 0 keeps Winograd off under auto).
WINOGRAD_SPEEDUP_VAR = "FASTMOCO_CPU_WINOGRAD_SPEEDUP"


def cpu_winograd_speedup(rounds: int = 7) -> float:
    """Time of the convolution auto would otherwise run / Winograd's, for a 256→256 3×3 layer
    over 32 images of 8×8, forward and both gradients, timed in turns (the best time of each).

    Winograd's gain depends on how fast the CPU's direct convolutions already are (AVX2: about
    the mm rate; AVX-512 and AMX have oneDNN's brgemm kernels), so auto measures (under a
    second, once per run) instead of assuming it from the CPU kind."""
    if os.environ.get(WINOGRAD_SPEEDUP_VAR):
        return float(os.environ[WINOGRAD_SPEEDUP_VAR])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
    direct = nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    winograd = copy.deepcopy(direct)
    gemm = resolve_conv_weight_grad("auto", torch.device("cpu"), torch.float32) == "gemm"
    use_winograd_(winograd, gemm_fallback=gemm)
    if gemm:
        use_gemm_weight_grad_(direct)
    x.requires_grad_(True)

    def seconds(conv: nn.Module) -> float:
        start = time.perf_counter()
        conv(x).backward(grad_y)
        return time.perf_counter() - start

    with torch.enable_grad():
        seconds(direct), seconds(winograd)  # warm-up: oneDNN's primitives, the allocator
        # in turns, the best of each: a neighbour's burst slows some calls, none speeds one up
        times = [(seconds(direct), seconds(winograd)) for _ in range(rounds)]
    speedup = min(t[0] for t in times) / min(t[1] for t in times)
    os.environ[WINOGRAD_SPEEDUP_VAR] = f"{speedup:.4f}"  # spawned arms and workers agree with us
    return speedup


def resolve_conv_winograd(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether wide 3×3 stride-1 convolutions run by F(2×2, 3×3) (fastmoco/winograd.py). auto:
    on a CPU in fp32 where it measures at least WINOGRAD_MIN_SPEEDUP faster
    (`cpu_winograd_speedup`); not on GPUs (cuDNN chooses its own algorithms, Winograd among
    them), nor in bf16/fp16 (this path runs fp32 and fp64 only)."""
    choose("run.conv_winograd", mode, CONV_WINOGRAD)
    if mode != "auto":
        return mode == "on"
    return (device.type == "cpu" and dtype == torch.float32
            and cpu_winograd_speedup() >= WINOGRAD_MIN_SPEEDUP)


def use_fast_convolutions_(model: nn.Module, weight_grad: str, winograd: str,
                           device: torch.device, dtype: torch.dtype) -> None:
    """Swap the classes of `model`'s convolutions in place as the two settings resolve:
    Winograd first (it computes all three passes), the GEMM weight gradient for the rest."""
    gemm = resolve_conv_weight_grad(weight_grad, device, dtype) == "gemm"
    if resolve_conv_winograd(winograd, device, dtype):
        use_winograd_(model, gemm_fallback=gemm)
    if gemm:
        use_gemm_weight_grad_(model)


def describe_convolutions(weight_grad: str, winograd: str, device: torch.device,
                          dtype: torch.dtype) -> str:
    """What the run log says: the resolved choices, where they apply, and auto's measurement."""
    chosen = resolve_conv_weight_grad(weight_grad, device, dtype)
    if chosen == "gemm":
        chosen = (f"gemm (output maps up to {MAX_OUTPUT_PIXELS} px from {MIN_IN_CHANNELS}+ "
                  "channels)")
    text = f"weight grads {chosen}"
    measured = winograd == "auto" and device.type == "cpu" and dtype == torch.float32
    if resolve_conv_winograd(winograd, device, dtype):
        text += f", Winograd F(2x2,3x3) for 3x3 stride-1 layers of {WINOGRAD_MIN_CHANNELS}+ channels"
    if measured:
        text += (f" (Winograd measured {cpu_winograd_speedup():.2f}x on one such layer, "
                 f"auto's bar {WINOGRAD_MIN_SPEEDUP}x)")
    return text
