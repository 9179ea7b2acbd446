"""The bench's `reference` arm: the configured method as its authors wrote it, kept
deliberately plain (the models: reference_models.py). For MoCo v1/v2 facebookresearch/moco
builder.py + main_moco.py and the CIFAR demo's split BN; v3, BYOL and SimSiam their own.

fp32, NCHW, torchvision/PIL augmentation with ToTensor + Normalize in DataLoader workers, a Python
loop for the momentum update, eager einsum + cross_entropy (v1/v2 over a cloned C×K queue, enqueue
inside forward) or eager cosine losses, torch's default SGD / AdamW or moco-v3's loop LARS. Only
the backbone is shared with fastmoco (timm, same config). The step's parts are marked with
fastmoco's profiler ranges, so the bench splits it as fastmoco's.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fastmoco.bench.reference_models import ReferenceMoCo, reference_model, reference_optimizer
from fastmoco.config import TrainConfig
from fastmoco.pipelines.recipes import TwoViewRecipe, ViewRecipe
from fastmoco.trace import phase


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


__all__ = ["ReferenceArm", "ReferenceMoCo", "reference_loader", "view_transform"]


class ReferenceArm:
    """The authors' train step around the method's reference model: fp32, NCHW, their optimizer."""

    name = "reference"
    dtype = input_dtype = torch.float32
    channels_last = False
    compile = False

    def __init__(self, cfg: TrainConfig, device: torch.device, files: Sequence[str] | None,
                 recipe: TwoViewRecipe | None, num_workers: int) -> None:
        torch.manual_seed(cfg.run.seed)
        self.device = device
        self.model = reference_model(cfg).to(device)
        self.optimizer = reference_optimizer(self.model, cfg,
                                             cfg.optim.lr_for(cfg.schedule.batch_size))
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
        loss = self.model.loss(im_q, im_k)
        with phase("backward"):
            self.optimizer.zero_grad()
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()
        self.model.after_step()
