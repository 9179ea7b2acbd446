"""DALI graphs: the readers, the two-view and the eval pipeline; one function builds the CPU graph
(device_id=None) and the GPU graph (mixed decode), for the loaders and for graph_check alike."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline

from .recipes import SOLARIZE_THRESHOLD, TwoViewRecipe, ViewRecipe
from .webdataset import IMAGE_EXTS

HUE_DEGREES = 360.0  # torchvision hue factor x is x of a full turn; DALI's hue is in degrees
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


def center_crop(images, size: int, mean, std, dtype: types.DALIDataType):
    """Resize the shorter side to `size`, center-crop `size` and normalise to HWC `dtype` (eval)."""
    images = fn.resize(images, resize_shorter=size, antialias=True)
    return fn.crop_mirror_normalize(images, crop=[size, size], dtype=dtype, output_layout="HWC",
                                    mean=[255 * m for m in mean], std=[255 * s for s in std])


class Reader:
    """Adds the graph's reader (named "reader": the iterator sizes the epoch by it); knows its labels."""

    def __call__(self) -> list:
        raise NotImplementedError

    def label(self, outputs: list):
        raise NotImplementedError


@dataclass
class FileReader(Reader):
    """fn.readers.file over `files` in this order; labels from `labels` when given."""

    files: list[str]
    labels: list[int] | None = None

    def __call__(self) -> list:
        kw = {} if self.labels is None else {"labels": self.labels}
        return fn.readers.file(files=self.files, random_shuffle=False, name="reader", **kw)

    def label(self, outputs: list):
        return outputs[1]


@dataclass
class ShardReader(Reader):
    """fn.readers.webdataset over our indexes: image (+ .cls) members of rank shard_id's contiguous
    slice, shuffled through `shuffle_buffer` samples unless None; a missing image is an error."""

    tars: list[str]
    indexes: list[str]
    labeled: bool
    shard_id: int
    num_shards: int
    shuffle_buffer: int | None = None

    def __call__(self) -> list:
        exts = [";".join(IMAGE_EXTS)] + (["cls"] if self.labeled else [])
        kw = {} if self.shuffle_buffer is None else {"random_shuffle": True, "initial_fill": self.shuffle_buffer}
        out = fn.readers.webdataset(paths=self.tars, index_paths=self.indexes, ext=exts,
                                    case_sensitive_extensions=False, missing_component_behavior="error",
                                    name="reader", shard_id=self.shard_id, num_shards=self.num_shards, **kw)
        return out if isinstance(out, (list, tuple)) else [out]

    def label(self, outputs: list):
        """.cls padded with spaces to CLS_BYTES ASCII bytes (torch parses them); blanks (0) if unlabeled."""
        if self.labeled:
            return fn.pad(outputs[1], shape=[CLS_BYTES], fill_value=32)
        return fn.constant(idata=[32] * CLS_BYTES, dtype=types.UINT8)


@pipeline_def(enable_conditionals=True)
def _two_view(read: Reader, recipe: TwoViewRecipe, gpu: bool, dtype: types.DALIDataType):
    images = decode(read()[0], gpu)
    return augment_view(images, recipe.query, dtype), augment_view(images, recipe.key, dtype)


def two_view_pipeline(files: Sequence[str] | Reader, recipe: TwoViewRecipe, batch_size: int, *,
                      device_id: int | None, num_threads: int = 2, seed: int = 0,
                      dtype: torch.dtype = torch.float32, gpu: bool | None = None) -> Pipeline:
    """Two views of what `files` reads (paths, in order, or a Reader): device_id=None -> all-CPU
    graph, int -> mixed decode + GPU ops.

    `gpu` overrides the placement (gpu=True with device_id=None builds a GPU graph that can be
    serialized, not run, without CUDA: see graph_check)."""
    read = files if isinstance(files, Reader) else FileReader(list(files))
    gpu = device_id is not None if gpu is None else gpu
    return _two_view(read, recipe, gpu, output_dtype(dtype), batch_size=batch_size, num_threads=num_threads,
                     device_id=device_id, seed=seed % 2**31, prefetch_queue_depth=2, exec_dynamic=True)


@pipeline_def
def _eval(read: Reader, size: int, mean, std, gpu: bool, dtype: types.DALIDataType):
    out = read()
    return center_crop(decode(out[0], gpu), size, mean, std, dtype), read.label(out)


def eval_pipeline(read: Reader, size: int, mean, std, batch_size: int, *, device_id: int | None,
                  num_threads: int = 2, dtype: torch.dtype = torch.float32) -> Pipeline:
    """(center crops, labels) of what `read` reads, in order; placed as two_view_pipeline."""
    return _eval(read, size, mean, std, device_id is not None, output_dtype(dtype), batch_size=batch_size,
                 num_threads=num_threads, device_id=device_id, seed=0, exec_dynamic=True)
