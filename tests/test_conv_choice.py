"""How `run.conv_weight_grad` and `run.conv_winograd` resolve (fastmoco/conv_choice.py): explicit
settings as given; auto from a timing of one layer each, on a CPU in fp32 only, measured once
and kept for the run's child processes; what the run log says. (Rank 0's timing on every rank:
tests/test_distributed.py.)"""
from __future__ import annotations

import os

import pytest
import torch

from fastmoco import conv_choice
from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.conv_choice import (GEMM_SPEEDUP_VAR, WINOGRAD_SPEEDUP_VAR, describe_convolutions,
                                  resolve_conv_weight_grad, resolve_conv_winograd)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
WINOGRAD = "Winograd F(2x2,3x3) for 3x3 stride-1 layers of 256+ channels"
GEMM = "gemm (output maps up to 64 px from 256+ channels)"


def measured(monkeypatch, gemm: str, winograd: str) -> None:
    """What a CPU measured: the timings auto reads instead of timing again."""
    monkeypatch.setenv(GEMM_SPEEDUP_VAR, gemm)
    monkeypatch.setenv(WINOGRAD_SPEEDUP_VAR, winograd)


def test_explicit_settings_hold_on_any_device_and_dtype(monkeypatch):
    measured(monkeypatch, "0.5", "0.5")  # slower here: auto would take neither
    assert resolve_conv_weight_grad("gemm", CPU, torch.bfloat16) == "gemm"
    assert resolve_conv_weight_grad("native", CPU, torch.float32) == "native"
    assert resolve_conv_winograd("on", CUDA, torch.bfloat16)
    assert not resolve_conv_winograd("off", CPU, torch.float32)
    assert describe_convolutions("gemm", "on", CPU, torch.float32) == f"weight grads {GEMM}, {WINOGRAD}"
    assert describe_convolutions("native", "off", CPU, torch.float32) == "weight grads native"


@pytest.mark.parametrize("gemm, winograd", [("1.18", "1.40"), ("1.02", "1.40"), ("1.18", "1.05"),
                                            ("0.90", "0.95")])
def test_auto_takes_a_path_from_its_bar_on_a_cpu_in_fp32(monkeypatch, gemm, winograd):
    measured(monkeypatch, gemm, winograd)
    want_gemm, want_winograd = (float(v) >= conv_choice.MIN_SPEEDUP for v in (gemm, winograd))
    assert resolve_conv_weight_grad("auto", CPU, torch.float32) == ("gemm" if want_gemm else "native")
    assert resolve_conv_winograd("auto", CPU, torch.float32) == want_winograd
    text = describe_convolutions("auto", "auto", CPU, torch.float32)
    assert text.startswith(f"weight grads {GEMM if want_gemm else 'native'}")
    assert (WINOGRAD in text) == want_winograd
    assert text.endswith(f"(auto measured gemm weight grad {float(gemm):.2f}x, Winograd "
                         f"{float(winograd):.2f}x on one layer each, bar 1.1x)")
    for device, dtype in ((CPU, torch.bfloat16), (CPU, torch.float16), (CUDA, torch.float32)):
        assert resolve_conv_weight_grad("auto", device, dtype) == "native"
        assert not resolve_conv_winograd("auto", device, dtype)
        assert describe_convolutions("auto", "auto", device, dtype) == "weight grads native"


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
