"""Torchvision loaders (two-view, labelled linear-probe training, eval): PIL decode + v2 transforms
in workers, normalisation on the device."""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T

from .folder import ImageList, check_start, shard_indices
from .webdataset import ShardList, TarImageLoader
from .recipes import SOLARIZE_THRESHOLD, LinearRecipe, TwoViewRecipe, ViewRecipe, eval_resize
from .seeds import sample_seed

log = logging.getLogger(__name__)
MAX_SUBSTITUTES = 16  # consecutive bad files tolerated before the sample is declared undecodable


def view_transform(view: ViewRecipe) -> Callable[[Image.Image], Image.Image]:
    """PIL -> PIL transform of one view, in MoCo's order: crop, jitter, gray, blur, solarize, flip."""
    ops: list = [T.RandomResizedCrop(view.size, scale=view.crop_scale, ratio=view.crop_ratio, antialias=True)]
    if view.jitter_p > 0 and any(view.jitter):
        ops.append(T.RandomApply([T.ColorJitter(*view.jitter)], p=view.jitter_p))
    if view.grayscale_p > 0:
        ops.append(T.RandomGrayscale(p=view.grayscale_p))
    if view.blur_p > 0:
        ops.append(T.RandomApply([PILGaussianBlur(view.blur_sigma)], p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=view.solarize_p))
    if view.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(p=view.flip_p))
    return T.Compose(ops)


class PILGaussianBlur(torch.nn.Module):
    """Gaussian blur with sigma ~ U(blur_sigma), as MoCo v2 (PIL's blur is ~10x faster than a
    23-tap float convolution; the DALI window of ~10% of the crop spans > 5 sigma, so they agree)."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, img: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(*self.sigma))  # torch RNG: seeded per worker by the DataLoader
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def eval_transform(size: int, resize: int | None = None) -> Callable[[Image.Image], Image.Image]:
    """Resize the shorter side to eval_resize(size, resize) (256 for 224), then center-crop `size`
    (identity on 32-px CIFAR images)."""
    return T.Compose([T.Resize(eval_resize(size, resize), antialias=True), T.CenterCrop(size)])


def linear_transform(recipe: LinearRecipe) -> Callable[[Image.Image], Image.Image]:
    """PIL -> PIL labelled training view: RandomResizedCrop + flip ("rrc"), or RandomCrop with zero
    padding + flip ("pad_crop"; an image still smaller than the crop after the padding is padded
    further rather than failing)."""
    if recipe.kind == "rrc":
        return view_transform(recipe.view())
    ops: list = [T.RandomCrop(recipe.size, padding=recipe.padding or None, pad_if_needed=True, fill=0)]
    if recipe.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(p=recipe.flip_p))
    return T.Compose(ops)


def load_rgb(path: str) -> Image.Image:
    """Decode a file to RGB (grayscale, CMYK and palette images are converted)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def to_hwc_uint8(img: Image.Image) -> torch.Tensor:
    """H×W×3 uint8 tensor; batches of these permute to channels_last NCHW without a copy."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


class TrainDataset(Dataset):
    """Base of the training datasets: a file that fails to decode is replaced by a deterministic
    substitute and counted, so batches stay full and the count reaches the loop."""

    def __init__(self, files: Sequence, seed: int = 0, load: Callable[..., Image.Image] = load_rgb) -> None:
        self.files, self.load, self.seed = list(files), load, seed

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, key: int | tuple[int, int]) -> tuple[Image.Image, int, int]:
        """(image, index of the file actually read, files replaced) for (index, epoch); seeds torch."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        # The augmentation of a sample is a function of (seed, epoch, index) alone, whatever worker
        # draws it: a run resumed from a checkpoint sees the very same views.
        torch.manual_seed(sample_seed(self.seed, epoch, index))
        for attempt in range(MAX_SUBSTITUTES):
            j = (index + attempt * 7919) % len(self.files)
            try:
                return self.load(self.files[j]), j, attempt
            except Exception as e:  # PIL raises many types for bad data
                log.warning("skipping undecodable %s (%s: %s)", self.files[j], type(e).__name__, e)
        raise RuntimeError(f"{MAX_SUBSTITUTES} consecutive files failed to decode near {self.files[index]!r}; "
                           f"rescan the data with scan_image_folder(..., verify=True)")


