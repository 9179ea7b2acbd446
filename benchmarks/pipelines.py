"""Two-view images/s of the training pipelines: DALI CPU, torchvision, and DALI GPU when CUDA is present.

    python benchmarks/pipelines.py [--seconds 20] [--imagenet-files 4096]

Cases: CIFAR-10 at 32 px (cifar recipe) and the ImageNet samples replicated by symlinks (in a temp
dir) at 224 px (v2 recipe). Writes benchmarks/out/pipelines.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fastmoco.bench.results import default_command, write_result
from fastmoco.pipelines import build_train_loader, get_recipe, scan_image_folder
from fastmoco.pipelines.folder import ENV_VAR

DATA = Path(os.environ.get(ENV_VAR, Path(__file__).resolve().parents[2] / "shared" / "data"))


def replicate(src: Path, n: int, out: Path) -> Path:
    """`n` symlinks cycling over the images of `src` (nothing copied)."""
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for i in range(n):
        f = files[i % len(files)]
        (out / f"{i:06d}_{f.name}").symlink_to(f)
    return out


def measure(kind: str, files, recipe, batch: int, device: torch.device, workers: int, seconds: float) -> dict:
    """Two-view images/s after one warm-up batch, over at most `seconds` (whole batches)."""
    loader = build_train_loader(kind, files, recipe, batch, device=device, num_workers=workers)
    it = iter(loader)
    start = time.perf_counter()
    next(it)
    warm = time.perf_counter()
    steps = 0
    for q, k in it:
        steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - warm > seconds:
            break
    elapsed = time.perf_counter() - warm
    return {"kind": kind, "device": device.type, "workers": workers, "batch": batch, "steps": steps,
            "images_per_s": steps * batch / elapsed, "first_batch_s": warm - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per case")
    parser.add_argument("--imagenet-files", type=int, default=4096)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "pipelines.json"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    cuda = torch.cuda.is_available()
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [
            ("cifar10-32px", scan_image_folder(DATA / "cifar10" / "train"), get_recipe("cifar"), 256),
            ("imagenet-224px-v2", scan_image_folder(replicate(DATA / "imagenet-samples", args.imagenet_files,
                                                              Path(tmp))), get_recipe("v2"), 64),
        ]
        for name, files, recipe, batch in cases:
            runs = [("dali", cpu, cores), ("torchvision", cpu, cores)]
            if cuda:
                runs += [("dali", gpu, 4), ("torchvision", gpu, cores)]
            for kind, device, workers in runs:
                row = {"case": name, **measure(kind, files, recipe, batch, device, workers, args.seconds)}
                rows.append(row)
                print(f"{name:18s} {kind:12s} {device.type:4s} workers={workers:2d}  "
                      f"{row['images_per_s']:9.1f} two-view img/s", flush=True)
    result = {"host": platform.node(), "cores": cores, "cuda": torch.cuda.get_device_name(0) if cuda else None,
              "torch": torch.__version__, "rows": rows}
    for name in {r["case"] for r in rows}:
        by = {(r["kind"], r["device"]): r["images_per_s"] for r in rows if r["case"] == name}
        result.setdefault("dali_cpu_over_torchvision", {})[name] = by[("dali", "cpu")] / by[("torchvision", "cpu")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| case | pipeline | device | two-view img/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['kind']} | {r['device']} | {r['images_per_s']:.1f} |")
    for name, ratio in sorted(result["dali_cpu_over_torchvision"].items()):
        print(f"DALI CPU / torchvision ({name}): {ratio:.2f}x")
    table = [[r["case"], r["kind"], r["device"], r["workers"], r["images_per_s"]] for r in rows]
    print("results:", write_result(
        "pipelines", "two_view", ["case", "pipeline", "device", "workers", "two-view images/s"],
        table, command=default_command(), device_type="cuda" if cuda else "cpu",
        notes=[f"{args.seconds:g} s timed per case after a warm-up; batches of 256 (CIFAR, 32 px) "
               f"and 64 (ImageNet samples replicated to {args.imagenet_files} files, 224 px, v2 "
               f"recipe)"], out_dir=Path(__file__).parent / "results"))


if __name__ == "__main__":
    main()
