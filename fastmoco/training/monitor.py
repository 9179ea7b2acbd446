"""The kNN monitor of a run: the random-init baseline, per-epoch and final kNN top-1. Every
process measures on its own part of the bank and of the eval split (fastmoco.evaluation.knn
merges the neighbours across processes) and records the same value. With knn.linear_probe the same
features also fit the cached linear probe (fastmoco.evaluation.probe), recorded as probe_<tag>."""
from __future__ import annotations

import copy
import logging
from typing import Optional

import torch.nn.functional as F

from fastmoco.config import TrainConfig
from fastmoco.data import build_knn_loaders
from fastmoco.distributed import gather_rows
from fastmoco.evaluation.knn import extract_features, knn_top1, recalibrate_bn_
from fastmoco.evaluation.probe import linear_probe
from fastmoco.methods.moco import MoCo
from fastmoco.runtime import Runtime

log = logging.getLogger("fastmoco")


class KnnMonitor:
    def __init__(self, cfg: TrainConfig, rt: Runtime, results: dict) -> None:
        self.cfg, self.rt = cfg.knn, rt
        self.results = results  # RunPosition.knn: tag → top-1, saved in checkpoints
        self.loaders = None
        if cfg.knn.enabled:
            self.loaders = build_knn_loaders(
                cfg.data, cfg.pipeline, cfg.knn.batch_size, device=rt.device, dtype=rt.dtype,
                channels_last=cfg.run.channels_last, seed=cfg.run.seed, rank=rt.rank,
                world_size=rt.world_size,
                calibration_images=cfg.knn.init_bn_calibration_images if cfg.knn.at_start else 0)

    def due(self, epoch: int) -> bool:
        return self.loaders is not None and epoch % self.cfg.every_epochs == 0

    def __call__(self, tag: str, moco: MoCo) -> Optional[float]:
        """kNN top-1 of the query encoder (head or backbone features), recorded under `tag`."""
        if self.loaders is None:
            return None
        encoder = moco.query_encoder if self.cfg.features == "head" else moco.backbone
        how = ""
        if tag == "init" and self.loaders.calibration is not None:
            # The random network with BN statistics of the data, not torch's defaults: a copy,
            # so that training starts from the state it would have started from. Every process
            # re-estimates on the same images (the calibration loader is not sharded), so the
            # copies agree (SyncBatchNorm, too, then averages identical batches).
            encoder = copy.deepcopy(encoder)
            for m in encoder.modules():  # Module.compile's wrapper is bound to the original
                m._compiled_call_impl = None
            seen = recalibrate_bn_(encoder, self.loaders.calibration, self.rt.device, self.rt.dtype)
            self.results["init_bn_images"] = seen
            how = f", BN statistics re-estimated on {seen} train images"
        rt, loaders = self.rt, self.loaders
        bank, bank_labels = extract_features(encoder, loaders.bank, rt.device, rt.dtype, normalize=False)
        feats, labels = extract_features(encoder, loaders.eval, rt.device, rt.dtype, normalize=False)
        # Collective: every process calls it with its own parts and gets the same value.
        acc = knn_top1(F.normalize(feats, dim=1), labels, F.normalize(bank, dim=1), bank_labels,
                       loaders.num_classes, self.cfg.k, self.cfg.temperature)
        self.results[tag] = acc  # identical on every process (rank 0 saves the checkpoints)
        log.info("kNN top-1 (%s, %s features, k=%d%s): %.2f%%", tag, self.cfg.features,
                 self.cfg.k, how, acc)
        if self.cfg.linear_probe and tag in ("init", "final"):
            # Small by design (the monitor's subsets): every process fits the same probe.
            train_x, train_y = gather_rows(bank, bank_labels)
            test_x, test_y = gather_rows(feats, labels)
            r = linear_probe(train_x, train_y, test_x, test_y, loaders.num_classes)
            self.results[f"probe_{tag}"] = r.top1
            log.info("cached linear probe (%s, %d train / %d test features, lr %g, wd %g chosen on "
                     "held-out train features): top-1 %.2f%%, top-5 %.2f%%, %.1f s", tag,
                     len(train_x), len(test_x), r.lr, r.weight_decay, r.top1, r.top5, r.seconds)
        return acc
