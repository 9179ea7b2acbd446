"""DALI two-view pipeline: one function builds the CPU graph (device_id=None) and the GPU graph."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .folder import ImageList, decode_check, shard_indices
from .recipes import SOLARIZE_THRESHOLD, TwoViewRecipe, ViewRecipe
from .webdataset import IMAGE_EXTS, ShardList, drop_samples, find_undecodable

log = logging.getLogger(__name__)
HUE_DEGREES = 360.0  # torchvision hue factor x is x of a full turn; DALI's hue is in degrees
SHUFFLE_BUFFER = 4096  # encoded samples the WebDataset reader shuffles in (~0.5 GB at ImageNet sizes)
CLS_BYTES = 16  # a .cls member is padded to this many ASCII bytes and parsed by torch


def output_dtype(dtype: torch.dtype) -> types.DALIDataType:
    """DALI output type for a training dtype: bf16 is produced as fp16 (exact enough) and cast by torch."""
    return types.FLOAT if dtype == torch.float32 else types.FLOAT16


def decode(encoded, gpu: bool):
    """Decode to RGB uint8 HWC: "mixed" (nvJPEG, output on the GPU) or "cpu"."""
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)


def _coin(p: float):
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def color(images, view: ViewRecipe):
    """ColorJitter (p=jitter_p) and grayscale (p=grayscale_p) folded into one color_twist.

    Factors are uniform in [1-x, 1+x] (hue: ±x turns) as in torchvision. Saturation 0 is an exact
    grayscale with torchvision's luma weights; because color_twist is affine per pixel and its
    luma is untouched by hue, graying inside the twist equals graying after the jitter. Differences
    from torchvision: a fixed order (not a random permutation), contrast pivots on mid-grey
    instead of the image mean, and hue rotates in YIQ (mean HSV shift equals the angle).
    """
    b, c, s, h = view.jitter
    kw = {}
    if view.jitter_p > 0:
        on = 1.0 if view.jitter_p >= 1 else _coin(view.jitter_p)  # one coin for all four factors
        for name, x in (("brightness", b), ("contrast", c), ("saturation", s)):
            if x > 0:
                kw[name] = 1.0 + on * (fn.random.uniform(range=[max(0.0, 1 - x), 1 + x]) - 1.0)
        if h > 0:
            kw["hue"] = on * fn.random.uniform(range=[-h * HUE_DEGREES, h * HUE_DEGREES])
    if view.grayscale_p > 0:
        keep = 1.0 - _coin(view.grayscale_p)
        kw["saturation"] = kw["saturation"] * keep if "saturation" in kw else keep
    return fn.color_twist(images, **kw) if kw else images


def blur(images, view: ViewRecipe):
    """Gaussian blur, sigma uniform in blur_sigma, as the authors' PIL GaussianBlur(radius=sigma).

    No fixed window: DALI sizes each sample's window from its sigma (2·ceil(3σ)+1, 99.7 % of the
    kernel's mass). A 23-px window (10 % of 224) holds the same kernel padded with near-zero taps
    and cost twice the time of the whole rest of the view on the CPU."""
    return fn.gaussian_blur(images, sigma=fn.random.uniform(range=list(view.blur_sigma)))


def solarize(images):
    """Invert pixels >= 128 (PIL ImageOps.solarize)."""
    high = images >= SOLARIZE_THRESHOLD
    return fn.cast(images + high * (255 - 2 * images), dtype=types.UINT8)


def augment_view(images, view: ViewRecipe, dtype: types.DALIDataType):
    """One view: crop, jitter+gray, blur, solarize, then flip+normalise to HWC `dtype`."""
    images = fn.random_resized_crop(images, size=[view.size, view.size], random_area=list(view.crop_scale),
                                    random_aspect_ratio=list(view.crop_ratio), antialias=True)
    images = color(images, view)
    if view.blur_p >= 1:
        images = blur(images, view)
    elif view.blur_p > 0:
        if fn.random.coin_flip(probability=view.blur_p, dtype=types.BOOL):
            images = blur(images, view)
    if view.solarize_p >= 1:
        images = solarize(images)
    elif view.solarize_p > 0:
        if fn.random.coin_flip(probability=view.solarize_p, dtype=types.BOOL):
            images = solarize(images)
    mirror = fn.random.coin_flip(probability=view.flip_p) if view.flip_p > 0 else 0
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout="HWC", mirror=mirror,
                                    mean=[255 * m for m in view.mean], std=[255 * s for s in view.std])


@pipeline_def(enable_conditionals=True)
def _two_view(files: list[str], recipe: TwoViewRecipe, gpu: bool, dtype: types.DALIDataType):
    encoded, _ = fn.readers.file(files=files, random_shuffle=False, name="reader")
    images = decode(encoded, gpu)
    return augment_view(images, recipe.query, dtype), augment_view(images, recipe.key, dtype)


def two_view_pipeline(files: Sequence[str], recipe: TwoViewRecipe, batch_size: int, *, device_id: int | None,
                      num_threads: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32,
                      gpu: bool | None = None) -> Pipeline:
    """Pipeline reading `files` in order: device_id=None -> all-CPU graph, int -> mixed decode + GPU ops.

    `gpu` overrides the placement (gpu=True with device_id=None builds a GPU graph that can be
    serialized, not run, without CUDA: see graph_check)."""
    gpu = device_id is not None if gpu is None else gpu
    return _two_view(list(files), recipe, gpu, output_dtype(dtype), batch_size=batch_size,
                     num_threads=num_threads, device_id=device_id, seed=seed % 2**31,
                     prefetch_queue_depth=2, exec_dynamic=True)


@pipeline_def
def _eval(files: list[str], labels: list[int], size: int, mean, std, gpu: bool, dtype: types.DALIDataType):
    encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="reader")
    images = fn.resize(decode(encoded, gpu), resize_shorter=size, antialias=True)
    images = fn.crop_mirror_normalize(images, crop=[size, size], dtype=dtype, output_layout="HWC",
                                      mean=[255 * m for m in mean], std=[255 * s for s in std])
    return images, label


def _dali_device(device: torch.device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _to_torch(x: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """NHWC from DALI -> N×3×H×W; the permute is a zero-copy channels_last view."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).to(dtype)
    return x if channels_last else x.contiguous()


