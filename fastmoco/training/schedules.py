"""The run's schedules as pure functions of the step: the learning rate and the key encoder's
momentum; how many steps they run over."""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastmoco.config import TrainConfig


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """m for this step: constant (v1/v2) or cosine from `base` to 1 (v3)."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1.0) / 2.0
    raise ValueError(f"unknown momentum schedule {schedule!r}: choose constant or cosine")


def lr_at(
    step: int,
    total_steps: int,
    base_lr: float,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    milestones: tuple[float, ...] = (0.6, 0.8),
) -> float:
    """Learning rate for this step: linear warm-up, then cosine, step (×0.1 at milestones) or constant."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        drops = sum(step >= m * total_steps for m in milestones)
        return base_lr * 0.1**drops
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown lr schedule {schedule!r}: choose cosine, step or constant")


@dataclass(frozen=True)
class Schedules:
    """The run's lr and momentum, read at the position `RunPosition.schedule_position` gives."""

    base_lr: float
    warmup_steps: int
    lr_schedule: str
    milestones: tuple[float, ...]
    momentum: float
    momentum_schedule: str

    def at(self, position: float, length: int) -> tuple[float, float]:
        """(lr, m) for the step at `position` of a schedule `length` steps long."""
        lr = lr_at(position, length, self.base_lr, self.lr_schedule, self.warmup_steps,
                   self.milestones)
        return lr, momentum_at(position, length, self.momentum, self.momentum_schedule)


def planned_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The schedules' number of steps: schedule.steps, else the epochs' (a time budget may fix
    fewer once it has measured the pace)."""
    return cfg.schedule.steps or cfg.schedule.epochs * steps_per_epoch


def build_schedules(cfg: TrainConfig, steps_per_epoch: int) -> Schedules:
    s = cfg.schedule
    return Schedules(cfg.optim.lr_for(s.batch_size), int(s.warmup_epochs * steps_per_epoch),
                     s.lr_schedule, tuple(s.milestones), cfg.method.momentum,
                     cfg.method.momentum_schedule)
