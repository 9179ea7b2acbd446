"""Shuffle BN by all_to_all against the paper's all_gather version: 2 and 4 gloo processes on the
CPU get the same shuffled sub-batches, the same keys back, the same MoCo losses and BN statistics
bit for bit, while each process sends (N − its own share) images instead of receiving (W−1)·N."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastmoco.methods.moco
from fastmoco import MoCo
from fastmoco.distributed import (
    batch_shuffle,
    batch_shuffle_all_gather,
    batch_unshuffle,
    batch_unshuffle_all_gather,
)

# Images per process, shuffles compared, MoCo steps per run. With these seeds the trials' splits
# are uneven and, at 4 processes, include empty parts (to a peer and to the process itself).
N, TRIALS, STEPS = 5, 4, 2
ROW = (3, 4, 4)  # one key image in the shuffle-only trials
SIZE = 16  # image side in the MoCo runs


def perm_seed(trial: int, rank: int) -> int:
    # Each rank seeds differently: only rank 0's broadcast permutation makes them agree.
    return 1000 * trial + 7919 * rank


def global_images(world: int, trial: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(trial)
    return torch.randn(world * N, *ROW, generator=g)


class TinyNet(nn.Module):
    """Conv-BN-ReLU twice and a pool: BatchNorm makes the key sub-batches observable."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Traffic:
    """Rows each process sends to and receives from the others, from the tensors and split sizes
    passed to all_to_all_single and all_gather (its own share excluded)."""

    def __init__(self) -> None:
        self.sent = self.received = 0
        self._originals = (dist.all_to_all_single, dist.all_gather)

    def __enter__(self) -> "Traffic":
        a2a, gather = self._originals
        rank, world = dist.get_rank(), dist.get_world_size()

        def all_to_all_single(out, x, out_splits, in_splits, *args, **kwargs):
            self.sent += sum(in_splits) - in_splits[rank]
            self.received += sum(out_splits) - out_splits[rank]
            return a2a(out, x, out_splits, in_splits, *args, **kwargs)

        def all_gather(outs, x, *args, **kwargs):
            self.received += (world - 1) * x.shape[0]
            return gather(outs, x, *args, **kwargs)

        dist.all_to_all_single, dist.all_gather = all_to_all_single, all_gather
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single, dist.all_gather = self._originals


