"""schedule.time_budget_min: fix the number of steps from the measured pace so that pretraining
ends within the budget."""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from fastmoco.distributed import is_distributed
from fastmoco.training.position import RunPosition


class TimeBudget:
    """After a short calibration, fix the number of steps, then re-plan on the pace since the last
    plan (epoch ends, checkpoints and a machine that slows down are not in the first steps; a
    shared machine's pace can move within minutes, so the last re-plans come late);
    rank 0 decides for every process. A budget never adds steps beyond the schedule's own."""

    CALIBRATE = (3, 13)  # measure the step time over these steps (after the warm-up steps)
    REPLAN = (0.1, 0.5, 0.75, 0.9)  # fractions of the first plan at which to re-plan

    def __init__(self, seconds: float, start_step: int, device: torch.device) -> None:
        self.seconds, self.start, self.device = seconds, start_step, device
        self.t0 = time.perf_counter()
        self.mark: Optional[float] = None
        self.mark_step = 0
        self.total_steps = 0
        self.cap = 0  # the schedule's own number of steps
        self.replan_at: set[int] = set()

    @classmethod
    def for_run(cls, minutes: Optional[float], progress: RunPosition,
                device: torch.device) -> Optional["TimeBudget"]:
        """The budget of a run that has one and has not been planned yet (a resumed run keeps its plan)."""
        if not minutes or progress.budgeted:
            return None
        return cls(minutes * 60.0, progress.step, device)

    def update(self, progress: RunPosition) -> bool:
        """Fix (or re-fix) `progress.total_steps` when this step is a planning step; True if it did."""
        if not self.decide(progress.step, progress.total_steps):
            return False
        if progress.budgeted:  # a re-plan: the lr must not jump
            progress.replan(self.total_steps)
        else:
            progress.total_steps, progress.budgeted = self.total_steps, True
        return True

    def decide(self, step: int, planned: int) -> bool:
        """True when this step fixed (or re-fixed) `self.total_steps`."""
        done = step - self.start
        if done == self.CALIBRATE[0]:
            self.mark, self.mark_step = time.perf_counter(), step
        if self.mark is None or not (done == self.CALIBRATE[1] or step in self.replan_at):
            return False
        first = not self.total_steps
        if first:
            self.cap = planned
        now = time.perf_counter()
        per_step = (now - self.mark) / (step - self.mark_step)  # the pace since the last plan
        self.mark, self.mark_step = now, step
        total = step + max(1, int((self.seconds - (now - self.t0)) / per_step))
        decided = torch.tensor([min(self.cap, total)], dtype=torch.long, device=self.device)
        if is_distributed():
            dist.broadcast(decided, src=0)
        self.total_steps = int(decided.item())
        if first:
            self.replan_at = {max(step + 1, self.start + int(f * (self.total_steps - self.start)))
                              for f in self.REPLAN}  # a plan shorter than 130 steps: right after
        return True
