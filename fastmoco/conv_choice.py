"""Which convolution paths a run takes: `run.conv_weight_grad` and `run.conv_winograd`.

Both fast paths trade the framework's kernels for GEMMs (fastmoco/conv.py, fastmoco/winograd.py).
What they gain depends on how fast the CPU's own convolutions already are: on an AVX2 CPU oneDNN's
direct convolutions run at about the mm rate and its weight gradients at half of it; AVX-512 and
AMX have oneDNN's brgemm kernels. So `auto` does not assume it from the CPU kind: at start it
times one layer each path applies to, both ways, forward and both gradients, in turns (about
a second each), and takes a path from MIN_SPEEDUP. The figure is kept in an environment
variable (`device.kept_in_env`, as precision=auto's bf16 timing is): the bench's spawned arms
inherit it, a user may set it to skip the timing (0 keeps the path off), and in a training
process group `agree_on_measurements` gives every rank rank 0's.
On GPUs both stay off (cuDNN chooses its own algorithms), and in bf16/fp16 too (both paths run
fp32 and fp64 only).
"""
from __future__ import annotations

import copy
import os
import time
from typing import Callable

import torch
from torch import nn

from fastmoco import conv
from fastmoco.config import CONV_WEIGHT_GRADS, CONV_WINOGRAD, choose
from fastmoco.conv import GemmGradConv2d, gemm_eligible, use_gemm_weight_grad_, use_winograd_
from fastmoco.device import kept_in_env
from fastmoco.distributed import broadcast_choice, get_world_size
from fastmoco.winograd import WinogradConv2d, winograd_eligible

# auto takes a path where its layer measures at least this much faster. On the AVX2 EPYC, in
# fresh processes, the Winograd layer measured 1.17-1.59x (the whole R18 CIFAR step 1.14-1.17x)
# and the GEMM weight gradient's 1.14-1.26x (the step ~1.04x); a neighbour's matmuls on the same
# cores spread them to 1.26-1.65x and 0.79-1.55x (benchmarks/RESULTS.md). A tie costs little, a
# wrong "off" the step's gain: hence a low bar.
MIN_SPEEDUP = 1.1
GEMM_SPEEDUP_VAR = "FASTMOCO_CPU_GEMM_WEIGHT_GRAD_SPEEDUP"
WINOGRAD_SPEEDUP_VAR = "FASTMOCO_CPU_WINOGRAD_SPEEDUP"


def _speedup(c_in: int, c_out: int, stride: int, size: int, swap: Callable[[nn.Module], int],
             rounds: int) -> float:
    """The framework's time / the fast path's (`swap` puts a layer on it) for one 3×3 layer over
    a channels-last batch of 32 (split BN's sub-batch), forward and both gradients, timed in
    turns after a warm-up (the best time of each: a neighbour's burst slows some calls, none
    speeds one up)."""
    # its own random state: a run that times and one that reads the figure draw the same data
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        native = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False).to(
            memory_format=torch.channels_last)
        fast = copy.deepcopy(native)
        assert swap(fast) == 1
        x = torch.randn(32, c_in, size, size).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad_y = torch.randn_like(native(x))

        def seconds(layer: nn.Module) -> float:
            start = time.perf_counter()
            layer(x).backward(grad_y)
            return time.perf_counter() - start

        seconds(native), seconds(fast)  # warm-up: oneDNN's primitives, the allocator
        times = [(seconds(native), seconds(fast)) for _ in range(rounds)]
    return min(t[0] for t in times) / min(t[1] for t in times)


def cpu_gemm_weight_grad_speedup(rounds: int = 12) -> float:
    """The GEMM weight gradient on a 256→512 stride-2 layer over 8×8 maps (ResNet-18's
    layer4.0.conv1 at 32 px, which Winograd leaves to it), against the framework's."""
    return kept_in_env(GEMM_SPEEDUP_VAR,
                       lambda: _speedup(256, 512, 2, 8, use_gemm_weight_grad_, rounds))


