"""The fastmoco arms: the model, optimizer and step `fastmoco train` runs, built through
fastmoco.build for one process, with the config's overrides applied."""
from __future__ import annotations

from typing import Iterator

import torch

from fastmoco.config import TrainConfig
from fastmoco.data import build_loader, resolve_pipeline
from fastmoco.runtime import local_runtime
from fastmoco.training.trainer import build_trainer


class FastMocoArm:
    """build_trainer + trainer.step at the config's lr and momentum; build_loader for full/data."""

    def __init__(self, name: str, cfg: TrainConfig, device: torch.device, total_steps: int) -> None:
        self.name, self.cfg = name, cfg
        self.runtime = local_runtime(cfg, device)
        self.dtype = self.input_dtype = self.runtime.dtype  # the pipelines deliver the compute dtype
        self.channels_last = cfg.run.channels_last
        torch.manual_seed(cfg.run.seed)
        self.trainer = build_trainer(cfg, self.runtime, total_steps)  # compiles as train() would
        self.compile = self.trainer.compiled
        self.lr = cfg.optim.lr_for(cfg.schedule.batch_size)
        self.momentum = cfg.method.momentum
        self.pipeline = resolve_pipeline(cfg.pipeline) if cfg.data.name != "synthetic" else "-"

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = build_loader(self.cfg, self.runtime)
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    def step(self, x_q: torch.Tensor, x_k: torch.Tensor) -> None:
        self.trainer.step(x_q, x_k, self.lr, self.momentum)
