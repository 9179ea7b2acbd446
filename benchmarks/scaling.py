"""What multi-process MoCo sends per step, and what that costs: a model, and a measurement.

  python benchmarks/scaling.py predict            # ResNet-50 / ViT-B at 8, 64, 256 H100s (PREDICTED)
  python benchmarks/scaling.py measure --procs 2 --shuffle all_to_all  # gloo on this CPU (MEASURED)
  python benchmarks/scaling.py shuffle --procs 4  # shuffle BN's bytes alone, both versions (MEASURED)

`measure` counts the bytes of every collective a training step makes: the gradient all-reduce
through a DDP communication hook (the buckets DDP really sends), the all_gathers, all_to_alls
and the broadcast of shuffle BN and the queue by wrapping torch.distributed's functions, and
the bytes each process really wrote to its sockets (/proc/self/io wchar: gloo's TCP writes).
It then checks both against the same formulas `predict` uses.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

PEAK_BF16 = 989e12  # H100 SXM dense bf16 FLOP/s
LINK = 400e9 / 8  # 400 Gb/s per GPU (one NIC per GPU, as on DGX/HGX H100), bytes/s
LINK_EFFICIENCY = 0.8  # NCCL bus bandwidth reached on such links (nccl-tests, large messages)
HOP_LATENCY = 8e-6  # per ring step, inter-node
BUCKET = 25 * 2**20  # DDP's default bucket_cap_mb


@dataclass
class Setup:
    """One training recipe to predict for."""

    name: str
    backbone: str
    version: str
    batch: int  # images per GPU
    mfu: float  # fraction of PEAK_BF16 the step reaches on one H100 (assumed, see scaling.md)
    shuffle: str  # all_gather (the paper's code) | all_to_all (method.shuffle_bn=ddp) | sync | none
    image_bytes: int = 3 * 224 * 224 * 2  # one bf16 key image (DALI output)


SHUFFLES = ("all_gather", "all_to_all", "sync")
SETUPS = [Setup("ResNet-50, MoCo v2", "resnet50", "v2", 64, 0.15, s) for s in SHUFFLES] + [
    Setup("ViT-B/16, MoCo v3", "vit_base_patch16_224", "v3", 64, 0.40, "none"),
]


def ring_allreduce_sent(payload: float, w: int) -> float:
    return 2 * (w - 1) / w * payload


def ring_allgather_sent(local: float, w: int) -> float:
    return (w - 1) * local


def all_to_all_sent(local: float, w: int) -> float:
    """Expected bytes a process sends when each of its rows goes to a uniformly random process
    (a random permutation of the global batch): the 1/W that stay home are not sent. Each
    process also receives that much, and never more than `local`."""
    return (w - 1) / w * local


def step_bytes(params: int, n: int, dim: int, w: int, version: str, shuffle: str,
               image_bytes: int, bn_channels: int = 0, bn_layers: int = 0) -> dict[str, float]:
    """Bytes one process sends per step (ring algorithms; direct sends for all_to_all)."""
    views = 2 if version == "v3" else 1  # symmetric: two key passes, two gathers of everything
    out = {"grad_allreduce": ring_allreduce_sent(4 * params, w)}  # fp32 gradients
    if shuffle in ("all_gather", "all_to_all"):
        moved = ring_allgather_sent if shuffle == "all_gather" else all_to_all_sent
        out["shuffle_images"] = views * moved(n * image_bytes, w)
        out["shuffle_perm"] = views * (w * n * 8 if w > 1 else 0)  # broadcast, rank 0's share
        out["unshuffle_keys"] = views * moved(n * dim * 4, w)
    if shuffle == "sync":
        # torch's SyncBatchNorm: forward all_gathers (mean, invstd, count) in fp32 per BN layer,
        # in the query and the key encoder; backward all-reduces (Σdy, Σdy·x̂), query side only.
        out["syncbn_stats"] = views * 2 * ring_allgather_sent((2 * bn_channels + bn_layers) * 4, w)
        out["syncbn_grads"] = views * ring_allreduce_sent(2 * bn_channels * 4, w)
    if version == "v3":
        out["inbatch_keys"] = views * ring_allgather_sent(n * dim * 4, w)
    out["queue_keys"] = ring_allgather_sent(views * n * dim * 4, w)  # v3 gathers them too (unused)
    return out


def critical_hops(w: int, version: str, shuffle: str, bn_layers: int) -> int:
    """Ring steps of the collectives the step waits for, besides the gradient all-reduce.

    Shuffle BN: images out, permutation broadcast, keys back: three collectives per key pass,
    W−1 steps each (an all_to_all's W−1 sends are counted as W−1 steps like a ring's, though
    NCCL posts them at once). SyncBN: one all_gather per BN layer in each encoder's forward
    (W−1 steps) and one all-reduce per layer in the query's backward (2(W−1) steps), each
    blocking the layer after it. Plus v3's in-batch key gathers and the queue's gather."""
    views = 2 if version == "v3" else 1
    hops = 0
    if shuffle in ("all_gather", "all_to_all"):
        hops += 3 * views * (w - 1)
    if shuffle == "sync":
        hops += views * bn_layers * (2 * (w - 1) + 2 * (w - 1))
    if version == "v3":
        hops += views * (w - 1)
    return hops + (w - 1)


def model_facts(backbone: str, version: str) -> tuple[int, float, int, int, int]:
    """(query-side trainable parameters, forward FLOPs per image of one encoder, head dim,
    BatchNorm layers and their channels in an encoder, which SyncBN would synchronise)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.utils.flop_counter import FlopCounterMode

    from fastmoco import MoCo

    moco = MoCo(backbone, version=version, dim=256 if version == "v3" else 128, queue_size=256,
                shuffle_bn="none")
    params = sum(p.numel() for p in moco.parameters() if p.requires_grad)
    norms = [m for m in moco.query_encoder.modules() if isinstance(m, _BatchNorm)]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        moco.key_encoder(x)
    return (params, fc.get_total_flops() / 2, 256 if version == "v3" else 128, len(norms),
            sum(m.num_features for m in norms))