def moco_run(version: str, world: int, rank: int) -> dict:
    """STEPS DDP steps of a tiny MoCo; the same init on every rank, per-rank permutation seeds."""
    torch.manual_seed(100)
    moco = MoCo(TinyNet(), version=version, dim=8, queue_size=8 * world * N, temperature=0.2,
                shuffle_bn="ddp", mlp_hidden=32, loss_backend="torch", ema_backend="torch",
                world_size=world)
    model = nn.parallel.DistributedDataParallel(moco, broadcast_buffers=False)
    opt = torch.optim.SGD(moco.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    losses, keys = [], []
    for step in range(STEPS):
        x_q, x_k = (torch.randn(world * N, 3, SIZE, SIZE, generator=g)[rank * N:(rank + 1) * N]
                    for _ in range(2))
        torch.manual_seed(perm_seed(step, rank))
        out = model(x_q, x_k, momentum=0.9)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        moco.enqueue(out.keys)
        losses.append(out.loss.detach())
        keys.append(out.keys)
    bn = {k: v for k, v in moco.key_encoder.state_dict().items() if "running" in k}
    return {"losses": torch.stack(losses), "keys": keys, "bn": bn, "state": moco.state_dict()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trials = []
    for trial in range(TRIALS):
        x = global_images(world, trial)[rank * N:(rank + 1) * N]
        torch.manual_seed(perm_seed(trial, rank))
        with Traffic() as gathered:
            ref, idx = batch_shuffle_all_gather(x)
            ref_back = batch_unshuffle_all_gather(ref, idx)
        rng_after = torch.get_rng_state()
        torch.manual_seed(perm_seed(trial, rank))
        with Traffic() as exchanged:
            got, plan = batch_shuffle(x)
            got_back = batch_unshuffle(got, plan)
        trials.append({
            "equal_rng": torch.equal(torch.get_rng_state(), rng_after),  # the same draws
            "ref": ref, "got": got, "ref_back": ref_back, "got_back": got_back,
            "gather_received": gathered.received, "a2a_sent": exchanged.sent,
            "a2a_received": exchanged.received,
        })
    runs = {}
    for version in ("v2", "v3"):  # v3: symmetric, two shuffles per step
        runs[version, "all_to_all"] = moco_run(version, world, rank)
        fastmoco.methods.moco.batch_shuffle = batch_shuffle_all_gather  # the model's reference path
        fastmoco.methods.moco.batch_unshuffle = batch_unshuffle_all_gather
        runs[version, "all_gather"] = moco_run(version, world, rank)
        fastmoco.methods.moco.batch_shuffle, fastmoco.methods.moco.batch_unshuffle = batch_shuffle, batch_unshuffle
    torch.save({"trials": trials, "runs": runs}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_shuffle_equals_the_all_gather_shuffle(world, tmp_path):
    # Forked workers inherit the imported modules: spawned ones re-import torch and fastmoco
    # (~5 s of CPU each). They run on the CPU with one thread; after CUDA was initialised here,
    # fork is unsafe and spawn is used.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world,
                       start_method=method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    moved = 0
    for trial in range(TRIALS):
        x = global_images(world, trial)
        torch.manual_seed(perm_seed(trial, 0))
        perm = torch.randperm(world * N)  # rank 0's draw, re-derived here
        stay_total = 0
        for rank, r in enumerate(ranks):
            t = r["trials"][trial]
            assert t["equal_rng"]
            # Process `rank` encodes images perm[rank·N:(rank+1)·N] of the global batch, in order.
            expected = x[perm[rank * N:(rank + 1) * N]]
            assert torch.equal(t["ref"], expected) and torch.equal(t["got"], expected)
            mine = x[rank * N:(rank + 1) * N]  # unshuffling the shuffled images restores them
            assert torch.equal(t["ref_back"], mine) and torch.equal(t["got_back"], mine)
            # Rows moved: all_gather brings in (W−1)·N images and (W−1)·N keys; all_to_all sends
            # and receives the N − stay of each that are encoded elsewhere, in each direction.
            stay = int((perm[rank * N:(rank + 1) * N] // N == rank).sum())
            stay_total += stay
            assert t["gather_received"] == 2 * (world - 1) * N
            assert t["a2a_sent"] == t["a2a_received"] == 2 * (N - stay)
        moved += world * N - stay_total
    assert moved > 0  # the trials move images between processes: the comparison is not vacuous

    for version in ("v2", "v3"):
        runs = [(r["runs"][version, "all_to_all"], r["runs"][version, "all_gather"]) for r in ranks]
        for a2a, gather in runs:  # same sub-batches, so the same keys, losses and BN statistics
            assert torch.equal(a2a["losses"], gather["losses"]), version
            assert all(torch.equal(a, b) for a, b in zip(a2a["keys"], gather["keys"])), version
            for name, value in gather["bn"].items():
                assert torch.equal(a2a["bn"][name], value), f"{version} {name}"
            for name, value in gather["state"].items():
                assert torch.equal(a2a["state"][name], value), f"{version} {name}"
        # Each process's key BN saw its own sub-batch: the statistics differ between processes.
        first = [a2a["bn"] for a2a, _ in runs]
        name = next(k for k in first[0] if k.endswith("running_mean"))
        assert not torch.equal(first[0][name], first[1][name])


def test_single_process_shuffle_is_the_all_gather_permutation():
    x = torch.randn(9, *ROW)
    torch.manual_seed(3)
    ref, idx = batch_shuffle_all_gather(x)
    torch.manual_seed(3)
    got, plan = batch_shuffle(x)
    torch.manual_seed(3)
    assert torch.equal(got, x[torch.randperm(9)]) and torch.equal(got, ref)
    assert plan.send_counts == plan.recv_counts == [9]
    keys = got.flatten(1)[:, :5] * 2  # a per-row function, so each key follows its image
    assert torch.equal(batch_unshuffle(keys, plan), x.flatten(1)[:, :5] * 2)
    assert torch.equal(batch_unshuffle(keys, plan), batch_unshuffle_all_gather(keys, idx))
