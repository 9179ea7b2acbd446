"""Convolutions whose weight gradient is one GEMM per chunk of unfolded input.

On CPUs without AVX-512, oneDNN computes the weight gradient of a 3×3 convolution with an older
kernel (jit:avx2) at about half the rate of its own forward pass, where MKL's GEMM over the
unfolded (im2col) input runs near the mm rate on small maps of wide layers (benchmarks/RESULTS.md,
session of 2026-12-07). `run.conv_weight_grad` chooses: `native` (the framework's kernel),
`gemm` (this module, for output maps of at most MAX_OUTPUT_PIXELS from at least MIN_IN_CHANNELS
channels) or `auto` (fastmoco/conv_choice.py: gemm on a CPU in fp32 where it measures faster;
~4 % on the ResNet-18 CIFAR step on AVX2). The forward pass and the input gradient stay the
framework's; the weight gradient is the same sum in another order.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

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
