"""`fastmoco eval linear|knn`: the linear protocol runs, resumes exactly and reports top-1/top-5;
the cached probe and the kNN command agree with the library; bad input stops at start."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from test_train import FAST, make_config

from fastmoco.config import from_hydra
from fastmoco.evaluation.commands import knn, linear
from fastmoco.evaluation.config import EvalConfig
from fastmoco.training.loop import train
from fastmoco.weights import checkpoint as ckpt
from fastmoco.weights.checkpoint import latest_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def pretrained(tiny_cifar, tmp_path_factory) -> Path:
    """A run directory with a checkpoint of a tiny ResNet after 2 steps."""
    run = tmp_path_factory.mktemp("run")
    train(make_config(FAST + [f"data.root={tiny_cifar}", f"run.dir={run}", "schedule.steps=2",
                              "knn.enabled=false"]))
    return run


def eval_config(overrides: list[str]) -> EvalConfig:
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        return from_hydra(compose(config_name="eval", overrides=overrides), EvalConfig)


def common(pretrained, tiny_cifar, run_dir) -> list[str]:
    return [f"checkpoint={pretrained}", f"data.root={tiny_cifar}", f"run.dir={run_dir}",
            "linear=cifar", "pipeline=torchvision", "pipeline.num_workers=1", "run.progress=false",
            "linear.batch_size=40", "linear.epochs=3", "linear.eval_every_epochs=1", "run.log_every=1"]


def test_the_linear_protocol_resumes_exactly(pretrained, tiny_cifar, tmp_path):
    """Three epochs straight, and the same run resumed from its checkpoint after epoch 2 (RNG,
    optimizer, schedule position): the same classifier, bit for bit, and the same accuracy."""
    straight = linear(eval_config(common(pretrained, tiny_cifar, tmp_path / "a")))
    assert straight["mode"] == "full" and 0 <= straight["top1"] <= straight["top5"] <= 100
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("checkpoint_*.pt"))
    after_two = ckpts[-2]
    assert load_checkpoint(after_two)["progress"]["epoch"] == 2
    resumed_dir = tmp_path / "b" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copy(after_two, resumed_dir / after_two.name)
    resumed = linear(eval_config(common(pretrained, tiny_cifar, tmp_path / "b")))
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))["classifier"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"))["classifier"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert resumed["top1"] == straight["top1"] and resumed["top5"] == straight["top5"]
    records = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_top1" in r for r in records) == 2 and sum("loss" in r for r in records) == 15


def test_cached_probe_and_knn_commands(pretrained, tiny_cifar, tmp_path):
    base = common(pretrained, tiny_cifar, tmp_path)
    cached = linear(eval_config(base + ["linear.mode=cached"]))
    assert cached["mode"] == "cached" and cached["train_images"] == 200
    assert 0 <= cached["top1"] <= cached["top5"] <= 100
    result = knn(eval_config(base + ["knn.k=20"]))
    assert 0 <= result["knn_top1"] <= 100
    # The random-init baseline of the same architecture, its BN statistics from train images.
    baseline = linear(eval_config(
        common("resnet18", tiny_cifar, tmp_path / "r") + ["linear.mode=cached", "cifar_stem=true",
        "+backbone_kwargs.channels=[8,16,32,64]", "bn_calibration_images=100"]))
    assert baseline["source"] == "timm:resnet18" and 0 <= baseline["top1"] <= 100


def test_the_cli_prints_the_result(pretrained, tiny_cifar, tmp_path):
    cmd = [sys.executable, "-m", "fastmoco", "eval", "linear", *common(pretrained, tiny_cifar, tmp_path),
           "linear.mode=cached"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cached linear probe of resnet18" in res.stdout and "top-5" in res.stdout


def test_bad_input_stops_at_start(pretrained, tiny_cifar, tmp_path):
    with pytest.raises(ValueError, match="checkpoint= is missing"):
        eval_config([])
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        linear(eval_config(common(empty, tiny_cifar, tmp_path / "x")))
    # run.dir holding another run: never resumed from, never rotated away.
    with pytest.raises(ValueError, match="holds pretraining checkpoints"):
        linear(eval_config(common(pretrained, tiny_cifar, pretrained)))
    done = tmp_path / "done"
    linear(eval_config(common(pretrained, tiny_cifar, done) + ["linear.epochs=1"]))
    with pytest.raises(ValueError, match="holds the linear protocol of another backbone or other settings"):
        linear(eval_config(common(pretrained, tiny_cifar, done) + ["linear.epochs=1", "linear.lr=3"]))
    # A folder written before linear.optimizer/nesterov existed: they read as their defaults.
    last = ckpt.latest_checkpoint(done)
    old = ckpt.load_checkpoint(last)
    del old["config"]["linear"]["optimizer"], old["config"]["linear"]["nesterov"]
    ckpt.save_atomic(old, last)
    assert linear(eval_config(common(pretrained, tiny_cifar, done) + ["linear.epochs=1"]))["top1"] >= 0
    with pytest.raises(ValueError, match="holds the linear protocol of another backbone or other settings"):
        linear(eval_config(common(pretrained, tiny_cifar, done) + ["linear.epochs=1",
                                                                  "linear.optimizer=lars"]))
    with pytest.raises(ValueError, match="resnet50"):  # the checkpoint holds a resnet18
        linear(eval_config(common(pretrained, tiny_cifar, tmp_path / "z") + ["name=resnet50"]))
    # A val split whose classes are not the train split's: every label would shift.
    odd = tmp_path / "odd"
    shutil.copytree(tiny_cifar, odd, symlinks=True)
    shutil.rmtree(sorted((odd / "test").iterdir())[0])
    with pytest.raises(ValueError, match="classes of 'test' and 'train' differ"):
        linear(eval_config(common(pretrained, odd, tmp_path / "y")))
