"""The run's state in a checkpoint: what it holds, saving it from every process, restoring it."""
from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from fastmoco.config import QUEUE_VERSIONS, RunConfig, TrainConfig
from fastmoco.distributed import broadcast_choice, get_rank, get_world_size, is_distributed
from fastmoco.training.position import RunPosition
from fastmoco.training.trainer import Trainer
from fastmoco.weights import checkpoint as ckpt

log = logging.getLogger("fastmoco")


def read_latest(cfg: TrainConfig) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """The run directory's newest readable checkpoint and its contents (read once), if resuming;
    an unreadable newer one is reported, skipped and (by rank 0) set aside, so that it does not
    count among the checkpoints kept. Every process must pick the same one."""
    path, state = (ckpt.read_newest(cfg.run.dir, set_aside=get_rank() == 0) if cfg.run.resume
                   else (None, None))
    if is_distributed():
        picked: list[Any] = [None] * get_world_size()
        dist.all_gather_object(picked, path.name if path else None)
        if len(set(picked)) > 1:
            raise RuntimeError(
                f"the processes found different checkpoints to resume from in run.dir="
                f"{cfg.run.dir} ({', '.join(map(str, picked))} by rank): put run.dir on storage "
                f"every node shares")
    return path, state


def check_run_dir(run: RunConfig, rank: int, device: torch.device) -> None:
    """Stop at start, on every process, if rank 0 cannot write checkpoints into run.dir."""
    error = None
    if rank == 0:
        try:
            ckpt.check_writable(run.dir)
        except OSError as e:
            error = e
    if broadcast_choice(int(error is not None), device):
        raise PermissionError(
            f"run.dir={run.dir} is not writable ({error or 'on rank 0'}): checkpoints could not "
            f"be saved; set run.dir to a writable folder")


def progress_of(state: dict[str, Any], cfg: TrainConfig) -> RunPosition:
    """The checkpoint's progress; one written before `budgeted` existed had a time budget plan
    exactly when it recorded a number of steps under a budget."""
    p = dict(state["progress"])
    p.setdefault("budgeted", bool(cfg.schedule.time_budget_min and p.get("total_steps")))
    return RunPosition(**p)


def gather_rng() -> list[dict[str, Any]]:
    """Every process's RNG states, in rank order (every process calls it)."""
    state = ckpt.rng_state()
    if not is_distributed():
        return [state]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, state)
    return out


def state_of(trainer: Trainer, progress: RunPosition, cfg: TrainConfig,
             size_index: Optional[int]) -> dict[str, Any]:
    """Everything the next step needs (the tensors are the live ones, not copies); every process
    calls it (RNG states are gathered)."""
    return {
        **trainer.state_dict(),
        "progress": progress.to_dict(),
        "rng": gather_rng(),
        "world_size": trainer.runtime.world_size,
        "global_batch": cfg.schedule.batch_size,
        "size_index": size_index,
        "config": dataclasses.asdict(cfg),
    }


def save(trainer: Trainer, progress: RunPosition, cfg: TrainConfig,
         size_index: Optional[int]) -> None:
    """Checkpoint everything the next step needs, now; every process calls it."""
    write(cfg.run, progress.step, state_of(trainer, progress, cfg, size_index),
          trainer.runtime.rank)


def write(run: RunConfig, step: int, state: dict[str, Any], rank: int) -> None:
    """Rank 0 writes `state` as the checkpoint of `step` (atomically); every process waits."""
    if rank == 0:
        path = ckpt.save_checkpoint(run.dir, step, state, keep=run.keep_checkpoints)
        log.info("checkpoint %s", path)
    if is_distributed():
        dist.barrier()


def restore_rng(state: dict[str, Any], rank: int, world: int, seed: int) -> None:
    """This process's RNG streams from the checkpoint; fresh per-rank streams (derived from the
    step) when it was written by another number of processes."""
    rngs = state["rng"]
    if len(rngs) == world:
        ckpt.set_rng_state(rngs[rank])
        return
    log.warning("checkpoint from %d process(es) resumed on %d: RNG streams re-seeded",
                len(rngs), world)
    derived = seed + 1000003 * state["progress"]["step"] + rank
    torch.manual_seed(derived)
    random.seed(derived)


def restore(path: Path, state: dict[str, Any], trainer: Trainer, cfg: TrainConfig) -> None:
    """Load `state` (read from `path`) into the trainer and this process's RNGs."""
    if state["global_batch"] != cfg.schedule.batch_size:
        raise ValueError(
            f"{path} was trained with global batch {state['global_batch']} but "
            f"schedule.batch_size={cfg.schedule.batch_size}: keep the global batch to resume "
            f"(the per-process batch follows from it), or start a new run.dir")
    queue = state.get("config", {}).get("method", {}).get("queue_size")
    # Both with a queue (a checkpoint of a queue-less method stores 0): another method is
    # reported by check_model_state with the settings it was trained with.
    if cfg.method.variant in QUEUE_VERSIONS and queue and queue != cfg.method.queue_size:
        raise ValueError(
            f"{path} was trained with a queue of {queue} keys but method.queue_size="
            f"{cfg.method.queue_size}: set method.queue_size={queue} to resume, or start a new "
            f"run.dir")
    trainer.load_state_dict(state)
    restore_rng(state, trainer.runtime.rank, trainer.runtime.world_size, cfg.run.seed)
    p = state["progress"]
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, p["step"], p["epoch"],
             p["batch_in_epoch"])
