"""The cached linear probe: it finds a linear separation, reports top-1/top-5, and chooses its
lr and weight decay on held-out train features only."""
from __future__ import annotations

import pytest
import torch

from fastmoco.probe import fit_linear, linear_probe, topk_accuracy


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
