"""From the data config to the loaders the loop reads: two-view pretraining and the kNN splits."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional

import torch

from fastmoco.config import DataConfig, PipelineConfig, TrainConfig, default_data_root
from fastmoco.pipelines import build_eval_loader, build_labelled_train_loader, build_train_loader
from fastmoco.pipelines.folder import ImageList, scan_image_folder
from fastmoco.pipelines.recipes import get_linear_recipe, get_recipe
from fastmoco.pipelines.webdataset import ShardList, is_webdataset, scan_webdataset
from fastmoco.runtime import Runtime

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
        self.skipped, self.start = 0, 0
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = (batch_size, 3, size, size)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self._views = [torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
                       for _ in range(2)]

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.start = start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.start, self.steps):
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
    rank: int = 0, world_size: int = 1,
) -> Optional[KnnLoaders]:
    """The kNN monitor's loaders (centre crops, no augmentation), or None without labels; bank
    and eval over rank's part of each split, calibration over the same images on every rank."""
    if data.name == "synthetic" or not data.eval_split:
        return None
    bank = split_files(data, data.train_split, data.knn_bank_max, seed)
    test = split_files(data, data.eval_split, data.knn_eval_max, seed)
    recipe = get_recipe(data.recipe, data.image_size).query
    kind = resolve_pipeline(pipeline)
    kwargs = dict(device=device, dtype=dtype, channels_last=channels_last,
                  num_workers=num_workers(pipeline, world_size))
    make = lambda files, **part: build_eval_loader(kind, files, data.image_size, recipe.mean,
                                                   recipe.std, batch_size, **kwargs, **part)
    calibration = None
    if calibration_images > 0:
        calibration = make(split_files(data, data.train_split, calibration_images, seed + 1))
    part = dict(rank=rank, world_size=world_size)
    return KnnLoaders(make(bank, **part), make(test, **part), len(bank.classes), calibration)


def labelled_splits(data: DataConfig, seed: int, train_max: Optional[int],
                    eval_max: Optional[int]) -> tuple[ImageList | ShardList, ImageList | ShardList]:
    """The train and eval splits with their labels; the eval split's classes must be the train
    split's (labels are class indices, so a missing class would shift every label after it)."""
    train = split_files(data, data.train_split, train_max, seed)
    test = split_files(data, data.eval_split, eval_max, seed)
    if list(test.classes) != list(train.classes):
        extra = sorted(set(test.classes) - set(train.classes))
        missing = sorted(set(train.classes) - set(test.classes))
        raise ValueError(
            f"the classes of {data.eval_split!r} and {data.train_split!r} differ (only in "
            f"{data.eval_split}: {extra[:5] or '-'}; only in {data.train_split}: {missing[:5] or '-'}): "
            f"give both splits the same class folders (an empty folder is a class with no images), "
            f"or point data.eval_split at a split of the same dataset")
    return train, test


class FeatureLoaders(NamedTuple):
    train: Iterable  # centre crops of the train split, this process's part
    val: Iterable  # centre crops of the eval split, this process's part
    num_classes: int


def build_feature_loaders(cfg, rt, batch_size: int = 256) -> FeatureLoaders:
    """Centre crops of both splits, split over the processes: for features extracted once (the
    cached probe, `fastmoco eval knn`). `cfg` is an EvalConfig, `rt` a Runtime."""
    data = cfg.data
    train, test = labelled_splits(data, cfg.run.seed, cfg.linear.max_train_images, None)
    mean_std = get_recipe(data.recipe, data.image_size).query
    kind = resolve_pipeline(cfg.pipeline)
    make = lambda files: build_eval_loader(
        kind, files, data.image_size, mean_std.mean, mean_std.std, batch_size, device=rt.device,
        dtype=rt.dtype, channels_last=cfg.run.channels_last,
        num_workers=num_workers(cfg.pipeline, rt.world_size), rank=rt.rank, world_size=rt.world_size)
    return FeatureLoaders(make(train), make(test), len(train.classes))


class LinearLoaders(NamedTuple):
    train: Iterable  # augmented labelled views of the train split (linear.train_view), this process's part
    val: Iterable  # centre crops of the eval split, this process's part
    num_classes: int


def build_linear_loaders(cfg, rt) -> LinearLoaders:
    """The linear protocol's loaders (`cfg` an EvalConfig, `rt` a Runtime): RandomResizedCrop
    + flip, or RandomCrop with padding 4 + flip (linear.train_view), and the eval centre crops."""
    data, lc = cfg.data, cfg.linear
    train, test = labelled_splits(data, cfg.run.seed, lc.max_train_images, None)
    recipe = get_linear_recipe("cifar" if lc.train_view == "pad_crop" else "v2", data.image_size)
    local = lc.batch_size // rt.world_size
    if len(train) < lc.batch_size:
        raise ValueError(f"{len(train)} training images but linear.batch_size={lc.batch_size}: "
                         f"lower linear.batch_size or add data")
    kind = resolve_pipeline(cfg.pipeline)
    kw = dict(device=rt.device, dtype=rt.dtype, channels_last=cfg.run.channels_last,
              num_workers=num_workers(cfg.pipeline, rt.world_size), rank=rt.rank,
              world_size=rt.world_size)
    mean_std = get_recipe(data.recipe, data.image_size).query  # what the backbone was trained on
    train_recipe = dataclasses.replace(recipe, mean=mean_std.mean, std=mean_std.std)
    return LinearLoaders(
        build_labelled_train_loader(kind, train, train_recipe, local, seed=cfg.run.seed, **kw),
        build_eval_loader(kind, test, data.image_size, mean_std.mean, mean_std.std, local, **kw),
        len(train.classes))


def build_calibration_loader(cfg, rt, batch_size: int = 256) -> Iterable:
    """Centre crops of `cfg.bn_calibration_images` train images, the same on every process."""
    data = cfg.data
    files = split_files(data, data.train_split, cfg.bn_calibration_images, cfg.run.seed + 1)
    mean_std = get_recipe(data.recipe, data.image_size).query
    return build_eval_loader(resolve_pipeline(cfg.pipeline), files, data.image_size, mean_std.mean,
                             mean_std.std, batch_size, device=rt.device, dtype=rt.dtype,
                             channels_last=cfg.run.channels_last,
                             num_workers=num_workers(cfg.pipeline, rt.world_size))


def build_loader(cfg: TrainConfig, rt: Runtime):
    """The two-view pretraining loader of this process (its share of the global batch)."""
    return build_pretrain_loader(
        cfg.data, cfg.pipeline, cfg.schedule.batch_size // rt.world_size, device=rt.device,
        dtype=rt.dtype, channels_last=cfg.run.channels_last, rank=rt.rank,
        world_size=rt.world_size, seed=cfg.run.seed)
