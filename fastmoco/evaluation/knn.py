"""The kNN monitor: weighted cosine kNN (k=200, T=0.1) over train features, as in the MoCo CIFAR demo.

One code path for one process and for many. Across processes each one extracts the features of
its own part of the bank and of the queries; no process ever holds the whole bank. The queries
travel instead (they are few): chunk by chunk every process gathers every process's queries,
finds their top-k among its own bank rows, and hands the candidates (k similarities and labels
per query and process) back; each process merges the candidates of its own queries into the
global top-k and votes. In one process there are no collectives and the merge is the identity.

Exactness: the merge keeps the k largest of the W·k candidates in descending order (a stable
sort, ties in rank order), which is the set and order one process's top-k over the whole bank
has, and the vote then adds the same weights in the same order. (A similarity is a dot product
from a matrix product whose shape differs with the world size; BLAS may round it differently in
the last bit, which moves a prediction only where two candidates or two classes' votes are that
close.) The accuracy comes from integer counts summed over processes: the same float on every
process. Memory per process: its bank part (N/W×D) and queries (Q/W×D) in fp32, a chunk×N/W
similarity matrix, and W·chunk×k candidates (similarity and label) per round.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastmoco.device import autocast
from fastmoco.distributed import get_rank, get_world_size, is_distributed


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (or, with normalize=False, raw) features (N×D, fp32) and labels (N, int64)
    of every image the loader yields (0×0 and 0 when it yields none: a process whose part of a
    split is empty)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            with autocast(device, dtype):
                f = encoder(x)
            feats.append(F.normalize(f.float(), dim=1) if normalize else f.float())
            labels.append(y.to(device).long())
    finally:
        encoder.train(was_training)
    if not feats:
        return (torch.empty(0, 0, device=device),
                torch.empty(0, dtype=torch.long, device=device))
    return torch.cat(feats), torch.cat(labels)


def knn_topk(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar rows of `bank` per query: similarities (B×k, descending) and their
    labels. A bank of fewer than k rows fills the tail with similarity -inf (weight 0), label 0."""
    sims = queries @ bank.T  # B×N
    top = min(k, bank.shape[0])
    values, idx = sims.topk(top, dim=1)  # sorted, largest first
    labels = bank_labels[idx]
    if top < k:
        pad = k - top
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
        labels = torch.cat([labels, labels.new_zeros(labels.shape[0], pad)], 1)
    return values, labels


def merge_topk(sims: torch.Tensor, labels: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row's candidates (B×M, M ≥ k, e.g. W processes' top-k side by side),
    descending; equal similarities keep their column order, so the merge is deterministic."""
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), labels.gather(1, order)


def knn_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int,
             temperature: float) -> torch.Tensor:
    """Each neighbour votes for its label with weight exp(sim/T); the class with the most weight."""
    weights = (sims / temperature).exp()
    votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=sims.device)
    votes.scatter_add_(1, labels, weights)
    return votes.argmax(dim=1)


def _world(distributed: Optional[bool]) -> int:
    """Processes that share the bank: every one of the job unless `distributed` is False."""
    if distributed is False or not is_distributed():
        return 1
    return get_world_size()


def _all_gather(x: torch.Tensor, world: int) -> torch.Tensor:
    """W×… : every process's `x` (equal shapes), in rank order."""
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.stack(out)


def _with_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    """An empty 0×0 part (nothing extracted) as 0×dim, so that every product has its shape."""
    return x.new_zeros(0, dim) if x.shape[0] == 0 else x


