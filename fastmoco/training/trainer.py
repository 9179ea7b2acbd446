"""The method's model, its optimizer and one step of its Algorithm 1 (`Trainer`), built from the
config in one place: `fastmoco train`, `fastmoco bench` and the demo's autosizer all build
through here, so what the bench times is what training runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastmoco.config import TrainConfig
from fastmoco.device import autocast, grad_scaler
from fastmoco.distributed import broadcast_module_
from fastmoco.methods.byol import BYOL
from fastmoco.methods.moco import MoCo
from fastmoco.methods.siamese import Siamese, StepOutput
from fastmoco.methods.simsiam import SimSiam
from fastmoco.runtime import Runtime
from fastmoco.trace import phase
from fastmoco.training.optim import build_optimizer, param_groups, set_lr


def build_model(cfg: TrainConfig, rt: Runtime) -> Siamese:
    """The configured method's model (MoCo, BYOL or SimSiam) on the runtime's device,
    channels-last when the config asks for it."""
    m, b = cfg.method, cfg.backbone
    common = dict(dim=m.dim, mlp_hidden=m.mlp_hidden, predictor_hidden=m.predictor_hidden,
                  shuffle_bn=m.shuffle_bn, cifar_stem=b.cifar_stem, pos_embed=b.pos_embed,
                  freeze_patch_embed=b.freeze_patch_embed, backbone_kwargs=dict(b.kwargs),
                  world_size=rt.world_size, device_type=rt.device.type)
    if m.name == "byol":
        model: Siamese = BYOL(b.name, momentum=m.momentum, ema_backend=cfg.run.ema_backend,
                              **common)
    elif m.name == "simsiam":
        model = SimSiam(b.name, **common)
    else:
        model = MoCo(b.name, version=m.version, queue_size=m.queue_size, momentum=m.momentum,
                     temperature=m.temperature, bn_splits=m.bn_splits, symmetric=m.symmetric,
                     loss_backend=cfg.run.loss_backend, ema_backend=cfg.run.ema_backend,
                     compute_dtype=rt.dtype, **common)
    fmt = torch.channels_last if cfg.run.channels_last else torch.preserve_format
    return model.to(rt.device, memory_format=fmt)


def decide_compile(cfg: TrainConfig, steps: int, device: torch.device) -> bool:
    """auto: compile on GPUs for runs long enough to repay the cold compile. Not on CPUs: there
    inductor's step ran slower than eager (the bench's no_compile arm times both), on top of a
    cold compile of about a minute."""
    choice = cfg.run.compile
    if choice != "auto":
        return choice == "on"
    return device.type == "cuda" and steps >= cfg.run.compile_min_steps


@dataclass
class Trainer:
    """The model, its optimizer and one step of the method's Algorithm 1, as the run executes them."""

    model: Siamese  # the method's model (MoCo, BYOL or SimSiam): what a checkpoint holds
    wrapped: nn.Module  # `model`, or the DDP wrapper around it: what the step calls
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    runtime: Runtime
    compiled: bool

    def step(self, x_q: torch.Tensor, x_k: torch.Tensor, lr: float, momentum: float) -> StepOutput:
        """Forward to the loss (MoCo: momentum update first, as the authors' code); backward;
        optimizer step; then the method's end of step (MoCo: enqueue the keys, BYOL: the
        momentum update, as its Algorithm 1)."""
        set_lr(self.optimizer, lr)
        with phase("forward"), autocast(self.runtime.device, self.runtime.dtype):
            out = self.wrapped(x_q, x_k, momentum=momentum)
        self.optimizer.zero_grad(set_to_none=True)
        with phase("backward"):
            self.scaler.scale(out.loss).backward()
        with phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.model.after_step(out, momentum)  # after backward: the loss may hold the queue
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(),  # the encoders, the queue and its pointer
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_model_state(self.model, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


METHOD_KEYS = ("name", "version", "dim", "mlp_hidden", "predictor_hidden", "queue_size")


def check_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """A checkpoint of another method or of other head widths stops with the settings it was
    trained with (the ones to set to resume), not with torch's list of keys."""
    ours, theirs = model.state_dict(), state["model"]
    odd = sorted(ours.keys() ^ theirs.keys())
    odd += sorted(k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape)
    if not odd:
        return
    key = odd[0]
    where = (f"{key} is {list(theirs[key].shape)} there, {list(ours[key].shape)} here"
             if key in ours and key in theirs else
             f"{key} is {'only here' if key in ours else 'only there'}")
    method = {"name": "moco", **(state.get("config") or {}).get("method", {})}
    trained = " ".join(f"method.{k}={method[k]}" for k in METHOD_KEYS if k in method)
    raise ValueError(f"the checkpoint holds another model than this run builds ({len(odd)} "
                     f"tensors differ, e.g. {where}): it was trained with {trained}. Set those "
                     f"to resume it, or start a new run.dir")


def build_trainer(cfg: TrainConfig, rt: Runtime, steps: int) -> Trainer:
    """Model (identical on every process), optimizer, loss scaler, compile for a run of `steps`
    steps as `run.compile` decides, DDP with several processes."""
    model = build_model(cfg, rt)
    broadcast_module_(model)  # rank 0's queue (a buffer, drawn from a per-rank seed) everywhere
    lr = cfg.optim.lr_for(cfg.schedule.batch_size)
    optimizer = build_optimizer(param_groups(model, cfg.optim, lr), cfg.optim, lr, rt.device)
    compiled = decide_compile(cfg, steps, rt.device)
    if compiled:
        model.compile_encoders()
    wrapped: nn.Module = model
    if rt.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            broadcast_buffers=False,  # the queue and key encoder are identical by construction
        )
    return Trainer(model, wrapped, optimizer, grad_scaler(rt.device, rt.dtype), rt, compiled)
