"""DALI graphs: the readers, the two-view, the labelled (linear-probe training) and the eval
pipeline; one function builds the CPU graph (device_id=None) and the GPU graph (mixed decode), for
the loaders and for graph_check alike."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline

from .recipes import SOLARIZE_THRESHOLD, LinearRecipe, TwoViewRecipe, ViewRecipe, eval_resize
from .webdataset import IMAGE_EXTS

HUE_DEGREES = 360.0  # torchvision hue factor x is x of a full turn; DALI's hue is in degrees
CLS_BYTES = 16  # a .cls member is padded to this many ASCII bytes and parsed by torch


def output_dtype(dtype: torch.dtype) -> types.DALIDataType:
    """DALI output type for a training dtype: bf16 is produced as fp16 (exact enough) and cast by torch."""
    return types.FLOAT if dtype == torch.float32 else types.FLOAT16


def decode(encoded, gpu: bool):
    """Decode to RGB uint8 HWC: "mixed" (nvJPEG, output on the GPU) or "cpu"."""
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)


class RandomStates:
    """Per-batch states of a graph's random operators, fed from outside the pipeline through
    DALI's `_random_state` argument (as DALI's dynamic mode feeds them): the k-th random operator
    built reads row k of `draw(iteration, n)` (n×7 uint32 Philox states) at the pipeline's
    iteration-th batch, the same row for every sample (DALI derives each sample's stream from it
    and the sample's place in the batch). A batch's draws are then a function of `draw`'s answer
    for it, not of the batches the pipeline ran before: a pipeline started at batch b gives the
    batches one started at 0 gives from b on."""

    def __init__(self, draw: Callable[[int, int], np.ndarray], batch_size: int) -> None:
        self.draw, self.batch_size, self.node, self.count = draw, batch_size, None, 0

    def attach(self) -> None:
        """The external source of the states, made in the graph being defined, before any use."""
        self.node = fn.external_source(source=self, batch=True, batch_info=True, dtype=types.UINT32)

    def next(self) -> dict:
        self.count += 1
        return {"_random_state": self.node[self.count - 1]}

    def __call__(self, info) -> list[np.ndarray]:
        states = np.ascontiguousarray(self.draw(info.iteration, self.count), dtype=np.uint32)
        return [states] * self.batch_size


_states: RandomStates | None = None  # of the graph being defined; None: operators seeded by the pipeline


def _use_states(states: RandomStates | None) -> None:
    global _states
    _states = states
    if states is not None:
        states.attach()


def _rand() -> dict:
    """The next random operator's `_random_state` argument, or none."""
    return _states.next() if _states is not None else {}


def _coin(p: float):
    return fn.cast(fn.random.coin_flip(probability=p, **_rand()), dtype=types.FLOAT)


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
                kw[name] = 1.0 + on * (fn.random.uniform(range=[max(0.0, 1 - x), 1 + x], **_rand()) - 1.0)
        if h > 0:
            kw["hue"] = on * fn.random.uniform(range=[-h * HUE_DEGREES, h * HUE_DEGREES], **_rand())
    if view.grayscale_p > 0:
        keep = 1.0 - _coin(view.grayscale_p)
        kw["saturation"] = kw["saturation"] * keep if "saturation" in kw else keep
    return fn.color_twist(images, **kw) if kw else images


def blur(images, view: ViewRecipe):
    """Gaussian blur, sigma uniform in blur_sigma, as the authors' PIL GaussianBlur(radius=sigma).

    No fixed window: DALI sizes each sample's window from its sigma (2·ceil(3σ)+1, 99.7 % of the
    kernel's mass). A 23-px window (10 % of 224) holds the same kernel padded with near-zero taps
    and cost twice the time of the whole rest of the view on the CPU."""
    return fn.gaussian_blur(images, sigma=fn.random.uniform(range=list(view.blur_sigma), **_rand()))


def solarize(images):
    """Invert pixels >= 128 (PIL ImageOps.solarize)."""
    high = images >= SOLARIZE_THRESHOLD
    return fn.cast(images + high * (255 - 2 * images), dtype=types.UINT8)


def augment_view(images, view: ViewRecipe, dtype: types.DALIDataType):
    """One view: crop, jitter+gray, blur, solarize, then flip+normalise to HWC `dtype`."""
    images = fn.random_resized_crop(images, size=[view.size, view.size], random_area=list(view.crop_scale),
                                    random_aspect_ratio=list(view.crop_ratio), antialias=True, **_rand())
    images = color(images, view)
    if view.blur_p >= 1:
        images = blur(images, view)
    elif view.blur_p > 0:
        if fn.random.coin_flip(probability=view.blur_p, dtype=types.BOOL, **_rand()):
            images = blur(images, view)
    if view.solarize_p >= 1:
        images = solarize(images)
    elif view.solarize_p > 0:
        if fn.random.coin_flip(probability=view.solarize_p, dtype=types.BOOL, **_rand()):
            images = solarize(images)
    return flip_normalize(images, view.flip_p, view.mean, view.std, dtype)


def flip_normalize(images, flip_p: float, mean, std, dtype: types.DALIDataType):
    """Horizontal flip with probability flip_p, then (x/255 - mean) / std as HWC `dtype`."""
    mirror = fn.random.coin_flip(probability=flip_p, **_rand()) if flip_p > 0 else 0
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout="HWC", mirror=mirror,
                                    mean=[255 * m for m in mean], std=[255 * s for s in std])


