"""What the tests compare numbers with: one definition of the relative error."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error of `a` relative to the reference `b`'s largest magnitude, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
