"""The kNN monitor of a run: the random-init baseline, per-epoch and final kNN top-1 (rank 0
measures, every process waits)."""
from __future__ import annotations

import copy
import logging
from typing import Optional

import torch.distributed as dist

from fastmoco.build import Runtime
from fastmoco.config import TrainConfig
from fastmoco.data import build_knn_loaders
from fastmoco.distributed import is_distributed
from fastmoco.knn import knn_accuracy, recalibrate_bn_
from fastmoco.model import MoCo

log = logging.getLogger("fastmoco")


class KnnMonitor:
    def __init__(self, cfg: TrainConfig, rt: Runtime, results: dict) -> None:
        self.cfg, self.rt = cfg.knn, rt
        self.results = results  # Progress.knn: tag → top-1, saved in checkpoints
        self.loaders = None
        if cfg.knn.enabled:
            self.loaders = build_knn_loaders(
                cfg.data, cfg.pipeline, cfg.knn.batch_size, device=rt.device, dtype=rt.dtype,
                channels_last=cfg.run.channels_last, seed=cfg.run.seed,
                calibration_images=cfg.knn.init_bn_calibration_images if cfg.knn.at_start else 0)

    def due(self, epoch: int) -> bool:
        return self.loaders is not None and epoch % self.cfg.every_epochs == 0

    def __call__(self, tag: str, moco: MoCo) -> Optional[float]:
        """kNN top-1 of the query encoder (head or backbone features), recorded under `tag`."""
        if self.loaders is None:
            return None
        acc = None
        if self.rt.rank == 0:
            encoder = moco.query_encoder if self.cfg.features == "head" else moco.backbone
            how = ""
            if tag == "init" and self.loaders.calibration is not None:
                # The random network with BN statistics of the data, not torch's defaults: a copy,
                # so that training starts from the state it would have started from.
                encoder = copy.deepcopy(encoder)
                seen = recalibrate_bn_(encoder, self.loaders.calibration, self.rt.device, self.rt.dtype)
                self.results["init_bn_images"] = seen
                how = f", BN statistics re-estimated on {seen} train images"
            acc = knn_accuracy(encoder, self.loaders.bank, self.loaders.eval,
                               self.loaders.num_classes, self.rt.device, self.rt.dtype,
                               self.cfg.k, self.cfg.temperature)
            self.results[tag] = acc
            log.info("kNN top-1 (%s, %s features, k=%d%s): %.2f%%", tag, self.cfg.features,
                     self.cfg.k, how, acc)
        if is_distributed():
            dist.barrier()
        return acc
