"""How `run.conv_weight_grad` and `run.conv_winograd` resolve (fastmoco/conv_choice.py): explicit
settings as given; auto from a timing of one layer each, on a CPU in fp32 only, for a model
with a layer the path could take, measured once and kept for the run's child processes; what the
run log says. (Rank 0's timing on every rank:
tests/test_distributed.py.)"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fastmoco import conv_choice
from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.conv_choice import (GEMM_SPEEDUP_VAR, WINOGRAD_SPEEDUP_VAR, describe_convolutions,
                                  resolve_conv_weight_grad, resolve_conv_winograd,
                                  use_fast_convolutions_)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GEMM = "GEMM weight grads on {} (maps up to 64 px from 256+ channels)"


def measured(monkeypatch, gemm: str, winograd: str) -> None:
    """What a CPU measured: the timings auto reads instead of timing again."""
    monkeypatch.setenv(GEMM_SPEEDUP_VAR, gemm)
    monkeypatch.setenv(WINOGRAD_SPEEDUP_VAR, winograd)


def net() -> nn.Module:
    """One layer for each path (the layers ResNet-18 at 32 px gives them) and a narrow one."""
    return nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.Conv2d(256, 512, 3, 2, 1),
                         nn.Conv2d(16, 16, 3, padding=1))


def paths(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model]


def test_explicit_settings_hold_on_any_device_and_dtype(monkeypatch):
    measured(monkeypatch, "0.5", "0.5")  # slower here: auto would take neither
    assert resolve_conv_weight_grad("gemm", CPU, torch.bfloat16) == "gemm"
    assert resolve_conv_weight_grad("native", CPU, torch.float32) == "native"
    assert resolve_conv_winograd("on", CUDA, torch.bfloat16)
    assert not resolve_conv_winograd("off", CPU, torch.float32)
    model = net()
    use_fast_convolutions_(model, "gemm", "on", CPU, torch.float32)
    # the narrow layer takes the class but runs the framework's gradient (tests/test_conv.py)
    assert paths(model) == ["WinogradGemmConv2d", "GemmGradConv2d", "GemmGradConv2d"]
    assert describe_convolutions(model).startswith(
        f"Winograd F(2x2,3x3) on 1 of 3, {GEMM.format(2)} (auto's timings: GEMM weight grad "
        "0.50x, Winograd 0.50x")
    model = net()
    use_fast_convolutions_(model, "native", "off", CPU, torch.float32)
    assert paths(model) == ["Conv2d"] * 3
    monkeypatch.delenv(GEMM_SPEEDUP_VAR)
    monkeypatch.delenv(WINOGRAD_SPEEDUP_VAR)
    assert describe_convolutions(model) == "the framework's, all 3"


@pytest.mark.parametrize("gemm, winograd", [("1.18", "1.40"), ("1.02", "1.40"), ("1.18", "1.05"),
                                            ("0.90", "0.95")])
def test_auto_takes_a_path_from_its_bar_on_a_cpu_in_fp32(monkeypatch, gemm, winograd):
    measured(monkeypatch, gemm, winograd)
    want_gemm, want_winograd = (float(v) >= conv_choice.MIN_SPEEDUP for v in (gemm, winograd))
    want = "gemm" if want_gemm else "native"
    assert resolve_conv_weight_grad("auto", CPU, torch.float32) == want
    assert resolve_conv_winograd("auto", CPU, torch.float32) == want_winograd
    model = net()
    use_fast_convolutions_(model, "auto", "auto", CPU, torch.float32)
    first = {(True, True): "WinogradGemmConv2d", (False, True): "WinogradConv2d",
             (True, False): "GemmGradConv2d", (False, False): "Conv2d"}
    assert paths(model) == [first[want_gemm, want_winograd],
                            *["GemmGradConv2d" if want_gemm else "Conv2d"] * 2]
    assert describe_convolutions(model).endswith(
        f"(auto's timings: GEMM weight grad {float(gemm):.2f}x, Winograd {float(winograd):.2f}x "
        "on one layer each, bar 1.1x)")
    monkeypatch.delenv(GEMM_SPEEDUP_VAR)  # and no timing where auto is off whatever it says
    monkeypatch.delenv(WINOGRAD_SPEEDUP_VAR)
    monkeypatch.setattr(conv_choice.time, "perf_counter", lambda: pytest.fail("timed"))
    for device, dtype in ((CPU, torch.bfloat16), (CPU, torch.float16), (CUDA, torch.float32)):
        assert resolve_conv_weight_grad("auto", device, dtype) == "native"
        assert not resolve_conv_winograd("auto", device, dtype)
        model = net()
        use_fast_convolutions_(model, "auto", "auto", device, dtype)
        assert paths(model) == ["Conv2d"] * 3
        assert describe_convolutions(model) == "the framework's, all 3"


def test_auto_does_not_time_for_a_model_without_a_layer_for_it(monkeypatch):
    """The CPU demo's quarter-width ResNet-18 (16-128 channels): nothing to time at start."""
    monkeypatch.delenv(GEMM_SPEEDUP_VAR)
    monkeypatch.delenv(WINOGRAD_SPEEDUP_VAR)
    monkeypatch.setattr(conv_choice.time, "perf_counter", lambda: pytest.fail("timed"))
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(128, 128, 3, 2, 1))
    use_fast_convolutions_(model, "auto", "auto", CPU, torch.float32)
    assert paths(model) == ["Conv2d"] * 2
    assert describe_convolutions(model) == "the framework's, all 2"


def test_settings_are_checked_where_the_config_is_read():
    assert apply_overrides(TrainConfig(), ["run.conv_winograd=true"]).run.conv_winograd == "on"
    with pytest.raises(ValueError, match="run.conv_winograd='fast': choose one of auto, on, off"):
        apply_overrides(TrainConfig(), ["run.conv_winograd=fast"])
    with pytest.raises(ValueError, match="run.conv_weight_grad='im2col': choose one of auto, "
                                         "native, gemm"):
        resolve_conv_weight_grad("im2col", CPU, torch.float32)


@pytest.mark.parametrize("var, measure", [
    (GEMM_SPEEDUP_VAR, conv_choice.cpu_gemm_weight_grad_speedup),
    (WINOGRAD_SPEEDUP_VAR, conv_choice.cpu_winograd_speedup)], ids=["gemm", "winograd"])
def test_auto_times_its_layer_once_and_children_inherit_it(monkeypatch, var, measure):
    """The timing runs on this CPU (both paths, forward and backward) and is kept in the
    environment, where the bench's spawned arms and a second call read it instead of timing."""
    monkeypatch.delenv(var, raising=False)
    speedup = measure(rounds=1)
    assert speedup > 0.0  # its size is the machine's: the run log and the bench report it
    assert float(os.environ[var]) == pytest.approx(speedup, abs=1e-4)
    monkeypatch.setattr(conv_choice.time, "perf_counter", lambda: pytest.fail("timed twice"))
    assert measure() == pytest.approx(speedup, abs=1e-4)
