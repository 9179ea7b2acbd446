"""`fastmoco eval linear` and `fastmoco eval knn`: the pretrained backbone judged as the papers
judge it. The linear protocol trains a linear classifier on the frozen backbone (BatchNorm in
eval mode) on augmented views; `linear.mode=cached` fits it on features extracted once."""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastmoco.data import build_calibration_loader, build_feature_loaders, build_linear_loaders
from fastmoco.device import autocast
from fastmoco.distributed import gather_rows, is_distributed
from fastmoco.evaluation.config import EvalConfig, LinearConfig
from fastmoco.evaluation.knn import distributed_knn_accuracy, extract_features, recalibrate_bn_
from fastmoco.evaluation.probe import linear_probe
from fastmoco.runtime import Runtime, init_runtime, seed_process
from fastmoco.training import state as resume
from fastmoco.training.metrics import MetricsWriter, ProgressBar, setup_logging
from fastmoco.training.optim import LARS, set_lr
from fastmoco.training.position import RunPosition, epoch_batches
from fastmoco.training.schedules import lr_at
from fastmoco.training.stop import StopFlag
from fastmoco.weights import checkpoint as ckpt
from fastmoco.weights.load import BackboneInfo, load_backbone

log = logging.getLogger("fastmoco")


def frozen_backbone(cfg: EvalConfig, rt: Runtime) -> tuple[nn.Module, BackboneInfo]:
    """The backbone to judge, on the device, channels-last, in eval mode, without gradients;
    its BatchNorm statistics re-estimated first when cfg.bn_calibration_images asks for it."""
    extra = {"cifar_stem": cfg.cifar_stem, "kwargs": dict(cfg.backbone_kwargs)} \
        if cfg.cifar_stem or cfg.backbone_kwargs else {}
    backbone, info = load_backbone(cfg.checkpoint, encoder=cfg.encoder, name=cfg.name, **extra)
    fmt = torch.channels_last if cfg.run.channels_last else torch.preserve_format
    backbone.to(rt.device, memory_format=fmt)
    how = ""
    if cfg.bn_calibration_images > 0:  # every process on the same images: identical statistics
        seen = recalibrate_bn_(backbone, build_calibration_loader(cfg, rt), rt.device, rt.dtype)
        how = f", BN statistics re-estimated on {seen} train images"
    backbone.eval().requires_grad_(False)
    log.info("backbone %s (%s encoder) from %s: %d features%s", info.name, info.encoder,
             info.source, info.num_features, how)
    return backbone, info


