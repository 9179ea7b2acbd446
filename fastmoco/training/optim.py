"""Optimizers: torch's SGD/AdamW (fused on CUDA, foreach elsewhere) and LARS, which torch lacks."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from fastmoco.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS as in MoCo v3: SGD with momentum whose step is scaled per tensor by the trust ratio
    ‖θ‖/‖g + wd·θ‖; biases and norm parameters (1-D) are left unscaled and undecayed, except in
    a param group with `exclude_1d: False`, which scales and decays them too (apex's LARC over
    every tensor: SimSiam's linear protocol wraps the classifier's weight and bias in it)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            exclude_1d = group.get("exclude_1d", True)
            scaled = [p for p in params if p.ndim > 1 or not exclude_1d]
            # The update of a scaled tensor is a new tensor: p.grad stays the gradient.
            update = {p: p.grad for p in params if p.ndim <= 1 and exclude_1d}
            if scaled:
                d = torch._foreach_add([p.grad for p in scaled], scaled, alpha=group["weight_decay"])
                p_norm = torch._foreach_norm(scaled)
                d_norm = torch._foreach_norm(d)
                ratios = [
                    torch.where((pn > 0) & (dn > 0), group["trust_coefficient"] * pn / dn,
                                torch.ones_like(pn))
                    for pn, dn in zip(p_norm, d_norm)
                ]
                torch._foreach_mul_(d, ratios)
                update.update(zip(scaled, d))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, [update[p] for p in params])
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return None


def param_groups(model: nn.Module, cfg: OptimConfig, lr: float) -> list[dict[str, Any]]:
    """The trainable parameters in one group, or, with `fix_predictor_lr`, the predictor's in a
    second group whose lr stays `lr` (`set_lr` leaves it; SimSiam's --fix-pred-lr)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    predictor = getattr(model, "predictor", None)
    if not cfg.fix_predictor_lr or predictor is None:
        return [{"params": trainable}]
    fixed = {id(p) for p in predictor.parameters()}
    return [{"params": [p for p in trainable if id(p) not in fixed]},
            {"params": [p for p in trainable if id(p) in fixed], "fixed_lr": lr}]


def build_optimizer(params: Iterable[nn.Parameter] | list[dict[str, Any]], cfg: OptimConfig,
                    lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters (or the groups of
    `param_groups`), with the fastest torch kernel."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    fused = device.type == "cuda"
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=fused or None,
                               foreach=None if fused else True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay, fused=fused or None,
                                 foreach=None if fused else True)
    if cfg.name == "lars":
        return LARS(params, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    raise ValueError(f"optim.name={cfg.name!r}: choose sgd, lars or adamw")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's lr on every group, but a group with a `fixed_lr` keeps it."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("fixed_lr", lr)
