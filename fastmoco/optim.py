"""Optimizers: torch's SGD/AdamW (fused on CUDA, foreach elsewhere) and LARS, which torch lacks."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from fastmoco.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS as in MoCo v3: SGD with momentum whose step is scaled per tensor by the trust ratio
    ‖θ‖/‖g + wd·θ‖; biases and norm parameters (1-D) are left unscaled and undecayed."""

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
            scaled = [p for p in params if p.ndim > 1]
            # The update of a scaled tensor is a new tensor: p.grad stays the gradient.
            update = {p: p.grad for p in params if p.ndim <= 1}
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


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, lr: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters, with the fastest torch kernel."""
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
    for group in optimizer.param_groups:
        group["lr"] = lr