def cpu_winograd_speedup(rounds: int = 12) -> float:
    """Winograd F(2×2, 3×3) on a 256→256 layer over 8×8 maps (ResNet-18's layer3 at 32 px),
    against the framework's convolution."""
    return kept_in_env(WINOGRAD_SPEEDUP_VAR,
                       lambda: _speedup(256, 256, 1, 8, use_winograd_, rounds))


def _measured(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32


def resolve_conv_weight_grad(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    """native, gemm, or auto's choice: gemm on a CPU in fp32 where it measures faster."""
    choose("run.conv_weight_grad", mode, CONV_WEIGHT_GRADS)
    if mode != "auto":
        return mode
    fast = _measured(device, dtype) and cpu_gemm_weight_grad_speedup() >= MIN_SPEEDUP
    return "gemm" if fast else "native"


def resolve_conv_winograd(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether wide 3×3 stride-1 convolutions run by F(2×2, 3×3): on, off, or auto's choice (on
    a CPU in fp32 where it measures faster)."""
    choose("run.conv_winograd", mode, CONV_WINOGRAD)
    if mode != "auto":
        return mode == "on"
    return _measured(device, dtype) and cpu_winograd_speedup() >= MIN_SPEEDUP


def agree_on_measurements(weight_grad: str, winograd: str, device: torch.device,
                          dtype: torch.dtype, rank: int) -> None:
    """In a process group, every rank takes rank 0's timings for the settings left to auto
    (call on every rank, before the model is built): rank 0 measures while the others wait,
    instead of each timing a CPU the others load and perhaps deciding otherwise."""
    if not _measured(device, dtype) or get_world_size() == 1:
        return
    for mode, var, measure in ((weight_grad, GEMM_SPEEDUP_VAR, cpu_gemm_weight_grad_speedup),
                               (winograd, WINOGRAD_SPEEDUP_VAR, cpu_winograd_speedup)):
        if mode == "auto":
            speedup = measure() if rank == 0 else 0.0
            os.environ[var] = f"{broadcast_choice(round(speedup * 1e4), device) / 1e4:.4f}"


def use_fast_convolutions_(model: nn.Module, weight_grad: str, winograd: str,
                           device: torch.device, dtype: torch.dtype) -> None:
    """Swap the classes of `model`'s convolutions in place as the two settings resolve:
    Winograd first (it computes all three passes), the GEMM weight gradient for the rest. auto
    times a path only for a model with a layer it could take (the CPU demo's narrow network
    has none)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    gemm = (any(gemm_eligible(m) and m.in_channels >= conv.MIN_IN_CHANNELS for m in layers)
            and resolve_conv_weight_grad(weight_grad, device, dtype) == "gemm")
    if any(map(winograd_eligible, layers)) and resolve_conv_winograd(winograd, device, dtype):
        use_winograd_(model, gemm_fallback=gemm)
    if gemm:
        use_gemm_weight_grad_(model)


def describe_convolutions(model: nn.Module) -> str:
    """What the run log says: how many convolutions each path took, and auto's timings where
    this run has them."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    winograd = sum(isinstance(m, WinogradConv2d) for m in layers)
    # with Winograd's fall-back ones; a narrower layer has the class but runs the framework's
    gemm = sum(isinstance(m, GemmGradConv2d) and m.in_channels >= conv.MIN_IN_CHANNELS
               for m in layers)
    parts = [f"Winograd F(2x2,3x3) on {winograd} of {len(layers)}"] if winograd else []
    if gemm:
        parts.append(f"GEMM weight grads on {gemm} (maps up to {conv.MAX_OUTPUT_PIXELS} px from "
                     f"{conv.MIN_IN_CHANNELS}+ channels)")
    text = ", ".join(parts) or f"the framework's, all {len(layers)}"
    timed = [f"{name} {float(os.environ[var]):.2f}x" for name, var in (
        ("GEMM weight grad", GEMM_SPEEDUP_VAR), ("Winograd", WINOGRAD_SPEEDUP_VAR))
        if os.environ.get(var)]
    if timed:
        text += f" (auto's timings: {', '.join(timed)} on one layer each, bar {MIN_SPEEDUP}x)"
    return text
