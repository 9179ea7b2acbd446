"""One 3×3 stride-1 convolution at a time, forward + backward and forward alone, by Winograd
F(2×2, 3×3) (fastmoco/winograd.py) against the framework's convolution (with fastmoco's GEMM
weight gradient where `run.conv_weight_grad=auto` would use it), timed in turns; medians.

    python benchmarks/winograd_shapes.py --reps 10
    python benchmarks/winograd_shapes.py --shape 32,256,8 --shape 4,512,7

Default shapes: ResNet-18 at 32 px in split-BN sub-batches of 32 (layer1-4) and ResNet-50's
layer3/4 at 224 px in sub-batches of 4; fp32, channels-last.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from fastmoco.conv import GemmGradConv2d
from fastmoco.device import cpu_kind
from fastmoco.winograd import conv3x3
from step_ab import in_turns  # run as python benchmarks/winograd_shapes.py

SHAPES = ["32,64,32", "32,128,16", "32,256,8", "32,512,4", "4,256,14", "4,512,7"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--shape", action="append", help="N,C,H (C in = C out, square map)")
    a = p.parse_args()
    print(f"{cpu_kind()}, {torch.get_num_threads()} threads, {a.reps} turns, fp32 channels-last")
    print(f"{'N, C, H':>12} {'fwd+bwd native':>15} {'winograd':>9} {'ratio':>6} "
          f"{'fwd native':>11} {'winograd':>9} {'ratio':>6}")
    torch.manual_seed(0)
    for spec in a.shape or SHAPES:
        n, c, h = map(int, spec.split(","))
        x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        conv = GemmGradConv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
        grad_y = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)

        def native():
            conv(x).backward(grad_y)

        def winograd():
            conv3x3(x, conv.weight).backward(grad_y)

        def native_fwd():
            with torch.no_grad():
                conv(x)

        def winograd_fwd():
            with torch.no_grad():
                conv3x3(x, conv.weight)

        arms = (native, winograd, native_fwd, winograd_fwd)
        times = in_turns({f.__name__: f for f in arms}, a.reps)
        ms = [1000 * statistics.median(t) for t in times.values()]
        print(f"{spec:>12} {ms[0]:13.1f}ms {ms[1]:7.1f}ms {ms[0] / ms[1]:5.2f}x "
              f"{ms[2]:9.1f}ms {ms[3]:7.1f}ms {ms[2] / ms[3]:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
