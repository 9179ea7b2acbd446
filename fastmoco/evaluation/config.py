"""The evaluation commands' configuration (`fastmoco eval linear|knn`): the linear protocol and
what to evaluate; composed by hydra from conf/eval.yaml and conf/linear/ on these dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from fastmoco.config import (
    LR_SCHEDULES,
    DataConfig,
    KnnConfig,
    PipelineConfig,
    RunConfig,
    choose,
    register_schema,
)

LINEAR_MODES = ("full", "cached")
LINEAR_VIEWS = ("rrc", "pad_crop")
LINEAR_OPTIMIZERS = ("sgd", "lars")
ENCODERS = ("query", "key")


@dataclass
class LinearConfig:
    """The linear protocol: a linear classifier on the frozen backbone, BatchNorm in eval mode.
    The defaults are the MoCo authors' main_lincls (v1/v2); conf/linear/ holds the v3, BYOL,
    SimSiam and CIFAR presets."""

    mode: str = "full"  # full: the protocol on augmented views | cached: features extracted once
    epochs: int = 100
    batch_size: int = 256  # global
    lr: float = 30.0
    base_batch: Optional[int] = 256  # lr is per this many images
    # sgd | lars: LARS (fastmoco/training/optim.py) over the classifier's weight and bias, both adapted,
    # as SimSiam's main_lincls wraps them in apex's LARC (trust coefficient 0.001, no clipping).
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False  # sgd only: BYOL's protocol uses Nesterov momentum
    weight_decay: float = 0.0
    lr_schedule: str = "step"  # step: x0.1 at the milestones (epochs 60 and 80 of 100)
    milestones: tuple[float, ...] = (0.6, 0.8)
    train_view: str = "rrc"  # rrc: RandomResizedCrop + flip | pad_crop: RandomCrop, padding 4, + flip
    eval_every_epochs: int = 10
    # cached mode: (lr, weight decay) swept on a held-out part of the train split
    holdout: float = 0.1
    cached_epochs: int = 30
    max_train_images: Optional[int] = None  # a random subset of the train split

    def __post_init__(self) -> None:
        choose("linear.mode", self.mode, LINEAR_MODES)
        choose("linear.optimizer", self.optimizer, LINEAR_OPTIMIZERS)
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError(f"linear.nesterov=true with linear.optimizer={self.optimizer}, "
                             f"linear.momentum={self.momentum}: Nesterov momentum needs "
                             f"linear.optimizer=sgd and a positive linear.momentum, or set "
                             f"linear.nesterov=false")
        choose("linear.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        choose("linear.train_view", self.train_view, LINEAR_VIEWS)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"linear.epochs={self.epochs}, linear.batch_size={self.batch_size}, "
                             f"linear.lr={self.lr}: all must be positive")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"linear.holdout={self.holdout}: choose a fraction in (0, 1)")
        if self.eval_every_epochs < 1 or self.cached_epochs < 1:
            raise ValueError(f"linear.eval_every_epochs={self.eval_every_epochs}, linear.cached_epochs="
                             f"{self.cached_epochs}: both must be at least 1")

    def lr_for(self, batch_size: int) -> float:
        return self.lr * (batch_size / self.base_batch if self.base_batch else 1.0)


@dataclass
class EvalConfig:
    """`fastmoco eval linear|knn`: a pretrained backbone judged on a labelled dataset."""

    # A run directory (its newest checkpoint), a checkpoint file, an export directory
    # (fastmoco export format=timm), or a timm model name (random init: the baseline).
    checkpoint: str = ""
    encoder: str = "query"  # query (what the authors keep) | key
    name: Optional[str] = None  # the timm backbone expected: a checkpoint of another one stops
    # For a timm name (random init): the architecture the pretrained run used, e.g.
    # cifar_stem=true '+backbone_kwargs.channels=[16,32,64,128]' for the CPU demo's network.
    cifar_stem: bool = False
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    # Re-estimate the backbone's BatchNorm statistics on this many train images (centre crops, no
    # weight update) before it is frozen: for a random-init baseline, whose default statistics
    # (mean 0, var 1) would understate it. 0: keep the backbone's own statistics.
    bn_calibration_images: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/eval"))

    def __post_init__(self) -> None:
        choose("encoder", self.encoder, ENCODERS)
        if not self.checkpoint:
            raise ValueError("checkpoint= is missing: a run directory, a checkpoint file, an "
                             "export directory, or a timm name (e.g. checkpoint=resnet50 for the "
                             "random-init baseline)")

    def check(self, world_size: int = 1) -> None:
        if self.linear.batch_size % world_size:
            raise ValueError(f"linear.batch_size={self.linear.batch_size} is not divisible by the "
                             f"{world_size} processes: use a multiple of {world_size}")
        if not self.data.eval_split:
            raise ValueError("data.eval_split is null: name the labelled split to evaluate on "
                             "(e.g. data.eval_split=val)")


register_schema("eval", EvalConfig)