class TwoViewDataset(TrainDataset):
    """(query, key, bad) per (index, epoch); `bad` counts the files replaced."""

    def __init__(self, files: Sequence, recipe: TwoViewRecipe, seed: int = 0,
                 load: Callable[..., Image.Image] = load_rgb) -> None:
        super().__init__(files, seed, load)
        self.query, self.key = view_transform(recipe.query), view_transform(recipe.key)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        img, _, bad = self.decode(key)
        return to_hwc_uint8(self.query(img)), to_hwc_uint8(self.key(img)), bad


class LabelledDataset(TrainDataset):
    """(view, label, bad) per (index, epoch): the label is the one of the file actually read."""

    def __init__(self, files: Sequence, labels: Sequence[int], recipe: LinearRecipe, seed: int = 0,
                 load: Callable[..., Image.Image] = load_rgb) -> None:
        super().__init__(files, seed, load)
        self.labels, self.transform = list(labels), linear_transform(recipe)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        img, j, bad = self.decode(key)
        return to_hwc_uint8(self.transform(img)), self.labels[j], bad


class EvalDataset(Dataset):
    """(image, label, ok) per index; ok=False rows are dropped by the loader and counted."""

    def __init__(self, files: Sequence, labels: Sequence[int], size: int,
                 load: Callable[..., Image.Image] = load_rgb, resize: int | None = None) -> None:
        self.files, self.labels, self.size, self.load = list(files), list(labels), size, load
        self.transform = eval_transform(size, resize)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        try:
            return to_hwc_uint8(self.transform(self.load(self.files[index]))), self.labels[index], True
        except Exception as e:
            log.warning("skipping undecodable %s (%s: %s)", self.files[index], type(e).__name__, e)
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), self.labels[index], False


def sources(files: ImageList | ShardList) -> tuple[list, list[int], Callable[..., Image.Image]]:
    """(items, labels, load): file paths and PIL, or tar members read by offset (labels 0 if none)."""
    if isinstance(files, ShardList):
        return files.members(), files.labels or [0] * len(files), TarImageLoader()
    return files.files, files.labels, load_rgb


