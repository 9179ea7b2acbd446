"""Sizing a time-budgeted run from the machine it lands on: among a few candidate sizes (backbone
width, batch), the largest whose typical step fits the steps the run needs into its budget.

A CPU with fast native bf16 runs the CPU demo's ResNet-18 several times faster than one without,
so one fixed size either starves the slow machine of steps (MoCo's kNN first dips, then climbs)
or leaves the fast one a needlessly small network. Each candidate is timed as the run will
execute it: the run's own loader (its data pipeline shares the cores with the step), the run's
own model, precision, memory format and optimizer, the mean of many steps after a warm-up
rather than the best one. The budget counts training steps only (training/loop.py starts it
after the first evaluation), so the prediction is the number of steps the run will take."""
from __future__ import annotations

import gc
import itertools
import logging
import statistics
import time
from typing import Iterator, Optional

from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.data import build_loader
from fastmoco.distributed import broadcast_choice
from fastmoco.runtime import Runtime
from fastmoco.training.trainer import build_trainer

log = logging.getLogger(__name__)

# The first steps of a fresh model and pipeline run slower (allocations, primitive creation,
# the pipeline's first batches): they are left out. Then steps are timed for
# schedule.size_trial_seconds (at least MIN_TIMED_STEPS): on a shared 2-core machine twenty
# steps' mean moved by ±20 % from one trial to the next, and a fixed time gives the fast sizes
# more steps to average over.
WARMUP_STEPS, MIN_TIMED_STEPS = 6, 20
# A size is taken only if it promises this much more than schedule.min_steps: a machine that
# slows down after the trial then still gets the steps the size needs.
MARGIN = 1.15


def _batches(loader) -> Iterator:
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def step_seconds(cfg: TrainConfig, rt: Runtime) -> float:
    """Seconds of a typical step of `cfg` in the run's loop: the mean, over the steps timed in
    schedule.size_trial_seconds after the warm-up, of the time from one step's end to the next
    one's, the wait for the loader's batch included."""
    eager = apply_overrides(cfg, ["run.compile=off"], rt.world_size)  # a compile per candidate: minutes
    trainer = build_trainer(eager, rt, steps=0)  # the run's own build and step
    loader = build_loader(eager, rt)
    lr, m = cfg.optim.lr_for(cfg.schedule.batch_size), cfg.method.momentum
    times: list[float] = []
    last = time.perf_counter()
    for i, (x_q, x_k) in enumerate(_batches(loader)):
        trainer.step(x_q, x_k, lr, m).loss.item()  # .item(): wait for the device
        now = time.perf_counter()
        if i >= WARMUP_STEPS:
            times.append(now - last)
        last = now
        done = len(times) >= MIN_TIMED_STEPS and sum(times) >= cfg.schedule.size_trial_seconds
        if broadcast_choice(int(done), rt.device):  # rank 0's clock: every process steps alike
            break
    del loader, trainer
    gc.collect()  # this candidate's pipeline and model go before the next one is timed
    return statistics.fmean(times)


def choose_size(cfg: TrainConfig, rt: Runtime,
                resumed: Optional[int] = None) -> tuple[TrainConfig, Optional[int]]:
    """(`cfg` with the first of `schedule.sizes` whose typical step gives `schedule.min_steps`
    × MARGIN within `schedule.time_budget_min`, or the last (smallest) when none does; its index).
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
        log.info("size %d/%d (%s): %.3f s a step with its data -> about %d steps in %.1f min "
                 "(takes it from %d)", i + 1, len(candidates), " ".join(s.sizes[i]), seconds,
                 steps, s.time_budget_min, int(s.min_steps * MARGIN))
        # every process goes on while rank 0's measurement says so
        if broadcast_choice(int(steps >= s.min_steps * MARGIN), rt.device):
            chosen = i
            break
    log.info("sized by measurement: %s", " ".join(s.sizes[chosen]))
    return candidates[chosen], chosen
