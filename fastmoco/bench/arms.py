"""An arm by kind: fastmoco, reference, lightly or lightly_bf16 (lightly imported only here, when
asked for), and the model mode's synthetic batches in the arm's input dtype and memory format.

An arm has name, dtype, input_dtype, channels_last, compile, pipeline, `batches()` (its own
loader, epoch after epoch) and `step(x_q, x_k)` (one training step, its parts in fastmoco's
profiler ranges)."""
from __future__ import annotations

import importlib.util
from typing import Iterator, Sequence

import torch

from fastmoco.bench.arm_fastmoco import FastMocoArm
from fastmoco.bench.arm_reference import ReferenceArm
from fastmoco.config import TrainConfig
from fastmoco.data import SyntheticTwoViewLoader, num_workers
from fastmoco.pipelines.recipes import get_recipe

LIGHTLY_HINT = "lightly is not installed: pip install --no-deps lightly lightning-utilities"


def build_arm(name: str, kind: str, cfg: TrainConfig, device: torch.device,
              files: Sequence[str] | None, total_steps: int):
    """ImportError (the bench lists the arm as skipped) when a lightly arm has no lightly."""
    if kind == "fastmoco":
        return FastMocoArm(name, cfg, device, total_steps)
    recipe = get_recipe(cfg.data.recipe, cfg.data.image_size) if files else None
    workers = num_workers(cfg.pipeline, 1)
    if kind == "reference":
        return ReferenceArm(cfg, device, files, recipe, workers)
    if kind in ("lightly", "lightly_bf16"):
        if importlib.util.find_spec("lightly") is None:
            raise ImportError(LIGHTLY_HINT)
        from fastmoco.bench.arm_lightly import LightlyArm

        arm = LightlyArm(cfg, device, files, recipe, workers, bf16=kind == "lightly_bf16")
        arm.name = name
        return arm
    raise ValueError(f"unknown arm kind {kind!r}: choose fastmoco, reference, lightly or lightly_bf16")


def synthetic_batches(arm, cfg: TrainConfig, device: torch.device) -> Iterator:
    """The model mode: one pair of random views on the device, again and again."""
    b = cfg.schedule.batch_size
    loader = SyntheticTwoViewLoader(b, b, cfg.data.image_size, device, arm.input_dtype,
                                    arm.channels_last, cfg.run.seed)
    while True:
        yield from loader
