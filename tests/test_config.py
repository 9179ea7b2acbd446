"""The config: one source of defaults (the dataclasses), every check at the start, each naming
the setting to change."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

from fastmoco.config import TrainConfig, from_hydra, splits_bn

CONF = Path(__file__).resolve().parent.parent / "fastmoco" / "conf"


def make(overrides: list[str]) -> TrainConfig:
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize("override, match", [
    ("method.version=v4", r"method.version='v4': choose one of v1, v2, v3"),
    ("method.momentum_schedule=cosin", r"method.momentum_schedule='cosin': choose one of constant, cosine"),
    ("method.shuffle_bn=shuffle", r"method.shuffle_bn='shuffle': choose one of auto"),
    ("method.bn_splits=0", r"method.bn_splits=0: choose 1 or more"),
    ("method.queue_size=0", r"method.queue_size=0: MoCo v2 needs a queue"),
    ("optim.name=sgdd", r"optim.name='sgdd': choose one of sgd, lars, adamw"),
    ("schedule.lr_schedule=linear", r"schedule.lr_schedule='linear': choose one of cosine, step, constant"),
    ("pipeline.kind=pil", r"pipeline.kind='pil': choose one of auto, dali, torchvision"),
    ("knn.features=pooled", r"knn.features='pooled': choose one of head, backbone"),
    ("run.precision=bf32", r"run.precision='bf32': choose one of auto, bf16, fp16, fp32"),
    ("run.compile=maybe", r"run.compile='maybe': choose one of auto, on, off"),
    ("data.name=''", r"data.name is empty"),
    ("schedule.sizes=[['backbone.name=resnet18']]", r"schedule.sizes needs schedule.time_budget_min"),
])
def test_each_setting_is_checked_when_composed(override, match):
    with pytest.raises(ValueError, match=match):
        make([override])


@pytest.mark.parametrize("overrides, world, device, match", [
    (["schedule.batch_size=30"], 4, "cpu", r"schedule.batch_size=30 is not divisible by the 4 processes"),
    (["method.queue_size=100", "schedule.batch_size=32"], 1, "cpu", r"set method.queue_size=96"),
    (["method.bn_splits=3", "schedule.batch_size=32", "method.queue_size=96"], 1, "cpu",
     r"not a multiple of method.bn_splits=3"),
    (["method.shuffle_bn=split", "method.bn_splits=3", "schedule.batch_size=32",
      "method.queue_size=96"], 2, "cpu", r"batch per process 16 is not a multiple of method.bn_splits=3"),
    (["method.shuffle_bn=sync"], 1, "cpu", r"method.shuffle_bn=sync needs CUDA"),
    (["run.loss_backend=fused"], 1, "cpu", r"run.loss_backend='fused': choose one of auto, triton"),
    (["run.ema_backend=fast"], 1, "cpu", r"run.ema_backend='fast': choose one of auto, triton"),
    (["data.name=my_images"], 1, "cpu", r"data.name='my_images' has no folder: set data.root="),
])
def test_settings_that_fail_together_are_checked_at_start(overrides, world, device, match):
    cfg = make(overrides)
    with pytest.raises(ValueError, match=match):
        cfg.check(world, device)


def test_the_split_bn_rule_is_one_rule():
    """With several processes, auto means the paper's shuffle (no split), so bn_splits is free;
    in one process the same settings split BN, and the batch must divide into the splits."""
    cfg = make(["method.bn_splits=3", "schedule.batch_size=32", "method.queue_size=96"])
    cfg.check(2, "cpu")
    assert not splits_bn(cfg.method.shuffle_bn, 2) and splits_bn(cfg.method.shuffle_bn, 1)
    with pytest.raises(ValueError, match="batch per process 32 is not a multiple of method.bn_splits=3"):
        cfg.check(1, "cpu")


def test_defaults_are_written_once():
    """The yaml presets hold only what differs from the dataclass defaults (plus the preset's own
    name): a default restated in yaml is a second source that drifts."""
    defaults = TrainConfig()
    restated = []
    for path in sorted(CONF.glob("*/*.yaml")):
        group = path.parent.name
        if group in ("experiment", "hydra") or not hasattr(defaults, group):
            continue
        section = getattr(defaults, group)
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            if key in ("name", "version", "kind"):
                continue
            default = getattr(section, key)
            if isinstance(default, tuple):
                default = list(default)
            if value == default:
                restated.append(f"{path.relative_to(CONF)}: {key}")
    assert not restated, restated
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    assert set(top) <= {"defaults", "hydra"}, set(top)


def test_compose_without_overrides_is_the_documented_default():
    cfg = make([])
    assert (cfg.method.version, cfg.backbone.name, cfg.data.name) == ("v2", "resnet18", "cifar10")
    assert cfg.run == TrainConfig().run and cfg.knn == TrainConfig().knn
