"""Two gloo processes on the CPU against one process on the same global batch: shuffle BN,
the queue, v3's in-batch keys, checkpoints across world sizes, elastic restarts, data shards."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from fastmoco.pipelines.folder import shard_indices
from fastmoco.pipelines.torchvision import EpochShardSampler
from torch import nn

from fastmoco import MoCo, device
from fastmoco.config import RunConfig
from fastmoco.distributed import AnyProcess, broadcast_module_, get_world_size, shutdown
from fastmoco.runtime import init_runtime
from fastmoco.weights.checkpoint import list_checkpoints, load_checkpoint

WORLD, N, STEPS, SIZE = 2, 4, 3, 16  # processes, batch per process, steps, image side
LR, M = 0.1, 0.9
# The 2-process run and the 1-process reference sum in different orders (gloo's all-reduce,
# per-process BN, each CPU's own conv kernels), so they agree only up to rounding, and three SGD
# steps through BN over 4 samples amplify it: in fp32 the losses differ by up to ~2.6e-5 on some
# CPUs (hundreds of ulps). Both sides therefore run in float64, where the same amplification
# leaves ~1e-13; a tolerance of 1e6 float64 ulps (2.2e-10) is machine-independent and still
# 1e6 times smaller than what a real error (a wrong shuffle, BN over the wrong keys) moves: >1e-3.
DTYPE = torch.float64
TOL = dict(rtol=1e6 * torch.finfo(DTYPE).eps, atol=1e6 * torch.finfo(DTYPE).eps)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
FAST = ["backbone=resnet18_cifar", "+backbone.kwargs.channels=[8,16,32,64]", "pipeline=torchvision",
        "pipeline.num_workers=0", "method.queue_size=96", "method.bn_splits=4", "schedule.batch_size=16",
        "run.log_every=1", "run.progress=false", "knn.enabled=false", "run.precision=fp32",
        "run.keep_checkpoints=5"]


class TinyNet(nn.Module):
    """Two conv-BN-ReLU blocks and a pool: BatchNorm makes the key sub-batches observable."""

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


def tiny_moco(version: str, shuffle_bn: str, seed: int) -> MoCo:
    torch.manual_seed(seed)
    moco = MoCo(TinyNet(), version=version, dim=8, queue_size=24, temperature=0.2, momentum=M,
                shuffle_bn=shuffle_bn, mlp_hidden=32, loss_backend="torch", ema_backend="torch",
                world_size=get_world_size())
    moco.to(DTYPE)  # the flat EMA buffers follow the move
    return moco


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(WORLD * N, 3, SIZE, SIZE, generator=g, dtype=DTYPE),
             torch.randn(WORLD * N, 3, SIZE, SIZE, generator=g, dtype=DTYPE)) for _ in range(STEPS)]


def perm_seed(step: int, rank: int) -> int:
    # Rank 0 draws the permutation the reference uses; the others draw different ones, so only
    # the broadcast from rank 0 makes the processes agree.
    return 1000 * step + 7919 * rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, version: str, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    moco = tiny_moco(version, "auto", seed=100 + rank)  # per-rank init, fixed by broadcast_module_
    broadcast_module_(moco)
    assert moco.shuffle_bn == "ddp"
    model = nn.parallel.DistributedDataParallel(moco, broadcast_buffers=False)
    opt = torch.optim.SGD(moco.parameters(), lr=LR, momentum=0.9)
    losses = []
    for step, (x_q, x_k) in enumerate(global_batches()):
        rows = slice(rank * N, (rank + 1) * N)
        torch.manual_seed(perm_seed(step, rank))
        out = model(x_q[rows], x_k[rows], momentum=M)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        moco.enqueue(out.keys)
        losses.append(out.loss.detach())
    agree = AnyProcess()  # a stop request that reaches rank 1 alone, at its step 3
    stops = [agree(rank == 1 and step >= 3) for step in range(6)]
    torch.save({"losses": torch.stack(losses), "state": moco.state_dict(), "stops": stops},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def reference(version: str) -> tuple[torch.Tensor, dict]:
    """Algorithm 1 in one process on the global batch: BN over the same per-process sub-batches
    (queries per rank's rows, keys per slice of the one shuffled batch), loss averaged over all
    2N rows, keys enqueued in global order."""
    moco = tiny_moco(version, "none", seed=100)
    opt = torch.optim.SGD(moco.parameters(), lr=LR, momentum=0.9)
    t = moco.temperature

    def query(x):  # (W·N)×C, BN per process
        return torch.cat([moco._query(c) for c in x.chunk(WORLD)])

    @torch.no_grad()
    def key(x):  # shuffle, BN per slice of the shuffled batch, unshuffle
        perm = torch.randperm(x.shape[0])
        k = torch.cat([F.normalize(moco.key_encoder(c), dim=1) for c in x[perm].chunk(WORLD)])
        return k[torch.argsort(perm)]

    def contrast(q, k):
        labels = torch.zeros(q.shape[0], dtype=torch.long)
        if moco.queue is None:  # v3: every key of the global batch, positive on the diagonal
            return F.cross_entropy(q @ k.T / t, torch.arange(q.shape[0])) * 2 * t
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ moco.queue.keys.T], 1) / t
        return F.cross_entropy(logits, labels)

    losses = []
    for step, (x_q, x_k) in enumerate(global_batches()):
        moco.momentum_update(M)
        torch.manual_seed(perm_seed(step, 0))
        if moco.queue is None:  # v3, in its authors' order: both queries, then both keys
            q1, q2 = query(x_q), query(x_k)
            k1, k2 = key(x_q), key(x_k)
            loss, keys = contrast(q1, k2) + contrast(q2, k1), None
        else:
            q, k = query(x_q), key(x_k)
            loss, keys = contrast(q, k), k
        opt.zero_grad()
        loss.backward()
        opt.step()
        if keys is not None:
            moco.queue.enqueue(keys)
        losses.append(loss.detach())
    return torch.stack(losses), moco.state_dict()


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_two_processes_match_one_process_on_the_global_batch(version, tmp_path):
    mp.spawn(_worker, args=(version, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref_losses, ref_state = reference(version)

    # Every process holds the same key encoder, queue and pointer, bit for bit.
    shared = [k for k in ranks[0]["state"] if k.startswith("key_encoder.") or k.startswith("queue.")]
    params = dict(tiny_moco(version, "none", 0).named_parameters())
    for name in shared:
        if name.startswith("key_encoder.") and name not in params:
            continue  # BN running statistics: each process's own, as in the paper (unused in training)
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
    # The global loss is the mean of the per-process losses (equal N) and matches one process.
    torch.testing.assert_close(sum(r["losses"] for r in ranks) / WORLD, ref_losses, **TOL)
    # Parameters, key encoder and queue after three steps, to the same float64 tolerance.
    for name, value in ref_state.items():
        if name in params or name.startswith("queue."):
            torch.testing.assert_close(ranks[0]["state"][name], value, **TOL,
                                       msg=lambda m: f"{name}: {m}")
    if version == "v2":
        assert int(ranks[0]["state"]["queue.ptr"]) == STEPS * WORLD * N % 24
    # Both processes see the stop one call after rank 1 raised it, at the same step.
    assert ranks[0]["stops"] == ranks[1]["stops"] == [False] * 4 + [True] * 2
    # The test can fail: without the shuffle (one BN over each process's own keys) the loss moves.
    torch.manual_seed(0)
    moco = tiny_moco(version, "none", seed=100)
    x_q, x_k = global_batches()[0]
    with torch.no_grad():
        moco.momentum_update(M)
        q = torch.cat([moco._query(c) for c in x_q.chunk(WORLD)])
        k = torch.cat([F.normalize(moco.key_encoder(c), dim=1) for c in x_k.chunk(WORLD)])
    if version == "v2":
        l_pos = (q * k).sum(1, keepdim=True)
        unshuffled = F.cross_entropy(torch.cat([l_pos, q @ moco.queue.keys.T], 1) / 0.2,
                                     torch.zeros(len(q), dtype=torch.long))
        assert abs(unshuffled.item() - ref_losses[0].item()) > 1e-3


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun_train(nproc: int, overrides: list[str], cwd: Path, extra: list[str] = ()) -> list[str]:
    return [*TORCHRUN, f"--nproc_per_node={nproc}", *extra, "-m", "fastmoco", "train", *FAST, *overrides]


def _runtime_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    # each rank "measured" otherwise: bf16 fast on rank 0, slow on rank 1
    device.cpu_supports_bf16 = lambda: True
    device.cpu_bf16_speedup = lambda: 2.0 if rank == 0 else 0.5
    rt = init_runtime(RunConfig(device="cpu", precision="auto"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps([rt.rank, rt.world_size, rt.dtype_name]))
    shutdown()


def test_ranks_take_rank_zeros_precision(tmp_path):
    """precision=auto follows a timing: each process would take its own, on a CPU the others
    load, and could decide otherwise. Every rank runs rank 0's choice."""
    mp.spawn(_runtime_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert got == [[0, WORLD, "bfloat16"], [1, WORLD, "bfloat16"]]


def test_checkpoint_at_two_processes_resumes_at_one(tiny_cifar, tmp_path):
    a = tmp_path / "a"
    common = [f"data.root={tiny_cifar}", "schedule.epochs=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(torchrun_train(2, common + [f"run.dir={a}"], tmp_path),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es), batch 8 per process, shuffle_bn=ddp" in res.stdout + res.stderr
    two = [r for r in metrics(a) if "loss" in r]
    assert [r["step"] for r in two] == list(range(1, 25))  # rank 0 alone writes, once per step
    first = list_checkpoints(a)[0]
    state = load_checkpoint(first)
    assert (state["world_size"], state["progress"]["step"], len(state["rng"])) == (2, 12, 2)
    assert int(state["model"]["queue.ptr"]) == 12 * 16 % 96

    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copy(first, b / "checkpoints" / first.name)
    res = subprocess.run([sys.executable, "-m", "fastmoco", "train", *FAST, *common, f"run.dir={b}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "checkpoint from 2 process(es) resumed on 1" in log
    assert "1 process(es), batch 16 per process, shuffle_bn=split" in log
    one = [r for r in metrics(b) if "loss" in r]
    assert [r["step"] for r in one] == list(range(13, 25))
    # The schedule carries over: the same lr at every step as the uninterrupted 2-process run.
    assert [r["lr"] for r in one] == [r["lr"] for r in two[12:]]
    final = load_checkpoint(list_checkpoints(b)[-1])
    assert final["world_size"] == 1 and int(final["model"]["queue.ptr"]) == 24 * 16 % 96
    assert final["optimizer"]["state"]  # SGD momentum buffers came along


def _workers(pid: int) -> list[int]:
    """The training processes torchrun `pid` started (its children running `-m fastmoco train`)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"-m\0fastmoco\0train" in cmdline:
                out.append(int(child))
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the workers")
def test_elastic_restart_resumes_from_the_latest_checkpoint(tiny_cifar, tmp_path):
    run_dir = tmp_path / "run"
    extra = ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
             "--max-restarts=1"]
    cmd = torchrun_train(2, [f"data.root={tiny_cifar}", "schedule.epochs=3", f"run.dir={run_dir}"],
                         tmp_path, extra)
    # A restarted group must not read the previous attempt's addresses from torchrun's shared
    # store (pytorch/pytorch#135712): docs/multi-node.md sets the same variable.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not list_checkpoints(run_dir):
        time.sleep(0.2)
    workers = _workers(proc.pid)
    assert len(workers) == 2 and list_checkpoints(run_dir), "no epoch checkpoint before the deadline"
    os.kill(workers[1], signal.SIGKILL)  # a worker dies; torchrun restarts the group
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out  # the restarted group found the epoch checkpoint
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps[-1] == 36 and set(steps) == set(range(1, 37))


@pytest.mark.parametrize("n, batch, world", [(103, 4, 2), (200, 8, 2), (200, 5, 3)])
def test_shards_are_disjoint_cover_the_kept_data_and_reshuffle_per_epoch(n, batch, world):
    for epoch in (0, 1):
        shards = [shard_indices(n, batch, r, world, seed=3, epoch=epoch) for r in range(world)]
        kept = n // (batch * world) * batch * world
        assert all(len(s) == kept // world for s in shards)
        flat = [i for s in shards for i in s]
        assert len(set(flat)) == kept  # disjoint, and no rank repeats an image
        # Global batch i holds the same images at any world size with the same global batch:
        # this is what lets a checkpoint from W processes resume on W' by skipping batches.
        single = shard_indices(n, batch * world, 0, 1, seed=3, epoch=epoch)
        for i in range(kept // (batch * world)):
            union = {x for s in shards for x in s[i * batch:(i + 1) * batch]}
            assert union == set(single[i * batch * world:(i + 1) * batch * world])
        samplers = [EpochShardSampler(n, batch, r, world, seed=3) for r in range(world)]
        for s in samplers:
            s.set_epoch(epoch)
        assert [[i for i, _ in s] for s in samplers] == shards
    assert shard_indices(n, batch, 0, world, 3, 0) != shard_indices(n, batch, 0, world, 3, 1)
    assert shard_indices(n, batch, 0, world, 3, 0) != shard_indices(n, batch, 0, world, 4, 0)


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'fastmoco[slurm]'")
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    assert launcher.max_num_timeout > 0  # time-outs requeue; the run resumes from run.dir


def test_submitit_slurm_task_exports_its_rank(monkeypatch):
    pytest.importorskip("submitit")
    from fastmoco.distributed import _export_submitit_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "")  # recorded, so that the test's exports are undone afterwards
        monkeypatch.delenv(k)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    for k, v in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="16",
                     SLURM_PROCID="11", SLURM_LOCALID="3", SLURM_JOB_NUM_NODES="2",
                     SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[007-008]").items():
        monkeypatch.setenv(k, v)
    _export_submitit_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("11", "16", "3")
    assert os.environ["MASTER_ADDR"] == "gpu007"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # each task picks cuda:LOCAL_RANK


USER_SCRIPT = '''
import json, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import fastmoco

dist.init_process_group("gloo")
torch.manual_seed(0)
model = fastmoco.MoCo("resnet18", version="v2", dim=16, queue_size=64, momentum=0.99,
                      temperature=0.2, cifar_stem=True,
                      backbone_kwargs={"channels": [8, 16, 32, 64]})
ddp = DDP(model, broadcast_buffers=False)
optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
torch.manual_seed(1 + dist.get_rank())
x_q, x_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
out = ddp(x_q, x_k)
out.loss.backward(); optimizer.step()
model.enqueue(out.keys)
if dist.get_rank() == 0:
    print(json.dumps({"shuffle_bn": model.shuffle_bn, "loss": out.loss.item(),
                      "ptr": int(model.queue.ptr)}))
dist.destroy_process_group()
'''


def test_the_readme_example_in_a_users_ddp_script_shuffles_bn_across_processes(tmp_path):
    """The README's model in a user's own torchrun script (2 processes, 4 images each) takes the
    process count from torch.distributed and runs the paper's shuffle BN, not split BN."""
    script = tmp_path / "pretrain.py"
    script.write_text(USER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*TORCHRUN, f"--nproc_per_node={WORLD}", f"--master_port={free_port()}",
                          str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shuffle_bn"] == "ddp" and got["ptr"] == WORLD * 4  # both processes' keys enqueued
    assert torch.isfinite(torch.tensor(got["loss"]))


def test_two_processes_size_a_run_alike(tiny_cifar, tmp_path):
    """The autosizer's trial stops on rank 0's clock: both processes time the same number of
    steps (the step's collectives need them all) and take rank 0's size, then train."""
    run_dir = tmp_path / "run"
    sized = [f"data.root={tiny_cifar}", f"run.dir={run_dir}", "schedule.time_budget_min=0.05",
             "schedule.min_steps=1", "schedule.size_trial_seconds=1",
             "schedule.sizes=[['schedule.batch_size=16'],['schedule.batch_size=8']]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(torchrun_train(2, sized, tmp_path), capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "sized by measurement: schedule.batch_size=16" in log
    assert "2 process(es), batch 8 per process" in log
