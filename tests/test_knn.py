"""Weighted cosine kNN (MoCo CIFAR demo) against a brute-force loop, and knn_accuracy end to end."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmoco.knn import extract_features, knn_accuracy, knn_predict

CPU = torch.device("cpu")


def brute_force_knn(features, bank, bank_labels, num_classes, k, temperature):
    """Per query: every cosine similarity, the k largest, weights exp(sim/T), votes summed per
    class, the class with the most weight (float64 throughout)."""
    preds = []
    for q in features.double().tolist():
        sims = [(sum(a * b for a, b in zip(q, row)), int(y))
                for row, y in zip(bank.double().tolist(), bank_labels.tolist())]
        sims.sort(key=lambda t: -t[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / temperature)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def random_data(seed=0, n_bank=300, n_query=60, dim=16, num_classes=5):
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n_bank, dim, generator=g), dim=1)
    labels = torch.randint(num_classes, (n_bank,), generator=g)
    queries = F.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    return queries, bank, labels


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (10, 0.1), (50, 0.5), (200, 0.07)])
def test_knn_predict_matches_brute_force(k, temperature):
    queries, bank, labels = random_data()
    expected = brute_force_knn(queries, bank, labels, 5, k, temperature)
    got = knn_predict(queries, bank, labels, 5, k=k, temperature=temperature)
    assert got.dtype == torch.int64 and got.shape == (60,)
    assert torch.equal(got, expected)
    if k > 1:  # the vote weighting matters: plain majority disagrees somewhere
        assert not torch.equal(got, brute_force_knn(queries, bank, labels, 5, k, 1e6))


def test_knn_predict_independent_of_chunk():
    queries, bank, labels = random_data(seed=1)
    full = knn_predict(queries, bank, labels, 5, k=20)
    for chunk in (1, 7, 59, 60, 1000):
        assert torch.equal(knn_predict(queries, bank, labels, 5, k=20, chunk=chunk), full)


def test_knn_predict_k_larger_than_bank_uses_whole_bank():
    queries, bank, labels = random_data(seed=2, n_bank=30)
    got = knn_predict(queries, bank, labels, 5, k=200)
    assert torch.equal(got, brute_force_knn(queries, bank, labels, 5, 30, 0.1))


def test_knn_predict_nearest_neighbour_is_exact_match():
    """k = 1 with the queries taken from the bank returns the bank's own labels."""
    _, bank, labels = random_data(seed=3)
    assert torch.equal(knn_predict(bank[::3], bank, labels, 5, k=1), labels[::3])


def separable(num_classes, per_class, seed):
    """Features = one-hot class + small noise; labels = class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = F.one_hot(y, num_classes).float() * 3 + 0.3 * torch.randn(len(y), num_classes, generator=g)
    return x, y


def batches(x, y, size):
    return list(zip(x.split(size), y.split(size)))


def test_knn_accuracy_separable_is_100():
    bank_x, bank_y = separable(4, 25, seed=0)
    eval_x, eval_y = separable(4, 10, seed=1)
    encoder = nn.Identity()
    acc = knn_accuracy(encoder, batches(bank_x, bank_y, 16), batches(eval_x, eval_y, 7), 4,
                       CPU, torch.float32, k=20, temperature=0.1)
    assert acc == pytest.approx(100.0)


def test_knn_accuracy_counts_errors():
    """Eval labels shifted for a quarter of the images: exactly 75 %."""
    bank_x, bank_y = separable(4, 25, seed=0)
    eval_x, eval_y = separable(4, 10, seed=1)
    eval_y = torch.where(eval_y == 0, torch.ones_like(eval_y), eval_y)
    acc = knn_accuracy(nn.Identity(), batches(bank_x, bank_y, 16), batches(eval_x, eval_y, 7), 4,
                       CPU, torch.float32, k=20)
    assert acc == pytest.approx(75.0)


def test_extract_features_normalises_and_restores_mode():
    x, y = separable(3, 5, seed=0)
    enc = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8))
    enc.train()
    feats, labels = extract_features(enc, batches(x, y, 4), CPU, torch.float32)
    assert enc.training
    assert feats.shape == (15, 8) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(15))
    assert torch.equal(labels, y)
    enc.eval()
    torch.testing.assert_close(feats, F.normalize(enc(x), dim=1))  # eval mode used
