"""Everything a run is made of, built from its config in one place: where it runs (`Runtime`),
the model (MoCo, BYOL or SimSiam), optimizer and step of its Algorithm 1 (`Trainer`), the loader
and the schedules.

`fastmoco train`, `fastmoco bench` and the demo's autosizer all build through here, so what the
bench times is what training runs."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastmoco.byol import BYOL
from fastmoco.config import RunConfig, TrainConfig
from fastmoco.conv_choice import use_fast_convolutions_
from fastmoco.data import build_pretrain_loader
from fastmoco.device import autocast, grad_scaler, resolve_device, resolve_precision
from fastmoco.distributed import broadcast_choice, broadcast_module_, init_from_env
from fastmoco.model import MoCo
from fastmoco.momentum import Schedules
from fastmoco.optim import build_optimizer, param_groups, set_lr
from fastmoco.siamese import Siamese, StepOutput
from fastmoco.simsiam import SimSiam
from fastmoco.trace import phase

log = logging.getLogger("fastmoco")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device, the precision of the step, its place in the job."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def init_runtime(run: RunConfig) -> Runtime:
    """Join the process group torchrun or SLURM describes, take this process's GPU, and settle the
    precision (on a CPU `auto` measures: rank 0's choice holds everywhere). Training and the
    evaluation commands start here alike."""
    device = resolve_device(run.device)
    rank, world, local_rank = init_from_env(device.type)
    if device.type == "cuda" and run.device == "auto":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dtype = resolve_precision(run.precision, device, run.allow_emulated_bf16)
    if run.precision == "auto":
        dtype = DTYPES[broadcast_choice(DTYPES.index(dtype), device)]
    return Runtime(device, dtype, rank, world)


def local_runtime(cfg: TrainConfig, device: torch.device | None = None) -> Runtime:
    """One process and no process group: the bench's arms and the autosizer's trial steps."""
    device = device or resolve_device(cfg.run.device)
    return Runtime(device, resolve_precision(cfg.run.precision, device, cfg.run.allow_emulated_bf16))


def seed_process(seed: int, rank: int) -> None:
    """Each process its own stream (the queue is then made identical by a broadcast)."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)


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
    use_fast_convolutions_(model, cfg.run.conv_weight_grad, cfg.run.conv_winograd, rt.device,
                           rt.dtype)
    fmt = torch.channels_last if cfg.run.channels_last else torch.preserve_format
    return model.to(rt.device, memory_format=fmt)


def decide_compile(cfg: TrainConfig, steps: int, device: torch.device) -> bool:
    """auto: compile on GPUs for runs long enough to repay the cold compile. Not on CPUs: there
    the compiled step measured slower than eager (benchmarks/RESULTS.md, R18 CIFAR: 73.9 vs
    95.7 images/s), on top of a ~50 s cold compile."""
    choice = cfg.run.compile
    if choice != "auto":
        return choice == "on"
    return device.type == "cuda" and steps >= cfg.run.compile_min_steps


@dataclass
class Trainer:
    """The model, its optimizer and one step of the method's Algorithm 1, as the run executes them."""

    moco: Siamese  # the method's model (MoCo, BYOL or SimSiam), unwrapped
    model: nn.Module  # `moco`, or the DDP wrapper around it
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
            out = self.model(x_q, x_k, momentum=momentum)
        self.optimizer.zero_grad(set_to_none=True)
        with phase("backward"):
            self.scaler.scale(out.loss).backward()
        with phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.moco.after_step(out, momentum)  # after backward: the loss may hold the queue
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.moco.state_dict(),  # the encoders, the queue and its pointer
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_model_state(self.moco, state)
        self.moco.load_state_dict(state["model"])
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
    moco = build_model(cfg, rt)
    broadcast_module_(moco)  # rank 0's queue (a buffer, drawn from a per-rank seed) everywhere
    lr = cfg.optim.lr_for(cfg.schedule.batch_size)
    optimizer = build_optimizer(param_groups(moco, cfg.optim, lr), cfg.optim, lr, rt.device)
    compiled = decide_compile(cfg, steps, rt.device)
    if compiled:
        moco.compile_encoders()
    model: nn.Module = moco
    if rt.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            moco, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            broadcast_buffers=False,  # the queue and key encoder are identical by construction
        )
    return Trainer(moco, model, optimizer, grad_scaler(rt.device, rt.dtype), rt, compiled)


def build_loader(cfg: TrainConfig, rt: Runtime):
    """The two-view pretraining loader of this process (its share of the global batch)."""
    return build_pretrain_loader(
        cfg.data, cfg.pipeline, cfg.schedule.batch_size // rt.world_size, device=rt.device,
        dtype=rt.dtype, channels_last=cfg.run.channels_last, rank=rt.rank,
        world_size=rt.world_size, seed=cfg.run.seed)


def planned_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The schedule's number of steps (a time budget may fix fewer once it has measured)."""
    total = cfg.schedule.epochs * steps_per_epoch
    return total if cfg.schedule.max_steps is None else min(total, cfg.schedule.max_steps)


def build_schedules(cfg: TrainConfig, steps_per_epoch: int) -> Schedules:
    s = cfg.schedule
    return Schedules(cfg.optim.lr_for(s.batch_size), int(s.warmup_epochs * steps_per_epoch),
                     s.lr_schedule, tuple(s.milestones), cfg.method.momentum,
                     cfg.method.momentum_schedule)
