"""Plain-torch references: the specification every fused path is tested against."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def infonce_loss_reference(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoCo authors' formulation: einsum, cat, divide, cross_entropy (positive at index 0).

    Returns (mean loss, top-1 accuracy in percent).
    """
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # N×1
    l_neg = torch.einsum("nc,kc->nk", q, queue.detach())  # N×K
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # N×(1+K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == 0).float().mean() * 100.0
    return loss, accuracy


def infonce_inbatch_loss_reference(
    q: torch.Tensor, keys: torch.Tensor, temperature: float, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v3's in-batch loss: the keys of all processes are the candidates, the positive of
    query row i sits at column offset + i (offset = rank·N). Not multiplied by 2T here."""
    logits = torch.einsum("nc,mc->nm", q, keys.detach()) / temperature  # N×M
    labels = torch.arange(q.shape[0], device=q.device) + offset
    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == labels).float().mean() * 100.0
    return loss, accuracy


@torch.no_grad()
def ema_update_reference_(
    target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], momentum: float
) -> None:
    """The paper's per-parameter loop: θ_k ← m·θ_k + (1−m)·θ_q."""
    for t, s in zip(target, source, strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
