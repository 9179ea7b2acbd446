"""Training steps of the same case under different settings, built through `build_trainer` in one
process and timed in turns (A, B, A, B, ...), so that a load from other processes or a change of
clock speed reaches every variant alike. Reports median and min step time, and each variant's
speed relative to the first.

    python benchmarks/step_ab.py --reps 8 cl: run.channels_last=true \\
        nchw: run.channels_last=false

Default case: the bench's r18_cifar (MoCo v2, ResNet-18 CIFAR stem, 32 px, batch 256, K 4096,
split BN 8), fp32, synthetic inputs.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from fastmoco.runtime import local_runtime
from fastmoco.training.trainer import build_trainer
from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.data import SyntheticTwoViewLoader
from fastmoco.device import cpu_kind

CASE = ["backbone.name=resnet18", "backbone.cifar_stem=true", "data.name=synthetic",
        "data.image_size=32", "schedule.batch_size=256", "method.version=v2",
        "method.queue_size=4096", "method.bn_splits=8", "method.temperature=0.1",
        "method.momentum=0.99", "run.compile=off", "run.precision=fp32", "run.device=cpu",
        "run.channels_last=true"]


def in_turns(steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
             around: Callable[[], None] = lambda: None,
             sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each step, one of each per round for `rounds` rounds, after `warmup` calls of
    each (primitives, allocator, lazy state); `around` runs before the first round and after
    each one, outside the timings; `sync` brackets each timing (a GPU's queue)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    around()
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
        around()
    return times


def parse_variants(words: list[str]) -> dict[str, list[str]]:
    """`name: override override name2: override ...` -> {name: [overrides]}."""
    variants: dict[str, list[str]] = {}
    name = None
    for w in words:
        if w.endswith(":"):
            name = w[:-1]
            variants[name] = []
        elif name is None:
            raise SystemExit(f"{w!r}: start with a variant name followed by a colon, e.g. 'cl:'")
        else:
            variants[name].append(w)
    if len(variants) < 2:
        raise SystemExit("give at least two variants, e.g. 'a: run.channels_last=false b:'")
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--case", nargs="*", default=[], help="overrides on top of the default case")
    p.add_argument("variants", nargs="+")
    a = p.parse_args()
    variants = parse_variants(a.variants)
    trainers, batches = {}, {}
    for name, overrides in variants.items():
        cfg = apply_overrides(TrainConfig(), CASE + a.case + overrides)
        rt = local_runtime(cfg)
        torch.manual_seed(0)
        trainers[name] = build_trainer(cfg, rt, steps=a.reps + 2)
        b = cfg.schedule.batch_size
        batches[name] = next(iter(SyntheticTwoViewLoader(b, b, cfg.data.image_size, rt.device,
                                                         rt.dtype, cfg.run.channels_last, 0)))
    step = {n: (lambda n=n: trainers[n].step(*batches[n], 0.03, 0.99)) for n in trainers}
    times = in_turns(step, a.reps)
    print(f"{cpu_kind()}, {torch.get_num_threads()} threads, {a.reps} steps each, in turns; "
          f"case {' '.join(a.case) or 'r18_cifar (default)'}")
    first = statistics.median(times[next(iter(times))])
    for n, ts in times.items():
        m = statistics.median(ts)
        print(f"  {n:16s} median {m:.3f} s  min {min(ts):.3f} s  ({first / m:.3f}× {next(iter(times))})"
              f"  [{' '.join(f'{t:.2f}' for t in ts)}]")


if __name__ == "__main__":
    main()
