"""torch.distributed helpers that also work in a single process (no process group)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_from_env(device_type: str) -> tuple[int, int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); (0, 1, 0) otherwise.

    NCCL on CUDA, gloo on the CPU.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    if not is_distributed():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' `x` concatenated along dim 0 in rank order. Carries no gradient."""
    if not is_distributed() or get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle BN, step 1: gather the key images of all processes, permute them with one
    permutation drawn on rank 0 and broadcast, and return this process's slice with the
    indices that undo it. In one process this is a plain permutation of the batch."""
    local = x.shape[0]
    x_all = concat_all_gather(x)  # (W·N)×…
    perm = torch.randperm(x_all.shape[0], device=x.device)
    if is_distributed():
        dist.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)
    rank = get_rank()
    mine = perm[rank * local : (rank + 1) * local]
    return x_all[mine], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Shuffle BN, step 2: gather the shuffled keys and restore this process's original rows."""
    local = x.shape[0]
    x_all = concat_all_gather(x)
    rank = get_rank()
    mine = idx_unshuffle[rank * local : (rank + 1) * local]
    return x_all[mine]
