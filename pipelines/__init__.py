"""fastmoco.pipelines: two-view training loaders and eval loaders over DALI or torchvision."""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import torch

from .folder import ImageList, scan_image_folder, shard_indices
from .recipes import RECIPES, TwoViewRecipe, ViewRecipe, get_recipe
from .webdataset import ShardList, is_webdataset, scan_webdataset

KINDS = ("torchvision", "dali")


class TwoViewLoader(Protocol):
    """What the training loop consumes: full, normalised (x_q, x_k) batches on the device."""

    skipped: int  # files skipped so far (bad input)

    def __len__(self) -> int: ...  # steps per epoch (drop_last)

    def set_epoch(self, epoch: int) -> None: ...  # reshuffle with seed + epoch; disjoint shard per rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # N×3×H×W each


def build_train_loader(kind: str, files: ImageList | ShardList, recipe: TwoViewRecipe, batch_size: int, *,
                       device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                       num_workers: int = 2, rank: int = 0, world_size: int = 1, seed: int = 0) -> TwoViewLoader:
    """Two-view loader of `kind` ("torchvision" or "dali") over an image folder (ImageList) or tar
    shards (ShardList); DALI runs on the GPU when `device` is CUDA."""
    if kind == "torchvision":
        from .torchvision import TorchvisionTwoViewLoader

        return TorchvisionTwoViewLoader(files, recipe, batch_size, device=device, dtype=dtype,
                                        channels_last=channels_last, num_workers=num_workers, rank=rank,
                                        world_size=world_size, seed=seed)
    if kind == "dali":
        from .dali import DaliShardTwoViewLoader, DaliTwoViewLoader

        cls = DaliShardTwoViewLoader if isinstance(files, ShardList) else DaliTwoViewLoader
        return cls(files, recipe, batch_size, device=device, dtype=dtype, channels_last=channels_last,
                   num_workers=num_workers, rank=rank, world_size=world_size, seed=seed)
    raise ValueError(f"unknown pipeline kind {kind!r}; choose one of {KINDS}")


def build_eval_loader(kind: str, files: ImageList | ShardList, size: int, mean, std, batch_size: int, *,
                      device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                      num_workers: int = 2, rank: int = 0,
                      world_size: int = 1) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(x, labels) batches over rank's part of the split (strided files, or a contiguous slice of
    tar shards): resize shorter side, center crop."""
    if kind == "torchvision":
        from .torchvision import TorchvisionEvalLoader

        return TorchvisionEvalLoader(files, size, mean, std, batch_size, device=device, dtype=dtype,
                                     channels_last=channels_last, num_workers=num_workers, rank=rank,
                                     world_size=world_size)
    if kind == "dali":
        from .dali import DaliEvalLoader, DaliShardEvalLoader

        cls = DaliShardEvalLoader if isinstance(files, ShardList) else DaliEvalLoader
        return cls(files, size, mean, std, batch_size, device=device, dtype=dtype, channels_last=channels_last,
                   num_workers=num_workers, rank=rank, world_size=world_size)
    raise ValueError(f"unknown pipeline kind {kind!r}; choose one of {KINDS}")


__all__ = ["ImageList", "KINDS", "RECIPES", "ShardList", "TwoViewLoader", "TwoViewRecipe", "ViewRecipe",
           "build_eval_loader", "build_train_loader", "get_recipe", "is_webdataset", "scan_image_folder",
           "scan_webdataset", "shard_indices"]
