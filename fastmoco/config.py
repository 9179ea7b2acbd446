"""Typed configuration: the one source of every default and every check.

These dataclasses hold the defaults; hydra composes the yaml in conf/ (presets and overrides
only) on top of them, registered as the schema `fastmoco_schema`. The CLI converts once
(`from_hydra`); everything below it takes these plain objects. Each field is checked when the
dataclass is made, settings that depend on each other or on the machine in `TrainConfig.check`;
every message names the setting to change.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

METHODS = ("moco", "byol", "simsiam")
VERSIONS = ("v1", "v2", "v3")  # MoCo's
# Each method by its variant (MethodConfig.variant): its name in messages and its hydra preset.
LABELS = {"v1": ("MoCo v1", "moco_v1"), "v2": ("MoCo v2", "moco_v2"), "v3": ("MoCo v3", "moco_v3"),
          "byol": ("BYOL", "byol"), "simsiam": ("SimSiam", "simsiam")}
QUEUE_VERSIONS = ("v1", "v2")  # the variants with a queue of negatives
PREDICTOR_VERSIONS = ("v3", "byol", "simsiam")  # the variants with a predictor on the query side
# Methods whose authors synchronise BatchNorm over all processes (SyncBatchNorm over the whole
# model) instead of shuffling the keys between them.
SYNC_BN_VERSIONS = ("v3", "byol", "simsiam")
MOMENTUM_SCHEDULES = ("constant", "cosine")
SHUFFLE_BN_MODES = ("auto", "ddp", "split", "sync", "none")
PIPELINES = ("auto", "dali", "torchvision")
OPTIMIZERS = ("sgd", "lars", "adamw")
LR_SCHEDULES = ("cosine", "step", "constant")
POS_EMBEDS = ("learned", "sincos")
KNN_FEATURES = ("head", "backbone")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE = ("auto", "on", "off")


def choose(setting: str, value: Any, choices: tuple) -> None:
    """The check every enumerated setting goes through."""
    if value not in choices:
        raise ValueError(f"{setting}={value!r}: choose one of {', '.join(map(str, choices))}")


def splits_bn(shuffle_bn: str, world_size: int, version: str = "v2") -> bool:
    """Whether the key encoder's BN runs split by sub-batch (one process, or asked for): the one
    rule that the config check and the model (batchnorm.resolve_shuffle_bn) both follow. A
    method that synchronises BN (v3) splits only when asked: in one process its BN already
    normalises over the global batch, as SyncBatchNorm does."""
    if shuffle_bn == "split":
        return True
    return shuffle_bn == "auto" and world_size == 1 and version not in SYNC_BN_VERSIONS


@dataclass
class MethodConfig:
    """The method: MoCo (its version), BYOL or SimSiam; heads, queue, momentum encoder,
    temperature. conf/method/*.yaml hold each method's published settings."""

    name: str = "moco"  # moco | byol | simsiam
    version: str = "v2"  # MoCo's: v1 | v2 | v3
    dim: int = 128  # output width of the projector (and of the predictor)
    # Hidden widths. v2: the MLP (None: backbone width); v3, BYOL: projector and predictor
    # (None: 4096); SimSiam: the projector (None: backbone width).
    mlp_hidden: Optional[int] = None
    # v3, BYOL: the predictor's own hidden width (None: mlp_hidden); SimSiam's (None: 512).
    predictor_hidden: Optional[int] = None
    queue_size: int = 65536  # K (v3, BYOL, SimSiam have no queue: 0)
    momentum: float = 0.999  # m (BYOL's τ; SimSiam has no momentum encoder: 0)
    momentum_schedule: str = "constant"  # constant | cosine (v3, BYOL: m → 1)
    temperature: float = 0.2  # T (MoCo only)
    symmetric: bool = False  # v1/v2: add the swapped loss (v3, BYOL, SimSiam always do)
    shuffle_bn: str = "auto"  # auto | ddp | split | sync | none
    bn_splits: int = 8

    @property
    def variant(self) -> str:
        """v1 | v2 | v3 for MoCo, else the method's name: what the method-dependent rules use."""
        return self.version if self.name == "moco" else self.name

    @property
    def label(self) -> str:
        return LABELS[self.variant][0]

    def __post_init__(self) -> None:
        choose("method.name", self.name, METHODS)
        choose("method.version", self.version, VERSIONS)
        choose("method.momentum_schedule", self.momentum_schedule, MOMENTUM_SCHEDULES)
        choose("method.shuffle_bn", self.shuffle_bn, SHUFFLE_BN_MODES)
        if self.bn_splits < 1:
            raise ValueError(f"method.bn_splits={self.bn_splits}: choose 1 or more")
        v, label, preset = self.variant, *LABELS[self.variant]
        if v in QUEUE_VERSIONS and self.queue_size < 1:
            raise ValueError(f"method.queue_size={self.queue_size}: {label} needs a queue (e.g. "
                             f"65536); only method.version=v3, BYOL and SimSiam run without one")
        why = {"v3": "its negatives are the in-batch keys of all processes",
               "byol": "it has no negatives: the online network predicts its momentum copy",
               "simsiam": "it has no negatives: each view predicts the other"}
        if v not in QUEUE_VERSIONS and self.queue_size != 0:
            raise ValueError(f"method.queue_size={self.queue_size}: {label} has no queue "
                             f"({why[v]}): set method.queue_size=0 (method={preset} does)")
        if v not in QUEUE_VERSIONS and not self.symmetric:
            raise ValueError(f"method.symmetric=false: {label}'s loss is symmetric by definition "
                             f"(each view is predicted from the other): set method.symmetric=true "
                             f"(method={preset} does)")
        if self.predictor_hidden is not None and v not in PREDICTOR_VERSIONS:
            raise ValueError(f"method.predictor_hidden={self.predictor_hidden}: {label} has no "
                             f"predictor (v3, BYOL and SimSiam have one): remove it")
        if v in ("byol", "simsiam") and self.shuffle_bn in ("ddp", "split"):
            raise ValueError(f"method.shuffle_bn={self.shuffle_bn}: {label} has no negatives, so "
                             f"no BatchNorm statistics leak from a query to its key to hide by "
                             f"shuffling, and its authors normalise over the global batch: set "
                             f"method.shuffle_bn=auto (SyncBatchNorm with several GPUs), sync or none")
        if v == "simsiam" and (self.momentum != 0 or self.momentum_schedule != "constant"):
            raise ValueError(f"method.momentum={self.momentum}, method.momentum_schedule="
                             f"{self.momentum_schedule}: SimSiam has no momentum encoder (its "
                             f"target branch is the encoder itself under stop-gradient): set "
                             f"method.momentum=0 and method.momentum_schedule=constant "
                             f"(method=simsiam does), or use method=byol for a momentum target")
        for name in ("dim", "mlp_hidden", "predictor_hidden"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"method.{name}={value}: choose a positive width")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"method.momentum={self.momentum} must lie in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"method.temperature={self.temperature} must be positive")


@dataclass
class BackboneConfig:
    """Any timm model name; kwargs go to timm.create_model (e.g. channels for a narrow ResNet)."""

    name: str = "resnet18"
    cifar_stem: bool = False
    # ViTs, as MoCo v3 trains them: fixed 2-D sin-cos position embeddings (sincos) instead of
    # timm's learned ones, and the patch projection kept at its random init (--stop-grad-conv1).
    pos_embed: str = "learned"  # learned | sincos
    freeze_patch_embed: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choose("backbone.pos_embed", self.pos_embed, POS_EMBEDS)


@dataclass
class DataConfig:
    """Where the images are. root=None: $FASTMOCO_DATA, else ../shared/data/<name> beside the project."""

    name: str = "cifar10"  # cifar10 | imagefolder | synthetic
    root: Optional[str] = None
    train_split: str = "train"  # subfolder pretrained on (and the kNN bank)
    eval_split: Optional[str] = "test"  # labelled subfolder the kNN monitor classifies
    recipe: str = "cifar"  # v1 | v2 | v3 | v3_resnet | cifar (pipelines.recipes)
    image_size: int = 32
    max_images: Optional[int] = None  # pretrain on a fixed random subset
    knn_bank_max: Optional[int] = None  # kNN bank subset (None: whole train split)
    knn_eval_max: Optional[int] = None
    synthetic_images: int = 4096  # images per epoch for data=synthetic

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("data.name is empty: name the dataset (its folder under $FASTMOCO_DATA "
                             "or ../shared/data), or data=synthetic")
        if self.image_size < 1:
            raise ValueError(f"data.image_size={self.image_size}: choose a positive size")


@dataclass
class PipelineConfig:
    """Who augments: dali (GPU, or DALI's CPU mode), torchvision (PIL in workers), or auto."""

    kind: str = "auto"
    num_workers: int = -1  # -1: one per core

    def __post_init__(self) -> None:
        choose("pipeline.kind", self.kind, PIPELINES)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.03  # for batch_size below; scaled linearly if base_batch is set
    base_batch: Optional[int] = None  # lr is per this many images (e.g. 256)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW: torch's defaults, as MoCo v3's ViT runs
    # The predictor keeps the base lr (scaled by base_batch) through the schedule: SimSiam's
    # --fix-pred-lr. The rest follows warm-up and decay.
    fix_predictor_lr: bool = False

    def __post_init__(self) -> None:
        choose("optim.name", self.name, OPTIMIZERS)
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be positive")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)}: each must lie in [0, 1)")

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
    # The schedules' length in steps, instead of epochs × steps per epoch: a whole (short)
    # schedule, for smoke tests and benchmarks.
    steps: Optional[int] = None
    # Stop after this step with a checkpoint, the schedules left as they are: run the same command
    # with a later step, or null, to go on to the end.
    stop_at_step: Optional[int] = None
    time_budget_min: Optional[float] = None  # size the run to this many minutes of pretraining
    # Candidate sizes (dotted overrides, largest first) for a time-budgeted run: the first whose
    # measured step gives min_steps within the budget is used, else the last
    # (fastmoco.training.autosize).
    sizes: list[list[str]] = field(default_factory=list)
    min_steps: int = 0
    size_trial_seconds: float = 15.0  # each candidate size is timed this long, after a warm-up

    def __post_init__(self) -> None:
        choose("schedule.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"schedule.batch_size={self.batch_size}, schedule.epochs="
                             f"{self.epochs}: both must be at least 1")
        for name in ("steps", "stop_at_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"schedule.{name}={value}: choose a positive step, or null")
        if self.size_trial_seconds <= 0:
            raise ValueError(f"schedule.size_trial_seconds={self.size_trial_seconds}: choose a "
                             f"positive number of seconds")
        if self.sizes and (not self.time_budget_min or self.min_steps <= 0):
            raise ValueError("schedule.sizes needs schedule.time_budget_min and a positive "
                             "schedule.min_steps: set both, or schedule.sizes=[]")


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
    # At init and at the end, also fit the cached linear probe (fastmoco.evaluation.probe) on the
    # same train and test features: the linear figure of the run next to its kNN.
    linear_probe: bool = False

    def __post_init__(self) -> None:
        choose("knn.features", self.features, KNN_FEATURES)
        if self.enabled and (self.k < 1 or self.every_epochs < 1):
            raise ValueError(f"knn.k={self.k}, knn.every_epochs={self.every_epochs}: both must be "
                             f"at least 1 (or knn.enabled=false)")


def _on_off(value: object) -> str:
    """yaml reads a bare on/off as a boolean: back to the word."""
    word = str(value).lower()
    return {"true": "on", "false": "off"}.get(word, word)


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
    # Also checkpoint every this many steps / minutes (null: off). Written in the background; a
    # step loses only the copy of the state into host memory (fastmoco/training/checkpointing.py).
    checkpoint_every_steps: Optional[int] = None
    checkpoint_every_min: Optional[float] = None
    keep_checkpoints: int = 2  # at least 2: a resume falls back to the one before an unreadable one
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.compile = _on_off(self.compile)
        choose("run.compile", self.compile, COMPILE)
        choose("run.precision", self.precision, PRECISIONS)
        if self.log_every < 1 or self.checkpoint_every_epochs < 1:
            raise ValueError(f"run.log_every={self.log_every}, run.checkpoint_every_epochs="
                             f"{self.checkpoint_every_epochs}: both must be at least 1")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError(f"run.checkpoint_every_steps={self.checkpoint_every_steps}: choose a "
                             f"positive number of steps, or null to turn step checkpoints off")
        if self.checkpoint_every_min is not None and not self.checkpoint_every_min > 0:
            raise ValueError(f"run.checkpoint_every_min={self.checkpoint_every_min}: choose a "
                             f"positive number of minutes, or null to turn timed checkpoints off")
        if self.keep_checkpoints < 2:
            raise ValueError(f"run.keep_checkpoints={self.keep_checkpoints}: keep at least 2, so "
                             f"that a resume can fall back to the one before an unreadable newest one")


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

    def check(self, world_size: int = 1, device_type: Optional[str] = None) -> None:
        """Fail at start, naming what to change, on settings that only fail together, with the
        number of processes, or on this machine (`device_type`: cpu | cuda, None: not known yet)."""
        from fastmoco.kernels import EMA_BACKENDS, INFONCE_BACKENDS

        choose("run.loss_backend", self.run.loss_backend, INFONCE_BACKENDS)
        choose("run.ema_backend", self.run.ema_backend, EMA_BACKENDS)
        if self.knn.enabled and self.knn.linear_probe and world_size > 1 and not self.data.knn_bank_max:
            raise ValueError("knn.linear_probe gathers the kNN bank's features on every process: "
                             "bound it with data.knn_bank_max (e.g. 50000), or knn.linear_probe=false "
                             "and run fastmoco eval linear afterwards")
        d = self.data
        if d.name not in ("synthetic", "cifar10") and not d.root and default_data_root(d.name) is None:
            raise ValueError(f"data.name={d.name!r} has no folder: set data.root=/path/to/{d.name} "
                             f"(holding {d.train_split}/<class>/<images> or {d.train_split}/*.tar), "
                             f"or $FASTMOCO_DATA, or use data=synthetic")
        if self.method.shuffle_bn == "sync" and device_type not in (None, "cuda"):
            raise ValueError("method.shuffle_bn=sync needs CUDA (torch's SyncBatchNorm runs on GPUs "
                             "only): on the CPU use method.shuffle_bn=ddp, split or auto")
        b, w = self.schedule.batch_size, world_size
        if b % w != 0:
            raise ValueError(
                f"schedule.batch_size={b} is not divisible by the {w} processes: "
                f"use a multiple of {w}, e.g. {max(1, b // w) * w}"
            )
        per_step = b * (2 if self.method.symmetric else 1)
        variant = self.method.variant
        if variant in QUEUE_VERSIONS and self.method.queue_size % per_step != 0:
            good = max(1, self.method.queue_size // per_step) * per_step
            raise ValueError(
                f"method.queue_size={self.method.queue_size} must be a multiple of the keys "
                f"enqueued per step ({per_step} = global batch"
                f"{' × 2 (symmetric)' if self.method.symmetric else ''}): "
                f"set method.queue_size={good} or change schedule.batch_size"
            )
        local = b // w
        if splits_bn(self.method.shuffle_bn, w, variant) and \
                local % self.method.bn_splits != 0:
            raise ValueError(
                f"batch per process {local} is not a multiple of method.bn_splits="
                f"{self.method.bn_splits}: change one of them"
            )
        if self.optim.fix_predictor_lr and variant not in PREDICTOR_VERSIONS:
            raise ValueError(f"optim.fix_predictor_lr=true: {self.method.label} has no predictor "
                             f"(v3, BYOL and SimSiam have one): set optim.fix_predictor_lr=false")


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


def register_schema(name: str, node: type) -> None:
    """Make a dataclass the base hydra composes the yaml on (`defaults: - schema: <name>`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="schema", name=name, node=node, package="_global_")


register_schema("train", TrainConfig)


def from_hydra(cfg: Any, schema: type = TrainConfig) -> Any:
    """The one place where hydra's DictConfig becomes typed dataclasses (TrainConfig, EvalConfig)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    return OmegaConf.to_object(merged)
