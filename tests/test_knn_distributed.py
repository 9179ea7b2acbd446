"""The kNN across processes: two gloo processes on the CPU, each holding its part of the bank and
of the queries, give exactly the predictions and the accuracy of one process over everything."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastmoco.evaluation.knn import (
    distributed_knn_accuracy,
    knn_accuracy,
    knn_neighbours,
    knn_predict,
    recalibrate_bn_,
)
from fastmoco.weights.checkpoint import list_checkpoints, load_checkpoint

WORLD = 2
CPU = torch.device("cpu")
N_BANK, N_QUERY, DIM, CLASSES = 1001, 257, 32, 7
# Bank rows per rank (uneven; the last case leaves rank 1 without bank rows) and which queries
# each rank holds (strided as the eval loaders split files; the last case gives rank 1 none).
SPLITS = {
    "uneven": ((0, 501, 1001), lambda q, r: q[r::WORLD]),
    "empty_parts": ((0, 1001, 1001), lambda q, r: q if r == 0 else q[:0]),
}
# (k, T, chunk): k below a shard, above one shard (500 rows) but not the bank, above the bank
# (clamped to 1001), k = 1; chunks of 1024 (one round) and of 64 and 7 (many rounds, uneven).
CASES = [(200, 0.1, 1024), (600, 0.1, 64), (1500, 0.07, 1024), (1, 0.1, 7), (20, 0.5, 64)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(N_BANK, DIM, generator=g), dim=1)
    labels = torch.randint(CLASSES, (N_BANK,), generator=g)
    queries = F.normalize(torch.randn(N_QUERY, DIM, generator=g), dim=1)
    query_labels = torch.randint(CLASSES, (N_QUERY,), generator=g)
    return queries, query_labels, bank, labels


def clusters(n: int, seed: int):
    """Five classes around fixed centres with enough noise that the kNN errs now and then."""
    centres = torch.randn(5, 12, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(5, (n,), generator=g)
    return centres[y] + 1.1 * torch.randn(n, 12, generator=g), y


def encoder() -> nn.Module:
    """The same small network in every process: linear, BatchNorm, linear."""
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))


def batches(x, y, size):
    return list(zip(x.split(size), y.split(size)))


def part(x, y, rank, world):
    """Rank's strided part, as TorchvisionEvalLoader and DaliEvalLoader split the files."""
    return x[rank::world], y[rank::world]


def end_to_end(rank: int, world: int, distributed: bool = True) -> dict:
    """BN recalibration on the same (unsharded) images, then the kNN accuracy over this rank's
    part of the bank and eval data (world 1: all of it, in batches of other sizes)."""
    bank_x, bank_y = clusters(301, seed=1)
    eval_x, eval_y = clusters(97, seed=2)
    net = encoder()
    seen = recalibrate_bn_(net, batches(bank_x, bank_y, 64), CPU, torch.float32)
    out = {"seen": seen, "bn": {k: v.clone() for k, v in net.state_dict().items()}}
    bank = batches(*part(bank_x, bank_y, rank, world), 16 if distributed else 32)  # last partial
    evals = batches(*part(eval_x, eval_y, rank, world), 10 if distributed else 7)
    for k in (30, 200):  # 200: more than one process's 150/151 bank rows
        for chunk in (1024, 9):
            out[f"acc_k{k}_c{chunk}"] = distributed_knn_accuracy(
                net, bank, evals, 5, CPU, torch.float32, k=k, temperature=0.1, chunk=chunk,
                distributed=distributed)
    return out


def random_cases(rank: int) -> dict:
    queries, _, bank, labels = random_data()
    out = {}
    for split, (bounds, pick) in SPLITS.items():
        rows = slice(bounds[rank], bounds[rank + 1])
        my_bank, my_labels = bank[rows], labels[rows]
        if my_bank.shape[0] == 0:
            my_bank = torch.empty(0, 0)  # as extract_features returns an empty part
        mine = pick(queries, rank)
        if mine.shape[0] == 0:
            mine = torch.empty(0, 0)
        for k, t, chunk in CASES:
            sims, labs = knn_neighbours(mine, my_bank, my_labels, k, chunk)
            pred = knn_predict(mine, my_bank, my_labels, CLASSES, k, t, chunk)
            out[f"{split}/{k}/{t}/{chunk}"] = (sims, labs, pred)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {"random": random_cases(rank), "e2e": end_to_end(rank, WORLD)}
        if rank == 0:  # the one-process reference, in the same kind of process and threads
            queries, _, bank, labels = random_data()
            result["ref"] = {
                f"{k}/{t}/{chunk}": (
                    *knn_neighbours(queries, bank, labels, k, chunk, distributed=False),
                    knn_predict(queries, bank, labels, CLASSES, k, t, chunk, distributed=False))
                for k, t, chunk in CASES}
            result["e2e_ref"] = end_to_end(0, 1, distributed=False)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("knn_dist")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("k,t,chunk", CASES)
