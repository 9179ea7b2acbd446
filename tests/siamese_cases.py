"""What the BYOL and SimSiam tests share: the tiny fp32 settings of each method, a trainer built
through the real build path, random view pairs, and the tolerance the re-derivations are held to."""
from __future__ import annotations

import torch
from hydra import compose, initialize_config_module
from torch import nn

from fastmoco.config import TrainConfig, apply_overrides, from_hydra
from fastmoco.runtime import local_runtime
from fastmoco.training.trainer import Trainer, build_trainer

N, SIZE, STEPS = 8, 16, 3
DIM, HIDDEN, PRED = 16, 32, 8
# fp32 on both sides. SimSiam's side runs the same operations in the same order (bit-equal here);
# BYOL's differs in the order of a few sums (LARS's norms, the lerp form of the EMA, the loss's
# two means): measured at most 0.3 of this tolerance after three steps (on the block BN scales
# that start at 0), while a real difference (a missing stop-gradient, the EMA before the
# optimizer step) is orders of magnitude above it.
TOL = dict(rtol=1e-5, atol=1e-6)
TINY = ["backbone.cifar_stem=true", "+backbone.kwargs.channels=[8,16,32,64]",
        f"schedule.batch_size={N}", f"data.image_size={SIZE}", "run.compile=off",
        "run.precision=fp32", "run.channels_last=false", "run.device=cpu",
        "method.queue_size=0", "method.symmetric=true", f"method.dim={DIM}"]
BYOL_TINY = TINY + ["method.name=byol", f"method.mlp_hidden={HIDDEN}", "method.momentum=0.99",
                    "method.momentum_schedule=cosine", "optim.name=lars", "optim.lr=0.4",
                    "optim.weight_decay=1e-3"]
SIMSIAM_TINY = TINY + ["method.name=simsiam", f"method.predictor_hidden={PRED}",
                       "method.momentum=0", "optim.lr=0.05", "optim.fix_predictor_lr=true"]


def make(overrides: list[str]) -> TrainConfig:
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=overrides))


def trainer_for(overrides: list[str], seed: int = 0) -> tuple[Trainer, TrainConfig]:
    cfg = apply_overrides(TrainConfig(), overrides)
    torch.manual_seed(seed)
    return build_trainer(cfg, local_runtime(cfg), steps=100), cfg


def views(steps: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randn(N, 3, SIZE, SIZE, generator=g))
            for _ in range(steps)]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Every parameter and BN statistic, by name."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], **TOL, msg=lambda s: f"{name}: {s}")
