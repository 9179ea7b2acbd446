"""Every seed the loaders derive from (seed, epoch, rank, ...): the one place each formula lives."""
from __future__ import annotations

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of range(n), seeded by seed + epoch: the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def dali_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """Seed of a DALI pipeline built (or rebuilt after a bad file) at `step` of the epoch on `rank`."""
    return (seed * 1_000_003 + epoch * 1009 + rank * 7 + step) % 2**31


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one torchvision sample's augmentation, whatever worker draws it."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index
