"""The training loop, top to bottom: build, resume, then per step set lr and m, forward,
backward, optimizer step, enqueue; log on rank 0; checkpoint everything the next step needs."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from fastmoco import checkpoint as ckpt
from fastmoco.autosize import choose_size
from fastmoco.config import TrainConfig
from fastmoco.data import build_knn_loaders, build_pretrain_loader
from fastmoco.device import autocast, grad_scaler, resolve_device, resolve_precision
from fastmoco.distributed import (
    AnyProcess, broadcast_choice, broadcast_module_, get_world_size, init_from_env,
    is_distributed,
)
from fastmoco.knn import knn_accuracy, recalibrate_bn_
from fastmoco.model import MoCo, MoCoOutput
from fastmoco.momentum import lr_at, momentum_at
from fastmoco.optim import build_optimizer, set_lr

log = logging.getLogger("fastmoco")


def build_model(cfg: TrainConfig, device: torch.device, channels_last: bool,
                dtype: torch.dtype = torch.float32) -> MoCo:
    """MoCo on `device`, in channels-last memory when asked, as the config describes.

    On a GPU the queue is kept in the training dtype: the fused loss then reads half the bytes
    and runs on tensor cores. On the CPU it stays fp32 (the chunked loss is fp32 matmul)."""
    m = cfg.method
    if m.shuffle_bn == "sync" and device.type != "cuda":
        raise ValueError("method.shuffle_bn=sync needs CUDA (torch's SyncBatchNorm runs on GPUs "
                         "only): on the CPU use method.shuffle_bn=ddp, split or auto")
    model = MoCo(
        cfg.backbone.name, version=m.version, dim=m.dim, queue_size=m.queue_size,
        momentum=m.momentum, temperature=m.temperature, shuffle_bn=m.shuffle_bn,
        bn_splits=m.bn_splits, mlp_hidden=m.mlp_hidden, symmetric=m.symmetric,
        cifar_stem=cfg.backbone.cifar_stem, backbone_kwargs=dict(cfg.backbone.kwargs),
        loss_backend=cfg.run.loss_backend, ema_backend=cfg.run.ema_backend,
    )
    model.to(device)
    if device.type == "cuda" and model.queue is not None:
        model.queue.to(dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.prepare_ema()
    return model


def train_step(
    model: nn.Module, moco: MoCo, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    x_q: torch.Tensor, x_k: torch.Tensor, lr: float, momentum: float,
    device: torch.device, dtype: torch.dtype,
) -> MoCoOutput:
    """One step of Algorithm 1. `model` may be the DDP wrapper of `moco`."""
    set_lr(optimizer, lr)
    with autocast(device, dtype):
        out = model(x_q, x_k, momentum=momentum)  # EMA, queries, keys, InfoNCE
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    scaler.step(optimizer)
    scaler.update()
    moco.enqueue(out.keys)  # after backward: the loss may hold the queue for its gradient
    return out


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of `epoch` already trained (mid-epoch checkpoints)
    knn: dict = dataclasses.field(default_factory=dict)  # "init" and per-epoch kNN top-1
    total_steps: int = 0  # fixed once known (a time budget fixes it after a few steps)
    # After a time-budget re-plan the lr and momentum schedules keep their length and go on from
    # where they were, stretched over the steps left: schedule_position(anchor_step) = anchor_position.
    schedule_length: int = 0  # 0: the schedules run over total_steps
    anchor_step: int = 0
    anchor_position: float = 0.0

    def schedule_position(self, total_steps: int) -> tuple[float, int]:
        """(position, length) at which to read the lr and momentum schedules for this step."""
        if not self.schedule_length:
            return float(self.step), total_steps
        left = (self.schedule_length - self.anchor_position) / max(1, total_steps - self.anchor_step)
        return self.anchor_position + (self.step - self.anchor_step) * left, self.schedule_length

    def replan(self, total_steps: int, new_total: int) -> None:
        """A new number of steps that leaves the schedules' current values where they are."""
        self.anchor_position, self.schedule_length = self.schedule_position(total_steps)
        self.anchor_step, self.total_steps = self.step, new_total


