"""The bench's `lightly` peer arm: MoCo composed from lightly's pieces as its own MoCo example
does (examples/pytorch/moco.py, with the batch shuffle of its Lightning example).

NTXentLoss(memory_bank_size=(K, C)) holds and updates the queue, update_momentum is lightly's EMA,
batch_shuffle / batch_unshuffle shuffle the key batch, deactivate_requires_grad freezes the key
encoder, MoCoV2Transform augments in DataLoader workers. Same timm backbone, head width, batch,
queue, temperature, momentum and optimizer as the case. BatchNorm is the backbone's own, as in
lightly's example (fastmoco and the reference pay for split BN; lightly's SplitBatchNorm cannot
take channels-last inputs). Variants: as shipped (fp32, NCHW) and bf16 autocast + channels-last.

lightly is a benchmark-only extra: `pip install --no-deps lightly lightning-utilities`; this
module is imported only when a lightly arm is asked for. The step's parts are marked with
fastmoco's profiler ranges, so the bench splits it as fastmoco's.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import (
    batch_shuffle,
    batch_unshuffle,
    deactivate_requires_grad,
    update_momentum,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastmoco.backbone import create_backbone, feature_dim
from fastmoco.config import TrainConfig
from fastmoco.pipelines.recipes import TwoViewRecipe
from fastmoco.trace import phase


class LightlyMoCo(nn.Module):
    """The example's MoCo module: backbone + MoCoProjectionHead and their momentum copies."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        m, b = cfg.method, cfg.backbone
        self.backbone = create_backbone(b.name, cifar_stem=b.cifar_stem, **dict(b.kwargs))
        width = feature_dim(self.backbone)
        if m.version == "v1":
            self.projection_head = nn.Linear(width, m.dim)
        else:
            self.projection_head = MoCoProjectionHead(width, m.mlp_hidden or width, m.dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        key = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(key).detach()


class _Files(Dataset):
    def __init__(self, files: Sequence[str], transform) -> None:
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with open(self.files[index], "rb") as f:
            return self.transform(Image.open(f).convert("RGB"))


def lightly_transform(recipe: TwoViewRecipe):
    """lightly's MoCoV2Transform with the recipe's numbers (both views share them in v1/v2/cifar)."""
    from lightly.transforms import MoCoV2Transform

    v = recipe.query
    b, c, s, h = v.jitter
    return MoCoV2Transform(
        input_size=v.size, cj_prob=v.jitter_p, cj_bright=b, cj_contrast=c, cj_sat=s, cj_hue=h,
        min_scale=v.crop_scale[0], random_gray_scale=v.grayscale_p, gaussian_blur=v.blur_p,
        sigmas=v.blur_sigma, hf_prob=v.flip_p, normalize={"mean": list(v.mean), "std": list(v.std)},
    )


class LightlyArm:
    """The example's training step; `bf16=True` adds bf16 autocast and channels-last."""

    compile = False
    input_dtype = torch.float32  # the loader delivers fp32; autocast does the rest

    def __init__(self, cfg: TrainConfig, device: torch.device, files: Sequence[str] | None,
                 recipe: TwoViewRecipe | None, num_workers: int, bf16: bool) -> None:
        torch.manual_seed(cfg.run.seed)
        self.name = "lightly_bf16" if bf16 else "lightly"
        self.device = device
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.channels_last = bf16
        self.model = LightlyMoCo(cfg).to(device)
        if bf16:
            self.model.to(memory_format=torch.channels_last)
        self.momentum = cfg.method.momentum
        self.criterion = NTXentLoss(temperature=cfg.method.temperature,
                                    memory_bank_size=(cfg.method.queue_size, cfg.method.dim))
        self.criterion.to(device)
        lr = cfg.optim.lr_for(cfg.schedule.batch_size)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr,
                                         momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.batch_size = cfg.schedule.batch_size
        self.files, self.recipe, self.num_workers = files, recipe, num_workers
        self.pipeline = "lightly MoCoV2Transform (PIL, workers)"

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.files:
            raise ValueError("the lightly arm needs image files for the data/full modes")
        loader = DataLoader(_Files(self.files, lightly_transform(self.recipe)),
                            batch_size=self.batch_size, shuffle=True, drop_last=True,
                            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                            pin_memory=self.device.type == "cuda")
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        while True:
            for x_query, x_key in loader:
                yield (x_query.to(self.device).contiguous(memory_format=fmt),
                       x_key.to(self.device).contiguous(memory_format=fmt))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, x_query: torch.Tensor, x_key: torch.Tensor) -> None:
        model = self.model
        with phase("ema"):
            update_momentum(model.backbone, model.backbone_momentum, m=self.momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=self.momentum)
        with self._autocast():
            with phase("forward"):
                query = model(x_query)
                x_key, shuffle = batch_shuffle(x_key)
                key = batch_unshuffle(model.forward_momentum(x_key), shuffle)
            with phase("loss"):  # the memory bank is read and updated inside the loss
                loss = self.criterion(query, key)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad()
