"""BYOL: an online network that predicts a momentum copy of itself, without negatives."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastmoco.backbone import feature_dim
from fastmoco.distributed import get_world_size
from fastmoco.methods.heads import byol_mlp
from fastmoco.methods.siamese import (
    Siamese,
    StepOutput,
    build_backbone,
    cosine,
    inbatch_top1,
    resolve_sync_bn,
)
from fastmoco.trace import traced


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's loss for one direction: the mean over rows of ‖p̄ − z̄‖² = 2 − 2·cos(p, z)."""
    return (2.0 - 2.0 * cosine(p, z)).mean()


class BYOL(Siamese):
    """Bootstrap Your Own Latent (Grill et al., 2020), as its Algorithm 1 and the authors' code
    (deepmind-research/byol) run it.

    Online network: encoder f_θ + projector g_θ (`online`, the shared `query_encoder`) and the
    predictor q_θ; target network: f_ξ + g_ξ, the momentum copy (`target`, `key_encoder`).
    `forward(x1, x2)` returns L = ℓ(q_θ(z1), sg(z'2)) + ℓ(q_θ(z2), sg(z'1)), each ℓ the batch
    mean of 2 − 2·cos: the paper sums the two directions' means (so L lies in [0, 8]).
    The target moves after the optimizer step (`after_step`, ξ ← τξ + (1 − τ)θ with the step's
    τ), as in the paper's Algorithm 1 and their `_update_fn`. The target starts as a copy of the
    online network (the paper's ξ0 is an input; their code draws it from another seed).
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        *,
        dim: int = 256,
        mlp_hidden: int | None = None,
        predictor_hidden: int | None = None,
        momentum: float = 0.996,
        shuffle_bn: str = "auto",
        cifar_stem: bool = False,
        pos_embed: str = "learned",
        freeze_patch_embed: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        ema_backend: str = "auto",
        world_size: int | None = None,
        device_type: str | None = None,
    ) -> None:
        super().__init__()
        backbone = build_backbone(backbone, cifar_stem=cifar_stem, pos_embed=pos_embed,
                                  freeze_patch_embed=freeze_patch_embed,
                                  backbone_kwargs=backbone_kwargs)
        self.momentum = momentum  # τ_base, used when after_step is given none
        self.ema_backend = ema_backend
        self.shuffle_bn = resolve_sync_bn(shuffle_bn, world_size or get_world_size(), device_type,
                                          "BYOL")
        projector = byol_mlp(feature_dim(backbone), dim, mlp_hidden)  # g: 4096 hidden, 256 out
        predictor = byol_mlp(dim, dim, predictor_hidden or mlp_hidden)  # q: the same shape
        self._assemble(backbone, projector, predictor, momentum_encoder=True)
        self._place()

    @property
    def online(self) -> nn.Sequential:
        """f_θ, g_θ: the encoder and projector trained by the optimizer."""
        return self.query_encoder

    @property
    def target(self) -> nn.Sequential:
        """f_ξ, g_ξ: their exponential moving average."""
        return self.key_encoder

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                momentum: float | None = None) -> StepOutput:
        """x1, x2: the views t(x) and t'(x), N×3×H×W. Returns the loss and the in-batch top-1
        (`siamese.inbatch_top1`); `momentum` is used after the optimizer step, not here."""
        p1 = self.predictor(self.online(x1))  # q_θ(z_θ), N×d
        p2 = self.predictor(self.online(x2))
        with torch.no_grad():
            z1 = self.target(x1)  # z'_ξ, N×d: the targets, no gradient
            z2 = self.target(x2)
        return StepOutput(*self._loss(p1, p2, z1, z2), keys=None)

    @traced("loss")
    def _loss(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor,
              z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)  # the views swap roles
        return loss, (inbatch_top1(p1, z2) + inbatch_top1(p2, z1)) / 2

    def after_step(self, out: StepOutput, momentum: float | None = None) -> None:
        """Algorithm 1's last line, after θ's update: ξ ← τξ + (1 − τ)θ."""
        self.momentum_update(self.momentum if momentum is None else momentum)
