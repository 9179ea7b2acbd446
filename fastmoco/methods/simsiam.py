"""SimSiam: one network, two views, a predictor and a stop-gradient; no momentum encoder."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastmoco.backbone import feature_dim
from fastmoco.distributed import get_world_size
from fastmoco.methods.heads import simsiam_predictor, simsiam_projector
from fastmoco.methods.siamese import (
    Siamese,
    StepOutput,
    build_backbone,
    cosine,
    inbatch_top1,
    resolve_sync_bn,
)
from fastmoco.trace import traced


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z): the batch mean of −cos(p, z), z already detached by the caller."""
    return -cosine(p, z).mean()


class SimSiam(Siamese):
    """Exploring Simple Siamese Representation Learning (Chen and He, 2021), as its Algorithm 1
    and facebookresearch/simsiam (builder.py, main_simsiam.py) run it.

    Encoder f = backbone + projector (the shared `query_encoder`; 3 fc layers with BN, the
    output BN without affine), predictor h (2048 → 512 → 2048). `forward(x1, x2)` returns
    L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2, D the negative cosine: BYOL with m = 0, the target
    branch the encoder itself under stop-gradient, so there is no momentum copy to update.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        *,
        dim: int = 2048,
        mlp_hidden: int | None = None,
        predictor_hidden: int | None = None,
        shuffle_bn: str = "auto",
        cifar_stem: bool = False,
        pos_embed: str = "learned",
        freeze_patch_embed: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        world_size: int | None = None,
        device_type: str | None = None,
    ) -> None:
        super().__init__()
        backbone = build_backbone(backbone, cifar_stem=cifar_stem, pos_embed=pos_embed,
                                  freeze_patch_embed=freeze_patch_embed,
                                  backbone_kwargs=backbone_kwargs)
        self.shuffle_bn = resolve_sync_bn(shuffle_bn, world_size or get_world_size(), device_type,
                                          "SimSiam")
        projector = simsiam_projector(feature_dim(backbone), dim, mlp_hidden)
        predictor = simsiam_predictor(dim, predictor_hidden)
        self._assemble(backbone, projector, predictor, momentum_encoder=False)
        self._place()

    @property
    def encoder(self) -> nn.Sequential:
        """f: backbone and projector."""
        return self.query_encoder

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                momentum: float | None = None) -> StepOutput:
        """x1, x2: two augmented views, N×3×H×W. Returns the loss and the in-batch top-1
        (`siamese.inbatch_top1`); `momentum` is not used (SimSiam has none)."""
        z1, z2 = self.encoder(x1), self.encoder(x2)  # projections, N×d
        p1, p2 = self.predictor(z1), self.predictor(z2)  # predictions, N×d
        return StepOutput(*self._loss(p1, p2, z1.detach(), z2.detach()), keys=None)

    @traced("loss")
    def _loss(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor,
              z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2  # stop-gradient on z
        return loss, (inbatch_top1(p1, z2) + inbatch_top1(p2, z1)) / 2
