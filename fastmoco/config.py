"""Typed configuration: hydra composes the yaml in conf/, these dataclasses hold and check it.

The CLI converts once (`from_hydra`); everything below it takes these plain objects.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class MethodConfig:
    """MoCo itself: version, head, queue, momentum encoder, temperature."""

    version: str = "v2"
    dim: int = 128
    mlp_hidden: Optional[int] = None  # v2 MLP width; None = backbone width
    queue_size: int = 65536  # K
    momentum: float = 0.999  # m
    momentum_schedule: str = "constant"  # constant | cosine (v3: m → 1)
    temperature: float = 0.2  # T
    symmetric: bool = False
    shuffle_bn: str = "auto"  # auto | ddp | split | sync | none
    bn_splits: int = 8

    def __post_init__(self) -> None:
        if self.version not in ("v1", "v2", "v3"):
            raise ValueError(f"method.version={self.version!r}: choose v1, v2 or v3")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"method.momentum={self.momentum} must lie in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"method.temperature={self.temperature} must be positive")


@dataclass
class BackboneConfig:
    """Any timm model name; kwargs go to timm.create_model (e.g. channels for a narrow ResNet)."""

    name: str = "resnet18"
    cifar_stem: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the images are. root=None: $FASTMOCO_DATA, else ../shared/data/<name> beside the project."""

    name: str = "cifar10"  # cifar10 | imagefolder | synthetic
    root: Optional[str] = None
    train_split: str = "train"  # subfolder pretrained on (and the kNN bank)
    eval_split: Optional[str] = "test"  # labelled subfolder the kNN monitor classifies
    recipe: str = "cifar"  # v1 | v2 | v3 | cifar (pipelines.recipes)
    image_size: int = 32
    max_images: Optional[int] = None  # pretrain on a fixed random subset
    knn_bank_max: Optional[int] = None  # kNN bank subset (None: whole train split)
    knn_eval_max: Optional[int] = None
    synthetic_images: int = 4096  # images per epoch for data=synthetic


@dataclass
class PipelineConfig:
    """Who augments: dali (GPU, or DALI's CPU mode), torchvision (PIL in workers), or auto."""

    kind: str = "auto"
    num_workers: int = -1  # -1: one per core

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "dali", "torchvision"):
            raise ValueError(f"pipeline.kind={self.kind!r}: choose auto, dali or torchvision")


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.03  # for batch_size below; scaled linearly if base_batch is set
    base_batch: Optional[int] = None  # lr is per this many images (e.g. 256)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)

    def lr_for(self, batch_size: int) -> float:
        """The learning rate for a global batch: `lr`, scaled linearly when base_batch is set."""
        return self.lr * (batch_size / self.base_batch if self.base_batch else 1.0)


@dataclass
class ScheduleConfig:
    epochs: int = 200
    batch_size: int = 256  # global, over all processes
    lr_schedule: str = "cosine"  # cosine | step | constant
    milestones: tuple[float, ...] = (0.6, 0.8)  # fractions of training, for step
    warmup_epochs: float = 0.0
    max_steps: Optional[int] = None  # stop early (smoke tests, benchmarks)
    time_budget_min: Optional[float] = None  # size the run to this many minutes of pretraining
    # Candidate sizes (dotted overrides, largest first) for a time-budgeted run: the first whose
    # measured step gives min_steps within the budget is used, else the last (fastmoco.autosize).
    sizes: list[list[str]] = field(default_factory=list)
    min_steps: int = 0


@dataclass
class KnnConfig:
    """Weighted cosine kNN on a labelled split, as in the MoCo CIFAR demo."""

    enabled: bool = True
    every_epochs: int = 10
    k: int = 200
    temperature: float = 0.1
    features: str = "head"  # head (the demo's 128-d output) | backbone (pooled features)
    at_start: bool = True  # measure the random-init network too
    # The random-init baseline re-estimates its BatchNorm statistics on this many train images
    # first (no weight update): with torch's default statistics (mean 0, var 1) a random network
    # scores lower than it can, and part of "pretraining gained" would only be BN learning the
    # data's statistics. 0: the default statistics.
    init_bn_calibration_images: int = 2560
    batch_size: int = 512


@dataclass
class RunConfig:
    dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    allow_emulated_bf16: bool = False  # bf16 on a CPU without native bf16 (~7x slower than fp32)
    channels_last: bool = True
    compile: str = "auto"  # auto | on | off
    compile_min_steps: int = 2000  # auto: compile only when the run is at least this long
    loss_backend: str = "auto"
    ema_backend: str = "auto"
    seed: int = 0
    log_every: int = 20
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 2
    resume: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self, world_size: int = 1) -> None:
        """Fail at start, naming what to change, on settings that would fail mid-run."""
        b, w = self.schedule.batch_size, world_size
        if b % w != 0:
            raise ValueError(
                f"schedule.batch_size={b} is not divisible by the {w} processes: "
                f"use a multiple of {w}, e.g. {max(1, b // w) * w}"
            )
        per_step = b * (2 if self.method.symmetric else 1)
        if self.method.version != "v3" and self.method.queue_size % per_step != 0:
            good = max(1, self.method.queue_size // per_step) * per_step
            raise ValueError(
                f"method.queue_size={self.method.queue_size} must be a multiple of the keys "
                f"enqueued per step ({per_step} = global batch"
                f"{' × 2 (symmetric)' if self.method.symmetric else ''}): "
                f"set method.queue_size={good} or change schedule.batch_size"
            )
        local = b // w
        if self.method.shuffle_bn in ("auto", "split") and self.method.bn_splits > 1:
            if local % self.method.bn_splits != 0 and w == 1:
                raise ValueError(
                    f"batch per process {local} is not a multiple of method.bn_splits="
                    f"{self.method.bn_splits}: change one of them"
                )


def default_data_root(name: str) -> Optional[Path]:
    """$FASTMOCO_DATA (the dataset folder itself), else ../shared/data/<name> beside the project."""
    env = os.environ.get("FASTMOCO_DATA")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), here):
        candidate = base.parent / "shared" / "data" / name
        if candidate.is_dir():
            return candidate
    return None


def apply_overrides(cfg: TrainConfig, overrides: list[str], world_size: int = 1) -> TrainConfig:
    """Dotted overrides in hydra's command-line syntax (`off` stays a string) on a typed config:
    a checked copy; `cfg` is left as it is."""
    if not overrides:
        return cfg
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    conf = OmegaConf.structured(cfg)
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if "." not in o.key_or_group:
            raise ValueError(f"override {o.input_line!r}: bench cases and arms and demo sizes take "
                             f"dotted keys (backbone.name=resnet50), not config groups "
                             f"(backbone=resnet50)")
        OmegaConf.update(conf, o.key_or_group, o.value(), merge=True, force_add=o.is_add())
    out = OmegaConf.to_object(conf)
    out.check(world_size)
    return out


def from_hydra(cfg: Any) -> TrainConfig:
    """The one place where hydra's DictConfig becomes typed dataclasses."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
