"""What multi-process MoCo sends per step, and what that costs: a model, and a measurement.

  python benchmarks/scaling.py predict            # ResNet-50 / ViT-B at 8, 64, 256 H100s (PREDICTED)
  python benchmarks/scaling.py measure --procs 2  # gloo on this machine's CPUs (MEASURED)

`measure` counts the bytes of every collective a training step makes: the gradient all-reduce
through a DDP communication hook (the buckets DDP really sends), the all_gathers and the
broadcast of shuffle BN and the queue by wrapping torch.distributed's functions. It then checks
the counts against the same formulas `predict` uses.
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
    shuffle_bn: bool
    image_bytes: int = 3 * 224 * 224 * 2  # one bf16 key image (DALI output)


SETUPS = [
    Setup("ResNet-50, MoCo v2", "resnet50", "v2", 64, 0.15, True),
    Setup("ViT-B/16, MoCo v3", "vit_base_patch16_224", "v3", 64, 0.40, False),
]


def ring_allreduce_sent(payload: float, w: int) -> float:
    return 2 * (w - 1) / w * payload


def ring_allgather_sent(local: float, w: int) -> float:
    return (w - 1) * local


def step_bytes(params: int, n: int, dim: int, w: int, version: str, shuffle: bool,
               image_bytes: int) -> dict[str, float]:
    """Bytes one process sends per step (ring algorithms) and the payloads behind them."""
    views = 2 if version == "v3" else 1  # symmetric: two key passes, two gathers of everything
    out = {"grad_allreduce": ring_allreduce_sent(4 * params, w)}  # fp32 gradients
    if shuffle:
        out["shuffle_images"] = views * ring_allgather_sent(n * image_bytes, w)
        out["shuffle_perm"] = views * (w * n * 8 if w > 1 else 0)  # broadcast, rank 0's share
        out["unshuffle_keys"] = views * ring_allgather_sent(n * dim * 4, w)
    if version == "v3":
        out["inbatch_keys"] = views * ring_allgather_sent(n * dim * 4, w)
    out["queue_keys"] = ring_allgather_sent(views * n * dim * 4, w)  # v3 gathers them too (unused)
    return out


def model_facts(backbone: str, version: str) -> tuple[int, float, int]:
    """(query-side trainable parameters, forward FLOPs per image of one encoder, head dim)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastmoco import MoCo

    moco = MoCo(backbone, version=version, dim=256 if version == "v3" else 128, queue_size=256,
                shuffle_bn="none")
    params = sum(p.numel() for p in moco.parameters() if p.requires_grad)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        moco.key_encoder(x)
    return params, fc.get_total_flops() / 2, 256 if version == "v3" else 128


def predict() -> None:
    """The table of benchmarks/scaling.md: bytes, communication time, compute time, efficiency."""
    print("| setup | GPUs | params (M) | grad all-reduce sent | shuffle-BN sent | queue/keys sent | "
          "comm exposed (ms) | compute (ms) | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in SETUPS:
        params, flops_fwd, dim = model_facts(s.backbone, s.version)
        passes = 2 if s.version == "v3" else 1
        # Per image: query forward + backward (3 forwards) and key forward, per view pass.
        compute = passes * 4 * flops_fwd * s.batch / (s.mfu * PEAK_BF16)
        backward = compute * passes * 2 / (passes * 4)  # the share of the step DDP can overlap
        for w in (8, 64, 256):
            b = step_bytes(params, s.batch, dim, w, s.version, s.shuffle_bn, s.image_bytes)
            bw = LINK * LINK_EFFICIENCY
            t_grad = b["grad_allreduce"] / bw + 2 * (w - 1) * HOP_LATENCY
            # Buckets go out while backward runs; the last bucket (first layers) cannot overlap.
            last = ring_allreduce_sent(min(BUCKET, 4 * params), w) / bw + 2 * (w - 1) * HOP_LATENCY
            exposed_grad = max(last, t_grad - backward)
            shuffle = sum(v for k, v in b.items() if k.startswith(("shuffle", "unshuffle")))
            keys = b["queue_keys"] + b.get("inbatch_keys", 0.0)
            n_gathers = (3 if s.shuffle_bn else 0) * passes + (passes if s.version == "v3" else 0) + 1
            # Gathers sit on the critical path (the key forward waits for its images).
            exposed = exposed_grad + (shuffle + keys) / bw + n_gathers * (w - 1) * HOP_LATENCY
            eff = compute / (compute + exposed)
            print(f"| {s.name} | {w} | {params / 1e6:.1f} | {b['grad_allreduce'] / 2**20:.0f} MiB | "
                  f"{shuffle / 2**20:.1f} MiB | {keys / 2**10:.0f} KiB | {exposed * 1e3:.1f} | "
                  f"{compute * 1e3:.1f} | {eff:.0%} |")
        print(f"<!-- {s.name}: forward {flops_fwd / 1e9:.2f} GFLOP/image (flop_counter), "
              f"batch {s.batch}/GPU, MFU {s.mfu} -->")


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

    def hook(self):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            self.payload["grad_allreduce"] += bucket.buffer().numel() * bucket.buffer().element_size()
            self.calls["grad_allreduce"] += 1
            return allreduce_hook(state, bucket)

        return counting_hook


def _measure_worker(rank: int, world: int, port: int, steps: int, batch: int, result) -> None:
    from fastmoco import MoCo

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
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        params = sum(p.numel() for p in moco.parameters() if p.requires_grad)
        result.update(steps_per_s=steps / elapsed, images_per_s=steps * batch * world / elapsed,
                      payload={k: v / steps for k, v in counter.payload.items()},
                      calls={k: v / steps for k, v in counter.calls.items()}, params=params)
    if world > 1:
        dist.destroy_process_group()


def measure(procs: int, steps: int, batch: int) -> None:
    """Steps/s and bytes per step per process, gloo on CPU, narrow ResNet-18 at 32 px."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_measure_worker, args=(procs, port, steps, batch, result), nprocs=procs, join=True)
        r = dict(result)
    print(f"processes={procs} batch/process={batch} steps={steps} (gloo, CPU, ResNet-18 CIFAR stem, "
          f"MoCo v2, {r['params'] / 1e6:.2f}M trainable params)")
    print(f"  {r['steps_per_s']:.2f} steps/s, {r['images_per_s']:.1f} images/s")
    expected = step_bytes(r["params"], batch, 128, procs, "v2", procs > 1, 3 * 32 * 32 * 4)
    payload_expected = {
        "grad_allreduce": 4 * r["params"],
        "all_gather": batch * 3 * 32 * 32 * 4 + batch * 128 * 4 + batch * 128 * 4,  # images, keys, queue
        "broadcast": procs * batch * 8,
    }
    for k, v in sorted(r["payload"].items()):
        print(f"  {k:15s} payload {v / 2**10:10.1f} KiB/step in {r['calls'][k]:.0f} calls "
              f"(formula {payload_expected.get(k, float('nan')) / 2**10:.1f} KiB)")
    print(f"  ring bytes sent per process per step: {sum(expected.values()) / 2**20:.2f} MiB "
          f"({', '.join(f'{k} {v / 2**10:.0f} KiB' for k, v in expected.items())})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["predict", "measure"])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.mode == "predict":
        predict()
    else:
        measure(args.procs, args.steps, args.batch)
