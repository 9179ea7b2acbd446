"""Every seed the loaders derive from (seed, epoch, rank, ...): the one place each formula lives."""
from __future__ import annotations

import numpy as np
import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of range(n), seeded by seed + epoch: the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def dali_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """Seed of a DALI pipeline built (or rebuilt after a bad file) at `step` of the epoch on `rank`."""
    return (seed * 1_000_003 + epoch * 1009 + rank * 7 + step) % 2**31


def dali_states(seed: int, epoch: int, rank: int, step: int, n: int) -> np.ndarray:
    """The n×7 uint32 Philox states of a DALI graph's n random operators for batch `step` of the
    epoch on `rank`: the batch's augmentation is a function of these alone."""
    words = np.random.SeedSequence([seed % 2**64, epoch, rank, step]).generate_state(7 * n, np.uint32)
    return words.reshape(n, 7)


def window_permutation(n: int, seed: int, epoch: int, rank: int, window: int) -> torch.Tensor:
    """The order of the n samples of shuffle window `window` of rank's slice in an epoch (tar shards)."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch * 1009 + rank * 7) * 10_000_019 + window) % 2**63)
    return torch.randperm(n, generator=g)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one torchvision sample's augmentation, whatever worker draws it."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index
