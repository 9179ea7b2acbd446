"""What MoCo, BYOL and SimSiam share (SimSiam's paper reads all three as Siamese networks): the
backbone, the online encoder (backbone + projector) with its predictor, the momentum copy of the
encoder and its flat EMA, SyncBatchNorm over the whole model, placement and compile.

Each method's step lives in its own module (model.py, byol.py, simsiam.py) and calls these by
name. The attribute names are shared so that checkpoints, export and the kNN monitor read every
method alike: `query_encoder` is the trained encoder (MoCo's f_q; BYOL's online f_θ, g_θ;
SimSiam's f), `key_encoder` its momentum copy (MoCo's f_k; BYOL's target f_ξ, g_ξ; SimSiam has
none), `predictor` the head on the query side only (v3, BYOL, SimSiam)."""
from __future__ import annotations

import copy
import logging
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastmoco.backbone import adapt_vit_, create_backbone
from fastmoco.kernels import ema_update_, flatten_parameters_
from fastmoco.methods.batchnorm import convert_sync_bn_
from fastmoco.trace import traced

log = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    """What a method's forward returns to the training step."""

    loss: torch.Tensor  # scalar, carries the gradient
    accuracy: torch.Tensor  # pretext top-1 in percent, no gradient
    keys: Optional[torch.Tensor]  # MoCo v1/v2: the keys to enqueue after backward; else unused


def build_backbone(backbone: str | nn.Module, *, cifar_stem: bool = False,
                   pos_embed: str = "learned", freeze_patch_embed: bool = False,
                   backbone_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A timm name becomes the model (fastmoco.backbone); a module is adapted in place (ViTs)."""
    if isinstance(backbone, str):
        return create_backbone(backbone, cifar_stem=cifar_stem, pos_embed=pos_embed,
                               freeze_patch_embed=freeze_patch_embed, **(backbone_kwargs or {}))
    adapt_vit_(backbone, pos_embed=pos_embed, freeze_patch_embed=freeze_patch_embed)
    return backbone


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows in fp32 at least: autocast's bf16/fp16 outputs go up, float64 stays."""
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=1)


def cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two N×C batches (N), in fp32 at least."""
    return (normalize(p) * normalize(z)).sum(dim=1)


@torch.no_grad()
def inbatch_top1(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Pretext top-1 (percent) of a method without negatives: the share of rows whose nearest
    target in this process's batch (cosine) is their own image's, as MoCo v3's in-batch top-1
    over its keys. A collapsed network falls to chance, 100/N."""
    sim = normalize(p) @ normalize(z).T  # N×N
    hits = sim.argmax(dim=1) == torch.arange(p.shape[0], device=p.device)
    return hits.float().mean() * 100.0


def resolve_sync_bn(mode: str, world_size: int, device_type: Optional[str], method: str) -> str:
    """BatchNorm of a method without negatives (BYOL, SimSiam): its authors normalise over the
    global batch (BYOL's cross-replica BN, SimSiam's SyncBatchNorm over the whole model).
    auto → sync with several CUDA processes, none in one process (the same statistics); with
    several CPU processes, where torch has no SyncBatchNorm, per-process BN, with a warning.
    The key shuffles (ddp, split) hide a positive key's BN statistics from its query: without
    negatives there is nothing to hide."""
    if mode in ("ddp", "split"):
        raise ValueError(
            f"method.shuffle_bn={mode}: {method} has no negatives, so no BatchNorm statistics "
            f"leak from a query to its key to hide by shuffling, and its authors normalise over "
            f"the global batch: set method.shuffle_bn=auto (SyncBatchNorm with several GPUs), "
            f"sync or none")
    if mode not in ("auto", "sync", "none"):
        raise ValueError(f"method.shuffle_bn={mode!r}: choose auto, sync or none for {method}")
    if mode != "auto":
        return mode
    if world_size > 1 and device_type == "cuda":
        return "sync"
    if world_size > 1:
        log.warning("%s normalises BatchNorm over the global batch, and torch's SyncBatchNorm runs "
                    "on CUDA only: on %s each of the %d processes normalises over its own batch "
                    "(method.shuffle_bn=none). Train on GPUs for the authors' BN", method,
                    device_type or "this device", world_size)
    return "none"


class Siamese(nn.Module):
    """The parts every method has; a method's __init__ calls `_assemble` and then `_place`.

    The model owns its placement: `.to(device, memory_format=...)` (any nn.Module move) keeps
    the encoder and its momentum copy in one flat buffer each, so the momentum update is one
    operation (a lerp, or one Triton launch on CUDA)."""

    shuffle_bn: str  # the resolved BN mode: ddp | split | sync | none
    ema_backend: str = "auto"

    def _assemble(self, backbone: nn.Module, projector: nn.Module,
                  predictor: Optional[nn.Module], *, momentum_encoder: bool) -> None:
        """Online encoder = backbone + projector; the predictor on it; SyncBatchNorm over all of
        it when `shuffle_bn` is sync (once the heads exist, as moco-v3 and SimSiam convert the
        whole model); then the momentum copy, without gradients."""
        self.query_encoder = nn.Sequential(backbone, projector)
        self.predictor = predictor
        if self.shuffle_bn == "sync":
            convert_sync_bn_(self.query_encoder)
            if predictor is not None:
                convert_sync_bn_(predictor)
        self.key_encoder = None
        if momentum_encoder:
            self.key_encoder = copy.deepcopy(self.query_encoder)
            self.key_encoder.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        """The online encoder's backbone: what is kept after pretraining."""
        return self.query_encoder[0]

    def _apply(self, fn, recurse: bool = True):  # every module move: .to(device), .double(), ...
        super()._apply(fn, recurse)
        self._place()
        return self

    @torch.no_grad()
    def _place(self) -> None:
        """After a move: the encoder and its momentum copy become views into one flat buffer
        each (the momentum update is then a single operation)."""
        if self.key_encoder is not None:
            flatten_parameters_(self.query_encoder)
            flatten_parameters_(self.key_encoder)

    @traced("ema")
    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """θ_k ← m·θ_k + (1−m)·θ_q over the parameters; the copy's BN buffers stay its own."""
        ema_update_(self.key_encoder, self.query_encoder, momentum, backend=self.ema_backend)

    def compile_encoders(self) -> None:
        """torch.compile each backbone and head (split BN calls the backbone once per sub-batch)."""
        for encoder in (self.query_encoder, self.key_encoder):
            for part in encoder if encoder is not None else ():
                part.compile()

    def after_step(self, out: StepOutput, momentum: float) -> None:
        """What the method does after the optimizer step (MoCo: enqueue; BYOL: the EMA)."""