def extract(backbone: nn.Module, loader: Iterable, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (fp32) and labels of this process's part of a split (may be empty)."""
    return extract_features(backbone, loader, rt.device, rt.dtype, normalize=False)


def _start(cfg: EvalConfig) -> Runtime:
    rt = init_runtime(cfg.run)
    setup_logging(rt.rank)
    cfg.check(rt.world_size)
    seed_process(cfg.run.seed, rt.rank)
    return rt


def linear(cfg: EvalConfig) -> dict[str, Any]:
    """The linear protocol (or its cached probe); returns top-1/top-5 on the eval split."""
    rt = _start(cfg)
    backbone, info = frozen_backbone(cfg, rt)
    if cfg.linear.mode == "cached":
        return _cached(cfg, rt, backbone, info)
    return _full(cfg, rt, backbone, info)


def knn(cfg: EvalConfig) -> dict[str, Any]:
    """Weighted kNN (k, T of cfg.knn) of the backbone's features: train split as the bank."""
    rt = _start(cfg)
    backbone, info = frozen_backbone(cfg, rt)
    bank, queries, num_classes = build_feature_loaders(cfg, rt)
    top1 = distributed_knn_accuracy(backbone, bank, queries, num_classes, rt.device, rt.dtype,
                                    cfg.knn.k, cfg.knn.temperature)
    return {"knn_top1": top1, "k": cfg.knn.k, "backbone": info.name, "source": info.source}


def _cached(cfg: EvalConfig, rt: Runtime, backbone: nn.Module, info: BackboneInfo) -> dict[str, Any]:
    train, val, num_classes = build_feature_loaders(cfg, rt)
    train_x, train_y = gather_rows(*extract(backbone, train, rt))
    val_x, val_y = gather_rows(*extract(backbone, val, rt))
    # Every process holds the same features and fits the same probe (no broadcast needed).
    r = linear_probe(train_x, train_y, val_x, val_y, num_classes, holdout=cfg.linear.holdout,
                     epochs=cfg.linear.cached_epochs, seed=cfg.run.seed)
    log.info("cached linear probe: top-1 %.2f%%, top-5 %.2f%% (lr %g, weight decay %g chosen on "
             "%d held-out train images: %.2f%%), %.1f s", r.top1, r.top5, r.lr, r.weight_decay,
             int(cfg.linear.holdout * len(train_x)), r.holdout_top1, r.seconds)
    return {"mode": "cached", "top1": r.top1, "top5": r.top5, "lr": r.lr,
            "weight_decay": r.weight_decay, "train_images": len(train_x), "seconds": r.seconds,
            "backbone": info.name, "source": info.source}


def _own_checkpoint(cfg: EvalConfig, info: BackboneInfo) -> tuple[Any, Any]:
    """(path, contents) of the newest checkpoint in run.dir if it is this evaluation's: a
    classifier trained on this backbone with these settings; (None, None) without one. Anything else there stops the run: resuming it would report
    another run's classifier, and the checkpoint rotation would delete another run's files."""
    latest = ckpt.latest_checkpoint(cfg.run.dir)
    if latest is None:
        return None, None
    state = ckpt.load_checkpoint(latest)
    if "classifier" not in state:
        raise ValueError(f"run.dir={cfg.run.dir} holds pretraining checkpoints ({latest.name}): "
                         f"give the evaluation its own run.dir")
    saved, now = state.get("backbone", {}), dataclasses.asdict(info)
    same = all(saved.get(k) == now[k] for k in ("name", "source", "encoder", "step", "kwargs"))
    same = same and all(_same_settings(state["config"].get(k), getattr(cfg, k))
                        for k in ("linear", "data", "encoder"))
    if not same:
        raise ValueError(f"run.dir={cfg.run.dir} holds the linear protocol of another backbone or "
                         f"other settings ({latest.name}): give this evaluation its own run.dir, "
                         f"or delete that folder to start over")
    return latest, state


def _same_settings(saved: Any, now: Any) -> bool:
    """A saved config section equals this run's; a setting added since it was written (absent
    there) counts as its default, the behaviour that run had."""
    if not dataclasses.is_dataclass(now) or not isinstance(saved, dict):
        return saved == now
    current = dataclasses.asdict(now)
    defaults = {f.name: f.default for f in dataclasses.fields(now)
                if f.default is not dataclasses.MISSING}
    return saved.keys() <= current.keys() and all(
        (saved[k] if k in saved else defaults.get(k, dataclasses.MISSING)) == v
        for k, v in current.items())


@torch.no_grad()
def evaluate(backbone: nn.Module, classifier: nn.Module, loader: Iterable,
             rt: Runtime) -> tuple[float, float]:
    """Top-1 and top-5 in percent over the eval split, summed over every process's part."""
    counts = torch.zeros(3, dtype=torch.float64, device=rt.device)  # top-1 hits, top-5 hits, n
    for x, y in loader:
        with autocast(rt.device, rt.dtype):
            f = backbone(x)
        logits = classifier(f.float())
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y.to(rt.device)[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), hit.new_tensor(len(y), dtype=torch.long)]).to(counts)
    if is_distributed():
        dist.all_reduce(counts)
    return (100.0 * counts[0] / counts[2]).item(), (100.0 * counts[1] / counts[2]).item()


def linear_optimizer(classifier: nn.Linear, lc: LinearConfig, lr: float) -> torch.optim.Optimizer:
    """The classifier's optimizer: SGD (Nesterov if asked), or LARS over its weight and bias,
    both adapted (`exclude_1d: False`), as SimSiam's main_lincls wraps SGD in apex's LARC. The
    zero-initialised bias takes a plain SGD step until its norm is positive, as in LARC. With
    weight decay the trust ratio is MoCo v3's ‖θ‖/‖g + wd·θ‖ (LARC's: ‖θ‖/(‖g‖ + wd·‖θ‖));
    SimSiam's protocol has none."""
    params = list(classifier.parameters())
    if lc.optimizer == "lars":
        return LARS([{"params": params, "exclude_1d": False}], lr=lr,
                    weight_decay=lc.weight_decay, momentum=lc.momentum)
    return torch.optim.SGD(params, lr=lr, momentum=lc.momentum, nesterov=lc.nesterov,
                           weight_decay=lc.weight_decay)


