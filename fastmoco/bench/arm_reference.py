"""The bench's `reference` arm: MoCo as its authors wrote it (facebookresearch/moco
builder.py + main_moco.py, and the CIFAR demo's split BN), kept deliberately plain.

fp32, NCHW, torchvision/PIL augmentation with ToTensor + Normalize in DataLoader workers, a Python
loop for the momentum update, eager einsum + cat + cross_entropy over a cloned C×K queue, enqueue
inside forward, torch's default SGD. Only the backbone is shared with fastmoco (timm, same config).
The step's parts are marked with fastmoco's profiler ranges, so the bench splits it as fastmoco's.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fastmoco.backbone import create_backbone, feature_dim
from fastmoco.config import TrainConfig
from fastmoco.pipelines.recipes import TwoViewRecipe, ViewRecipe
from fastmoco.trace import phase


class SplitBatchNorm(nn.BatchNorm2d):
    """The CIFAR demo's shuffle-BN stand-in: BN statistics over `num_splits` sub-batches."""

    def __init__(self, num_features: int, num_splits: int) -> None:
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training:
            return super().forward(x)
        mean_split = self.running_mean.repeat(self.num_splits)
        var_split = self.running_var.repeat(self.num_splits)
        out = F.batch_norm(
            x.view(-1, c * self.num_splits, h, w), mean_split, var_split,
            self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
            True, self.momentum, self.eps).view(n, c, h, w)
        self.running_mean.data.copy_(mean_split.view(self.num_splits, c).mean(dim=0))
        self.running_var.data.copy_(var_split.view(self.num_splits, c).mean(dim=0))
        return out


def _split_bn_(module: nn.Module, num_splits: int) -> None:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, SplitBatchNorm(child.num_features, num_splits))
        else:
            _split_bn_(child, num_splits)


class ReferenceMoCo(nn.Module):
    """builder.MoCo: query/key encoders, a C×K queue, Algorithm 1 in `forward`."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        m, b = cfg.method, cfg.backbone
        self.K, self.m, self.T = m.queue_size, m.momentum, m.temperature

        def encoder() -> nn.Module:
            net = create_backbone(b.name, cifar_stem=b.cifar_stem, **dict(b.kwargs))
            if m.bn_splits > 1:
                _split_bn_(net, m.bn_splits)
            width = feature_dim(net)
            if m.version == "v1":
                return nn.Sequential(net, nn.Linear(width, m.dim))
            hidden = m.mlp_hidden or width
            return nn.Sequential(net, nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, m.dim))

        self.encoder_q = encoder()
        self.encoder_k = encoder()
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(m.dim, self.K), dim=0))  # C×K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor):
        with phase("forward"):
            q = F.normalize(self.encoder_q(im_q), dim=1)  # N×C
        with torch.no_grad():
            with phase("ema"):
                self._momentum_update_key_encoder()
            with phase("forward"):
                idx_shuffle = torch.randperm(im_k.shape[0], device=im_k.device)
                idx_unshuffle = torch.argsort(idx_shuffle)
                k = F.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)[idx_unshuffle]  # N×C
        with phase("loss"):
            l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # N×1
            l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # N×K
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # N×(1+K)
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        with phase("queue"):
            self._dequeue_and_enqueue(k)
        return logits, labels


class GaussianBlur:
    """The authors' PIL blur with σ drawn from [σ_min, σ_max]."""

    def __init__(self, sigma: Sequence[float]) -> None:
        self.sigma = sigma

    def __call__(self, x: Image.Image) -> Image.Image:
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def view_transform(v: ViewRecipe) -> transforms.Compose:
    """main_moco.py's augmentation list, from the same recipe fastmoco uses."""
    ops: list = [transforms.RandomResizedCrop(v.size, scale=v.crop_scale, ratio=v.crop_ratio)]
    if v.jitter_p > 0:
        ops.append(transforms.RandomApply([transforms.ColorJitter(*v.jitter)], p=v.jitter_p))
    if v.grayscale_p > 0:
        ops.append(transforms.RandomGrayscale(p=v.grayscale_p))
    if v.blur_p > 0:
        ops.append(transforms.RandomApply([GaussianBlur(v.blur_sigma)], p=v.blur_p))
    if v.solarize_p > 0:
        ops.append(transforms.RandomSolarize(128, p=v.solarize_p))
    ops += [transforms.RandomHorizontalFlip(p=v.flip_p), transforms.ToTensor(),
            transforms.Normalize(mean=v.mean, std=v.std)]
    return transforms.Compose(ops)


class TwoCropsDataset(Dataset):
    """ImageFolder + TwoCropsTransform over a file list (flat folders have no classes)."""

    def __init__(self, files: Sequence[str], recipe: TwoViewRecipe) -> None:
        self.files = list(files)
        self.query, self.key = view_transform(recipe.query), view_transform(recipe.key)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with open(self.files[index], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.query(img), self.key(img)


def reference_loader(files: Sequence[str], recipe: TwoViewRecipe, batch_size: int,
                     num_workers: int, device: torch.device) -> DataLoader:
    """main_moco.py's loader: shuffled, pinned on CUDA, drop_last."""
    return DataLoader(TwoCropsDataset(files, recipe), batch_size=batch_size, shuffle=True,
                      num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=num_workers > 0)


class ReferenceArm:
    """main_moco.py's train step around ReferenceMoCo: fp32, NCHW, default SGD."""

    name = "reference"
    dtype = input_dtype = torch.float32
    channels_last = False
    compile = False

    def __init__(self, cfg: TrainConfig, device: torch.device, files: Sequence[str] | None,
                 recipe: TwoViewRecipe | None, num_workers: int) -> None:
        torch.manual_seed(cfg.run.seed)
        self.device = device
        self.model = ReferenceMoCo(cfg).to(device)
        lr = cfg.optim.lr_for(cfg.schedule.batch_size)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.criterion = nn.CrossEntropyLoss()
        self.batch_size = cfg.schedule.batch_size
        self.files, self.recipe, self.num_workers = files, recipe, num_workers
        self.pipeline = "torchvision-v1 (PIL, workers)"

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(im_q, im_k) on the device, epoch after epoch."""
        if not self.files:
            raise ValueError("the reference arm needs image files for the data/full modes")
        loader = reference_loader(self.files, self.recipe, self.batch_size, self.num_workers,
                                  self.device)
        while True:
            for im_q, im_k in loader:
                yield (im_q.to(self.device, non_blocking=True),
                       im_k.to(self.device, non_blocking=True))

    def step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> None:
        output, target = self.model(im_q, im_k)
        with phase("loss"):
            loss = self.criterion(output, target)
        with phase("backward"):
            self.optimizer.zero_grad()
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()