class EpochShardSampler(Sampler[int]):
    """Per-epoch permutation (seed + epoch), whole global batches only, strided over ranks; from
    sample `start` of rank's order on (set_epoch), the ones before it never drawn."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.epoch, self.start = 0, 0
        self.length = len(shard_indices(n, batch_size, rank, world_size, seed, 0))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.length - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = shard_indices(self.n, self.batch_size, self.rank, self.world_size, self.seed, self.epoch)
        return iter([(i, self.epoch) for i in order[self.start :]])


class DeviceNormalizer:
    """uint8 N×H×W×3 (pinned) -> normalised N×3×H×W on `device` in `dtype`, channels_last if asked."""

    def __init__(self, mean, std, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) / std_t
        self.device, self.dtype, self.channels_last = device, dtype, channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC storage == channels_last NCHW
        x = torch.addcmul(self.shift, x.float(), self.scale).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


def own_process_group(_worker_id: int) -> None:
    """DataLoader worker_init_fn: a worker in a process group of its own. torch makes a worker die
    on any SIGTERM its parent did not send, so a SIGTERM to the run's group (a terminal, `kill
    -TERM -PGID`, torchrun passing on its own) would kill the workers before the training process
    could checkpoint; the parent still ends its workers itself."""
    os.setpgid(0, 0)


class TorchvisionTrainBase:
    """What the torchvision training loaders share: the epoch sampler (seed + epoch, disjoint rank
    shards, drop_last), the DataLoader and the `skipped` count of files replaced."""

    def __init__(self, dataset: TrainDataset, batch_size: int, *, device: torch.device, num_workers: int,
                 rank: int, world_size: int, seed: int) -> None:
        self.sampler = EpochShardSampler(len(dataset), batch_size, rank, world_size, seed)
        self.device = torch.device(device)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
            num_workers=num_workers, pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(seed),
            worker_init_fn=own_process_group if num_workers > 0 else None,
        )
        self.skipped, self.steps = 0, self.sampler.length // batch_size

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Read epoch `epoch` from its batch `start` on: each sample's view is a function of (seed,
        epoch, index), so the batches from `start` are the full epoch's; those before are not read."""
        self.sampler.set_epoch(epoch, check_start(start, self.steps) * self.loader.batch_size)

    def _batches(self) -> Iterator[tuple]:
        """The DataLoader's batches without their last field, the count of files replaced."""
        for *batch, bad in self.loader:
            n_bad = int(bad.sum())
            if n_bad:
                self.skipped += n_bad
                log.warning("replaced %d undecodable files in this batch (%d so far)", n_bad, self.skipped)
            yield batch


class TorchvisionTwoViewLoader(TorchvisionTrainBase):
    """TwoViewLoader over a torch DataLoader; `skipped` counts files replaced after a decode error."""

    def __init__(self, files: ImageList | ShardList, recipe: TwoViewRecipe, batch_size: int, *,
                 device: torch.device, dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int,
                 world_size: int, seed: int) -> None:
        items, _, load = sources(files)
        super().__init__(TwoViewDataset(items, recipe, seed, load), batch_size, device=device,
                         num_workers=num_workers, rank=rank, world_size=world_size, seed=seed)
        self.norm_q = DeviceNormalizer(recipe.query.mean, recipe.query.std, self.device, dtype, channels_last)
        self.norm_k = DeviceNormalizer(recipe.key.mean, recipe.key.std, self.device, dtype, channels_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for q, k in self._batches():
            yield self.norm_q(q), self.norm_k(k)


class TorchvisionLabelledLoader(TorchvisionTrainBase):
    """LabelledLoader: (x, labels) batches of the linear probe's training view, with the two-view
    loader's epoch order, rank shards, drop_last and bad-file replacement."""

    def __init__(self, files: ImageList | ShardList, recipe: LinearRecipe, batch_size: int, *,
                 device: torch.device, dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int,
                 world_size: int, seed: int) -> None:
        if isinstance(files, ShardList) and files.labels is None:
            raise ValueError(f"the shards under {files.root!r} have no .cls labels; a labelled loader needs them")
        items, labels, load = sources(files)
        super().__init__(LabelledDataset(items, labels, recipe, seed, load), batch_size, device=device,
                         num_workers=num_workers, rank=rank, world_size=world_size, seed=seed)
        self.norm = DeviceNormalizer(recipe.mean, recipe.std, self.device, dtype, channels_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, labels in self._batches():
            yield self.norm(x), labels.to(self.device, non_blocking=True)


class TorchvisionEvalLoader:
    """(x, labels) over rank's strided shard of the whole split (resize the shorter side to
    eval_resize(size, resize), center crop `size`); undecodable files dropped and counted."""

    def __init__(self, files: ImageList | ShardList, size: int, mean, std, batch_size: int, *,
                 device: torch.device, dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int,
                 world_size: int, resize: int | None = None) -> None:
        shard = list(range(rank, len(files), world_size))
        items, labels, load = sources(files)
        dataset = EvalDataset([items[i] for i in shard], [labels[i] for i in shard], size, load, resize)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                 num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                                 persistent_workers=num_workers > 0,
                                 worker_init_fn=own_process_group if num_workers > 0 else None)
        self.norm = DeviceNormalizer(mean, std, torch.device(device), dtype, channels_last)
        self.device = torch.device(device)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, labels, ok in self.loader:
            if not bool(ok.all()):
                self.skipped += int((~ok).sum())
                x, labels = x[ok], labels[ok]
                if len(x) == 0:
                    continue
            yield self.norm(x), labels.to(self.device, non_blocking=True)
