"""torch.distributed helpers that also work in a single process (no process group)."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_from_env(device_type: str) -> tuple[int, int, int]:
    """Join the process group torchrun (or a SLURM job from hydra's submitit launcher) describes
    (RANK, WORLD_SIZE, LOCAL_RANK); (0, 1, 0) otherwise. NCCL on CUDA, gloo on the CPU."""
    if "RANK" not in os.environ:
        _export_submitit_env()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    if not is_distributed():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def shutdown() -> None:
    """Leave the process group once every process is done (rank 0 writes the last checkpoint
    after the others finish their steps): a gloo group left to the interpreter's exit aborted a
    2-process CPU run at its end ("terminate called without an active exception")."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def _export_submitit_env() -> None:
    """In a SLURM task started by submitit (hydra/launcher=submitit_slurm, one task per GPU), set
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM's variables."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # the job runs submitit, so this only fails on a broken install
        return
    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        # Every task keeps all of the node's GPUs visible and picks cuda:LOCAL_RANK.
        env.export(set_cuda_visible_devices=False)


def broadcast_choice(index: int, device: torch.device, src: int = 0) -> int:
    """Rank `src`'s `index` on every process (a decision made from a measurement, which each
    process would otherwise make on its own timings); `index` itself in one process."""
    if not is_distributed() or get_world_size() == 1:
        return index
    t = torch.tensor([index], dtype=torch.long, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of rank `src` into the same module on all processes.

    DDP (broadcast_buffers=False) syncs parameters only; the queue is a buffer drawn from each
    rank's own seed, and must start identical everywhere."""
    if not is_distributed() or get_world_size() == 1:
        return
    for tensor in module.state_dict().values():  # detached views of the live storage
        dist.broadcast(tensor, src=src)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' `x` concatenated along dim 0 in rank order. Carries no gradient."""
    if not is_distributed() or get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's rows of all processes, concatenated in rank order; the processes may hold
    different numbers of rows, none included (an empty part may even be 0×0: the shape of the
    others' rows is agreed first). Carries no gradient."""
    if not is_distributed() or get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        shape = torch.tensor(t.shape, device=t.device)
        shapes = [torch.zeros_like(shape) for _ in range(get_world_size())]
        dist.all_gather(shapes, shape)
        rows = [int(s[0]) for s in shapes]
        row_shape = max((tuple(int(d) for d in s[1:]) for s in shapes if s[0] > 0), default=t.shape[1:])
        padded = torch.zeros((max(rows), *row_shape), dtype=t.dtype, device=t.device)
        if t.shape[0]:
            padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:n] for p, n in zip(parts, rows)]))
    return tuple(out)


def _draw_permutation(n_global: int, device: torch.device) -> torch.Tensor:
    """Shuffle BN's permutation of the global key batch: drawn on every process (each advances
    its own RNG the same way) and rank 0's broadcast, so all processes hold the same one."""
    perm = torch.randperm(n_global, device=device)
    if is_distributed():
        dist.broadcast(perm, src=0)
    return perm


class ShufflePlan(NamedTuple):
    """Who sends which key image where. Process p encodes global images perm[p·N:(p+1)·N] in
    that order; global image g is row g mod N of process g div N."""

    rows: torch.Tensor  # this process's rows in the order it sends them (grouped by destination)
    order: torch.Tensor  # where each received image goes in the shuffled batch
    send_counts: list[int]  # images to each process (rank order), own share included
    recv_counts: list[int]  # images from each process


def _exchange(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows of `x` (grouped by destination) to the processes, in `send_counts` parts.

    all_to_all_single because gloo (torch 2.14) takes its uneven splits, while its list form
    (dist.all_to_all) rejects parts of different sizes; NCCL takes both: one code path."""
    if not is_distributed() or get_world_size() == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv_counts, send_counts)
    return out


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, ShufflePlan]:
    """Shuffle BN, step 1, with one all_to_all: every key image goes straight to the process
    that encodes it ((W−1)/W·N images sent per process in expectation, instead of the (W−1)·N
    an all_gather brings in). Same permutation, sub-batch and order as
    `batch_shuffle_all_gather`, so the same keys bit for bit. Equal N on every process."""
    n, world, rank = x.shape[0], get_world_size(), get_rank()
    perm = _draw_permutation(world * n, x.device)
    owner = perm // n  # the process each position's image lives on
    where = torch.argsort(perm)[rank * n : (rank + 1) * n]  # the position of each of my images
    rows = torch.argsort(where)  # my rows in position order, so grouped by destination
    mine = owner[rank * n : (rank + 1) * n]
    order = torch.argsort(mine, stable=True)  # received parts arrive in source-rank order
    if world == 1:
        counts = [[n]]
    else:
        # counts[src][dst]: one host sync of W² integers, needed by the collective's splits.
        dst = torch.arange(world * n, device=x.device) // n
        counts = torch.bincount(owner * world + dst, minlength=world * world).view(world, world).tolist()
    plan = ShufflePlan(rows, order, counts[rank], [c[rank] for c in counts])
    received = _exchange(x[rows], plan.send_counts, plan.recv_counts)
    return torch.empty_like(x).index_copy_(0, order, received), plan


@torch.no_grad()
def batch_unshuffle(k: torch.Tensor, plan: ShufflePlan) -> torch.Tensor:
    """Shuffle BN, step 2: the reverse all_to_all; each key returns to its image's process and row."""
    back = _exchange(k[plan.order], plan.recv_counts, plan.send_counts)
    return torch.empty_like(k).index_copy_(0, plan.rows, back)


@torch.no_grad()
def batch_shuffle_all_gather(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle BN as the paper's code does it (the reference for `batch_shuffle`): gather the
    key images of all processes, permute them with the shared permutation, and return this
    process's slice with the indices that undo it. In one process: a plain permutation."""
    local = x.shape[0]
    x_all = concat_all_gather(x)  # (W·N)×…
    perm = _draw_permutation(x_all.shape[0], x.device)
    idx_unshuffle = torch.argsort(perm)
    rank = get_rank()
    mine = perm[rank * local : (rank + 1) * local]
    return x_all[mine], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_all_gather(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Step 2 of `batch_shuffle_all_gather`: gather the shuffled keys, keep this process's rows."""
    local = x.shape[0]
    x_all = concat_all_gather(x)
    rank = get_rank()
    mine = idx_unshuffle[rank * local : (rank + 1) * local]
    return x_all[mine]


class AnyProcess:
    """`agree(flag)` is True on every process once `flag` was True on any of them.

    A stop request (SIGTERM from SLURM or torchrun) reaches ranks at different steps; a rank that
    stopped alone would wait in the checkpoint's collectives while the others wait in the
    gradient all-reduce. Each call posts the local flag in a non-blocking MAX all-reduce on a
    CPU (gloo) group and returns the previous call's result, so every rank stops at the same
    step, one step after the request, without a host sync on the accelerator. Every process
    must make the same number of calls; in one process the flag is returned as is.
    """

    def __init__(self) -> None:
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._group = None
        if is_distributed() and get_world_size() > 1:
            # A second group (gloo, CPU tensors) keeps the flag off the NCCL stream.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def __call__(self, flag: bool) -> bool:
        if not is_distributed() or get_world_size() == 1:
            return flag
        agreed = False
        if self._pending is not None:
            work, t = self._pending
            work.wait()
            agreed = bool(t.item())
        t = torch.tensor([int(flag)], dtype=torch.int32)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, t)
        return agreed
