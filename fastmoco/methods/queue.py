"""The queue of past keys: K×C, one L2-normalised key per row, and its pointer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """Negatives for InfoNCE. Persistent buffers, so a resume restores the exact queue."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # K×C
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest len(keys) rows by `keys` (all processes' keys, rank order)."""
        n = keys.shape[0]
        if self.size % n != 0:
            raise ValueError(
                f"queue size K={self.size} is not a multiple of the global batch {n}: "
                f"set method.queue_size to a multiple of {n} (e.g. {max(1, self.size // n) * n})"
            )
        # The pointer lives on the device; slicing by a tensor avoids a host sync per step.
        idx = self.ptr + torch.arange(n, device=self.keys.device)
        self.keys.index_copy_(0, idx, keys.detach().to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)
