"""The fast linear probe (eval.mode=cached): a linear classifier fitted on frozen features
extracted once (centre crops, no augmentation), its lr and weight decay chosen on a held-out
part of the train split. Minutes instead of the full protocol's hours; docs/evaluation.md says
how its figure relates to the full protocol's."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LRS = (0.03, 0.1, 0.3, 1.0)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)


@dataclass
class ProbeResult:
    top1: float  # on the test features, in percent
    top5: float
    lr: float  # chosen on the held-out part of the train features
    weight_decay: float
    holdout_top1: float
    seconds: float


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Percent of rows whose label is among the top-k logits, for each k (k capped at the classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks]


def fit_linear_grid(x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                    lrs: tuple[float, ...], weight_decays: tuple[float, ...], epochs: int = 30,
                    batch_size: int = 256, seed: int = 0) -> list[nn.Linear]:
    """One linear layer per (lr, weight decay) pair, all trained at once on the same shuffled
    mini-batches: each as the authors' main_lincls initialises and steps it (weights N(0, 0.01),
    bias 0, SGD momentum 0.9, decay on both), with a cosine lr over `epochs` passes. Stacking
    the layers makes a sweep cost about one fit (a CIFAR-10 sweep of 12 pairs: 64 s one by one)."""
    g = torch.Generator().manual_seed(seed)
    n, dim = x.shape
    weight = (torch.randn(num_classes, dim, generator=g) * 0.01).to(x.device)
    params = [torch.cat([weight.T, torch.zeros(1, num_classes, device=x.device)])  # (D+1)×C
              .expand(len(lrs), -1, -1).clone().requires_grad_()]
    lr = torch.tensor(lrs, dtype=x.dtype, device=x.device)[:, None, None]  # G×1×1
    wd = torch.tensor(weight_decays, dtype=x.dtype, device=x.device)[:, None, None]
    buf = torch.zeros_like(params[0])
    ones = torch.ones(min(batch_size, n), 1, dtype=x.dtype, device=x.device)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:  # a new epoch: a new order
            order = torch.randperm(n, generator=g).to(x.device)
        idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        xb = torch.cat([x[idx], ones[: len(idx)]], dim=1)  # B×(D+1): the bias as a weight row
        logits = torch.matmul(xb, params[0])  # G×B×C
        loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(len(lrs)), reduction="sum")
        (grad,) = torch.autograd.grad(loss / len(idx), params)  # each layer's own mean loss
        with torch.no_grad():
            buf.mul_(0.9).add_(grad + wd * params[0])
            params[0].sub_(lr * 0.5 * (1.0 + math.cos(math.pi * step / total)) * buf)
    layers = []
    for w in params[0].detach():
        layer = nn.Linear(dim, num_classes).to(x.device)
        with torch.no_grad():
            layer.weight.copy_(w[:dim].T)
            layer.bias.copy_(w[dim])
        layers.append(layer)
    return layers


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, lr: float,
               weight_decay: float, epochs: int = 30, batch_size: int = 256, seed: int = 0) -> nn.Linear:
    """One linear layer trained as fit_linear_grid trains each of its layers."""
    return fit_linear_grid(x, y, num_classes, lrs=(lr,), weight_decays=(weight_decay,),
                           epochs=epochs, batch_size=batch_size, seed=seed)[0]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, num_classes: int, *, lrs: tuple[float, ...] = LRS,
                 weight_decays: tuple[float, ...] = WEIGHT_DECAYS, holdout: float = 0.1,
                 epochs: int = 30, batch_size: int = 256, seed: int = 0) -> ProbeResult:
    """Sweep (lr, weight decay) on a held-out `holdout` of the train features, refit the best on
    all of them, report top-1/top-5 on the test features. Features are standardised with the
    train statistics (one lr grid then serves a random network and a trained one alike)."""
    start = time.perf_counter()
    train_x, test_x = train_x.float(), test_x.float()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_x.shape[0], generator=g).to(train_x.device)
    n_hold = max(1, int(holdout * train_x.shape[0]))
    hold, fit = order[:n_hold], order[n_hold:]
    grid = list(itertools.product(lrs, weight_decays))
    layers = fit_linear_grid(train_x[fit], train_y[fit], num_classes, lrs=[p[0] for p in grid],
                             weight_decays=[p[1] for p in grid], epochs=epochs,
                             batch_size=batch_size, seed=seed)
    with torch.no_grad():
        held_acc = [topk_accuracy(layer(train_x[hold]), train_y[hold], (1,))[0] for layer in layers]
    best = max(range(len(grid)), key=lambda i: (held_acc[i], -i))  # ties: the first in the grid
    held, (lr, wd) = held_acc[best], grid[best]
    linear = fit_linear(train_x, train_y, num_classes, lr=lr, weight_decay=wd, epochs=epochs,
                        batch_size=batch_size, seed=seed)
    with torch.no_grad():
        top1, top5 = topk_accuracy(linear(test_x), test_y)
    return ProbeResult(top1, top5, lr, wd, held, time.perf_counter() - start)