class _TimeBudget:
    """schedule.time_budget_min: after a short calibration, fix the number of steps so that
    pretraining ends within the budget, then re-plan twice on the pace so far (epoch ends,
    checkpoints and a machine that slows down are not in the first steps); rank 0 decides for
    every process."""

    CALIBRATE = (3, 13)  # measure the step time over these steps (after the warm-up steps)
    REPLAN = (0.1, 0.5)  # fractions of the first plan at which to re-plan

    def __init__(self, seconds: float, start_step: int, device: torch.device) -> None:
        self.seconds, self.start, self.device = seconds, start_step, device
        self.t0 = time.perf_counter()
        self.mark: Optional[float] = None
        self.mark_step = 0
        self.total_steps = 0
        self.cap = 0  # the schedule's own number of steps: a budget never adds steps
        self.replan_at: set[int] = set()

    def decide(self, step: int, planned: int) -> bool:
        """True when this step fixed (or re-fixed) `total_steps`."""
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


class _StopFlag:
    """SIGTERM/SIGUSR1 (SLURM preemption, torchrun elastic restarts) → checkpoint at the next step."""

    def __init__(self) -> None:
        self.requested = False  # agreed by all processes (poll), so that all stop at one step
        self.signalled = False  # this process got the signal
        self._agree = AnyProcess()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def poll(self) -> bool:
        self.requested = self.requested or self._agree(self.signalled)
        return self.requested


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def _gather_rng() -> list[dict[str, Any]]:
    state = ckpt.rng_state()
    if not is_distributed():
        return [state]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, state)
    return out


