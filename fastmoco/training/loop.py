"""The training loop, top to bottom: build, resume, then per step read the lr and m, run
Algorithm 1's step, log on rank 0; checkpoint everything the next step needs."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastmoco.config import TrainConfig
from fastmoco.data import build_loader
from fastmoco.runtime import Runtime, init_runtime, seed_process
from fastmoco.training import state as resume
from fastmoco.training.autosize import choose_size
from fastmoco.training.budget import TimeBudget
from fastmoco.training.checkpointing import PeriodicCheckpoints
from fastmoco.training.metrics import MetricsWriter, ProgressBar, Throughput, setup_logging
from fastmoco.training.monitor import KnnMonitor
from fastmoco.training.position import RunPosition, epoch_batches
from fastmoco.training.schedules import Schedules, build_schedules, planned_steps
from fastmoco.training.stop import StopFlag
from fastmoco.training.trainer import Trainer, build_trainer

log = logging.getLogger("fastmoco")


@dataclass
class Run:
    """What the loop works on: built (or resumed) by `start`."""

    cfg: TrainConfig
    rt: Runtime
    loader: Any
    progress: RunPosition
    trainer: Trainer
    schedules: Schedules
    size_index: Optional[int]


def start(cfg: TrainConfig) -> Run:
    """Join the job, size the run (time-budgeted demos), build the loader and the trainer, and
    restore the latest checkpoint of run.dir when there is one."""
    rt = init_runtime(cfg.run)
    setup_logging(rt.rank)
    cfg.check(rt.world_size, rt.device.type)
    resume.check_run_dir(cfg.run, rt.rank, rt.device)
    path, state = resume.read_latest(cfg)
    cfg, size_index = choose_size(cfg, rt, state.get("size_index") if state else None)
    seed_process(cfg.run.seed, rt.rank)
    loader = build_loader(cfg, rt)
    progress = resume.progress_of(state, cfg) if state else RunPosition()
    if not progress.total_steps:  # a new run, or a checkpoint from before its budget's first plan
        progress.total_steps = planned_steps(cfg, len(loader))
    trainer = build_trainer(cfg, rt, steps=progress.total_steps - progress.step)
    if state:
        resume.restore(path, state, trainer, cfg)
    log.info("device %s, %s, channels_last=%s, compile=%s, %d process(es), batch %d per process, "
             "shuffle_bn=%s, %d steps per epoch, %d steps planned", rt.device, rt.dtype_name,
             cfg.run.channels_last, trainer.compiled, rt.world_size,
             cfg.schedule.batch_size // rt.world_size, trainer.model.shuffle_bn, len(loader),
             progress.total_steps)
    return Run(cfg, rt, loader, progress, trainer, build_schedules(cfg, len(loader)), size_index)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Pretrain as `cfg` says; returns a summary (probe and kNN before/after, images/s, steps)."""
    run = start(cfg)
    cfg, rt, progress, trainer = run.cfg, run.rt, run.progress, run.trainer
    knn = KnnMonitor(cfg, rt, progress.knn)
    writer = MetricsWriter(Path(cfg.run.dir), enabled=rt.rank == 0)
    if cfg.knn.at_start and progress.step == 0 and "init" not in progress.knn:
        writer.log({"step": 0, "knn_top1": knn("init", trainer.model)})
    # from here: the budget counts training (the autosizer's prediction is of training steps)
    budget = TimeBudget.for_run(cfg.schedule.time_budget_min, progress, rt.device)
    checkpoints = PeriodicCheckpoints(trainer, progress, cfg, run.size_index, len(run.loader))
    stop = StopFlag(cfg.schedule.stop_at_step)
    last = run_steps(run, knn, writer, checkpoints, budget, stop)

    if stop.requested and not progress.finished:
        log.warning("%s: checkpointing at step %d to resume from", stop.reason, progress.step)
        checkpoints.save_now()
        return {"stopped": True, "step": progress.step, "reason": stop.reason}
    if "final" not in progress.knn:
        checkpoints.save_now()  # the trained weights first: the final kNN and probe hold large banks
        writer.log({"step": progress.step, "knn_top1": knn("final", trainer.model)})
    checkpoints.save_now()
    summary = {"step": progress.step, "epochs": progress.epoch, **last,
               "knn_init": progress.knn.get("init"), "knn_final": progress.knn.get("final"),
               "knn_init_bn_images": progress.knn.get("init_bn_images"),
               "probe_init": progress.knn.get("probe_init"),
               "probe_final": progress.knn.get("probe_final"),
               "skipped_files": run.loader.skipped}
    writer.log({"summary": summary})
    writer.close()
    return summary


def run_steps(run: Run, knn: KnnMonitor, writer: MetricsWriter, checkpoints: PeriodicCheckpoints,
              budget: Optional[TimeBudget], stop: StopFlag) -> dict[str, float]:
    """Steps until the run is finished or every process agrees to stop; the last report."""
    cfg, progress, trainer = run.cfg, run.progress, run.trainer
    meter = Throughput(cfg.schedule.batch_size, progress.step)
    bar = ProgressBar(run.rt.rank == 0 and cfg.run.progress, progress.total_steps, progress.step)
    last: dict[str, float] = {"loss": math.nan, "pretext_top1": math.nan}
    while not (progress.finished or stop.poll(progress.step)):
        epoch = progress.epoch
        for x_q, x_k in epoch_batches(run.loader, progress):
            lr, m = run.schedules.at(*progress.schedule_position())
            out = trainer.step(x_q, x_k, lr, m)
            progress.advance()
            if budget is not None and budget.update(progress):
                log.info("time budget %.1f min: %d steps in all (planned at step %d)",
                         cfg.schedule.time_budget_min, progress.total_steps, progress.step)
            if progress.step % cfg.run.log_every == 0 or progress.finished:
                last = _report(out, progress, lr, m, meter, writer, run.loader.skipped)
                bar.update(progress.total_steps, loss=f"{last['loss']:.3f}",
                           top1=f"{last['pretext_top1']:.1f}", img_s=f"{last['images_per_s']:.1f}")
            else:
                bar.update(progress.total_steps)
            checkpoints.after_step()  # every N steps or minutes: copied now, written in the background
            if progress.finished or stop.poll(progress.step):
                break
        if progress.epoch > epoch and not progress.finished:  # the epoch ran to its end
            if knn.due(progress.epoch):
                knn(f"epoch_{progress.epoch}", trainer.model)
            checkpoints.after_epoch()
    bar.close()
    return {**last, "images_per_s": meter.overall(progress.step)}


def _report(out, progress: RunPosition, lr: float, m: float, meter: Throughput,
            writer: MetricsWriter, skipped: int) -> dict[str, float]:
    """Loss, pretext top-1 and images/s since the last report; the step's only host syncs."""
    loss, acc = out.loss.item(), out.accuracy.item()
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss} at step {progress.step}: lower optim.lr, or use "
            f"run.precision=fp32 / bf16; the last checkpoint is intact")
    ips = meter.window(progress.step)
    writer.log({"step": progress.step, "epoch": progress.epoch, "loss": loss, "pretext_top1": acc,
                "lr": lr, "momentum": m, "images_per_s": ips, "skipped_files": skipped})
    return {"loss": loss, "pretext_top1": acc, "images_per_s": ips}
