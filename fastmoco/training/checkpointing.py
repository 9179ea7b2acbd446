"""Checkpoints during training (every N epochs, steps or minutes) that cost the step only a copy
of the run's state into host memory; a background thread writes the copy, one write at a time.

When a checkpoint is due is the same on every process: epochs and steps are counted alike
everywhere, and the minutes are rank 0's clock, agreed through a non-blocking all-reduce one
step later (AnyProcess, as the stop requests). A step- or epoch-checkpoint due while a write is
still in flight waits for it; a timed one is not due until the write in flight is done. A write
that fails (disk full) is logged and training goes on; the files it did not finish are removed
and the last good checkpoint stays."""
from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any, Callable, Optional

import torch

from fastmoco.config import TrainConfig
from fastmoco.distributed import AnyProcess
from fastmoco.training import state as resume
from fastmoco.training.position import RunPosition
from fastmoco.training.trainer import Trainer
from fastmoco.weights import checkpoint as ckpt

log = logging.getLogger("fastmoco")


def to_host(obj: Any) -> Any:
    """A copy of `obj` in host memory that later steps cannot change: every tensor copied to the
    CPU, every container copied; immutable leaves (numbers, strings, tuples of them) shared."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and attributes (a state dict's _metadata)
        for k, v in obj.items():
            out[k] = to_host(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs one write at a time in a thread; a write that raises is logged, not re-raised."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.failures = 0
        self.seconds: list[float] = []  # how long each successful write took
        self._thread: Optional[threading.Thread] = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, write: Callable[[], Any], step: int) -> None:
        """Start `write` (the checkpoint of `step`) once the write in flight is done."""
        self.wait()
        # Not a daemon: a run that ends (or fails) mid-write finishes the write before it exits.
        self._thread = threading.Thread(target=self._run, args=(write, step),
                                        name="fastmoco-checkpoint")
        self._thread.start()

    def _run(self, write: Callable[[], Any], step: int) -> None:
        start = time.perf_counter()
        try:
            path = write()
        except Exception as e:
            self.failures += 1
            log.error("checkpoint of step %d not written (%s: %s): training goes on; the last good "
                      "checkpoint is %s", step, type(e).__name__, e,
                      ckpt.latest_checkpoint(self.run_dir))
            return
        self.seconds.append(time.perf_counter() - start)
        log.info("checkpoint %s (written in the background in %.1f s)", path, self.seconds[-1])


class PeriodicCheckpoints:
    """The run's checkpoints: `after_step` every step and `after_epoch` at an epoch's end take
    the periodic ones; `save_now` (stop, end of the run) waits for the write in flight, then
    writes synchronously and raises if it fails. Every process calls each of them."""

    clock = staticmethod(time.monotonic)  # rank 0's clock for checkpoint_every_min

    def __init__(self, trainer: Trainer, progress: RunPosition, cfg: TrainConfig,
                 size_index: Optional[int], steps_per_epoch: int) -> None:
        self.trainer, self.progress, self.cfg, self.size_index = trainer, progress, cfg, size_index
        self.steps_per_epoch = steps_per_epoch
        self.rank = trainer.runtime.rank
        run = cfg.run
        self.every_s = 60.0 * run.checkpoint_every_min if run.checkpoint_every_min else None
        self._agree = AnyProcess() if self.every_s else None
        self._last = self.clock()
        self._stale = False  # the next agreed time flag was posted before the last checkpoint
        self._pending = False  # due at an epoch's last step: taken at the epoch's end instead
        self.writer = BackgroundWriter(run.dir)
        self.snapshot_seconds: list[float] = []  # time each periodic checkpoint took in the step

    def after_step(self) -> None:
        p = self.progress
        due = self._time_due()  # first: a collective every process makes every step
        every = self.cfg.run.checkpoint_every_steps
        due = due or (every is not None and p.step % every == 0)
        if not due or p.finished:  # the final checkpoint follows
            return
        if p.batch_in_epoch == self.steps_per_epoch:
            self._pending = True  # so that it resumes at the next epoch's start, not past this one
            return
        self._snapshot()

    def after_epoch(self) -> None:
        if self._pending or self.progress.epoch % self.cfg.run.checkpoint_every_epochs == 0:
            self._snapshot()
        self._pending = False

    def save_now(self) -> None:
        self.writer.wait()
        resume.save(self.trainer, self.progress, self.cfg, self.size_index)
        self._reset()

    def close(self) -> None:
        """Wait for the write in flight."""
        self.writer.wait()

    def _time_due(self) -> bool:
        if self._agree is None:
            return False
        mine = (self.rank == 0 and not self.writer.busy
                and self.clock() - self._last >= self.every_s)
        agreed = self._agree(mine)
        stale, self._stale = self._stale, False
        return agreed and not stale

    def _reset(self) -> None:
        self._last = self.clock()
        self._stale = True

    def _snapshot(self) -> None:
        start = time.perf_counter()
        state = resume.state_of(self.trainer, self.progress, self.cfg, self.size_index)
        self._reset()
        if self.rank != 0:  # rank 0 writes: the model and optimizer are the same everywhere
            return
        self.writer.wait()  # one write in flight
        host, step, run = to_host(state), self.progress.step, self.cfg.run
        self.writer.submit(lambda: ckpt.save_checkpoint(run.dir, step, host,
                                                        keep=run.keep_checkpoints), step)
        self.snapshot_seconds.append(time.perf_counter() - start)
