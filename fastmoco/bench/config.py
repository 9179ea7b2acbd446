"""The `bench:` section of fastmoco/conf/bench.yaml as dataclasses, and the split of the composed
config into the training config every arm starts from and the bench settings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from fastmoco.config import TrainConfig, register_schema

MODES = ("model", "data", "full")
KINDS = ("fastmoco", "reference", "lightly", "lightly_bf16")


@dataclass
class ArmDef:
    """kind: fastmoco (the config plus `overrides`), reference, lightly or lightly_bf16."""

    kind: str = "fastmoco"
    overrides: list[str] = field(default_factory=list)
    modes: Optional[list[str]] = None  # None: every mode of the case
    note: str = ""
    # An arm that only differs from fastmoco by bf16 (no_amp, lightly_bf16): on a CPU without
    # native bf16 it is skipped with a note (emulated bf16 would time the emulation).
    needs_bf16: bool = False
    # The methods (MethodConfig.variant: v1, v2, v3, byol, simsiam) the arm's feature applies
    # to; in a case of another method the arm is listed as not applicable (None: all).
    methods: Optional[list[str]] = None
    feature: str = ""  # what the arm turns off or stands for, said when it does not apply

    def applies_to(self, variant: str) -> bool:
        return self.methods is None or variant in self.methods


@dataclass
class CaseDef:
    """A config: dotted overrides on top of the composed one ([] = as composed)."""

    overrides: list[str] = field(default_factory=list)
    modes: Optional[list[str]] = None  # None: bench.modes
    arms: Optional[list[str]] = None  # None: bench.arms


@dataclass
class Target:
    """`arm` in `mode` must reach `min` times: the bf16/fp32 mm ceiling (metric=ceiling_bf16 or
    ceiling), `other` arm's images/s (metric=vs_arm), or its own images/s in mode `other`."""

    name: str = ""
    arm: str = "fastmoco"
    mode: str = "model"
    metric: str = "vs_arm"  # ceiling_bf16 | ceiling | vs_arm | vs_mode
    other: str = "reference"
    min: float = 1.0
    case: Optional[str] = None  # None: every case where both numbers exist
    cpu: Optional[str] = None  # bf16 | no_bf16: only where bf16 is / is not the CPU's fast path


@dataclass
class CeilingConfig:
    enabled: bool = True
    mm_size: int = 2048
    mm_reps: int = 3
    copy_mb: int = 256
    flops: bool = True  # count one step's FLOPs per case


@dataclass
class BenchConfig:
    warmup: int = 2
    windows: int = 5
    steps_per_window: int = 3
    data_steps_per_window: int = 10  # data mode: batches per window (no model: cheap)
    profile_steps: int = 2
    modes: list[str] = field(default_factory=lambda: list(MODES))
    arms: list[str] = field(default_factory=lambda: ["reference", "fastmoco"])
    cases: list[str] = field(default_factory=lambda: ["current"])
    arm_defs: dict[str, ArmDef] = field(default_factory=dict)
    case_defs: dict[str, CaseDef] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    ceilings: CeilingConfig = field(default_factory=CeilingConfig)
    out_dir: str = "benchmarks/out"  # relative to the current directory: the bench's run directory
    docs_chart: Optional[str] = None  # also copy the chart here (docs/bench_latest.png, say)
    # Each case's table as JSON (benchmarks/make_results.py turns them into docs/results.md),
    # written only where this folder exists: in a checkout run from its root.
    results_dir: Optional[str] = "benchmarks/results"
    micro_kernels: bool = False  # also run benchmarks/kernels.py --quick (loss alone, EMA alone)
    # Each arm in a fresh process: none inherits another's allocator state, threads or caches
    # (in one process the arm that runs later can run faster for what the first left warm).
    isolate: bool = True
    # The model mode of every arm in turns (one window of each arm, then the next round; each
    # arm still in its own process when isolate): the ratios between arms then compare the same
    # minutes of a shared machine, whose pace can move within minutes. false: one arm
    # after another, as the data and full modes always run.
    in_turns: bool = True

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"bench.modes has {mode!r}: choose from {MODES}")
        for arm in self.arms:
            if arm not in self.arm_defs and arm not in KINDS:
                raise ValueError(f"bench.arms has {arm!r} but bench.arm_defs does not define it")
        for case in self.cases:
            if case != "current" and case not in self.case_defs:
                raise ValueError(f"bench.cases has {case!r}: define it under bench.case_defs "
                                 f"(known: {sorted(self.case_defs)})")
        if self.windows < 1 or self.steps_per_window < 1:
            raise ValueError("bench.windows and bench.steps_per_window must be at least 1")


@dataclass
class BenchRootConfig(TrainConfig):
    """What `fastmoco bench` composes on: the training schema plus `bench`."""

    bench: BenchConfig = field(default_factory=BenchConfig)


register_schema("bench", BenchRootConfig)


def split_config(cfg: DictConfig) -> tuple[TrainConfig, BenchConfig]:
    """The composed config → (the training config every arm starts from, the bench settings)."""
    root = OmegaConf.to_object(cfg)  # every field checked by its dataclass
    fields = {f.name: getattr(root, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**fields), root.bench
