"""Where a training step's time goes, by operator (torch.profiler), each convolution shape in the
step beside the same convolution timed alone, and the fp32 mm ceiling measured in the same
process (before and after; the best of the two).

    python benchmarks/profile_step.py                     # r18_cifar shape, precision auto
    python benchmarks/profile_step.py --precision fp32 --splits 8 --batch 256
    python benchmarks/profile_step.py --set run.conv_weight_grad=native

The per-shape table: `step` is the self time per training step of aten::mkldnn_convolution (the
forward) and aten::convolution_backward (the input gradient, and the weight gradient unless it
runs as GEMMs: `run.conv_weight_grad`), with its FLOP rate; `alone` times the same shape in a
loop of its own: forward, input gradient, weight gradient by the framework and by
fastmoco.conv.weight_grad. Layers that run by Winograd (`run.conv_winograd`) are not in that
table: their GEMMs count in the GEMM group, their tile transforms in "other".
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fastmoco.bench.measure import matmul_rate, step_flops
from fastmoco.build import build_trainer, local_runtime
from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.conv import weight_grad
from fastmoco.conv_choice import resolve_conv_weight_grad, resolve_conv_winograd
from fastmoco.data import SyntheticTwoViewLoader
from fastmoco.device import describe_cpu
from step_ab import CASE  # the bench's r18_cifar case (run as python benchmarks/...)

GROUPS = {  # exact aten names: a substring would put addmm_ under add_
    "conv forward": ("aten::mkldnn_convolution",),
    "conv backward (oneDNN)": ("aten::convolution_backward",),
    "GEMMs (conv weight grad, heads, loss)": ("aten::mm", "aten::addmm", "aten::addmm_",
                                              "aten::bmm"),
    "copies": ("aten::copy_",),
    "batch norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward",
                   "aten::_native_batch_norm_legit", "aten::batch_norm_update_stats"),
    "relu / add": ("aten::relu_", "aten::clamp_min_", "aten::threshold_backward", "aten::add_",
                   "aten::add"),
    "optimizer": ("aten::_foreach_add_", "aten::_foreach_mul_", "aten::_foreach_add",
                  "aten::_foreach_mul"),
    "ema": ("aten::_foreach_lerp_", "aten::lerp_"),
}


def group_of(name: str) -> str:
    for group, names in GROUPS.items():
        if name in names:
            return group
    return "other"


def conv_flops(x_shape, w_shape, stride: int) -> int:
    n, _, h, w = x_shape
    c_out, c_in, kh, kw = w_shape
    h_out = (h + 2 * (kh // 2) - kh) // stride + 1
    w_out = (w + 2 * (kw // 2) - kw) // stride + 1
    return 2 * n * c_out * c_in * kh * kw * h_out * w_out


def best_of(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def alone(x_shape, w_shape, stride: int) -> dict[str, float]:
    """GFLOP/s of one convolution shape timed by itself (fp32, channels-last, ResNet padding)."""
    k = w_shape[2]
    pad = k // 2
    x = torch.randn(x_shape).contiguous(memory_format=torch.channels_last)
    w = torch.randn(w_shape).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(F.conv2d(x, w, None, stride, pad))
    args = ([stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1)
    fl = conv_flops(x_shape, w_shape, stride) / 1e9
    cases = {
        "fwd": lambda: F.conv2d(x, w, None, stride, pad),
        "dgrad": lambda: torch.ops.aten.convolution_backward(g, x, w, None, *args,
                                                             [True, False, False]),
        "wgrad": lambda: torch.ops.aten.convolution_backward(g, x, w, None, *args,
                                                             [False, True, False]),
        "wgrad_gemm": lambda: weight_grad(x, g, (k, k), (stride, stride), (pad, pad)),
    }
    return {name: round(fl / best_of(fn), 1) for name, fn in cases.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--splits", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], help="more config overrides")
    p.add_argument("--no-alone", action="store_true", help="skip timing the shapes alone")
    a = p.parse_args()
    w = a.width
    cfg = apply_overrides(TrainConfig(), [
        *CASE, f"schedule.batch_size={a.batch}", f"method.bn_splits={a.splits}",
        f"run.precision={a.precision}", f"+backbone.kwargs.channels=[{w},{2 * w},{4 * w},{8 * w}]",
        *a.set])
    rt = local_runtime(cfg)
    device, dtype = rt.device, rt.dtype
    trainer = build_trainer(cfg, rt, steps=a.steps + 2)
    loader = iter(SyntheticTwoViewLoader(a.batch * (a.steps + 2), a.batch, 32, device, dtype,
                                         True, 0))
    run = lambda xq, xk: trainer.step(xq, xk, 0.03, 0.99)
    for _ in range(2):
        run(*next(loader))
    ceil_before = matmul_rate(device, torch.float32, 2048, 3)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(a.steps):
            run(*next(loader))
        wall = (time.perf_counter() - t) / a.steps
    ceil_after = matmul_rate(device, torch.float32, 2048, 3)
    totals: dict[str, float] = collections.defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            totals[group_of(e.key)] += e.self_cpu_time_total / 1e3 / a.steps
    # convolution shapes: forward (input, weight, ...) and backward (grad out, input, weight, ...)
    shapes: dict[tuple, dict[str, float]] = collections.defaultdict(
        lambda: collections.defaultdict(float))
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mkldnn_convolution", "aten::convolution_backward"):
            continue
        forward, s = e.key == "aten::mkldnn_convolution", e.input_shapes
        x_shape, w_shape = (s[0], s[1]) if forward else (s[1], s[2])
        if len(x_shape) != 4 or len(w_shape) != 4:
            continue
        v = shapes[(tuple(x_shape), tuple(w_shape))]
        part = "fwd" if forward else "bwd"
        v[part + "_ms"] += e.self_cpu_time_total / 1e3 / a.steps
        v[part + "_calls"] += e.count / a.steps
        if not forward:  # the gradient's map gives the stride
            v["stride"] = x_shape[2] // s[0][2]
    flops = step_flops(cfg, device)  # FlopCounterMode over one step of the same config
    report = {"cpu": describe_cpu(), "dtype": str(dtype), "batch": a.batch, "splits": a.splits,
              "width": w, "conv_weight_grad": resolve_conv_weight_grad(
                  cfg.run.conv_weight_grad, device, dtype),
              # Winograd layers' GEMMs count as GEMMs, their tile transforms as "other"
              "conv_winograd": resolve_conv_winograd(cfg.run.conv_winograd, device, dtype),
              "step_ms": round(wall * 1e3, 1), "img_s": round(a.batch / wall, 1),
              "mm_fp32_gflops": round(max(ceil_before, ceil_after) / 1e9, 1),
              "self_ms_by_group": {k: round(v, 1) for k, v in
                                   sorted(totals.items(), key=lambda kv: -kv[1])}}
    report["step_gflop"] = round(flops / 1e9, 1)
    report["step_gflops"] = round(flops / wall / 1e9, 1)
    report["pct_of_ceiling"] = round(100 * flops / wall / max(ceil_before, ceil_after), 1)
    print(json.dumps(report, indent=1))
    print("\nconvolutions: per step in the step, and the same shape alone (GFLOP/s)")
    print(f"{'input':>18} {'weight':>18} s  fwd ms  GF/s   bwd ms  | alone: fwd  dgrad  wgrad  "
          f"wgrad_gemm")
    bound_s = 0.0  # the step's convolutions alone, each at its own rate: the least step time
    for (x_shape, w_shape), v in sorted(shapes.items(), key=lambda kv: -kv[1]["fwd_ms"]):
        stride = int(v.get("stride", 1)) or 1
        fl = conv_flops(x_shape, w_shape, stride) / 1e9
        fwd_rate = fl * v["fwd_calls"] / (v["fwd_ms"] / 1e3) if v["fwd_ms"] else 0.0
        line = (f"{str(list(x_shape)):>18} {str(list(w_shape)):>18} {stride}  {v['fwd_ms']:6.0f} "
                f"{fwd_rate:5.0f}   {v['bwd_ms']:6.0f}  |")
        if not a.no_alone:
            r = alone(x_shape, w_shape, stride)
            line += f" {r['fwd']:9.0f} {r['dgrad']:6.0f} {r['wgrad']:6.0f} {r['wgrad_gemm']:10.0f}"
            # query forward + key forward, and the query's backward (no input gradient at the stem)
            bwd = v["bwd_calls"] * (fl / max(r["wgrad"], r["wgrad_gemm"])
                                    + (fl / r["dgrad"] if x_shape[1] > 3 else 0.0))
            bound_s += v["fwd_calls"] * fl / r["fwd"] + bwd
        print(line, flush=True)
    if bound_s:
        ceiling = max(ceil_before, ceil_after)
        print(f"\nthe convolutions alone at these rates: {bound_s * 1e3:.0f} ms a step; with nothing "
              f"else in the step it would run {flops / bound_s / 1e9:.0f} GFLOP/s = "
              f"{100 * flops / bound_s / ceiling:.0f} % of the fp32 mm ceiling ({ceiling / 1e9:.0f})")
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
