"""Where a run stands: steps done, epoch, position in the epoch, kNN results; saved in every
checkpoint, so that a resumed run continues the same schedules from the same batch."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass
class RunPosition:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of `epoch` already trained (mid-epoch checkpoints)
    knn: dict = dataclasses.field(default_factory=dict)  # "init" and per-epoch kNN top-1
    total_steps: int = 0  # the run's length: from the schedule, or fixed by a time budget
    budgeted: bool = False  # a time budget has fixed total_steps
    # After a time-budget re-plan the lr and momentum schedules keep their length and go on from
    # where they were, stretched over the steps left: schedule_position(anchor_step) = anchor_position.
    schedule_length: int = 0  # 0: the schedules run over total_steps
    anchor_step: int = 0
    anchor_position: float = 0.0

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def advance(self) -> None:
        """One optimizer step on the next batch of the epoch."""
        self.step += 1
        self.batch_in_epoch += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    def schedule_position(self) -> tuple[float, int]:
        """(position, length) at which to read the lr and momentum schedules for this step."""
        if not self.schedule_length:
            return float(self.step), self.total_steps
        left = (self.schedule_length - self.anchor_position) / max(1, self.total_steps - self.anchor_step)
        return self.anchor_position + (self.step - self.anchor_step) * left, self.schedule_length

    def replan(self, new_total: int) -> None:
        """A new number of steps that leaves the schedules' current values where they are."""
        self.anchor_position, self.schedule_length = self.schedule_position()
        self.anchor_step, self.total_steps = self.step, new_total

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def epoch_batches(loader: Iterable, progress: RunPosition) -> Iterator:
    """The current epoch's batches from where the run stands: the loader starts the epoch at
    batch `batch_in_epoch` (its order and augmentation are functions of the seed, the epoch and
    the batch), not reading the batches already trained; at its end, the next epoch."""
    loader.set_epoch(progress.epoch, start=progress.batch_in_epoch)
    yield from loader
    progress.next_epoch()
