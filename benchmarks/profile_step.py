"""Where a training step's time goes, by operator (torch.profiler), beside the same convolutions
timed alone and the fp32/bf16 mm ceiling measured in the same process.

    python benchmarks/profile_step.py                     # r18_cifar shape, precision auto
    python benchmarks/profile_step.py --precision fp32 --splits 8 --batch 256
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastmoco.bench.measure import matmul_rate
from fastmoco.build import build_trainer, local_runtime
from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.data import SyntheticTwoViewLoader
from fastmoco.device import describe_cpu

GROUPS = {
    "conv forward": ("mkldnn_convolution", "convolution_overrideable", "_convolution"),
    "conv backward": ("convolution_backward",),
    "batch norm": ("native_batch_norm", "batch_norm"),
    "relu / add": ("relu", "threshold_backward", "add_", "aten::add"),
    "linear / mm": ("addmm", "aten::mm", "linear"),
    "optimizer": ("_foreach", "sgd"),
    "ema": ("lerp",),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--splits", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    w = a.width
    cfg = apply_overrides(TrainConfig(), [
        "backbone.name=resnet18", "backbone.cifar_stem=true", "data.name=synthetic",
        "data.image_size=32", f"schedule.batch_size={a.batch}", "method.queue_size=4096",
        f"method.bn_splits={a.splits}", "method.temperature=0.1", "method.momentum=0.99",
        "run.compile=off", f"run.precision={a.precision}", "run.device=cpu",
        "run.channels_last=true", f"+backbone.kwargs.channels=[{w},{2 * w},{4 * w},{8 * w}]"])
    rt = local_runtime(cfg)
    device, dtype = rt.device, rt.dtype
    trainer = build_trainer(cfg, rt, steps=a.steps + 2)
    loader = iter(SyntheticTwoViewLoader(a.batch * (a.steps + 2), a.batch, 32, device, dtype,
                                         True, 0))
    run = lambda xq, xk: trainer.step(xq, xk, 0.03, 0.99)
    for _ in range(2):
        run(*next(loader))
    ceil_before = matmul_rate(device, torch.float32, 2048, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(a.steps):
            run(*next(loader))
        wall = (time.perf_counter() - t) / a.steps
    ceil_after = matmul_rate(device, torch.float32, 2048, 3)
    totals: dict[str, float] = collections.defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::") or "Optimizer" in e.key:
            totals[group_of(e.key)] += e.self_cpu_time_total / 1e3 / a.steps
    print(json.dumps({"cpu": describe_cpu(), "dtype": str(dtype), "batch": a.batch,
                      "splits": a.splits, "width": w, "step_ms": round(wall * 1e3, 1),
                      "img_s": round(a.batch / wall, 1),
                      "mm_fp32_gflops": round(max(ceil_before, ceil_after) / 1e9, 1),
                      "self_ms_by_group": {k: round(v, 1) for k, v in
                                           sorted(totals.items(), key=lambda kv: -kv[1])}},
                     indent=1))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
