"""The cached linear probe: it finds a linear separation, reports top-1/top-5, and chooses its
lr and weight decay on held-out train features only."""
from __future__ import annotations

import pytest
import torch

from fastmoco.evaluation.probe import fit_linear, linear_probe, topk_accuracy


def blobs(n: int, classes: int, dim: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, dim, generator=g), y


def test_topk_accuracy_counts_what_it_says():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_accuracy(logits, labels, (1, 2, 3)) == pytest.approx([100 / 3, 200 / 3, 100.0])


def test_the_probe_separates_separable_features():
    x, y = blobs(1200, 10, 32, 0.5, seed=0)
    result = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], 10, lrs=(0.1,), weight_decays=(0.0,),
                          epochs=10)
    assert result.top1 == 100.0 and result.top5 == 100.0 and result.holdout_top1 == 100.0


def test_random_labels_stay_at_chance():
    """A probe that could see the test labels would beat chance here."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2000, 16, generator=g), torch.randint(4, (2000,), generator=g)
    result = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:], 4, epochs=5)
    assert 15.0 < result.top1 < 35.0


def test_the_sweep_picks_on_held_out_train_features():
    """With a grid where one lr is useless (0) the sweep must pick the other."""
    x, y = blobs(600, 5, 8, 2.0, seed=2)
    result = linear_probe(x[:500], y[:500], x[500:], y[500:], 5, lrs=(0.0, 0.3), weight_decays=(0.0,),
                          epochs=5)
    assert result.lr == 0.3 and result.top1 > 50


def test_fit_is_deterministic_for_a_seed():
    x, y = blobs(300, 3, 4, 1.0, seed=3)
    a = fit_linear(x, y, 3, lr=0.1, weight_decay=0.0, epochs=3, seed=7)
    b = fit_linear(x, y, 3, lr=0.1, weight_decay=0.0, epochs=3, seed=7)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_the_stacked_sweep_trains_each_pair_as_torch_sgd_would():
    """fit_linear_grid against torch.optim.SGD on one nn.Linear per pair (same init, batches,
    cosine lr, momentum 0.9, weight decay on weight and bias): the same layers to fp32 rounding."""
    import math

    import torch.nn.functional as F
    from torch import nn

    from fastmoco.evaluation.probe import fit_linear_grid

    x, y = blobs(300, 4, 6, 1.0, seed=4)
    pairs = [(0.1, 0.0), (0.3, 1e-3), (0.03, 1e-2)]
    layers = fit_linear_grid(x, y, 4, lrs=[p[0] for p in pairs], weight_decays=[p[1] for p in pairs],
                             epochs=3, batch_size=64, seed=5)
    for (lr, wd), got in zip(pairs, layers):
        g = torch.Generator().manual_seed(5)
        ref = nn.Linear(6, 4)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(4, 6, generator=g) * 0.01)
            ref.bias.zero_()
        opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        steps, total = 300 // 64, 3 * (300 // 64)
        for step in range(total):
            if step % steps == 0:
                order = torch.randperm(300, generator=g)
            idx = order[(step % steps) * 64:][:64]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(ref(x[idx]), y[idx]).backward()
            opt.step()
        torch.testing.assert_close(got.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.bias, ref.bias, rtol=1e-5, atol=1e-6)
