"""The fast linear probe (eval.mode=cached): a linear classifier fitted on frozen features
extracted once (centre crops, no augmentation), its lr and weight decay chosen on a held-out
part of the train split. Minutes instead of the full protocol's hours; it reads a little lower
than the full protocol, which trains on augmented views (docs/evaluation.md has the measured gap)."""
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


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, lr: float,
               weight_decay: float, epochs: int = 30, batch_size: int = 256, seed: int = 0) -> nn.Linear:
    """A linear layer trained as the authors' main_lincls initialises and steps it (weights
    N(0, 0.01), bias 0, SGD momentum 0.9), with a cosine lr over `epochs` passes of shuffled
    mini-batches of the (standardised) features."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * 0.01)
        linear.bias.zero_()
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, x.shape[0] // batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:  # a new epoch: a new order
            order = torch.randperm(x.shape[0], generator=g).to(x.device)
        idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(linear(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return linear


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
    best = (-1.0, lrs[0], weight_decays[0])
    for lr, wd in itertools.product(lrs, weight_decays):
        linear = fit_linear(train_x[fit], train_y[fit], num_classes, lr=lr, weight_decay=wd,
                            epochs=epochs, batch_size=batch_size, seed=seed)
        with torch.no_grad():
            acc = topk_accuracy(linear(train_x[hold]), train_y[hold], (1,))[0]
        best = max(best, (acc, lr, wd), key=lambda t: t[0])
    held, lr, wd = best
    linear = fit_linear(train_x, train_y, num_classes, lr=lr, weight_decay=wd, epochs=epochs,
                        batch_size=batch_size, seed=seed)
    with torch.no_grad():
        top1, top5 = topk_accuracy(linear(test_x), test_y)
    return ProbeResult(top1, top5, lr, wd, held, time.perf_counter() - start)