class DaliTwoViewLoader:
    """TwoViewLoader over DALI. The epoch's order is ours (shard_indices, as torchvision), so each
    epoch builds a pipeline over exactly len(self) full batches of this rank's files."""

    def __init__(self, files: ImageList, recipe: TwoViewRecipe, batch_size: int, *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int, world_size: int,
                 seed: int) -> None:
        self.images, self.recipe, self.batch_size = files, recipe, batch_size
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.num_threads, self.rank, self.world_size, self.seed = max(1, num_workers), rank, world_size, seed
        self.device_id = _dali_device(self.device)
        self.epoch, self.skipped = 0, 0
        self.bad: set[str] = set()  # files that failed to decode in DALI; replaced in later epochs
        self.steps = len(shard_indices(len(files), batch_size, rank, world_size, seed, 0)) // batch_size

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_files(self) -> list[str]:
        """This rank's files for the current epoch, in reading order."""
        idx = shard_indices(len(self.images), self.batch_size, self.rank, self.world_size, self.seed, self.epoch)
        return self._substitute([self.images.files[i] for i in idx])

    def _substitute(self, paths: list[str]) -> list[str]:
        """Replace known-bad files by the next good file of the list (deterministic), counting each."""
        if not self.bad:
            return paths
        good = [p for p in paths if p not in self.bad]
        if not good:
            raise RuntimeError("every file of this epoch failed to decode; rescan with verify=True")
        out = []
        for i, p in enumerate(paths):
            if p in self.bad:
                self.skipped += 1
                p = good[i % len(good)]
            out.append(p)
        return out

    def _iterator(self, paths: list[str], first_step: int) -> DALIGenericIterator:
        pipe = two_view_pipeline(paths, self.recipe, self.batch_size, device_id=self.device_id,
                                 num_threads=self.num_threads, dtype=self.dtype,
                                 seed=self.seed * 1_000_003 + self.epoch * 1009 + self.rank * 7 + first_step)
        return DALIGenericIterator(pipe, ["q", "k"], reader_name="reader", auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.DROP)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        paths, step, it = self.epoch_files(), 0, None
        while step < self.steps:
            try:
                if it is None:  # the iterator's constructor already runs the first batch
                    it = self._iterator(paths[step * self.batch_size :], step)
                out = next(it)[0]
            except StopIteration:
                break
            except RuntimeError as e:  # DALI cannot skip a file mid-run: find it, replace it, rebuild
                it = None
                paths = self._recover(paths, step, e)
                continue
            step += 1
            yield (_to_torch(out["q"], self.device, self.dtype, self.channels_last),
                   _to_torch(out["k"], self.device, self.dtype, self.channels_last))

    def _recover(self, paths: list[str], step: int, error: Exception) -> list[str]:
        rest = paths[step * self.batch_size :]
        with ThreadPoolExecutor(max_workers=8) as pool:
            reasons = list(pool.map(decode_check, rest))
        bad = {p for p, r in zip(rest, reasons) if r is not None}
        if not bad:
            raise RuntimeError(f"DALI failed but every remaining file decodes with PIL: {error}") from error
        log.warning("DALI failed to decode %d files (first: %s); replacing them", len(bad), sorted(bad)[:3])
        self.bad |= bad
        return paths[: step * self.batch_size] + self._substitute(rest)


