"""Where this process runs (`Runtime`): its device, the precision of the step, its place in the
job. Training, the evaluation commands, the bench and the autosizer all start from one."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fastmoco.config import RunConfig, TrainConfig
from fastmoco.device import DTYPES, resolve_device, resolve_precision
from fastmoco.distributed import broadcast_choice, init_from_env


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device, the precision of the step, its place in the job."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def init_runtime(run: RunConfig) -> Runtime:
    """Join the process group torchrun or SLURM describes, take this process's GPU, and settle the
    precision (on a CPU `auto` measures: rank 0's choice holds everywhere). Training and the
    evaluation commands start here alike."""
    device = resolve_device(run.device)
    rank, world, local_rank = init_from_env(device.type)
    if device.type == "cuda" and run.device == "auto":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dtype = resolve_precision(run.precision, device, run.allow_emulated_bf16)
    if run.precision == "auto":
        choices = list(DTYPES.values())  # rank 0's measurement decides for every process
        dtype = choices[broadcast_choice(choices.index(dtype), device)]
    return Runtime(device, dtype, rank, world)


def local_runtime(cfg: TrainConfig, device: torch.device | None = None) -> Runtime:
    """One process and no process group: the bench's arms and the autosizer's trial steps."""
    device = device or resolve_device(cfg.run.device)
    return Runtime(device, resolve_precision(cfg.run.precision, device, cfg.run.allow_emulated_bf16))


def seed_process(seed: int, rank: int) -> None:
    """Each process its own stream (the queue is then made identical by a broadcast)."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