GPUS = (8, 64, 256)


def predict_setup(s: Setup, facts: tuple[int, float, int, int, int], w: int,
                  hop: float = HOP_LATENCY) -> dict[str, float]:
    """Bytes sent, exposed communication, compute and efficiency of one setup at `w` GPUs, with
    `hop` seconds per ring step."""
    params, flops_fwd, dim, bn_layers, bn_channels = facts
    passes = 2 if s.version == "v3" else 1
    # Per image: query forward + backward (3 forwards) and key forward, per view pass.
    compute = passes * 4 * flops_fwd * s.batch / (s.mfu * PEAK_BF16)
    backward = compute * passes * 2 / (passes * 4)  # the share of the step DDP can overlap
    b = step_bytes(params, s.batch, dim, w, s.version, s.shuffle, s.image_bytes, bn_channels, bn_layers)
    bw = LINK * LINK_EFFICIENCY
    t_grad = b["grad_allreduce"] / bw + 2 * (w - 1) * hop
    # Buckets go out while backward runs; the last bucket (first layers) cannot overlap.
    last = ring_allreduce_sent(min(BUCKET, 4 * params), w) / bw + 2 * (w - 1) * hop
    exposed_grad = max(last, t_grad - backward)
    bn = sum(v for k, v in b.items() if k.startswith(("shuffle", "unshuffle", "syncbn")))
    keys = b["queue_keys"] + b.get("inbatch_keys", 0.0)
    # Shuffle BN and SyncBN sit on the critical path (the key forward waits for its images, each
    # synchronised BN layer for its statistics).
    latency = critical_hops(w, s.version, s.shuffle, bn_layers) * hop
    exposed = exposed_grad + (bn + keys) / bw + latency
    return dict(grad=b["grad_allreduce"], bn=bn, keys=keys, exposed=exposed, latency=latency,
                compute=compute, efficiency=compute / (compute + exposed))


