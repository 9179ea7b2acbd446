"""MoCo: a query encoder trained by SGD, its momentum copy as key encoder, a queue of negatives."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastmoco.backbone import feature_dim, is_vit
from fastmoco.distributed import (
    batch_shuffle,
    batch_unshuffle,
    concat_all_gather,
    get_rank,
    get_world_size,
)
from fastmoco.kernels import infonce_inbatch_loss, infonce_loss
from fastmoco.methods.batchnorm import (
    convert_split_bn_,
    forward_in_splits,
    resolve_shuffle_bn,
    split_norms,
)
from fastmoco.methods.heads import projection_head, v3_predictor
from fastmoco.methods.queue import KeyQueue
from fastmoco.methods.siamese import Siamese, StepOutput, build_backbone, normalize
from fastmoco.trace import traced

MoCoOutput = StepOutput  # loss, accuracy (pretext top-1), keys to enqueue


class MoCo(Siamese):
    """Momentum Contrast (He et al., 2020), v1/v2 with a queue and v3 with in-batch keys.

    `forward(x_q, x_k)` runs Algorithm 1 up to the loss: momentum update, queries, keys
    (shuffle BN), InfoNCE over [k+, queue]/T. The caller enqueues `output.keys` after backward
    (`enqueue`), so the loss may keep a reference to the queue instead of copying it.
    v3 (Chen, Xie and He, 2021) runs its own Algorithm 1 (`_forward_in_batch`), with the heads
    of the authors' ResNet or ViT variant, chosen by the backbone's structure (`is_vit`).

    The model owns its placement: `.to(device, memory_format=...)` (any nn.Module move) keeps
    both encoders' parameters in one flat buffer each, and the queue in the dtype the loss runs
    in (`compute_dtype` on GPUs, where the fused loss then reads half the bytes; the parameters'
    dtype elsewhere). `world_size` is the number of processes the model is trained on (None:
    torch.distributed's, 1 without a process group), `device_type` (cpu | cuda) where: v3
    synchronises BN over processes on CUDA only.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        *,
        version: str = "v2",
        dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        shuffle_bn: str = "auto",
        bn_splits: int = 8,
        mlp_hidden: int | None = None,
        predictor_hidden: int | None = None,
        symmetric: bool = False,
        cifar_stem: bool = False,
        pos_embed: str = "learned",
        freeze_patch_embed: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        loss_backend: str = "auto",
        ema_backend: str = "auto",
        world_size: int | None = None,
        compute_dtype: torch.dtype = torch.float32,
        device_type: str | None = None,
    ) -> None:
        super().__init__()
        if version not in ("v1", "v2", "v3"):
            raise ValueError(f"unknown MoCo version {version!r}: choose v1, v2 or v3")
        backbone = build_backbone(backbone, cifar_stem=cifar_stem, pos_embed=pos_embed,
                                  freeze_patch_embed=freeze_patch_embed,
                                  backbone_kwargs=backbone_kwargs)
        self.version = version
        self.momentum = momentum
        self.temperature = temperature
        self.symmetric = symmetric or version == "v3"
        self.loss_backend = loss_backend
        self.ema_backend = ema_backend
        self.compute_dtype = compute_dtype
        self.shuffle_bn = resolve_shuffle_bn(shuffle_bn, world_size or get_world_size(), backbone,
                                             version, device_type)
        if bn_splits < 1:
            raise ValueError(f"method.bn_splits={bn_splits}: choose 1 or more")
        self.bn_splits = bn_splits
        if self.shuffle_bn == "split":
            convert_split_bn_(backbone)

        vit = is_vit(backbone)
        projector = projection_head(version, feature_dim(backbone), dim, mlp_hidden, vit)
        # v3 puts a predictor on the query side only.
        predictor = v3_predictor(dim, predictor_hidden or mlp_hidden, vit) \
            if version == "v3" else None
        self._assemble(backbone, projector, predictor, momentum_encoder=True)
        self.queue = KeyQueue(queue_size, dim) if version != "v3" else None
        self._place()

    @torch.no_grad()
    def _place(self) -> None:
        """After a move: flat encoder buffers (Siamese._place), and the queue in the loss's dtype."""
        super()._place()
        if self.queue is not None:
            param = next(self.query_encoder.parameters())
            half = self.compute_dtype in (torch.bfloat16, torch.float16)
            dtype = self.compute_dtype if param.is_cuda and half else param.dtype
            if self.queue.keys.dtype != dtype:
                self.queue.keys = self.queue.keys.to(dtype)

    def _encode(self, encoder: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        backbone, head = encoder
        if self.shuffle_bn != "split" or not backbone.training:
            return encoder(x)
        return head(forward_in_splits(backbone, x, self.bn_splits, split_norms(backbone)))

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        q = self._encode(self.query_encoder, x)  # N×C
        if self.predictor is not None:
            q = self.predictor(q)
        return normalize(q)

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        if self.shuffle_bn in ("ddp", "split"):
            x, plan = batch_shuffle(x)
            k = normalize(self._encode(self.key_encoder, x))  # N×C
            return batch_unshuffle(k, plan)
        return normalize(self._encode(self.key_encoder, x))

    @traced("loss")
    def _contrast(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.queue is None:  # v3: in-batch keys of all processes, scaled by 2T as in the paper
            keys = concat_all_gather(k)
            loss, acc = infonce_inbatch_loss(
                q, keys, self.temperature, offset=get_rank() * q.shape[0], backend=self.loss_backend
            )
            return loss * (2.0 * self.temperature), acc
        queue = self.queue.keys  # K×C, in the dtype the loss runs in (bf16 on GPUs)
        return infonce_loss(q.to(queue.dtype), k.to(queue.dtype), queue, self.temperature,
                            backend=self.loss_backend)

    def forward(
        self, x_q: torch.Tensor, x_k: torch.Tensor, momentum: float | None = None
    ) -> MoCoOutput:
        """x_q, x_k: two augmented views, N×3×H×W. Returns loss, top-1 and the keys to enqueue."""
        self.momentum_update(self.momentum if momentum is None else momentum)
        if self.queue is None:
            return self._forward_in_batch(x_q, x_k)
        q = self._query(x_q)  # N×C
        k = self._key(x_k)  # N×C, no gradient
        if not self.symmetric:
            loss, acc = self._contrast(q, k)
            return MoCoOutput(loss, acc, concat_all_gather(k))
        q2, k2 = self._query(x_k), self._key(x_q)  # the views swap roles
        loss1, acc1 = self._contrast(q, k)
        loss2, acc2 = self._contrast(q2, k2)
        keys = concat_all_gather(torch.cat([k, k2], dim=0))
        return MoCoOutput(loss1 + loss2, (acc1 + acc2) / 2, keys)

    def _forward_in_batch(self, x1: torch.Tensor, x2: torch.Tensor) -> MoCoOutput:
        """MoCo v3's Algorithm 1 after the momentum update: q1, q2 = g(f_q(x1)), g(f_q(x2));
        k1, k2 = f_k(x1), f_k(x2); loss = ctr(q1, k2) + ctr(q2, k1), each over the keys of all
        processes. The encoders run in the authors' order (their BN running statistics follow
        it). The keys returned are this process's, for the caller's API only: there is no queue."""
        q1, q2 = self._query(x1), self._query(x2)  # N×C each
        k1, k2 = self._key(x1), self._key(x2)  # N×C each, no gradient
        loss1, acc1 = self._contrast(q1, k2)
        loss2, acc2 = self._contrast(q2, k1)
        return MoCoOutput(loss1 + loss2, (acc1 + acc2) / 2, torch.cat([k2, k1], dim=0))

    @traced("queue")
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Algorithm 1's last line: the newest keys replace the oldest in the queue."""
        if self.queue is not None:
            self.queue.enqueue(keys)

    def after_step(self, out: MoCoOutput, momentum: float) -> None:
        """After the optimizer step: enqueue (the momentum update ran at the start of forward,
        where the authors' code runs it)."""
        self.enqueue(out.keys)