class DaliEvalLoader:
    """(x, labels) over rank's strided shard of the split: resize shorter side, center crop."""

    def __init__(self, files: ImageList, size: int, mean, std, batch_size: int, *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int, world_size: int) -> None:
        shard = list(range(rank, len(files), world_size))
        self.files = [files.files[i] for i in shard]
        self.labels = [files.labels[i] for i in shard]
        self.size, self.mean, self.std, self.batch_size = size, mean, std, batch_size
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.num_threads, self.device_id, self.skipped = max(1, num_workers), _dali_device(self.device), 0

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = _eval(self.files, self.labels, self.size, self.mean, self.std, self.device_id is not None,
                     output_dtype(self.dtype), batch_size=self.batch_size, num_threads=self.num_threads,
                     device_id=self.device_id, seed=0, exec_dynamic=True)
        it = DALIGenericIterator(pipe, ["x", "y"], reader_name="reader", auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.PARTIAL)
        for out in it:
            x, y = out[0]["x"], out[0]["y"]
            yield _to_torch(x, self.device, self.dtype, self.channels_last), y.view(-1).long().to(self.device)



# --- WebDataset shards -------------------------------------------------------------------------

def _wds_reader(tars: list[str], indexes: list[str], labeled: bool, **kw):
    """fn.readers.webdataset over our indexes: image (+ .cls) outputs; a missing image is an error."""
    exts = [";".join(IMAGE_EXTS)] + (["cls"] if labeled else [])
    out = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=exts, case_sensitive_extensions=False,
                                missing_component_behavior="error", name="reader", **kw)
    return out if isinstance(out, (list, tuple)) else [out]


@pipeline_def(enable_conditionals=True)
def _two_view_wds(tars: list[str], indexes: list[str], recipe: TwoViewRecipe, gpu: bool,
                  dtype: types.DALIDataType, shard_id: int, num_shards: int, buffer: int):
    encoded = _wds_reader(tars, indexes, False, shard_id=shard_id, num_shards=num_shards,
                          random_shuffle=True, initial_fill=buffer)[0]
    images = decode(encoded, gpu)
    return augment_view(images, recipe.query, dtype), augment_view(images, recipe.key, dtype)


