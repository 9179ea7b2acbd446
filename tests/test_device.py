"""What depends on the CPU kind: precision choices, the emulated-bf16 guard, the kind label, the
AVX2 stand-in the suite uses, BN recalibration for the random-init baseline, demo sizing."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from fastmoco import device
from fastmoco.config import TrainConfig
from fastmoco.device import ISA_CAP_VARS, cpu_supports_bf16, resolve_precision
from fastmoco.evaluation.knn import recalibrate_bn_
from fastmoco.runtime import Runtime
from fastmoco.training import autosize

CPU = torch.device("cpu")
RT = Runtime(CPU, torch.float32)
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.parametrize("native, speedup, expected", [
    (True, 4.3, torch.bfloat16),  # AMD EPYC AVX512-BF16: bf16 the fast path
    (True, 0.8, torch.float32),  # AVX512-BF16 without AMX, where bf16 measured slower
    (False, 0.0, torch.float32),  # AVX2: bf16 emulated
], ids=["bf16-fast", "bf16-but-slower", "avx2"])
def test_auto_precision_follows_what_the_cpu_measures(monkeypatch, native, speedup, expected):
    """Every branch on any machine: the probes are replaced, not the machine read."""
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: native)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: speedup)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == torch.float32  # fp32 is always there to force


def test_bf16_speedup_is_measured_where_bf16_is_native():
    speedup = device.cpu_bf16_speedup()
    if not cpu_supports_bf16():
        assert speedup == 0.0
    else:
        assert speedup > 0.0  # its size is the machine's; the bench reports it


def test_bf16_on_a_cpu_without_it_stops_and_names_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ValueError, match=r"no native bf16.*run.precision=fp32.*"
                                         r"run.allow_emulated_bf16=true"):
        resolve_precision("bf16", CPU)
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", CPU, allow_emulated_bf16=True) == torch.bfloat16
    assert "emulated" in caplog.text
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("bf16", CPU) == torch.bfloat16


def test_train_refuses_emulated_bf16_at_start(monkeypatch, tmp_path):
    from fastmoco.training.loop import train

    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: False)
    cfg = TrainConfig()
    cfg.data.name, cfg.run.precision, cfg.run.dir = "synthetic", "bf16", str(tmp_path)
    with pytest.raises(ValueError, match="run.allow_emulated_bf16"):
        train(cfg)
    assert not any(tmp_path.iterdir())  # stopped before anything was written


def test_isa_caps_make_any_x86_cpu_an_avx2_one():
    """The stand-in `make test-avx2` uses: with the caps, torch and oneDNN see no bf16 and the
    label says AVX2 (on an AVX2 machine the caps change nothing)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"not an x86 CPU with AVX2 ({torch.backends.cpu.get_cpu_capability()})")
    code = ("import json, torch; from fastmoco.device import cpu_kind, cpu_supports_bf16, "
            "describe_cpu; print(json.dumps([cpu_kind(), cpu_supports_bf16(), describe_cpu()]))")
    env = {k: v for k, v in os.environ.items() if k not in ISA_CAP_VARS}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **AVX2_CAPS},
                         capture_output=True, text=True, timeout=120, check=True)
    kind, bf16, described = json.loads(out.stdout.strip().splitlines()[-1])
    assert (kind, bf16) == ("AVX2", False)
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in described["isa_caps"]


def test_cpu_kind_agrees_with_the_bf16_probe():
    kind = device.cpu_kind()
    assert kind in ("AMX", "AVX512-BF16", "AVX512", "AVX2", "DEFAULT", "NO AVX", "VSX", "ZVECTOR")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert (kind in ("AMX", "AVX512-BF16")) == cpu_supports_bf16()


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.Flatten())


