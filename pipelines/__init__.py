"""fastmoco.pipelines: two-view training loaders, labelled (linear-probe) training loaders and eval
loaders over DALI or torchvision."""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import torch

from .folder import ImageList, scan_image_folder, shard_indices
from .recipes import (LINEAR_RECIPES, RECIPES, LinearRecipe, TwoViewRecipe, ViewRecipe, eval_resize,
                      get_linear_recipe, get_recipe)
from .webdataset import ShardList, is_webdataset, scan_webdataset

KINDS = ("torchvision", "dali")


class TwoViewLoader(Protocol):
    """What the training loop consumes: full, normalised (x_q, x_k) batches on the device."""

    skipped: int  # files skipped so far (bad input)

    def __len__(self) -> int: ...  # steps per epoch (drop_last)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Reshuffle with seed + epoch (disjoint shard per rank); iterate from batch `start` on, the
        batches the full epoch has there, without reading the ones before it."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # N×3×H×W each


class LabelledLoader(Protocol):
    """What the linear probe trains on: full, normalised (x, labels) batches on the device."""

    skipped: int  # files replaced so far (bad input)

    def __len__(self) -> int: ...  # steps per epoch (drop_last)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Reshuffle with seed + epoch (disjoint shard per rank); iterate from batch `start` on, the
        batches the full epoch has there, without reading the ones before it."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # N×3×H×W, N int64 labels


def build_train_loader(kind: str, files: ImageList | ShardList, recipe: TwoViewRecipe, batch_size: int, *,
                       device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                       num_workers: int = 2, rank: int = 0, world_size: int = 1, seed: int = 0) -> TwoViewLoader:
    """Two-view loader of `kind` ("torchvision" or "dali") over an image folder (ImageList) or tar
    shards (ShardList); DALI runs on the GPU when `device` is CUDA."""
    return _build(kind, files, ("TorchvisionTwoViewLoader", "DaliTwoViewLoader", "DaliShardTwoViewLoader"),
                  recipe, batch_size, device=device, dtype=dtype, channels_last=channels_last,
                  num_workers=num_workers, rank=rank, world_size=world_size, seed=seed)


def build_labelled_train_loader(kind: str, files: ImageList | ShardList, recipe: LinearRecipe, batch_size: int, *,
                                device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                                num_workers: int = 2, rank: int = 0, world_size: int = 1,
                                seed: int = 0) -> LabelledLoader:
    """Labelled loader of `kind` for training the linear probe: `recipe`'s view (RandomResizedCrop +
    flip, or RandomCrop with padding + flip; get_linear_recipe), normalised, with the two-view
    loaders' per-epoch order (set_epoch), disjoint rank shards, drop_last and bad-file handling.
    Tar shards need .cls labels."""
    return _build(kind, files, ("TorchvisionLabelledLoader", "DaliLabelledLoader", "DaliShardLabelledLoader"),
                  recipe, batch_size, device=device, dtype=dtype, channels_last=channels_last,
                  num_workers=num_workers, rank=rank, world_size=world_size, seed=seed)


def build_eval_loader(kind: str, files: ImageList | ShardList, size: int, mean, std, batch_size: int, *,
                      device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                      num_workers: int = 2, rank: int = 0, world_size: int = 1,
                      resize: int | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(x, labels) batches over rank's part of the split (strided files, or a contiguous slice of
    tar shards): resize the shorter side to eval_resize(size, resize) (None: 256 for 224, i.e.
    size / 0.875 from 128 px up; `size` itself below, an identity on CIFAR's 32 px), center crop
    `size`."""
    eval_resize(size, resize)  # fail here on a resize smaller than the crop
    return _build(kind, files, ("TorchvisionEvalLoader", "DaliEvalLoader", "DaliShardEvalLoader"),
                  size, mean, std, batch_size, device=device, dtype=dtype, channels_last=channels_last,
                  num_workers=num_workers, rank=rank, world_size=world_size, resize=resize)


def _build(kind: str, files: ImageList | ShardList, names: tuple[str, str, str], *args, **kwargs):
    """The loader class of `kind` for `files` (torchvision; DALI over a folder or over tar shards),
    imported only when asked for (DALI is optional), built with `args`."""
    torchvision_name, dali_name, dali_shard_name = names
    if kind == "torchvision":
        from . import torchvision

        return getattr(torchvision, torchvision_name)(files, *args, **kwargs)
    if kind == "dali":
        from . import dali

        name = dali_shard_name if isinstance(files, ShardList) else dali_name
        return getattr(dali, name)(files, *args, **kwargs)
    raise ValueError(f"unknown pipeline kind {kind!r}; choose one of {KINDS}")


__all__ = ["ImageList", "KINDS", "LINEAR_RECIPES", "LabelledLoader", "LinearRecipe", "RECIPES", "ShardList",
           "TwoViewLoader", "TwoViewRecipe", "ViewRecipe", "build_eval_loader", "build_labelled_train_loader",
           "build_train_loader", "eval_resize", "get_linear_recipe", "get_recipe", "is_webdataset",
           "scan_image_folder", "scan_webdataset", "shard_indices"]
