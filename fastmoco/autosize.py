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

import torch

from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.data import SyntheticTwoViewLoader
from fastmoco.device import grad_scaler
from fastmoco.distributed import broadcast_choice
from fastmoco.optim import build_optimizer

log = logging.getLogger(__name__)

WARMUP_STEPS, TIMED_STEPS = 2, 4


def step_seconds(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, world: int) -> float:
    """Seconds of one training step of `cfg` on synthetic inputs (the best of the timed steps)."""
    from fastmoco.train import build_model, train_step  # the run's own build and step

    local = cfg.schedule.batch_size // world
    moco = build_model(cfg, device, cfg.run.channels_last, dtype)
    lr = cfg.optim.lr_for(cfg.schedule.batch_size)
    optimizer = build_optimizer(moco.parameters(), cfg.optim, lr, device)
    scaler = grad_scaler(device, dtype)
    loader = SyntheticTwoViewLoader(local * (WARMUP_STEPS + TIMED_STEPS), local,
                                    cfg.data.image_size, device, dtype, cfg.run.channels_last,
                                    cfg.run.seed)
    best = float("inf")
    for i, (x_q, x_k) in enumerate(loader):
        start = time.perf_counter()
        out = train_step(moco, moco, optimizer, scaler, x_q, x_k, lr, cfg.method.momentum,
                         device, dtype)
        out.loss.item()  # wait for the device
        if i >= WARMUP_STEPS:
            best = min(best, time.perf_counter() - start)
    return best


def choose_size(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, rank: int,
                world: int, resumed: Optional[int] = None) -> tuple[TrainConfig, Optional[int]]:
    """(`cfg` with the first of `schedule.sizes` whose measured pace gives `schedule.min_steps`
    within `schedule.time_budget_min`, or the last (smallest) when none does; its index).
    Rank 0 decides; a resumed run keeps the size its checkpoint was trained with (`resumed`)."""
    s = cfg.schedule
    if not s.sizes:
        return cfg, None
    if not s.time_budget_min or s.min_steps <= 0:
        raise ValueError("schedule.sizes needs schedule.time_budget_min and a positive "
                         "schedule.min_steps: set both, or schedule.sizes=[]")
    candidates = [apply_overrides(cfg, list(o), world) for o in s.sizes]
    if resumed is not None:
        if not 0 <= resumed < len(candidates):
            raise ValueError(f"the checkpoint was trained with size {resumed + 1} of schedule.sizes, "
                             f"which has {len(candidates)} now: restore schedule.sizes or start "
                             f"a new run.dir")
        log.info("resumed run keeps its size: %s", " ".join(s.sizes[resumed]))
        return candidates[resumed], resumed
    chosen = len(candidates) - 1
    if rank == 0:
        budget = s.time_budget_min * 60.0
        for i, candidate in enumerate(candidates):
            seconds = step_seconds(candidate, device, dtype, world)
            steps = int(budget / seconds)
            log.info("size %d/%d (%s): %.3f s/step -> about %d steps in %.1f min (need %d)",
                     i + 1, len(candidates), " ".join(s.sizes[i]), seconds, steps,
                     s.time_budget_min, s.min_steps)
            if steps >= s.min_steps:
                chosen = i
                break
    chosen = broadcast_choice(chosen, device)
    log.info("sized by measurement: %s", " ".join(s.sizes[chosen]))
    return candidates[chosen], chosen