def predict() -> None:
    """The tables of benchmarks/scaling.md: bytes, communication time, compute time, efficiency."""
    facts = {}
    for s in SETUPS:
        if s.backbone not in facts:
            facts[s.backbone] = model_facts(s.backbone, s.version)
    print("| setup | BN across GPUs | GPUs | params (M) | grad all-reduce sent | BN traffic sent | "
          "queue/keys sent | comm exposed (ms) | latency of BN/key collectives (ms) | compute (ms) | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in SETUPS:
        f = facts[s.backbone]
        for w in GPUS:
            p = predict_setup(s, f, w)
            print(f"| {s.name} | {s.shuffle} | {w} | {f[0] / 1e6:.1f} | {p['grad'] / 2**20:.0f} MiB | "
                  f"{p['bn'] / 2**20:.1f} MiB | {p['keys'] / 2**10:.0f} KiB | {p['exposed'] * 1e3:.1f} | "
                  f"{p['latency'] * 1e3:.1f} | {p['compute'] * 1e3:.1f} | {p['efficiency']:.0%} |")
    for name, f in facts.items():
        s = next(s for s in SETUPS if s.backbone == name)
        print(f"<!-- {s.name}: forward {f[1] / 1e9:.2f} GFLOP/image (flop_counter), {f[3]} BN layers "
              f"with {f[4]} channels, batch {s.batch}/GPU, MFU {s.mfu} -->")
    # Side by side, and how much each depends on the per-step latency (1 µs: about NVLink's).
    hops = (HOP_LATENCY, 1e-6)
    print()
    print("| ResNet-50, MoCo v2 | " + " | ".join(f"{w} GPUs, {h * 1e6:.0f} µs/step" for h in hops
                                              for w in GPUS) + " |")
    print("|---" * (len(GPUS) * len(hops) + 1) + "|")
    for s in SETUPS:
        if s.backbone == "resnet50":
            effs = [predict_setup(s, facts[s.backbone], w, h)["efficiency"] for h in hops for w in GPUS]
            print(f"| {s.shuffle} | " + " | ".join(f"{e:.0%}" for e in effs) + " |")


class _Counter:
    """Bytes per collective kind; wraps torch.distributed's Python entry points."""

    def __init__(self) -> None:
        self.payload: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self) -> None:
        for name in ("all_gather", "broadcast"):  # DDP's all_reduce is counted by the hook
            original = getattr(dist, name)

            def counted(tensor_or_list, *args, _name=name, _original=original, **kwargs):
                t = args[0] if _name == "all_gather" else tensor_or_list  # all_gather(out, x)
                self.payload[_name] += t.numel() * t.element_size()
                self.calls[_name] += 1
                return _original(tensor_or_list, *args, **kwargs)

            setattr(dist, name, counted)
        a2a, rank = dist.all_to_all_single, dist.get_rank()

        def all_to_all_single(out, x, out_splits, in_splits, *args, **kwargs):
            row = x[0].numel() * x.element_size() if x.shape[0] else 0
            self.payload["all_to_all"] += (sum(in_splits) - in_splits[rank]) * row  # sent to others
            self.payload["all_to_all_received"] += (sum(out_splits) - out_splits[rank]) * row
            self.calls["all_to_all"] += 1
            self.calls["all_to_all_received"] += 1
            return a2a(out, x, out_splits, in_splits, *args, **kwargs)

        dist.all_to_all_single = all_to_all_single

    def hook(self):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            self.payload["grad_allreduce"] += bucket.buffer().numel() * bucket.buffer().element_size()
            self.calls["grad_allreduce"] += 1
            return allreduce_hook(state, bucket)

        return counting_hook


