"""The kNN monitor: weighted cosine kNN (k=200, T=0.1) over train features, as in the MoCo CIFAR demo."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastmoco.device import autocast


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N×D, fp32) and labels (N) of every image the loader yields."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            with autocast(device, dtype):
                f = encoder(x)
            feats.append(F.normalize(f.float(), dim=1))
            labels.append(y.to(device))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
    num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024,
) -> torch.Tensor:
    """Class of each row of `features`: the top-k neighbours in `bank` vote with weight exp(sim/T)."""
    k = min(k, bank.shape[0])
    preds = []
    for f in features.split(chunk):
        sim = f @ bank.T  # B×N
        sim_w, idx = sim.topk(k, dim=1)  # B×k
        weights = (sim_w / temperature).exp()
        votes = torch.zeros(f.shape[0], num_classes, device=f.device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


@torch.no_grad()
def recalibrate_bn_(encoder: nn.Module, loader: Iterable, device: torch.device,
                    dtype: torch.dtype) -> int:
    """Re-estimate every BatchNorm's running statistics as the plain average over the loader's
    images (train mode, no weight update); returns how many images were seen."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    saved = [m.momentum for m in norms]
    was_training = encoder.training
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches, not an EMA
        encoder.train()
        for x, _ in loader:
            with autocast(device, dtype):
                encoder(x)
            seen += x.shape[0]
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        encoder.train(was_training)
    return seen


def knn_accuracy(
    encoder: nn.Module, bank_loader: Iterable, eval_loader: Iterable, num_classes: int,
    device: torch.device, dtype: torch.dtype, k: int = 200, temperature: float = 0.1,
) -> float:
    """Top-1 in percent of the weighted kNN classifier on the labelled eval split."""
    bank, bank_labels = extract_features(encoder, bank_loader, device, dtype)
    feats, labels = extract_features(encoder, eval_loader, device, dtype)
    pred = knn_predict(feats, bank, bank_labels, num_classes, k, temperature)
    return (pred == labels).float().mean().item() * 100.0
