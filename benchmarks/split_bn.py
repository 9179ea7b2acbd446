"""Split BN layouts on the ResNet-18 CIFAR backbone: sub-batches (the encoder once per sub-batch),
sliced (once over the batch, sliced inside each BN) and plain BN, forward + backward, timed in
turns. `python benchmarks/split_bn.py SPLITS BATCH REPS [CHANNELS] [THREADS]`, e.g. `8 256 5` (the
bench's case) or `2 64 9 16,32,64,128` (the CPU demo's). With THREADS=1 it reports CPU time,
which a load from other processes moves less than wall time."""
from __future__ import annotations

import statistics
import sys
import time

import torch

from fastmoco.backbone import create_backbone
from fastmoco.methods.batchnorm import convert_split_bn_, forward_in_splits, split_norms
from fastmoco.device import cpu_kind


def main() -> None:
    splits, batch, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    width = [int(c) for c in sys.argv[4].split(",")] if len(sys.argv) > 4 else [64, 128, 256, 512]
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    clock = time.perf_counter if threads > 1 else time.process_time

    def make() -> torch.nn.Module:
        net = create_backbone("resnet18", cifar_stem=True, channels=width)
        return convert_split_bn_(net).to(memory_format=torch.channels_last)

    nets = {"sub_batches": make(), "sliced": make(), "plain": make()}
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def step(kind: str) -> None:
        net = nets[kind]
        net.zero_grad(set_to_none=True)
        y = net(x) if kind == "plain" else forward_in_splits(net, x, splits, split_norms(net), kind)
        y.square().mean().backward()

    for kind in nets:
        step(kind)  # warm-up
    times: dict[str, list[float]] = {kind: [] for kind in nets}
    for _ in range(reps):
        for kind in nets:
            t0 = clock()
            step(kind)
            times[kind].append(clock() - t0)
    print(f"splits {splits}, batch {batch}, channels {width}, {threads} thread(s), {cpu_kind()}, "
          f"{'CPU' if threads == 1 else 'wall'} time")
    base = statistics.median(times["sub_batches"])
    for kind, ts in times.items():
        m = statistics.median(ts)
        print(f"  {kind:12s} median {m:.3f} s  ({base / m:.2f}× sub_batches)  min {min(ts):.3f} s")


if __name__ == "__main__":
    main()
