"""Weighted cosine kNN (MoCo CIFAR demo) against a brute-force loop, and knn_accuracy end to end."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmoco.evaluation.knn import (
    extract_features,
    knn_accuracy,
    knn_neighbours,
    knn_predict,
    knn_topk,
    knn_vote,
    merge_topk,
)

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


@pytest.mark.parametrize("k", [1, 25, 60, 200])
def test_merging_the_top_k_of_bank_parts_gives_the_whole_bank_top_k(k):
    """What the processes do, in one process: the top-k of each part of the bank (one part
    smaller than k), side by side, merged; then the vote of the whole bank."""
    queries, bank, labels = random_data(seed=4)
    kk = min(k, bank.shape[0])
    full_sims, full_labels = knn_topk(queries, bank, labels, kk)
    parts = [(bank[a:b], labels[a:b]) for a, b in ((0, 130), (130, 170), (170, 300))]
    cands = [knn_topk(queries, b, l, kk) for b, l in parts]
    sims, labs = merge_topk(torch.cat([s for s, _ in cands], 1), torch.cat([l for _, l in cands], 1),
                            kk)
    torch.testing.assert_close(sims, full_sims, rtol=0, atol=1e-6)
    assert torch.equal(labs, full_labels)
    assert torch.equal(knn_vote(sims, labs, 5, 0.1), knn_predict(queries, bank, labels, 5, k=k))


def test_knn_topk_pads_a_short_bank_with_zero_weight():
    queries, bank, labels = random_data(seed=5, n_bank=4)
    sims, labs = knn_topk(queries, bank, labels, 10)
    assert sims.shape == labs.shape == (60, 10)
    assert bool(torch.isinf(sims[:, 4:]).all()) and bool((sims[:, 4:] < 0).all())
    assert bool((labs[:, 4:] == 0).all())
    assert torch.equal(knn_vote(sims, labs, 5, 0.1), knn_predict(queries, bank, labels, 5, k=10))
    empty, empty_labels = knn_topk(queries, bank[:0], labels[:0], 3)  # a process with no bank rows
    assert bool(torch.isinf(empty).all()) and empty_labels.shape == (60, 3)


def test_merge_topk_breaks_ties_by_column_order():
    sims = torch.tensor([[0.5, 0.75, 0.5, 0.75, 0.25]])
    labels = torch.tensor([[0, 1, 2, 3, 4]])
    s, l = merge_topk(sims, labels, 4)
    assert s.tolist() == [[0.75, 0.75, 0.5, 0.5]] and l.tolist() == [[1, 3, 0, 2]]


def test_knn_neighbours_without_process_group():
    queries, bank, labels = random_data(seed=6)
    sims, labs = knn_neighbours(queries, bank, labels, k=7, chunk=13)
    assert sims.shape == labs.shape == (60, 7)
    ref = (queries @ bank.T).topk(7, dim=1)
    torch.testing.assert_close(sims, ref.values)
    assert torch.equal(labs, labels[ref.indices])
    none = knn_predict(torch.empty(0, 0), bank, labels, 5, k=7)  # no queries in this process
    assert none.shape == (0,) and none.dtype == torch.int64
    with pytest.raises(ValueError, match="bank is empty"):
        knn_predict(queries, torch.empty(0, 0), labels[:0], 5)


def test_extract_features_of_an_empty_loader():
    feats, labels = extract_features(nn.Identity(), [], CPU, torch.float32)
    assert feats.shape == (0, 0) and labels.shape == (0,) and labels.dtype == torch.int64
