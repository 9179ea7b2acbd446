"""The one entry: `fastmoco train|bench <hydra overrides>` (console script and `python -m fastmoco`).

Hydra composes the yaml on the dataclass schema; the result becomes typed config here, once."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fastmoco.config import from_hydra
from fastmoco.distributed import is_main_process

USAGE = """usage: fastmoco {train,bench} [hydra overrides ...]

  fastmoco train                                   # MoCo v2, ResNet-18, CIFAR-10 recipe
  fastmoco train experiment=imagenet_moco_v2 data.root=/data/imagenet
  fastmoco train backbone=vit_small_patch16_224 method=moco_v3 optim=adamw
  fastmoco train --cfg job                         # print the composed config
  fastmoco bench backbone=resnet50 data=synthetic  # images/s and the step's time split
"""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train_main(cfg: DictConfig) -> None:
    from fastmoco.train import train

    summary = train(from_hydra(cfg))
    if is_main_process():
        print_summary(summary)


def print_summary(summary: dict) -> None:
    if summary.get("stopped"):
        print(f"stopped at step {summary['step']}; run the same command again to resume")
        return
    print(f"done: {summary['step']} steps, {summary['images_per_s']:.1f} images/s, "
          f"last loss {summary['loss']:.4f}, pretext top-1 {summary['pretext_top1']:.1f}%")
    before, after = summary.get("knn_init"), summary.get("knn_final")
    if after is not None:
        line = f"kNN top-1 on the test split: {after:.2f}% after pretraining"
        if before is not None:
            calibrated = summary.get("knn_init_bn_images")
            how = (f", its BN statistics re-estimated on {calibrated} train images" if calibrated
                   else ", torch's default BN statistics")
            line += f" vs {before:.2f}% at random init{how} ({after - before:+.2f} points)"
        print(line)
    if summary.get("skipped_files"):
        print(f"skipped {summary['skipped_files']} unreadable files (see the log)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    sys.argv = [f"fastmoco {command}", *rest]
    if command == "train":
        train_main()
    elif command == "bench":
        from fastmoco.bench import bench_main

        bench_main()
    else:
        print(USAGE, file=sys.stderr)
        raise SystemExit(f"unknown command {command!r}: use train or bench")