def _decide_compile(cfg: TrainConfig, total_steps: int, device: torch.device) -> bool:
    """auto: compile on GPUs for runs long enough to repay the cold compile. Not on CPUs: there
    the compiled step measured slower than eager (benchmarks/RESULTS.md, R18 CIFAR: 73.9 vs
    95.7 images/s), on top of a ~50 s cold compile."""
    choice = str(cfg.run.compile).lower()  # yaml reads a bare off/on as a boolean
    if choice in ("on", "true"):
        return True
    if choice in ("off", "false"):
        return False
    if choice != "auto":
        raise ValueError(f"run.compile={cfg.run.compile!r}: choose auto, on or off")
    return device.type == "cuda" and total_steps >= cfg.run.compile_min_steps


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Pretrain as `cfg` says; returns a summary (kNN before/after, images/s, steps)."""
    device = resolve_device(cfg.run.device)
    rank, world, local_rank = init_from_env(device.type)
    if device.type == "cuda" and cfg.run.device == "auto":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    _setup_logging(rank)
    cfg.check(world)
    dtype = resolve_precision(cfg.run.precision, device, cfg.run.allow_emulated_bf16)
    if cfg.run.precision == "auto":  # on a CPU auto measures: rank 0's choice holds everywhere
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        dtype = dtypes[broadcast_choice(dtypes.index(dtype), device)]
    run_dir = Path(cfg.run.dir)
    latest = ckpt.latest_checkpoint(run_dir) if cfg.run.resume else None
    state = ckpt.load_checkpoint(latest) if latest is not None else None  # read once
    size_index = None
    if cfg.schedule.sizes:  # before seeding: measuring builds models
        resumed = state.get("size_index") if state is not None else None
        cfg, size_index = choose_size(cfg, device, dtype, rank, world, resumed)
    torch.manual_seed(cfg.run.seed + rank)
    random.seed(cfg.run.seed + rank)
    local_batch = cfg.schedule.batch_size // world

    moco = build_model(cfg, device, cfg.run.channels_last, dtype)
    broadcast_module_(moco)  # rank 0's queue (a buffer, drawn from a per-rank seed) everywhere
    base_lr = cfg.optim.lr_for(cfg.schedule.batch_size)
    optimizer = build_optimizer(moco.parameters(), cfg.optim, base_lr, device)
    scaler = grad_scaler(device, dtype)
    loader = build_pretrain_loader(
        cfg.data, cfg.pipeline, local_batch, device=device, dtype=dtype,
        channels_last=cfg.run.channels_last, rank=rank, world_size=world, seed=cfg.run.seed,
    )
    steps_per_epoch = len(loader)
    total_steps = cfg.schedule.epochs * steps_per_epoch
    if cfg.schedule.max_steps is not None:
        total_steps = min(total_steps, cfg.schedule.max_steps)
    warmup_steps = int(cfg.schedule.warmup_epochs * steps_per_epoch)

    progress = Progress()
    if state is not None:
        progress = _resume(latest, state, moco, optimizer, scaler, rank, world, cfg)
        del state  # the model, optimizer and scaler hold their own copies now
        log.info("resumed from %s at step %d (epoch %d, batch %d)", latest, progress.step,
                 progress.epoch, progress.batch_in_epoch)

    if progress.total_steps:
        total_steps = progress.total_steps
    budget = None
    if cfg.schedule.time_budget_min and not progress.total_steps:
        budget = _TimeBudget(cfg.schedule.time_budget_min * 60.0, progress.step, device)
    else:
        progress.total_steps = total_steps
    use_compile = _decide_compile(cfg, total_steps - progress.step, device)
    log.info("device %s, %s, channels_last=%s, compile=%s (%s), %d process(es), batch %d per process, "
             "shuffle_bn=%s, %d steps per epoch, %d steps in all",
             device, str(dtype).removeprefix("torch."), cfg.run.channels_last, use_compile,
             cfg.run.compile, world, local_batch, moco.shuffle_bn, steps_per_epoch, total_steps)
    if use_compile:
        moco.compile_encoders()

    model: nn.Module = moco
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            moco, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the queue and key encoder are identical by construction
        )

    knn_loaders = None
    if cfg.knn.enabled:
        knn_loaders = build_knn_loaders(
            cfg.data, cfg.pipeline, cfg.knn.batch_size, device=device, dtype=dtype,
            channels_last=cfg.run.channels_last, seed=cfg.run.seed,
            calibration_images=cfg.knn.init_bn_calibration_images if cfg.knn.at_start else 0,
        )

    def run_knn(tag: str) -> Optional[float]:
        if knn_loaders is None:
            return None
        acc = None
        if rank == 0:
            encoder = moco.query_encoder if cfg.knn.features == "head" else moco.backbone
            how = ""
            if tag == "init" and knn_loaders.calibration is not None:
                # The random network with BN statistics of the data, not torch's defaults: a copy,
                # so that training starts from the state it would have started from.
                encoder = copy.deepcopy(encoder)
                seen = recalibrate_bn_(encoder, knn_loaders.calibration, device, dtype)
                progress.knn["init_bn_images"] = seen
                how = f", BN statistics re-estimated on {seen} train images"
            acc = knn_accuracy(encoder, knn_loaders.bank, knn_loaders.eval,
                               knn_loaders.num_classes, device, dtype, cfg.knn.k,
                               cfg.knn.temperature)
            progress.knn[tag] = acc
            log.info("kNN top-1 (%s, %s features, k=%d%s): %.2f%%", tag, cfg.knn.features,
                     cfg.knn.k, how, acc)
        if is_distributed():
            dist.barrier()
        return acc

    writer = _Writer(run_dir, cfg) if rank == 0 else None
    if cfg.knn.at_start and "init" not in progress.knn and progress.step == 0:
        acc0 = run_knn("init")
        if writer and acc0 is not None:
            writer.log({"step": 0, "knn_top1": acc0})

    stop = _StopFlag()
    state_fn = lambda: {**_state(moco, optimizer, scaler, progress, cfg, world),
                        "size_index": size_index}
    images_per_step = cfg.schedule.batch_size
    bar = _bar(rank, cfg, total_steps, progress.step)
    window_start, window_steps, ips = time.perf_counter(), 0, float("nan")
    last = {"loss": float("nan"), "pretext_top1": float("nan")}
    run_start, run_start_step = time.perf_counter(), progress.step
    while progress.step < total_steps and not stop.requested:
        loader.set_epoch(progress.epoch)
        skip = progress.batch_in_epoch
        for i, (x_q, x_k) in enumerate(loader):
            if i < skip:
                continue  # resuming mid-epoch: the epoch's order is a function of (seed, epoch)
            position, length = progress.schedule_position(total_steps)
            lr = lr_at(position, length, base_lr, cfg.schedule.lr_schedule,
                       warmup_steps, tuple(cfg.schedule.milestones))
            m = momentum_at(position, length, cfg.method.momentum, cfg.method.momentum_schedule)
            out = train_step(model, moco, optimizer, scaler, x_q, x_k, lr, m, device, dtype)
            progress.step += 1
            progress.batch_in_epoch = i + 1
            window_steps += 1
            if budget is not None and budget.decide(progress.step, total_steps):
                if progress.total_steps:  # a re-plan: the lr must not jump
                    progress.replan(total_steps, budget.total_steps)
                total_steps = progress.total_steps = budget.total_steps
                log.info("time budget %.1f min: %d steps in all (planned at step %d)",
                         cfg.schedule.time_budget_min, total_steps, progress.step)
                if bar:
                    bar.total = total_steps
            if progress.step % cfg.run.log_every == 0 or progress.step == total_steps:
                loss, acc = out.loss.item(), out.accuracy.item()  # the only host syncs
                last.update(loss=loss, pretext_top1=acc)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss} at step {progress.step}: lower optim.lr, or use "
                        f"run.precision=fp32 / bf16; the last checkpoint is intact")
                now = time.perf_counter()
                ips = window_steps * images_per_step / (now - window_start)
                window_start, window_steps = now, 0
                if writer:
                    writer.log({"step": progress.step, "epoch": progress.epoch, "loss": loss,
                                "pretext_top1": acc, "lr": lr, "momentum": m,
                                "images_per_s": ips, "skipped_files": loader.skipped})
                if bar:
                    bar.set_postfix(loss=f"{loss:.3f}", top1=f"{acc:.1f}", img_s=f"{ips:.1f}",
                                    refresh=False)
            if bar:
                bar.update(1)
            if progress.step >= total_steps or stop.poll():
                break
        else:  # the epoch ran to its end
            progress.epoch += 1
            progress.batch_in_epoch = 0
            e = progress.epoch
            if cfg.knn.enabled and e % cfg.knn.every_epochs == 0 and progress.step < total_steps:
                run_knn(f"epoch_{e}")
            if e % cfg.run.checkpoint_every_epochs == 0 and progress.step < total_steps:
                _save(run_dir, progress.step, state_fn, rank, cfg)
            continue
        break
    if bar:
        bar.close()
    elapsed = time.perf_counter() - run_start
    if progress.step > run_start_step:  # the mean over this invocation, not the last window
        ips = (progress.step - run_start_step) * images_per_step / elapsed
    if stop.requested and progress.step < total_steps:
        log.warning("stop requested: checkpointing at step %d to resume from", progress.step)
        _save(run_dir, progress.step, state_fn, rank, cfg)
        return {"stopped": True, "step": progress.step}

    final_knn = progress.knn.get("final")
    if "final" not in progress.knn:
        final_knn = run_knn("final")
    _save(run_dir, progress.step, state_fn, rank, cfg)
    if writer and final_knn is not None:
        writer.log({"step": progress.step, "knn_top1": final_knn})
    summary = {"step": progress.step, "epochs": progress.epoch, "images_per_s": ips, **last,
               "knn_init": progress.knn.get("init"), "knn_final": final_knn,
               "knn_init_bn_images": progress.knn.get("init_bn_images"),
               "skipped_files": loader.skipped}
    if writer:
        writer.log({"summary": summary})
        writer.close()
    return summary


def _state(moco: MoCo, optimizer, scaler, progress: Progress, cfg: TrainConfig, world: int) -> dict:
    return {
        "model": moco.state_dict(),  # both encoders, the queue and its pointer
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": dataclasses.asdict(progress),
        "rng": _gather_rng(),
        "world_size": world,
        "global_batch": cfg.schedule.batch_size,
        "config": dataclasses.asdict(cfg),
    }


def _save(run_dir: Path, step: int, state_fn, rank: int, cfg: TrainConfig) -> None:
    state = state_fn()  # every rank takes part in gathering the RNG states
    if rank == 0:
        path = ckpt.save_checkpoint(run_dir, step, state, keep=cfg.run.keep_checkpoints)
        log.info("checkpoint %s", path)
    if is_distributed():
        dist.barrier()


def _resume(path: Path, state: dict, moco: MoCo, optimizer, scaler, rank: int, world: int,
            cfg: TrainConfig) -> Progress:
    """Restore `state` (read from `path`) into the model, optimizer, scaler and RNGs."""
    if state["global_batch"] != cfg.schedule.batch_size:
        raise ValueError(
            f"{path} was trained with global batch {state['global_batch']} but "
            f"schedule.batch_size={cfg.schedule.batch_size}: keep the global batch to resume "
            f"(the per-process batch follows from it), or start a new run.dir")
    moco.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if len(rngs) == world:
        ckpt.set_rng_state(rngs[rank])
    else:  # a different number of processes: derive fresh per-rank streams from the step
        log.warning("checkpoint from %d process(es) resumed on %d: RNG streams re-seeded",
                    len(rngs), world)
        p = state["progress"]
        torch.manual_seed(cfg.run.seed + 1000003 * p["step"] + rank)
        random.seed(cfg.run.seed + 1000003 * p["step"] + rank)
    return Progress(**state["progress"])


class _Writer:
    """Metrics as JSON lines and TensorBoard scalars (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not record:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _bar(rank: int, cfg: TrainConfig, total: int, done: int):
    if rank != 0 or not cfg.run.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="pretrain", unit="step", dynamic_ncols=True)


if __name__ == "__main__":
    from fastmoco.cli import main

    main(["train", *__import__("sys").argv[1:]])