def pad_crop(encoded, images, size: int, padding: int):
    """torchvision's RandomCrop(size, padding) with zero fill, as one slice: the window's top-left
    corner in the padded image is uniform over its integer positions, 0..H+2p-size (and W), and
    the pixels outside the image come out 0. The image shape is read from the encoded bytes on the
    CPU (the slice's window is a CPU argument input, the pixels stay on the decoder's device)."""
    hw = fn.peek_image_shape(encoded)[0:2]  # H, W (EXIF orientation applied, as the decoder)
    room = dmath.max(hw + (2 * padding - size), 0)  # a smaller image is padded at the bottom/right too
    k = dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0], shape=[2], **_rand()) * (room + 1)), room)
    return fn.slice(images, start=fn.cast(k - padding, dtype=types.INT32), shape=[size, size], axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=0)


def linear_view(encoded, images, recipe: LinearRecipe, dtype: types.DALIDataType):
    """The linear probe's training view: the two-view crop + flip ("rrc") or pad_crop + flip."""
    if recipe.kind == "rrc":
        return augment_view(images, recipe.view(), dtype)
    images = pad_crop(encoded, images, recipe.size, recipe.padding)
    return flip_normalize(images, recipe.flip_p, recipe.mean, recipe.std, dtype)


def _half_to_even(n):
    """Python's round(n / 2) for an integer DataNode n >= 0 (ties to even), as torchvision's CenterCrop."""
    k = n // 2
    return k + (n - 2 * k) * (k - 2 * (k // 2))


def center_crop(encoded, images, size: int, mean, std, dtype: types.DALIDataType, resize: int | None = None):
    """torchvision's Resize(eval_resize(size, resize)) + CenterCrop(size), normalised to HWC `dtype`
    (eval): 256 then 224 at 224; below 128 px the resize is to `size` itself, an identity on 32-px
    CIFAR. The output size (shorter side s, longer int(s * long / short)) and the crop's corner
    (round((n - size) / 2), ties to even) are torchvision's integers, computed on the CPU from the
    encoded image's shape, so both backends cut the same window."""
    short = eval_resize(size, resize)
    shape = fn.peek_image_shape(encoded)  # H, W, C (EXIF orientation applied, as the decoder)
    h, w = shape[0], shape[1]
    tall = h >= w  # torchvision: the width is the short side when w <= h
    new_h = tall * (short * h // w) + (1 - tall) * short
    new_w = tall * short + (1 - tall) * (short * w // h)
    images = fn.resize(images, resize_y=fn.cast(new_h, dtype=types.FLOAT), resize_x=fn.cast(new_w, dtype=types.FLOAT),
                       antialias=True)
    start = fn.stack(_half_to_even(new_h - size), _half_to_even(new_w - size))
    images = fn.slice(images, start=fn.cast(start, dtype=types.INT32), shape=[size, size], axis_names="HW")
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout="HWC",
                                    mean=[255 * m for m in mean], std=[255 * s for s in std])


def ascii_ints(x: torch.Tensor) -> torch.Tensor:
    """N×B uint8 ASCII (digits, padding spaces/newlines) -> N int64."""
    d = x.long() - ord("0")
    value = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for j in range(x.shape[1]):
        digit = (d[:, j] >= 0) & (d[:, j] <= 9)
        value = torch.where(digit, value * 10 + d[:, j], value)
    return value


class Reader:
    """Adds the graph's reader (named "reader": the iterator sizes the epoch by it); knows its labels."""

    reader_name = "reader"  # None for a source that ends the epoch itself (StopIteration)

    def __call__(self) -> list:
        raise NotImplementedError

    def label(self, outputs: list):
        raise NotImplementedError

    def to_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The label output of a batch, as torch hands it over, -> N int64."""
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

    def to_labels(self, y: torch.Tensor) -> torch.Tensor:
        return y.view(-1).long()


@dataclass
class ShardReader(Reader):
    """fn.readers.webdataset over our indexes: image (+ .cls) members of rank shard_id's contiguous
    slice, in order (the eval loaders; training reads shards through dali.MemberSource); a missing
    image is an error."""

    tars: list[str]
    indexes: list[str]
    labeled: bool
    shard_id: int
    num_shards: int

    def __call__(self) -> list:
        exts = [";".join(IMAGE_EXTS)] + (["cls"] if self.labeled else [])
        out = fn.readers.webdataset(paths=self.tars, index_paths=self.indexes, ext=exts,
                                    case_sensitive_extensions=False, missing_component_behavior="error",
                                    name="reader", shard_id=self.shard_id, num_shards=self.num_shards)
        return out if isinstance(out, (list, tuple)) else [out]

    def label(self, outputs: list):
        """.cls padded with spaces to CLS_BYTES ASCII bytes (torch parses them); blanks (0) if unlabeled."""
        if self.labeled:
            return fn.pad(outputs[1], shape=[CLS_BYTES], fill_value=32)
        return fn.constant(idata=[32] * CLS_BYTES, dtype=types.UINT8)

    def to_labels(self, y: torch.Tensor) -> torch.Tensor:
        return ascii_ints(y)


@pipeline_def(enable_conditionals=True)
def _two_view(read: Reader, recipe: TwoViewRecipe, gpu: bool, dtype: types.DALIDataType, states: RandomStates | None):
    _use_states(states)
    images = decode(read()[0], gpu)
    return augment_view(images, recipe.query, dtype), augment_view(images, recipe.key, dtype)


def two_view_pipeline(files: Sequence[str] | Reader, recipe: TwoViewRecipe, batch_size: int, *,
                      device_id: int | None, num_threads: int = 2, seed: int = 0,
                      dtype: torch.dtype = torch.float32, gpu: bool | None = None,
                      states: RandomStates | None = None) -> Pipeline:
    """Two views of what `files` reads (paths, in order, or a Reader): device_id=None -> all-CPU
    graph, int -> mixed decode + GPU ops. The random operators draw from `states` (per batch),
    else from streams seeded by `seed` once for the pipeline.

    `gpu` overrides the placement (gpu=True with device_id=None builds a GPU graph that can be
    serialized, not run, without CUDA: see graph_check)."""
    read = files if isinstance(files, Reader) else FileReader(list(files))
    gpu = device_id is not None if gpu is None else gpu
    return _define(_two_view, read, recipe, gpu, output_dtype(dtype), states, batch_size=batch_size,
                   num_threads=num_threads, device_id=device_id, seed=seed)


def _define(graph, *args, seed: int, **kw) -> Pipeline:
    """A training graph (its last argument the RandomStates its body installs), seeded and
    prefetched alike; the module's states are cleared after it, whatever happens."""
    try:
        return graph(*args, seed=seed % 2**31, prefetch_queue_depth=2, exec_dynamic=True, **kw)
    finally:
        _use_states(None)


@pipeline_def
def _labelled(read: Reader, recipe: LinearRecipe, gpu: bool, dtype: types.DALIDataType, states: RandomStates | None):
    _use_states(states)
    out = read()
    return linear_view(out[0], decode(out[0], gpu), recipe, dtype), read.label(out)


def labelled_pipeline(read: Reader, recipe: LinearRecipe, batch_size: int, *, device_id: int | None,
                      num_threads: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32,
                      gpu: bool | None = None, states: RandomStates | None = None) -> Pipeline:
    """(linear-probe training views, labels) of what `read` reads (a Reader with labels); placed
    and seeded as two_view_pipeline (labels stay on the CPU)."""
    gpu = device_id is not None if gpu is None else gpu
    return _define(_labelled, read, recipe, gpu, output_dtype(dtype), states, batch_size=batch_size,
                   num_threads=num_threads, device_id=device_id, seed=seed)


@pipeline_def
def _eval(read: Reader, size: int, mean, std, gpu: bool, dtype: types.DALIDataType, resize: int | None):
    out = read()
    return center_crop(out[0], decode(out[0], gpu), size, mean, std, dtype, resize), read.label(out)


def eval_pipeline(read: Reader, size: int, mean, std, batch_size: int, *, device_id: int | None,
                  num_threads: int = 2, dtype: torch.dtype = torch.float32, resize: int | None = None,
                  gpu: bool | None = None) -> Pipeline:
    """(center crops, labels) of what `read` reads, in order; placed as two_view_pipeline."""
    gpu = device_id is not None if gpu is None else gpu
    return _eval(read, size, mean, std, gpu, output_dtype(dtype), resize, batch_size=batch_size,
                 num_threads=num_threads, device_id=device_id, seed=0, exec_dynamic=True)