def _written() -> int:
    """Bytes this process has passed to write/send system calls: gloo's TCP traffic in a step."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def _measure_worker(rank: int, world: int, port: int, steps: int, batch: int, shuffle: str,
                    result) -> None:
    import fastmoco.methods.moco
    from fastmoco import MoCo
    from fastmoco.distributed import batch_shuffle_all_gather, batch_unshuffle_all_gather

    if shuffle == "all_gather":  # the paper's version, kept as the reference
        fastmoco.methods.moco.batch_shuffle = batch_shuffle_all_gather
        fastmoco.methods.moco.batch_unshuffle = batch_unshuffle_all_gather
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per process: the same work per process at any W
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    moco = MoCo("resnet18", version="v2", dim=128, queue_size=4096, cifar_stem=True,
                shuffle_bn="ddp" if world > 1 else "none", loss_backend="torch",  # plain BN baseline
                world_size=world)
    counter = _Counter()
    model: nn.Module = moco
    if world > 1:
        model = nn.parallel.DistributedDataParallel(moco, broadcast_buffers=False)
        model.register_comm_hook(None, counter.hook())
        counter.wrap()
    opt = torch.optim.SGD(moco.parameters(), lr=0.03, momentum=0.9)
    x_q, x_k = torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)

    def step() -> None:
        out = model(x_q, x_k, momentum=0.99)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        moco.enqueue(out.keys)

    for _ in range(2):  # warm-up
        step()
    counter.payload.clear()
    counter.calls.clear()
    written = _written()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - t0
    result[f"written{rank}"] = (_written() - written) / steps
    result[f"a2a{rank}"] = counter.payload.get("all_to_all", 0) / steps
    if rank == 0:
        params = sum(p.numel() for p in moco.parameters() if p.requires_grad)
        result.update(steps_per_s=steps / elapsed, images_per_s=steps * batch * world / elapsed,
                      payload={k: v / steps for k, v in counter.payload.items()},
                      calls={k: v / steps for k, v in counter.calls.items()}, params=params)
    if world > 1:
        dist.destroy_process_group()


def measure(procs: int, steps: int, batch: int, shuffle: str) -> None:
    """Steps/s and bytes per step per process, gloo on CPU, narrow ResNet-18 at 32 px."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_measure_worker, args=(procs, port, steps, batch, shuffle, result), nprocs=procs,
                 join=True)
        r = dict(result)
    mode = shuffle if procs > 1 else "none"
    print(f"processes={procs} batch/process={batch} steps={steps} shuffle={mode} (gloo, CPU, "
          f"ResNet-18 CIFAR stem, MoCo v2, {r['params'] / 1e6:.2f}M trainable params)")
    print(f"  {r['steps_per_s']:.2f} steps/s, {r['images_per_s']:.1f} images/s")
    image, key = 3 * 32 * 32 * 4, 128 * 4
    expected = step_bytes(r["params"], batch, 128, procs, "v2", mode, image)
    payload_expected = {
        "grad_allreduce": 4 * r["params"],
        "broadcast": procs * batch * 8,
        # images and keys (all_gather shuffle), and the queue's keys
        "all_gather": batch * key + (batch * (image + key) if mode == "all_gather" else 0),
        "all_to_all": all_to_all_sent(batch * (image + key), procs),  # expectation over permutations
        "all_to_all_received": all_to_all_sent(batch * (image + key), procs),
    }
    for k, v in sorted(r["payload"].items()):
        print(f"  {k:15s} payload {v / 2**10:10.1f} KiB/step in {r['calls'][k]:.0f} calls "
              f"(formula {payload_expected.get(k, float('nan')) / 2**10:.1f} KiB)")
    print(f"  bytes sent per process per step, formula: {sum(expected.values()) / 2**20:.3f} MiB "
          f"({', '.join(f'{k} {v / 2**10:.1f} KiB' for k, v in expected.items())})")
    if procs > 1:
        # The formula's all_to_all terms are expectations over permutations; here each rank's
        # are replaced by the rows it really passed to all_to_all_single. gloo broadcasts from
        # rank 0 to every other process directly: (W−1)× the permutation from rank 0, none from
        # the others (a ring broadcast, as NCCL's, sends it about once per process).
        common = sum(v for k, v in expected.items() if k != "shuffle_perm")
        if mode == "all_to_all":
            common -= expected["shuffle_images"] + expected["unshuffle_keys"]
        for rank in range(procs):
            perm = (procs - 1) * procs * batch * 8 if rank == 0 else 0
            exact = common + r[f"a2a{rank}"] + perm
            label = "formula with this run's all_to_all splits" if mode == "all_to_all" else "formula"
            print(f"  rank {rank}: wrote {r[f'written{rank}'] / 2**10:.1f} KiB/step to its sockets; "
                  f"{label} {exact / 2**10:.1f} KiB")


