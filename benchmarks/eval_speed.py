"""Evaluation speed targets (issue 13), side by side in one process:
- feature extraction through the eval pipeline (centre crops of a split) against the backbone's
  forward alone on synthetic tensors of the same shape: the pipeline must not be the bottleneck
  (target ≥ 90 %);
- the cached probe's fit on CIFAR-10-sized features (50,000 × D, 10 classes; target < 60 s).

    python benchmarks/eval_speed.py --checkpoint runs/cpu_demo --data ../shared/data/cifar10
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fastmoco.runtime import Runtime
from fastmoco.config import DataConfig, PipelineConfig
from fastmoco.data import resolve_pipeline, split_files
from fastmoco.device import autocast, describe_cpu, resolve_precision
from fastmoco.evaluation.commands import extract
from fastmoco.pipelines import build_eval_loader
from fastmoco.pipelines.recipes import get_recipe
from fastmoco.evaluation.probe import linear_probe
from fastmoco.weights.load import load_backbone


def forward_rate(backbone, rt: Runtime, batch: int, size: int, images: int) -> float:
    x = torch.randn(batch, 3, size, size, device=rt.device).to(rt.dtype).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad(), autocast(rt.device, rt.dtype):
        backbone(x)
        start, done = time.perf_counter(), 0
        while done < images:
            backbone(x)
            done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--pipeline", default="auto")
    ap.add_argument("--probe-rows", type=int, default=50000)
    ap.add_argument("--probe-dim", type=int, default=512)  # a ResNet-18's features
    args = ap.parse_args()
    device = torch.device("cpu")
    rt = Runtime(device, resolve_precision("auto", device))
    backbone, info = load_backbone(args.checkpoint)
    backbone.to(device, memory_format=torch.channels_last).eval()
    data = DataConfig(root=args.data)
    files = split_files(data, "test", args.images, 0)
    recipe = get_recipe(data.recipe, data.image_size).query
    kind = resolve_pipeline(PipelineConfig(kind=args.pipeline))
    loader = build_eval_loader(kind, files, data.image_size, recipe.mean, recipe.std, args.batch,
                               device=device, dtype=rt.dtype, num_workers=torch.get_num_threads())
    out: dict = {"cpu": describe_cpu(), "backbone": info.name, "num_features": info.num_features,
                 "pipeline": kind, "dtype": rt.dtype_name, "images": len(files)}
    extract(backbone, loader, rt)  # warm-up: pipeline build, first batches
    start = time.perf_counter()
    feats, _ = extract(backbone, loader, rt)
    out["extract_img_s"] = len(feats) / (time.perf_counter() - start)
    out["forward_img_s"] = forward_rate(backbone, rt, args.batch, data.image_size, len(files))
    out["extract_vs_forward"] = out["extract_img_s"] / out["forward_img_s"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.probe_rows + 10000, args.probe_dim, generator=g)
    y = torch.randint(10, (len(x),), generator=g)
    x[:, :10] += 2 * torch.nn.functional.one_hot(y, 10).float()  # separable, with noise
    r = linear_probe(x[:args.probe_rows], y[:args.probe_rows], x[args.probe_rows:], y[args.probe_rows:], 10)
    out["probe_features"] = [args.probe_rows, args.probe_dim]
    out["probe_fit_s"], out["probe_top1"] = r.seconds, r.top1
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