def test_two_processes_give_the_one_process_neighbours_and_predictions(two_processes, split, k, t,
                                                                        chunk):
    queries, query_labels, _, _ = random_data()
    ref_sims, ref_labels, ref_pred = two_processes[0]["ref"][f"{k}/{t}/{chunk}"]
    kk = min(k, N_BANK)
    assert ref_sims.shape == (N_QUERY, kk)
    index = torch.arange(N_QUERY)
    _, pick = SPLITS[split]
    correct = total = 0
    for rank, result in enumerate(two_processes):
        sims, labels, pred = result["random"][f"{split}/{k}/{t}/{chunk}"]
        rows = pick(index, rank)  # which queries this rank held
        assert sims.shape == labels.shape == (len(rows), kk) and pred.shape == (len(rows),)
        assert pred.dtype == torch.int64
        # The merged neighbours are the global top-k: similarities equal up to the rounding of a
        # product of another shape (1 ulp on some chunks here), and the same labels in the same
        # order except among neighbours that close or tied (one topk orders ties its own way,
        # the merge by rank; equal weights, so the vote is the same).
        ref = ref_sims[rows]
        torch.testing.assert_close(sims, ref, rtol=0, atol=1e-6)
        gap = (ref[:, :-1] - ref[:, 1:]).abs() < 1e-6
        near_tie = F.pad(gap, (0, 1)) | F.pad(gap, (1, 0))
        assert not bool(((labels != ref_labels[rows]) & ~near_tie).any())
        assert bool((sims[:, :-1] >= sims[:, 1:]).all())
        assert torch.equal(pred, ref_pred[rows])
        correct += int((pred == query_labels[rows]).sum())
        total += len(rows)
    assert total == N_QUERY
    assert correct == int((ref_pred == query_labels).sum())


def test_the_merge_matters():
    """A process that voted with its own part of the bank alone would predict differently."""
    queries, _, bank, labels = random_data()
    full = knn_predict(queries, bank, labels, CLASSES, 200, 0.1, distributed=False)
    alone = knn_predict(queries, bank[:501], labels[:501], CLASSES, 200, 0.1, distributed=False)
    assert not torch.equal(full, alone)


def test_two_process_accuracy_equals_one_process_exactly(two_processes):
    r0, r1 = (r["e2e"] for r in two_processes)
    one = two_processes[0]["e2e_ref"]  # one process, the whole splits, other batch sizes
    # Each process re-estimated BN on the same images: the statistics of one process.
    assert r0["seen"] == r1["seen"] == one["seen"] == 301
    for name, value in one["bn"].items():
        assert torch.equal(r0["bn"][name], value) and torch.equal(r1["bn"][name], value), name
    for k in (30, 200):
        assert 40.0 < one[f"acc_k{k}_c1024"] < 98.0  # neither trivial nor hopeless
        for chunk in (1024, 9):
            key = f"acc_k{k}_c{chunk}"
            assert r0[key] == r1[key] == one[key] == one[f"acc_k{k}_c1024"], key


def test_knn_accuracy_in_one_process_is_the_same_function(two_processes):
    """Without a process group knn_accuracy (= distributed_knn_accuracy) is the one-process value."""
    assert distributed_knn_accuracy is knn_accuracy
    bank_x, bank_y = clusters(301, seed=1)
    eval_x, eval_y = clusters(97, seed=2)
    net = encoder()
    recalibrate_bn_(net, batches(bank_x, bank_y, 64), CPU, torch.float32)
    acc = knn_accuracy(net, batches(bank_x, bank_y, 32), batches(eval_x, eval_y, 7), 5, CPU,
                       torch.float32, k=30)
    assert acc == pytest.approx(two_processes[0]["e2e_ref"]["acc_k30_c1024"], abs=1.1)  # ≤ 1 flip


@pytest.mark.slow
def test_monitor_in_two_process_training_matches_one_process(tiny_cifar, tmp_path):
    """`fastmoco train` on two processes: every rank measures its part and the random-init kNN
    (the same network on either side) is the one-process value; progress.knn is saved."""
    fast = ["backbone=resnet18_cifar", "+backbone.kwargs.channels=[8,16,32,64]",
            "pipeline=torchvision", "pipeline.num_workers=0", "method.queue_size=96",
            "method.bn_splits=4", "schedule.batch_size=16", "run.progress=false",
            "run.precision=fp32", "knn.k=20", "knn.batch_size=64", f"data.root={tiny_cifar}",
            "schedule.steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    summaries = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"w{nproc}"
        launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
                  if nproc > 1 else [sys.executable])
        res = subprocess.run([*launch, "-m", "fastmoco", "train", *fast, f"run.dir={run_dir}"],
                             capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summaries[nproc] = next(r["summary"] for r in recs if "summary" in r)
        knn = load_checkpoint(list_checkpoints(run_dir)[-1])["progress"]["knn"]
        assert set(knn) >= {"init", "final", "init_bn_images"} and knn["init_bn_images"] == 200
    assert summaries[2]["knn_init"] == summaries[1]["knn_init"]
    assert 0 < summaries[2]["knn_final"] <= 100


def _gather_worker(rank: int, world: int, port: int, result) -> None:
    import os

    import torch.distributed as dist

    from fastmoco.distributed import gather_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        feats = torch.arange(12.0).view(3, 4) if rank == 0 else torch.empty(0, 0)  # an empty part
        labels = torch.tensor([1, 2, 3]) if rank == 0 else torch.empty(0, dtype=torch.long)
        f, l = gather_rows(feats, labels)
        result[rank] = (f.tolist(), l.tolist())
    finally:
        dist.destroy_process_group()


def test_gather_rows_takes_an_empty_part():
    """A process with no rows of a split (fewer images than processes) still joins the gather."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(2, port, result), nprocs=2)
    expected = (torch.arange(12.0).view(3, 4).tolist(), [1, 2, 3])
    assert result[0] == expected and result[1] == expected
