"""The training loop, top to bottom: build, resume, then per step read the lr and m, run
Algorithm 1's step, log on rank 0; checkpoint everything the next step needs."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from fastmoco import resume
from fastmoco.autosize import choose_size
from fastmoco.budget import TimeBudget
from fastmoco.build import (
    build_loader, build_schedules, build_trainer, init_runtime, planned_steps, seed_process,
)
from fastmoco.config import TrainConfig
from fastmoco.conv_choice import agree_on_measurements, describe_convolutions
from fastmoco.metrics import MetricsWriter, ProgressBar, Throughput, setup_logging
from fastmoco.monitor import KnnMonitor
from fastmoco.periodic import PeriodicCheckpoints
from fastmoco.progress import Progress, epoch_batches
from fastmoco.stop import StopFlag

log = logging.getLogger("fastmoco")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Pretrain as `cfg` says; returns a summary (kNN before/after, images/s, steps)."""
    rt = init_runtime(cfg.run)
    setup_logging(rt.rank)
    cfg.check(rt.world_size, rt.device.type)
    # before any model is built (the autosizer's trials too): the convolution paths' timings
    agree_on_measurements(cfg.run.conv_weight_grad, cfg.run.conv_winograd, rt.device, rt.dtype,
                          rt.rank)
    resume.check_run_dir(cfg.run, rt.rank, rt.device)
    path, state = resume.read_latest(cfg)
    cfg, size_index = choose_size(cfg, rt, state.get("size_index") if state else None)
    seed_process(cfg.run.seed, rt.rank)
    loader = build_loader(cfg, rt)
    progress = resume.progress_of(state, cfg) if state else Progress(
        total_steps=planned_steps(cfg, len(loader)))
    if not progress.total_steps:  # a checkpoint from before its run's first time-budget plan
        progress.total_steps = planned_steps(cfg, len(loader))
    trainer = build_trainer(cfg, rt, steps=progress.total_steps - progress.step)
    if state:
        resume.restore(path, state, trainer, cfg)
        del state  # the trainer holds its own copies now
    schedules = build_schedules(cfg, len(loader))
    log.info("device %s, %s, channels_last=%s, compile=%s, convolutions: %s, %d process(es), "
             "batch %d per process, shuffle_bn=%s, %d steps per epoch, %d steps planned",
             rt.device, rt.dtype_name, cfg.run.channels_last, trainer.compiled,
             describe_convolutions(trainer.moco), rt.world_size,
             cfg.schedule.batch_size // rt.world_size, trainer.moco.shuffle_bn, len(loader),
             progress.total_steps)

    budget = TimeBudget.for_run(cfg.schedule.time_budget_min, progress, rt.device)  # counts the kNN
    knn = KnnMonitor(cfg, rt, progress.knn)
    writer = MetricsWriter(Path(cfg.run.dir), enabled=rt.rank == 0)
    if cfg.knn.at_start and progress.step == 0 and "init" not in progress.knn:
        writer.log({"step": 0, "knn_top1": knn("init", trainer.moco)})
    stop, meter = StopFlag(), Throughput(cfg.schedule.batch_size, progress.step)
    bar = ProgressBar(rt.rank == 0 and cfg.run.progress, progress.total_steps, progress.step)
    checkpoints = PeriodicCheckpoints(trainer, progress, cfg, size_index, len(loader))
    save = checkpoints.save_now  # waits for the periodic write in flight, then writes
    last: dict[str, float] = {"loss": math.nan, "pretext_top1": math.nan}

    while not (progress.finished or stop.requested):
        epoch = progress.epoch
        for x_q, x_k in epoch_batches(loader, progress):
            lr, m = schedules.at(*progress.schedule_position())
            out = trainer.step(x_q, x_k, lr, m)
            progress.advance()
            if budget is not None and budget.update(progress):
                log.info("time budget %.1f min: %d steps in all (planned at step %d)",
                         cfg.schedule.time_budget_min, progress.total_steps, progress.step)
            if progress.step % cfg.run.log_every == 0 or progress.finished:
                last = _report(out, progress, lr, m, meter, writer, loader.skipped)
                bar.update(progress.total_steps, loss=f"{last['loss']:.3f}",
                           top1=f"{last['pretext_top1']:.1f}", img_s=f"{last['images_per_s']:.1f}")
            else:
                bar.update(progress.total_steps)
            checkpoints.after_step()  # every N steps or minutes: copied now, written in the background
            if progress.finished or stop.poll():
                break
        if progress.epoch > epoch and not progress.finished:  # the epoch ran to its end
            if knn.due(progress.epoch):
                knn(f"epoch_{progress.epoch}", trainer.moco)
            checkpoints.after_epoch()
    bar.close()

    if stop.requested and not progress.finished:
        log.warning("stop requested: checkpointing at step %d to resume from", progress.step)
        save()
        return {"stopped": True, "step": progress.step}
    if "final" not in progress.knn:
        save()  # the trained weights first: the final kNN and probe hold large feature banks
        writer.log({"step": progress.step, "knn_top1": knn("final", trainer.moco)})
    save()
    summary = {"step": progress.step, "epochs": progress.epoch,
               **last, "images_per_s": meter.overall(progress.step),
               "knn_init": progress.knn.get("init"), "knn_final": progress.knn.get("final"),
               "knn_init_bn_images": progress.knn.get("init_bn_images"),
               "probe_init": progress.knn.get("probe_init"),
               "probe_final": progress.knn.get("probe_final"),
               "skipped_files": loader.skipped}
    writer.log({"summary": summary})
    writer.close()
    return summary


def _report(out, progress: Progress, lr: float, m: float, meter: Throughput,
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


if __name__ == "__main__":  # the entry moved: say so rather than exit 0 having done nothing
    raise SystemExit("run `python -m fastmoco train ...` (or `torchrun ... -m fastmoco train ...`)")