class DaliShardTwoViewLoader:
    """TwoViewLoader over WebDataset shards. Each epoch permutes the shard order (seed + epoch, the
    same on every rank); DALI then gives rank r the r-th contiguous 1/world_size slice of the samples
    and shuffles it through a buffer of `shuffle_buffer` samples, so ranks read disjoint data."""

    def __init__(self, files: ShardList, recipe: TwoViewRecipe, batch_size: int, *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int = SHUFFLE_BUFFER) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shards, self.recipe, self.batch_size, self.buffer = files, recipe, batch_size, shuffle_buffer
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.num_threads, self.rank, self.world_size, self.seed = max(1, num_workers), rank, world_size, seed
        self.device_id = _dali_device(self.device)
        self.epoch, self.skipped = 0, 0
        self.steps = len(files) // world_size // batch_size  # every rank's slice holds >= len // world
        if self.steps == 0:
            raise ValueError(f"{len(files)} images cannot fill one batch of {batch_size} on each of "
                             f"{world_size} ranks; lower batch_size or add shards")

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_shards(self) -> tuple[list[str], list[str]]:
        """(tars, indexes) in this epoch's order."""
        order = self.shards.epoch_order(self.seed, self.epoch)
        return [self.shards.tars[i] for i in order], [self.shards.indexes[i] for i in order]

    def _iterator(self, first_step: int) -> DALIGenericIterator:
        tars, indexes = self.epoch_shards()
        pipe = _two_view_wds(tars, indexes, self.recipe, self.device_id is not None, output_dtype(self.dtype),
                             self.rank, self.world_size, self.buffer, batch_size=self.batch_size,
                             num_threads=self.num_threads, device_id=self.device_id,
                             seed=(self.seed * 1_000_003 + self.epoch * 1009 + self.rank * 7 + first_step) % 2**31,
                             prefetch_queue_depth=2, exec_dynamic=True)
        return DALIGenericIterator(pipe, ["q", "k"], reader_name="reader", auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.DROP)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step, it = 0, None
        while step < self.steps:
            try:
                if it is None:
                    it = self._iterator(step)
                out = next(it)[0]
            except StopIteration:
                break
            except RuntimeError as e:  # a member DALI cannot decode: find it, drop it from the index, rebuild
                it = None
                self._recover(e)
                continue
            step += 1
            yield (_to_torch(out["q"], self.device, self.dtype, self.channels_last),
                   _to_torch(out["k"], self.device, self.dtype, self.channels_last))

    def _recover(self, error: Exception) -> None:
        bad = find_undecodable(self.shards)
        if not bad:
            raise RuntimeError(f"DALI failed to decode a sample but PIL decodes every indexed image under "
                               f"{self.shards.root}; re-encode the shards' images with PIL or use "
                               f"pipeline=torchvision. DALI said: {error}") from error
        n = drop_samples(self.shards, bad)
        self.skipped += n
        first = next(f"{t}:{k} ({r})" for t, b in bad.items() for k, r in b.items())
        log.warning("DALI failed to decode %d WebDataset samples (first: %s); dropped them from the index and "
                    "restarted the epoch's reader (the rest of this epoch may repeat samples)", n, first)


@pipeline_def
def _eval_wds(tars: list[str], indexes: list[str], labeled: bool, size: int, mean, std, gpu: bool,
              dtype: types.DALIDataType, shard_id: int, num_shards: int):
    out = _wds_reader(tars, indexes, labeled, shard_id=shard_id, num_shards=num_shards)
    images = fn.resize(decode(out[0], gpu), resize_shorter=size, antialias=True)
    images = fn.crop_mirror_normalize(images, crop=[size, size], dtype=dtype, output_layout="HWC",
                                      mean=[255 * m for m in mean], std=[255 * s for s in std])
    label = fn.pad(out[1], shape=[CLS_BYTES], fill_value=32) if labeled else fn.constant(idata=[32] * CLS_BYTES,
                                                                                        dtype=types.UINT8)
    return images, label


def ascii_ints(x: torch.Tensor) -> torch.Tensor:
    """N×B uint8 ASCII (digits, padding spaces/newlines) -> N int64."""
    d = x.long() - ord("0")
    value = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for j in range(x.shape[1]):
        digit = (d[:, j] >= 0) & (d[:, j] <= 9)
        value = torch.where(digit, value * 10 + d[:, j], value)
    return value


class DaliShardEvalLoader:
    """(x, labels) over rank's contiguous slice of the shards, in index order; labels from .cls (else 0)."""

    def __init__(self, files: ShardList, size: int, mean, std, batch_size: int, *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int, world_size: int) -> None:
        self.shards, self.size, self.mean, self.std, self.batch_size = files, size, mean, std, batch_size
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.num_threads, self.device_id, self.skipped = max(1, num_workers), _dali_device(self.device), 0
        self.rank, self.world_size = rank, world_size
        n = len(files)
        self.count = n * (rank + 1) // world_size - n * rank // world_size  # DALI's slice of shard_id

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = _eval_wds(self.shards.tars, self.shards.indexes, self.shards.labels is not None, self.size,
                         self.mean, self.std, self.device_id is not None, output_dtype(self.dtype), self.rank,
                         self.world_size, batch_size=self.batch_size, num_threads=self.num_threads,
                         device_id=self.device_id, seed=0, exec_dynamic=True)
        it = DALIGenericIterator(pipe, ["x", "y"], reader_name="reader", auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.PARTIAL)
        for out in it:
            x, y = out[0]["x"], out[0]["y"]
            yield _to_torch(x, self.device, self.dtype, self.channels_last), ascii_ints(y).to(self.device)
