"""The one entry: `fastmoco train|bench|eval|export ...` (console script, `python -m fastmoco`,
`torchrun -m fastmoco train`).

Hydra composes the yaml on the dataclass schema; the result becomes typed config here, once."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fastmoco.config import from_hydra
from fastmoco.distributed import is_main_process, shutdown
from fastmoco.evaluation.config import EvalConfig

USAGE = """usage: fastmoco {train,bench,eval linear,eval knn,export} [overrides ...]

  fastmoco train experiment=cifar10_moco_v2          # the MoCo authors' CIFAR-10 recipe
  fastmoco train                                   # the defaults: MoCo v2's ImageNet settings
                                                   # on CIFAR-10, ResNet-18 (no recipe)
  fastmoco train experiment=imagenet_moco_v2 data.root=/data/imagenet
  fastmoco train experiment=imagenet_moco_v3_vit_small_300ep data.root=/data/imagenet
  fastmoco train --cfg job                         # print the composed config
  fastmoco bench backbone=resnet50 data=synthetic  # images/s and the step's time split
  fastmoco eval linear checkpoint=runs/cpu_demo linear=cifar linear.mode=cached
  fastmoco eval linear checkpoint=RUN data=imagefolder data.root=/data/imagenet   # main_lincls
  fastmoco eval knn checkpoint=RUN                 # weighted kNN, k 200, T 0.1
  fastmoco export checkpoint=RUN format=timm out=DIR   # also torchvision, detectron2
"""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train_main(cfg: DictConfig) -> None:
    from fastmoco.training.loop import train

    summary = train(from_hydra(cfg))
    if is_main_process():
        print_summary(summary)
    shutdown()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def eval_linear_main(cfg: DictConfig) -> None:
    from fastmoco.evaluation.commands import linear

    summary = linear(from_hydra(cfg, EvalConfig))
    if is_main_process():
        print_eval(summary)
    shutdown()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def eval_knn_main(cfg: DictConfig) -> None:
    from fastmoco.evaluation.commands import knn

    summary = knn(from_hydra(cfg, EvalConfig))
    if is_main_process():
        print(f"kNN top-1 (k={summary['k']}) of {summary['backbone']} from {summary['source']}: "
              f"{summary['knn_top1']:.2f}%")
    shutdown()


def _stopped(summary: dict) -> bool:
    """Say so when a run stopped early on a signal (training and evaluation alike)."""
    if summary.get("stopped") and summary.get("reason", "").startswith("schedule.stop_at_step"):
        print(f"stopped at step {summary['step']} ({summary['reason']}); run again with a later "
              f"schedule.stop_at_step, or schedule.stop_at_step=null, to go on")
    elif summary.get("stopped"):
        print(f"stopped at step {summary['step']}; run the same command again to resume")
    return bool(summary.get("stopped"))


def print_eval(summary: dict) -> None:
    if _stopped(summary):
        return
    what = "cached linear probe" if summary["mode"] == "cached" else "linear protocol"
    print(f"{what} of {summary['backbone']} from {summary['source']}: top-1 {summary['top1']:.2f}%, "
          f"top-5 {summary['top5']:.2f}%")


def print_summary(summary: dict) -> None:
    if _stopped(summary):
        return
    print(f"done: {summary['step']} steps, {summary['images_per_s']:.1f} images/s, "
          f"last loss {summary['loss']:.4f}, pretext top-1 {summary['pretext_top1']:.1f}%")
    # The paper judges a representation by a linear classifier on it: that figure first.
    for name, what in (("probe", "linear probe (cached features)"), ("knn", "kNN")):
        before, after = summary.get(f"{name}_init"), summary.get(f"{name}_final")
        if after is None:
            continue
        line = f"{what} top-1 on the test split: {after:.2f}% after pretraining"
        if before is not None:
            line += f" vs {before:.2f}% at random init ({after - before:+.2f} points)"
        print(line)
    calibrated = summary.get("knn_init_bn_images")
    if summary.get("knn_init") is not None:
        print("random init: the same network, " + (
            f"its BN statistics re-estimated on {calibrated} train images" if calibrated
            else "torch's default BN statistics"))
    if summary.get("skipped_files"):
        print(f"skipped {summary['skipped_files']} unreadable files (see the log)")


def method_linear_preset(overrides: list[str]) -> list[str]:
    """`linear=<preset>` of the checkpoint's pretraining method (BYOL's, SimSiam's, MoCo v3's
    protocol) when the command line chooses no linear preset; [] otherwise."""
    from fastmoco.weights.load import linear_preset_for

    if any(o.lstrip("+~").split("=")[0].split("@")[0] == "linear" for o in overrides):
        return []
    source = next((o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")), None)
    preset = linear_preset_for(source) if source else None
    if preset is None:
        return []
    print(f"linear={preset}: the linear protocol of the method that pretrained {source} "
          f"(choose another with linear=...)")
    return [f"linear={preset}"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "eval":
        if not rest or rest[0] not in ("linear", "knn"):
            raise SystemExit("fastmoco eval needs what to evaluate: fastmoco eval linear ... or "
                             "fastmoco eval knn ...")
        command, rest = f"eval {rest[0]}", rest[1:]
    sys.argv = [f"fastmoco {command}", *rest]
    if command == "train":
        train_main()
    elif command == "bench":
        from fastmoco.bench import bench_main

        bench_main()
    elif command == "eval linear":
        sys.argv += method_linear_preset(rest)
        eval_linear_main()
    elif command == "eval knn":
        eval_knn_main()
    elif command == "export":
        from fastmoco.weights.export import run

        run(rest)
    else:
        print(USAGE, file=sys.stderr)
        raise SystemExit(f"unknown command {command!r}: use train, bench, eval or export")