@torch.no_grad()
def knn_neighbours(
    features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int = 200,
    chunk: int = 1024, *, distributed: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global top-k of each row of `features` (this process's queries) among the rows of
    `bank` on all processes: similarities (Q×k', descending) and labels, k' = min(k, bank size).

    With a process group (unless distributed=False) `bank` is this process's part of the bank and
    every process must call this, each with its own queries (any counts, also none). At most
    `chunk` queries of the whole job are compared at a time: a chunk×(bank rows here) matrix."""
    world = _world(distributed)
    if world == 1:
        n_bank, rounds, per_round = bank.shape[0], 0, chunk
        dim = max(bank.shape[1], features.shape[1])
    else:
        sizes = torch.tensor([bank.shape[0], features.shape[0], bank.shape[1], features.shape[1]],
                             dtype=torch.long, device=features.device)
        sizes = _all_gather(sizes, world).cpu()
        n_bank, dim = int(sizes[:, 0].sum()), int(sizes[:, 2:].max())
        per_round = max(1, chunk // world)  # queries per process and round
        rounds = -(-int(sizes[:, 1].max()) // per_round)  # every process joins every round
    k = min(k, n_bank)
    if k < 1:
        raise ValueError("the kNN bank is empty")
    features, bank = _with_dim(features.float(), dim), _with_dim(bank.float(), dim)
    if world == 1:
        parts = [knn_topk(f, bank, bank_labels, k) for f in features.split(per_round)]
    else:
        rank, parts = get_rank(), []
        for r in range(rounds):
            mine = features[r * per_round:(r + 1) * per_round]
            padded = torch.cat([mine, mine.new_zeros(per_round - mine.shape[0], dim)])
            queries = _all_gather(padded, world).flatten(0, 1)  # (W·per_round)×D, rank order
            sims, labels = knn_topk(queries, bank, bank_labels, k)
            # Every process's candidates for this process's queries: W×(W·per_round)×k gathered,
            # of which rows rank·per_round … hold ours; side by side in rank order → Q×(W·k).
            own = slice(rank * per_round, rank * per_round + mine.shape[0])
            sims = _all_gather(sims, world)[:, own].permute(1, 0, 2).flatten(1)
            labels = _all_gather(labels, world)[:, own].permute(1, 0, 2).flatten(1)
            parts.append(merge_topk(sims, labels, k))
    if not parts:
        return (features.new_zeros(0, k),
                torch.zeros(0, k, dtype=torch.long, device=features.device))
    return torch.cat([s for s, _ in parts]), torch.cat([l for _, l in parts])


@torch.no_grad()
def knn_predict(
    features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
    num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024,
    *, distributed: Optional[bool] = None,
) -> torch.Tensor:
    """Class of each row of `features`: the top-k neighbours in `bank` vote with weight exp(sim/T).

    With a process group, `bank` is this process's part and the neighbours are those of the whole
    bank across processes (see knn_neighbours; every process must call this); distributed=False,
    or no process group, keeps it to this process's tensors."""
    sims, labels = knn_neighbours(features, bank, bank_labels, k, chunk, distributed=distributed)
    preds = [knn_vote(s, l, num_classes, temperature)
             for s, l in zip(sims.split(chunk), labels.split(chunk))]  # votes: chunk×classes
    return torch.cat(preds) if preds else labels.new_zeros(0)


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
    chunk: int = 1024, *, distributed: Optional[bool] = None,
) -> float:
    """Top-1 in percent of the weighted kNN classifier on the labelled eval split.

    With a process group every process calls this with the loaders of its own part of the bank
    and of the eval split (each image in exactly one process's part) and gets the same value,
    equal to what one process computes over the whole splits."""
    bank, bank_labels = extract_features(encoder, bank_loader, device, dtype)
    feats, labels = extract_features(encoder, eval_loader, device, dtype)
    return knn_top1(feats, labels, bank, bank_labels, num_classes, k, temperature, chunk,
                    distributed=distributed)


def knn_top1(
    feats: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
    num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024, *,
    distributed: Optional[bool] = None,
) -> float:
    """knn_accuracy on features already extracted (L2-normalised; each process its own parts)."""
    pred = knn_predict(feats, bank, bank_labels, num_classes, k, temperature, chunk,
                       distributed=distributed)
    counts = torch.stack([(pred == labels).sum(), torch.tensor(labels.numel(), device=pred.device)])
    if _world(distributed) > 1:
        dist.all_reduce(counts)
    correct, total = (int(c) for c in counts.cpu())
    if total == 0:
        raise ValueError("the kNN eval split is empty")
    return 100.0 * correct / total


# The same function: every process passes its own shard loaders (one process: the whole splits).
distributed_knn_accuracy = knn_accuracy
