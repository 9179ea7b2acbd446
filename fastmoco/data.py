"""From the data config to the loaders the loop reads: two-view pretraining and the kNN splits."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional

import torch

from fastmoco.config import DataConfig, PipelineConfig, default_data_root
from fastmoco.pipelines import build_eval_loader, build_train_loader
from fastmoco.pipelines.folder import ImageList, scan_image_folder
from fastmoco.pipelines.recipes import get_recipe
from fastmoco.pipelines.webdataset import ShardList, is_webdataset, scan_webdataset

log = logging.getLogger(__name__)


def resolve_pipeline(cfg: PipelineConfig) -> str:
    """auto: DALI where it is installed (on the GPU, or in its CPU mode), torchvision otherwise."""
    if cfg.kind != "auto":
        if cfg.kind == "dali" and importlib.util.find_spec("nvidia.dali") is None:
            raise RuntimeError(
                "pipeline=dali but NVIDIA DALI is not installed: pip install 'fastmoco[dali]' "
                "(nvidia-dali-cuda130) or use pipeline=torchvision"
            )
        return cfg.kind
    return "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torchvision"


def num_workers(cfg: PipelineConfig, world_size: int) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    return max(1, (os.cpu_count() or 1) // max(1, world_size))


def resolve_root(cfg: DataConfig) -> Path:
    """data.root, else $FASTMOCO_DATA, else ../shared/data/<name>; a clear error if none exists."""
    root = Path(cfg.root).expanduser() if cfg.root else default_data_root(cfg.name)
    if root is None and cfg.name == "cifar10":
        root = _download_cifar10()
    if root is None or not root.is_dir():
        raise FileNotFoundError(
            f"data root for {cfg.name!r} not found ({root or 'nothing configured'}): set "
            f"data.root=/path/to/{cfg.name} or the environment variable FASTMOCO_DATA; the folder "
            f"must hold {cfg.train_split}/<class>/<images> or {cfg.train_split}/*.tar shards"
        )
    return root


def _download_cifar10() -> Optional[Path]:
    from fastmoco.datasets import ensure_cifar10

    try:
        return ensure_cifar10()
    except OSError as e:  # offline: fall through to the error that names the settings
        log.warning("could not download CIFAR-10 (%s)", e)
        return None


def split_files(cfg: DataConfig, split: str, max_images: Optional[int],
                seed: int) -> ImageList | ShardList:
    """The images of root/<split>: an ImageFolder tree, or a folder of WebDataset tar shards."""
    root = resolve_root(cfg)
    if is_webdataset(root / split):
        return scan_webdataset(root / split, max_images=max_images, seed=seed)
    return scan_image_folder(root / split, max_images=max_images, seed=seed)


class SyntheticTwoViewLoader:
    """Random image pairs made on the device: measures the model with no data pipeline at all."""

    def __init__(self, images: int, batch_size: int, size: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, seed: int) -> None:
        self.steps = max(1, images // batch_size)
        self.skipped = 0
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = (batch_size, 3, size, size)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self._views = [torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
                       for _ in range(2)]

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            yield self._views[0], self._views[1]


def build_pretrain_loader(
    data: DataConfig, pipeline: PipelineConfig, batch_size: int, *, device: torch.device,
    dtype: torch.dtype, channels_last: bool, rank: int, world_size: int, seed: int,
):
    """The two-view loader for pretraining; `batch_size` is per process."""
    if data.name == "synthetic":
        return SyntheticTwoViewLoader(data.synthetic_images // world_size, batch_size,
                                      data.image_size, device, dtype, channels_last, seed + rank)
    files = split_files(data, data.train_split, data.max_images, seed)
    if len(files) < batch_size * world_size:
        raise ValueError(
            f"{len(files)} training images but the global batch is "
            f"{batch_size * world_size}: lower schedule.batch_size or add data"
        )
    kind = resolve_pipeline(pipeline)
    log.info("pretraining on %d images from %s with the %s pipeline (%s recipe, %d px)",
             len(files), data.train_split, kind, data.recipe, data.image_size)
    return build_train_loader(
        kind, files, get_recipe(data.recipe, data.image_size), batch_size, device=device,
        dtype=dtype, channels_last=channels_last, num_workers=num_workers(pipeline, world_size),
        rank=rank, world_size=world_size, seed=seed,
    )


class KnnLoaders(NamedTuple):
    bank: Iterable  # labelled train images: the neighbours
    eval: Iterable  # labelled eval images: the queries
    num_classes: int
    calibration: Optional[Iterable]  # train images to re-estimate a random network's BN statistics


def build_knn_loaders(
    data: DataConfig, pipeline: PipelineConfig, batch_size: int, *, device: torch.device,
    dtype: torch.dtype, channels_last: bool, seed: int, calibration_images: int = 0,
) -> Optional[KnnLoaders]:
    """The kNN monitor's loaders (centre crops, no augmentation), or None without labels."""
    if data.name == "synthetic" or not data.eval_split:
        return None
    bank = split_files(data, data.train_split, data.knn_bank_max, seed)
    test = split_files(data, data.eval_split, data.knn_eval_max, seed)
    recipe = get_recipe(data.recipe, data.image_size).query
    kind = resolve_pipeline(pipeline)
    kwargs = dict(device=device, dtype=dtype, channels_last=channels_last,
                  num_workers=num_workers(pipeline, 1))
    make = lambda files: build_eval_loader(kind, files, data.image_size, recipe.mean, recipe.std,
                                           batch_size, **kwargs)
    calibration = None
    if calibration_images > 0:
        calibration = make(split_files(data, data.train_split, calibration_images, seed + 1))
    return KnnLoaders(make(bank), make(test), len(bank.classes), calibration)
