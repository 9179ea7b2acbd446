"""DALI loaders: one base runs a pipeline into torch; readers (image files, WebDataset shards) and
outputs (two views, labelled linear-probe views, eval crops) are the subclasses."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .dali_graph import (FileReader, RandomStates, Reader, ShardReader, eval_pipeline, labelled_pipeline,
                         two_view_pipeline)
from .folder import ImageList, check_start, decode_check, epoch_steps, shard_indices
from .recipes import LinearRecipe, TwoViewRecipe
from .seeds import dali_seed, dali_states
from .webdataset import MemberIndex, MemberReader, ShardEpoch, ShardList, drop_samples, find_undecodable

log = logging.getLogger(__name__)
SHUFFLE_BUFFER = 4096  # samples of a shuffle window over tar shards (~0.5 GB of reads at ImageNet sizes)


def dali_device(device: torch.device) -> int | None:
    """DALI's device_id for a torch device: None on the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class DaliLoader:
    """What every DALI loader shares: placement, threads, the skip count, pipeline -> torch batches."""

    outputs: tuple[str, str]
    last_batch: LastBatchPolicy

    def __init__(self, batch_size: int, *, device: torch.device, dtype: torch.dtype, channels_last: bool,
                 num_workers: int) -> None:
        self.batch_size, self.device = batch_size, torch.device(device)
        self.dtype, self.channels_last = dtype, channels_last
        self.num_threads, self.device_id, self.skipped = max(1, num_workers), dali_device(self.device), 0

    def _iterator(self, pipe: Pipeline, reader_name: str | None = "reader") -> DALIGenericIterator:
        """Batches until the reader's epoch ends, or (reader_name None) until the source stops."""
        return DALIGenericIterator(pipe, list(self.outputs), reader_name=reader_name, auto_reset=False,
                                   last_batch_policy=self.last_batch)

    def _to_torch(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC from DALI -> N×3×H×W; the permute is a zero-copy channels_last view."""
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(self.dtype)
        return x if self.channels_last else x.contiguous()


class DaliTrainBase(DaliLoader):
    """Training loader skeleton: `steps` full batches per epoch, from batch `start` on (set_epoch).
    Batch `step` reads the files the epoch's order puts there and its random operators draw from
    states seeded by (seed, epoch, rank, step) (RandomStates): a pipeline started at any batch
    gives what one started at 0 gives from there, without reading the batches before it. A file
    DALI cannot decode is handed to the reader's _recover, then the pipeline is rebuilt at the
    same step. Two views by default; DaliLabelled changes the outputs."""

    outputs, last_batch = ("q", "k"), LastBatchPolicy.DROP
    labelled = False  # whether the readers carry labels

    def __init__(self, recipe: TwoViewRecipe | LinearRecipe, batch_size: int, steps: int, *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int, world_size: int,
                 seed: int) -> None:
        super().__init__(batch_size, device=device, dtype=dtype, channels_last=channels_last, num_workers=num_workers)
        self.recipe, self.steps, self.epoch, self.start = recipe, steps, 0, 0
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Read epoch `epoch` from its batch `start` on; the batches before it are not read."""
        self.epoch, self.start = epoch, check_start(start, self.steps)

    def _start_epoch(self) -> None:
        """Fix what this epoch reads, before its first pipeline."""

    def _reader(self, step: int) -> Reader:
        """The reader of a pipeline that starts at `step` of the epoch."""
        raise NotImplementedError

    def _recover(self, step: int, error: Exception) -> None:
        """Find and take out what DALI failed to decode, or raise."""
        raise NotImplementedError

    def _states(self, step: int) -> RandomStates:
        """The random operators' states of a pipeline that starts at `step`: its i-th batch's are step + i's."""
        seed, epoch, rank = self.seed, self.epoch, self.rank
        return RandomStates(lambda i, n: dali_states(seed, epoch, rank, step + i, n), self.batch_size)

    def _pipeline(self, reader: Reader, step: int) -> Pipeline:
        return two_view_pipeline(reader, self.recipe, self.batch_size, device_id=self.device_id,
                                 num_threads=self.num_threads, seed=dali_seed(self.seed, self.epoch, self.rank, step),
                                 dtype=self.dtype, states=self._states(step))

    def _batch(self, out: dict, reader: Reader) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_torch(out["q"]), self._to_torch(out["k"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._start_epoch()
        step, it, reader = self.start, None, None
        while step < self.steps:
            try:
                if it is None:  # the iterator's constructor already runs the first batch
                    reader = self._reader(step)
                    it = self._iterator(self._pipeline(reader, step), reader.reader_name)
                out = next(it)[0]
            except StopIteration:
                break
            except RuntimeError as e:  # DALI cannot skip a file mid-run: take it out and rebuild
                it = None
                self._recover(step, e)
                continue
            step += 1
            yield self._batch(out, reader)


class DaliLabelled:
    """Mixin for a DaliTrainBase reader subclass: (x, labels) batches of the linear probe's
    training view (LabelledLoader), the labels read with the images."""

    outputs = ("x", "y")
    labelled = True

    def _pipeline(self, reader: Reader, step: int) -> Pipeline:
        return labelled_pipeline(reader, self.recipe, self.batch_size, device_id=self.device_id,
                                 num_threads=self.num_threads, seed=dali_seed(self.seed, self.epoch, self.rank, step),
                                 dtype=self.dtype, states=self._states(step))

    def _batch(self, out: dict, reader: Reader) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_torch(out["x"]), reader.to_labels(out["y"]).to(self.device, non_blocking=True)


class DaliTwoViewLoader(DaliTrainBase):
    """TwoViewLoader over image files. The epoch's order is ours (shard_indices, as torchvision), so
    each epoch builds a pipeline over exactly len(self) full batches of this rank's files."""

    def __init__(self, files: ImageList, recipe: TwoViewRecipe, batch_size: int, *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int, world_size: int,
                 seed: int) -> None:
        super().__init__(recipe, batch_size, epoch_steps(len(files), batch_size, rank, world_size), device=device,
                         dtype=dtype, channels_last=channels_last, num_workers=num_workers, rank=rank,
                         world_size=world_size, seed=seed)
        self.images, self.paths = files, []
        self.bad: set[str] = set()  # files that failed to decode in DALI; replaced in later epochs
        # a substitute brings its own label: labels follow the paths actually read
        self.label_of = dict(zip(files.files, files.labels)) if self.labelled else None

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

    def _start_epoch(self) -> None:
        self.paths = self.epoch_files()

    def _reader(self, step: int) -> Reader:
        paths = self.paths[step * self.batch_size :]
        return FileReader(paths, [self.label_of[p] for p in paths] if self.labelled else None)

    def _recover(self, step: int, error: Exception) -> None:
        done, rest = self.paths[: step * self.batch_size], self.paths[step * self.batch_size :]
        with ThreadPoolExecutor(max_workers=8) as pool:
            reasons = list(pool.map(decode_check, rest))
        bad = {p for p, r in zip(rest, reasons) if r is not None}
        if not bad:
            raise RuntimeError(f"DALI failed but every remaining file decodes with PIL: {error}") from error
        log.warning("DALI failed to decode %d files (first: %s); replacing them", len(bad), sorted(bad)[:3])
        self.bad |= bad
        self.paths = done + self._substitute(rest)


class MemberSource(Reader):
    """Encoded images (and labels) of tar members through an external source: batch `step` of
    the epoch holds the members at positions step·N .. step·N + N - 1 of `epoch` (ShardEpoch),
    read by offset here, from batch `start` until `steps` (then StopIteration ends the epoch)."""

    reader_name = None  # the iterator runs until the source stops

    def __init__(self, epoch: ShardEpoch, members: MemberIndex, labels: list[int] | None, batch_size: int,
                 start: int, steps: int) -> None:
        self.epoch, self.members, self.labels, self.batch_size = epoch, members, labels, batch_size
        self.start, self.steps, self.read = start, steps, MemberReader()

    def __call__(self) -> list:
        if self.labels is None:
            return [fn.external_source(source=self.batch, batch=True, batch_info=True, dtype=types.UINT8)]
        return list(fn.external_source(source=self.batch, batch=True, batch_info=True, num_outputs=2,
                                       dtype=[types.UINT8, types.INT32]))

    def batch(self, info) -> list[np.ndarray] | tuple[list[np.ndarray], list[np.ndarray]]:
        step = self.start + info.iteration
        if step >= self.steps:
            raise StopIteration
        samples = self.epoch.samples(step * self.batch_size, (step + 1) * self.batch_size)
        data = [np.frombuffer(self.read(*self.members(int(g))), dtype=np.uint8) for g in samples]
        if self.labels is None:
            return data
        return data, [np.array([self.labels[g]], dtype=np.int32) for g in samples]

    def label(self, outputs: list):
        return outputs[1]

    def to_labels(self, y: torch.Tensor) -> torch.Tensor:
        return y.view(-1).long()


class DaliShardTwoViewLoader(DaliTrainBase):
    """TwoViewLoader over WebDataset shards. Each epoch permutes the shard order (seed + epoch, the
    same on every rank); rank r reads the r-th contiguous 1/world_size slice of the samples in that
    order, shuffled inside windows of `shuffle_buffer` samples (ShardEpoch), so ranks read disjoint
    data and any batch's members are known without reading the ones before it."""

    def __init__(self, files: ShardList, recipe: TwoViewRecipe, batch_size: int, *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int = SHUFFLE_BUFFER) -> None:
        # every rank's slice holds >= len // world_size samples
        steps = epoch_steps(len(files), batch_size, rank, world_size, unit="shards")
        if self.labelled and files.labels is None:
            raise ValueError(f"the shards under {files.root!r} have no .cls labels; a labelled loader needs them")
        super().__init__(recipe, batch_size, steps, device=device, dtype=dtype, channels_last=channels_last,
                         num_workers=num_workers, rank=rank, world_size=world_size, seed=seed)
        self.shards, self.buffer = files, shuffle_buffer
        self.order: ShardEpoch | None = None
        self.members: MemberIndex | None = None

    def _start_epoch(self) -> None:
        self.order = ShardEpoch(self.shards.counts, self.rank, self.world_size, self.seed, self.epoch, self.buffer)
        self.members = MemberIndex(self.shards)

    def _reader(self, step: int) -> Reader:
        return MemberSource(self.order, self.members, self.shards.labels if self.labelled else None,
                            self.batch_size, step, self.steps)

    def _recover(self, step: int, error: Exception) -> None:
        bad = find_undecodable(self.shards)
        if not bad:
            raise RuntimeError(f"DALI failed to decode a sample but PIL decodes every indexed image under "
                               f"{self.shards.root}; re-encode the shards' images with PIL or use "
                               f"pipeline=torchvision. DALI said: {error}") from error
        n = drop_samples(self.shards, bad)
        self.skipped += n
        self._start_epoch()  # the slices move by the dropped count
        first = next(f"{t}:{k} ({r})" for t, b in bad.items() for k, r in b.items())
        log.warning("DALI failed to decode %d WebDataset samples (first: %s); dropped them from the index and "
                    "went on at the same step (the rest of this epoch may repeat samples)", n, first)


class DaliLabelledLoader(DaliLabelled, DaliTwoViewLoader):
    """LabelledLoader over image files: DaliTwoViewLoader's epoch order, rank shards and bad-file
    replacement (a substitute file brings its own label)."""


class DaliShardLabelledLoader(DaliLabelled, DaliShardTwoViewLoader):
    """LabelledLoader over WebDataset shards with .cls labels: DaliShardTwoViewLoader's sharding,
    buffer shuffle and bad-sample handling."""


class DaliEvalBase(DaliLoader):
    """(x, labels) batches of center crops over `count` samples, the last batch partial."""

    outputs, last_batch = ("x", "y"), LastBatchPolicy.PARTIAL

    def __init__(self, reader: Reader, count: int, size: int, mean, std, batch_size: int, *,
                 device: torch.device, dtype: torch.dtype, channels_last: bool, num_workers: int,
                 resize: int | None = None) -> None:
        super().__init__(batch_size, device=device, dtype=dtype, channels_last=channels_last, num_workers=num_workers)
        self.reader, self.count, self.size, self.mean, self.std = reader, count, size, mean, std
        self.resize = resize

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = eval_pipeline(self.reader, self.size, self.mean, self.std, self.batch_size, device_id=self.device_id,
                             num_threads=self.num_threads, dtype=self.dtype, resize=self.resize)
        for out in self._iterator(pipe):
            yield self._to_torch(out[0]["x"]), self.reader.to_labels(out[0]["y"]).to(self.device)


class DaliEvalLoader(DaliEvalBase):
    """(x, labels) over rank's strided shard of the split: resize shorter side, center crop."""

    def __init__(self, files: ImageList, size: int, mean, std, batch_size: int, *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int, world_size: int,
                 resize: int | None = None) -> None:
        shard = range(rank, len(files), world_size)
        reader = FileReader([files.files[i] for i in shard], [files.labels[i] for i in shard])
        super().__init__(reader, len(shard), size, mean, std, batch_size, device=device, dtype=dtype,
                         channels_last=channels_last, num_workers=num_workers, resize=resize)


class DaliShardEvalLoader(DaliEvalBase):
    """(x, labels) over rank's contiguous slice of the shards, in index order; labels from .cls (else 0)."""

    def __init__(self, files: ShardList, size: int, mean, std, batch_size: int, *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, num_workers: int, rank: int, world_size: int,
                 resize: int | None = None) -> None:
        n = len(files)
        count = n * (rank + 1) // world_size - n * rank // world_size  # DALI's slice of shard_id
        reader = ShardReader(files.tars, files.indexes, labeled=files.labels is not None, shard_id=rank,
                             num_shards=world_size)
        super().__init__(reader, count, size, mean, std, batch_size, device=device, dtype=dtype,
                         channels_last=channels_last, num_workers=num_workers, resize=resize)
