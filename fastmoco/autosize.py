"""Sizing a time-budgeted run from the machine it lands on: among a few candidate sizes (backbone
width, batch), the largest whose measured step fits the steps the run needs into its budget.

A CPU with native bf16 runs the CPU demo's ResNet-18 about 6x faster than one without, so one
fixed size either starves the slow machine of steps (MoCo's kNN first dips, then climbs) or
leaves the fast one a needlessly small network. The step is timed on synthetic tensors, exactly
as the run will execute it (same model, precision, memory format, optimizer)."""
from __future__ import annotations

import logging
import time
from typing import Optional

from fastmoco.build import Runtime, build_trainer
from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.data import SyntheticTwoViewLoader
from fastmoco.distributed import broadcast_choice

log = logging.getLogger(__name__)

WARMUP_STEPS, TIMED_STEPS = 2, 4


def step_seconds(cfg: TrainConfig, rt: Runtime) -> float:
    """Seconds of one training step of `cfg` on synthetic inputs (the best of the timed steps)."""
    eager = apply_overrides(cfg, ["run.compile=off"], rt.world_size)  # a compile per candidate: minutes
    trainer = build_trainer(eager, rt, steps=0)  # the run's own build and step
    local = cfg.schedule.batch_size // rt.world_size
    loader = SyntheticTwoViewLoader(local * (WARMUP_STEPS + TIMED_STEPS), local,
                                    cfg.data.image_size, rt.device, rt.dtype, cfg.run.channels_last,
                                    cfg.run.seed)
    lr = cfg.optim.lr_for(cfg.schedule.batch_size)
    best = float("inf")
    for i, (x_q, x_k) in enumerate(loader):
        start = time.perf_counter()
        trainer.step(x_q, x_k, lr, cfg.method.momentum).loss.item()  # .item(): wait for the device
        if i >= WARMUP_STEPS:
            best = min(best, time.perf_counter() - start)
    return best


def choose_size(cfg: TrainConfig, rt: Runtime,
                resumed: Optional[int] = None) -> tuple[TrainConfig, Optional[int]]:
    """(`cfg` with the first of `schedule.sizes` whose measured pace gives `schedule.min_steps`
    within `schedule.time_budget_min`, or the last (smallest) when none does; its index).
    Every process times the step (the step's collectives need them all); rank 0's timings decide.
    A resumed run keeps the size its checkpoint was trained with (`resumed`)."""
    s = cfg.schedule
    if not s.sizes:
        return cfg, None
    candidates = [apply_overrides(cfg, list(o), rt.world_size) for o in s.sizes]
    if resumed is not None:
        if not 0 <= resumed < len(candidates):
            raise ValueError(f"the checkpoint was trained with size {resumed + 1} of schedule.sizes, "
                             f"which has {len(candidates)} now: restore schedule.sizes or start "
                             f"a new run.dir")
        log.info("resumed run keeps its size: %s", " ".join(s.sizes[resumed]))
        return candidates[resumed], resumed
    chosen = len(candidates) - 1
    budget = s.time_budget_min * 60.0
    for i, candidate in enumerate(candidates):
        seconds = step_seconds(candidate, rt)
        steps = int(budget / seconds)
        log.info("size %d/%d (%s): %.3f s/step -> about %d steps in %.1f min (need %d)",
                 i + 1, len(candidates), " ".join(s.sizes[i]), seconds, steps,
                 s.time_budget_min, s.min_steps)
        # every process goes on while rank 0's measurement says so
        if broadcast_choice(int(steps >= s.min_steps), rt.device):
            chosen = i
            break
    log.info("sized by measurement: %s", " ".join(s.sizes[chosen]))
    return candidates[chosen], chosen
