"""The time a mid-epoch resume costs the data pipeline: from building the training loader to its
first batch, with the epoch started at its first batch and at its last (CIFAR-10, the CIFAR
recipe's batch of 512), per pipeline; and what the last batch cost before the loaders could start
anywhere (iterate from batch 0, decoding and dropping every batch before it).

    python benchmarks/resume_cost.py [--repeats 5] [--old-repeats 1] [--format folder|shards]

Starts alternate (first, last, first, ...) so that a machine shared with other work weighs on both
alike; medians are reported. One untimed start per pipeline first (imports, DALI's graph
conversion). Writes benchmarks/out/resume_cost.json and prints a table.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from fastmoco.pipelines import build_train_loader, get_recipe, scan_image_folder, scan_webdataset
from fastmoco.pipelines.folder import ENV_VAR

DATA = Path(os.environ.get(ENV_VAR, Path(__file__).resolve().parents[2] / "shared" / "data"))
EPOCH = 1


def write_shards(images, out: Path, per_shard: int = 5000) -> Path:
    """CIFAR-10 as tar shards (<key>.jpg + <key>.cls) in `out`."""
    for s in range(0, len(images.files), per_shard):
        with tarfile.open(out / f"train-{s // per_shard:04d}.tar", "w") as tf:
            for i in range(s, min(s + per_shard, len(images.files))):
                for name, data in ((f"{i:06d}.jpg", Path(images.files[i]).read_bytes()),
                                   (f"{i:06d}.cls", b"%d\n" % images.labels[i])):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return out


def first_batch_s(kind: str, files, batch: int, workers: int, start: int) -> float:
    """Seconds from building the loader to the first batch of an epoch started at `start`."""
    t = time.perf_counter()
    loader = build_train_loader(kind, files, get_recipe("cifar"), batch, device=torch.device("cpu"),
                                num_workers=workers)
    loader.set_epoch(EPOCH, start=start)
    next(iter(loader))
    elapsed = time.perf_counter() - t
    del loader
    return elapsed


def replay_s(kind: str, files, batch: int, workers: int) -> tuple[float, int]:
    """Seconds to reach the epoch's last batch by reading every batch before it (the old resume)."""
    t = time.perf_counter()
    loader = build_train_loader(kind, files, get_recipe("cifar"), batch, device=torch.device("cpu"),
                                num_workers=workers)
    loader.set_epoch(EPOCH)
    n = sum(1 for _ in loader)
    return time.perf_counter() - t, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed starts per pipeline and position")
    parser.add_argument("--old-repeats", type=int, default=1, help="replays of a whole epoch (0: skip)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--format", choices=("folder", "shards"), default="folder")
    parser.add_argument("--kinds", nargs="+", default=["dali", "torchvision"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "resume_cost.json"))
    args = parser.parse_args()

    images = scan_image_folder(DATA / "cifar10" / "train")
    tmp = tempfile.TemporaryDirectory()
    files = images if args.format == "folder" else scan_webdataset(write_shards(images, Path(tmp.name)))
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "format": args.format, "images": len(files), "batch": args.batch,
              "workers": args.workers, "cases": {}}
    for kind in args.kinds:
        steps = len(build_train_loader(kind, files, get_recipe("cifar"), args.batch, device=torch.device("cpu"),
                                       num_workers=0 if kind == "torchvision" else 1))
        first_batch_s(kind, files, args.batch, args.workers, 0)  # warm-up, untimed
        times: dict[str, list[float]] = {"first": [], "last": []}
        for _ in range(args.repeats):
            for name, start in (("first", 0), ("last", steps - 1)):
                times[name].append(first_batch_s(kind, files, args.batch, args.workers, start))
        replays = [replay_s(kind, files, args.batch, args.workers)[0] for _ in range(args.old_repeats)]
        case = {"steps_per_epoch": steps, "first_s": times["first"], "last_s": times["last"],
                "median_first_s": statistics.median(times["first"]),
                "median_last_s": statistics.median(times["last"]), "replay_to_last_s": replays}
        case["last_over_first"] = case["median_last_s"] / case["median_first_s"]
        result["cases"][kind] = case
        print(f"{kind:12s} {steps} steps/epoch  first batch {case['median_first_s']:.2f} s  "
              f"last batch {case['median_last_s']:.2f} s  ({case['last_over_first']:.2f}x)  "
              f"old replay to the last batch {' '.join(f'{r:.1f}' for r in replays) or '-'} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