def _full(cfg: EvalConfig, rt: Runtime, backbone: nn.Module, info: BackboneInfo) -> dict[str, Any]:
    lc = cfg.linear
    loaders = build_linear_loaders(cfg, rt)
    classifier = nn.Linear(info.num_features, loaders.num_classes)
    nn.init.normal_(classifier.weight, std=0.01)  # as the authors' main_lincls
    nn.init.zeros_(classifier.bias)
    classifier.to(rt.device)
    model: nn.Module = classifier
    if rt.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            classifier, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    base_lr = lc.lr_for(lc.batch_size)
    optimizer = linear_optimizer(classifier, lc, base_lr)
    progress = RunPosition(total_steps=lc.epochs * len(loaders.train))
    latest, state = _own_checkpoint(cfg, info)  # read once: checked, then resumed from
    if latest is not None and cfg.run.resume:
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        progress = RunPosition(**state["progress"])
        resume.restore_rng(state, rt.rank, rt.world_size, cfg.run.seed)
        log.info("resumed the linear protocol from %s at step %d", latest, progress.step)
    del state
    save = lambda: resume.write(cfg.run, progress.step, {
        "classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(),
        "progress": progress.to_dict(), "rng": resume.gather_rng(),
        "config": dataclasses.asdict(cfg), "backbone": dataclasses.asdict(info)}, rt.rank)
    writer = MetricsWriter(Path(cfg.run.dir), enabled=rt.rank == 0)
    bar = ProgressBar(rt.rank == 0 and cfg.run.progress, progress.total_steps, progress.step, "linear")
    stop = StopFlag()
    log.info("linear protocol: %d epochs of %d steps, batch %d, %s lr %g (%s), %d classes",
             lc.epochs, len(loaders.train), lc.batch_size, lc.optimizer, base_lr, lc.lr_schedule,
             loaders.num_classes)

    while not (progress.finished or stop.requested):
        epoch = progress.epoch
        for x, y in epoch_batches(loaders.train, progress):
            lr = lr_at(*progress.schedule_position(), base_lr, lc.lr_schedule, 0, tuple(lc.milestones))
            set_lr(optimizer, lr)
            with torch.no_grad(), autocast(rt.device, rt.dtype):
                f = backbone(x)
            loss = F.cross_entropy(model(f.float()), y.to(rt.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.advance()
            if progress.step % cfg.run.log_every == 0:
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"linear loss is {value} at step {progress.step}: "
                                             f"lower linear.lr; the last checkpoint is intact")
                writer.log({"step": progress.step, "epoch": progress.epoch, "loss": value, "lr": lr})
                bar.update(loss=f"{value:.3f}")
            else:
                bar.update()
            if progress.finished or stop.poll():
                break
        if progress.epoch > epoch and not progress.finished:
            if progress.epoch % lc.eval_every_epochs == 0:
                top1, top5 = evaluate(backbone, classifier, loaders.val, rt)
                progress.knn[f"epoch_{progress.epoch}"] = top1
                writer.log({"step": progress.step, "val_top1": top1, "val_top5": top5})
                log.info("epoch %d: val top-1 %.2f%%, top-5 %.2f%%", progress.epoch, top1, top5)
            if progress.epoch % cfg.run.checkpoint_every_epochs == 0:
                save()
    bar.close()
    if stop.requested and not progress.finished:
        save()
        return {"stopped": True, "step": progress.step}
    top1, top5 = evaluate(backbone, classifier, loaders.val, rt)
    save()
    summary = {"mode": "full", "top1": top1, "top5": top5, "epochs": lc.epochs,
               "step": progress.step, "backbone": info.name, "source": info.source,
               "skipped_files": loaders.train.skipped}
    writer.log({"summary": summary})
    writer.close()
    return summary