def test_recalibrated_bn_holds_the_data_statistics_and_leaves_weights_alone():
    net = _bn_net().double()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    g = torch.Generator().manual_seed(1)
    batches = [(3.0 + 2.0 * torch.randn(8, 3, 9, 9, generator=g, dtype=torch.float64), None)
               for _ in range(4)]
    net.eval()
    assert recalibrate_bn_(net, batches, CPU, torch.float32) == 32
    assert not net.training and net[1].momentum == 0.1  # mode and momentum restored
    # The first BN sees conv(x): its running mean is the mean over the four equal batches of the
    # per-batch means, its running var the mean of the per-batch unbiased variances.
    with torch.no_grad():
        feats = [net[0](x) for x, _ in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(1) for f in feats]).mean(0)
    tol = dict(rtol=1e-12, atol=1e-12)  # float64, sums of ~500 terms
    torch.testing.assert_close(net[1].running_mean, mean, **tol)
    torch.testing.assert_close(net[1].running_var, var, **tol)
    for k, v in weights.items():
        assert torch.equal(net.state_dict()[k], v), k
    # The test can fail: torch's defaults (mean 0, var 1) are far from the data's.
    assert (mean.abs() > 0.1).any()


def test_autosize_takes_the_first_size_that_gets_its_steps(monkeypatch):
    cfg = TrainConfig()
    cfg.schedule.time_budget_min, cfg.schedule.min_steps = 1.0, 100
    cfg.method.queue_size = 4096
    cfg.schedule.sizes = [["schedule.batch_size=256"], ["schedule.batch_size=128"],
                          ["schedule.batch_size=64"]]
    pace = {256: 1.0, 128: 0.5, 64: 0.25}  # seconds per step: 60, 120, 240 steps in a minute
    monkeypatch.setattr(autosize, "step_seconds",
                        lambda c, *a: pace[c.schedule.batch_size])
    chosen, index = autosize.choose_size(cfg, RT)
    assert (chosen.schedule.batch_size, index) == (128, 1)
    assert cfg.schedule.batch_size == 256  # the caller's config is left as it was
    cfg.schedule.min_steps = 1000  # no size gets there: the smallest
    assert autosize.choose_size(cfg, RT)[1] == 2
    # A resumed run keeps its checkpoint's size without measuring.
    monkeypatch.setattr(autosize, "step_seconds", lambda *a: pytest.fail("measured on resume"))
    assert autosize.choose_size(cfg, RT, resumed=0)[0].schedule.batch_size == 256
    with pytest.raises(ValueError, match="restore schedule.sizes"):
        autosize.choose_size(cfg, RT, resumed=5)
    with pytest.raises(ValueError, match="schedule.time_budget_min"):  # checked when made
        dataclasses.replace(cfg.schedule, time_budget_min=None)


def tiny_sized_config() -> TrainConfig:
    """A narrow ResNet-18 on 16-px synthetic views, timed for one second a trial."""
    cfg = TrainConfig()
    cfg.backbone.name, cfg.backbone.cifar_stem = "resnet18", True
    cfg.backbone.kwargs = {"channels": [8, 16, 32, 64]}
    cfg.data.name, cfg.data.image_size = "synthetic", 16
    cfg.schedule.batch_size, cfg.method.queue_size, cfg.method.bn_splits = 8, 64, 2
    cfg.schedule.size_trial_seconds = 1.0
    cfg.run.compile = "off"
    return cfg


def test_autosize_times_the_real_step():
    seconds = autosize.step_seconds(tiny_sized_config(), RT)
    assert 0 < seconds < 30


def test_autosize_times_the_step_with_its_data(monkeypatch):
    """A size is judged by the loop the run executes: a loader that makes the step wait for its
    batch (a data pipeline sharing the cores) counts in the step's time, the mean of it."""
    cfg = tiny_sized_config()
    alone = autosize.step_seconds(cfg, RT)
    real = autosize.build_loader

    class SlowLoader:
        def __init__(self, loader, wait: float) -> None:
            self.loader, self.wait = loader, wait

        def set_epoch(self, epoch: int, start: int = 0) -> None:
            self.loader.set_epoch(epoch, start)

        def __iter__(self):
            for batch in self.loader:
                time.sleep(self.wait)
                yield batch

    monkeypatch.setattr(autosize, "build_loader", lambda c, rt: SlowLoader(real(c, rt), 0.3))
    assert autosize.step_seconds(cfg, RT) >= alone + 0.2