def _shuffle_worker(rank: int, world: int, port: int, steps: int, batch: int, side: int,
                    result) -> None:
    from fastmoco.distributed import (
        batch_shuffle, batch_shuffle_all_gather, batch_unshuffle, batch_unshuffle_all_gather,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = _Counter()
    counter.wrap()
    x = torch.randn(batch, 3, side, side)
    versions = {"all_gather": (batch_shuffle_all_gather, batch_unshuffle_all_gather),
                "all_to_all": (batch_shuffle, batch_unshuffle)}
    for name, (shuffle, unshuffle) in versions.items():
        written = seconds = 0.0
        counter.payload.clear()
        for step in range(steps + 1):  # the first is a warm-up
            torch.manual_seed(step + 7919 * rank)  # the same permutations for both versions
            dist.barrier()
            w0, t0 = _written(), time.perf_counter()
            shuffled, undo = shuffle(x)
            keys = unshuffle(shuffled[:, 0, 0, :128].contiguous(), undo)  # N×128 fp32 "keys"
            if step:
                written += _written() - w0
                seconds += time.perf_counter() - t0
            else:
                counter.payload.clear()
        result[name, rank] = dict(written=written / steps, seconds=seconds / steps,
                                  sent=counter.payload.get("all_to_all", 0) / steps,
                                  received=counter.payload.get("all_to_all_received", 0) / steps)
    dist.destroy_process_group()


def measure_shuffle(procs: int, steps: int, batch: int, side: int) -> None:
    """Bytes each shuffle-BN version sends per process per key pass (images out, keys back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_shuffle_worker, args=(procs, port, steps, batch, side, result), nprocs=procs,
                 join=True)
        r = dict(result)
    image, key = 3 * side * side * 4, 128 * 4
    row = image + key
    print(f"processes={procs} batch/process={batch} steps={steps} image 3x{side}x{side} fp32 "
          f"({image / 2**10:.0f} KiB), keys 128 fp32 (gloo, CPU)")
    print(f"  formula per process and key pass: all_gather sends (W-1)*N rows = "
          f"{ring_allgather_sent(batch * row, procs) / 2**10:.1f} KiB; all_to_all sends and receives "
          f"(W-1)/W*N rows = {all_to_all_sent(batch * row, procs) / 2**10:.1f} KiB in expectation; "
          f"rank 0 also broadcasts the permutation, (W-1)*W*N*8 B = {(procs - 1) * procs * batch * 8} B")
    for name in ("all_gather", "all_to_all"):
        for rank in range(procs):
            m = r[name, rank]
            perm = (procs - 1) * procs * batch * 8 if rank == 0 else 0
            if name == "all_gather":
                formula = ring_allgather_sent(batch * row, procs) + perm
                exact = f"formula {formula / 2**10:.1f} KiB"
            else:  # this run's splits, as passed to all_to_all_single
                exact = (f"sent {m['sent'] / row:.2f} rows, received {m['received'] / row:.2f} rows "
                         f"per step; formula with these splits {(m['sent'] + perm) / 2**10:.1f} KiB")
            print(f"  {name:10s} rank {rank}: wrote {m['written'] / 2**10:9.1f} KiB/step ({exact}); "
                  f"{m['seconds'] * 1e3:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["predict", "measure", "shuffle"])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--side", type=int, default=224, help="image side in `shuffle` mode")
    parser.add_argument("--shuffle", choices=["all_to_all", "all_gather"], default="all_to_all",
                        help="shuffle BN's version (method.shuffle_bn=ddp uses all_to_all)")
    args = parser.parse_args()
    if args.mode == "predict":
        predict()
    elif args.mode == "shuffle":
        measure_shuffle(args.procs, args.steps, args.batch, args.side)
    else:
        measure(args.procs, args.steps, args.batch, args.shuffle)
