"""The bench's arms in model mode, built in one process and timed in turns (one step of each
arm, then the next round), with the fp32 mm ceiling sampled between rounds: the ratios between
arms and each arm's fraction of the ceiling no longer depend on which minute an arm ran in, as
they do in `fastmoco bench`, which runs its arms one after another in their own processes.

    python benchmarks/arms_ab.py --rounds 8 --case r18_cifar \\
        --arms reference fastmoco no_winograd lightly

Composes conf/bench.yaml like `fastmoco bench` (its arm and case definitions); extra
`key=value` overrides go after `--`. Reports per arm: median step time over the rounds, images/s,
× the first arm (the median of the per-round ratios) and the median per-round fraction of the
ceiling (each round against the better of the samples before and after it; FLOPs of the direct
convolutions, as the bench counts them). Peak memory is not measured (one process).
"""
from __future__ import annotations

import argparse
import statistics

import torch
from hydra import compose, initialize_config_module

from fastmoco.bench.arms import build_arm, synthetic_batches
from fastmoco.bench.config import ArmDef, split_config
from fastmoco.bench.measure import matmul_rate, step_flops, synchronize
from fastmoco.build import planned_steps
from fastmoco.config import apply_overrides
from fastmoco.device import cpu_kind, resolve_device
from step_ab import in_turns  # run as python benchmarks/arms_ab.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--case", default="r18_cifar")
    p.add_argument("--arms", nargs="+", default=["reference", "fastmoco", "lightly"])
    p.add_argument("overrides", nargs="*", help="key=value on the composed bench config")
    a = p.parse_args()
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        base, bench = split_config(compose(config_name="bench", overrides=a.overrides))
    cfg = apply_overrides(base, bench.case_defs[a.case].overrides + ["data.name=synthetic"])
    device = resolve_device(cfg.run.device)
    flop_per_image = step_flops(cfg, device) / cfg.schedule.batch_size
    total = planned_steps(cfg, max(1, cfg.data.synthetic_images // cfg.schedule.batch_size))
    steps = {}
    for name in a.arms:
        adef = bench.arm_defs.get(name) or ArmDef(kind=name)
        arm_cfg = apply_overrides(cfg, adef.overrides)
        arm = build_arm(name, adef.kind, arm_cfg, device, None, total)
        views = next(synthetic_batches(arm, arm_cfg, device))  # model mode: the same pair always
        steps[name] = lambda arm=arm, views=views: arm.step(*views)
    samples: list[float] = []
    seconds = in_turns(steps, a.rounds, warmup=max(1, bench.warmup),
                       around=lambda: samples.append(matmul_rate(
                           device, torch.float32, bench.ceilings.mm_size, bench.ceilings.mm_reps)),
                       sync=lambda: synchronize(device))
    ceilings = [max(u, v) for u, v in zip(samples, samples[1:])]
    b = cfg.schedule.batch_size
    first = next(iter(seconds))
    print(f"{cpu_kind()}, {torch.get_num_threads()} threads, case {a.case}, {a.rounds} rounds "
          f"in turns, {flop_per_image * b / 1e9:.1f} GFLOP a step (direct convolutions); mm "
          f"ceiling {min(samples) / 1e9:.0f}-{max(samples) / 1e9:.0f} GFLOP/s over the run")
    for name, ts in seconds.items():
        ratio = statistics.median(s0 / s for s0, s in zip(seconds[first], ts))
        frac = statistics.median(flop_per_image * b / s / c for s, c in zip(ts, ceilings))
        med = statistics.median(ts)
        print(f"  {name:16s} {med:7.3f} s/step  {b / med:6.1f} img/s  {ratio:5.2f}x {first}  "
              f"{100 * frac:5.1f}% of ceiling  [{' '.join(f'{t:.2f}' for t in ts)}]")


if __name__ == "__main__":
    main()
