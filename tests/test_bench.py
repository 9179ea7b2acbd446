"""fastmoco bench: the CLI smoke run (every arm, sane numbers), that each arm does its method's
work (the reference arm for MoCo v2, v3 and BYOL against fastmoco's step), and which arms apply
to which method."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fastmoco.kernels import infonce_loss_reference
from torch.autograd import DeviceType
from torch.profiler import record_function

from fastmoco.bench import (
    ArmDef,
    BenchConfig,
    CaseDef,
    CeilingConfig,
    Target,
    check_targets,
    drain,
    format_table,
)
from fastmoco.bench.arm_fastmoco import FastMocoArm
from fastmoco.bench.arm_reference import ReferenceArm, ReferenceMoCo
from fastmoco.bench.arms import synthetic_batches
from fastmoco.bench.driver import run_case
from fastmoco.bench.measure import measure
from fastmoco.bench.phases import phase_us, profiler
from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.methods.moco import MoCo

TINY = ["backbone=resnet18_cifar", "+backbone.kwargs.channels=[8,16,32,64]", "method.queue_size=64",
        "method.bn_splits=4", "schedule.batch_size=8", "data.image_size=16", "pipeline.num_workers=1",
        "run.compile=off"]
FAST_BENCH = ["bench.warmup=1", "bench.windows=2", "bench.steps_per_window=1", "bench.profile_steps=1",
              "bench.ceilings.mm_size=128", "bench.ceilings.copy_mb=4"]


def tiny_config(**method) -> TrainConfig:
    cfg = apply_overrides(TrainConfig(), [o.replace("backbone=resnet18_cifar", "backbone.cifar_stem=true")
                                 for o in TINY])
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg


def test_cli_smoke_every_arm_and_mode_with_sane_numbers(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastmoco", "bench", *TINY, *FAST_BENCH,
           f"data.root={tiny_cifar}", f"bench.out_dir={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "bench_latest.json").read_text())
    bench = result["bench"]
    rows = result["cases"]["current"]["rows"]
    have_lightly = __import__("importlib").util.find_spec("lightly") is not None
    cpu = result["setting"]["cpu"]  # the CPU kind and what auto ran, as the bench saw them
    assert cpu["kind"] in res.stdout and cpu["auto_dtype"] in ("bfloat16", "float32")
    auto_fp32 = cpu["auto_dtype"] == "float32"  # then the bf16-only arms are skipped, with a note
    for arm in bench["arms"]:
        modes = bench["arm_defs"][arm]["modes"] or bench["modes"]
        got = {r["mode"]: r for r in rows if r["arm"] == arm}
        assert set(got) == set(modes), (arm, set(got))
        assert arm in res.stdout
        for mode, r in got.items():
            if bench["arm_defs"][arm]["needs_bf16"] and auto_fp32:
                assert "not this CPU's fast path" in r["skipped"], (arm, r)
                continue
            if arm.startswith("lightly") and not have_lightly:
                assert "lightly" in r["skipped"]
                continue
            assert math.isfinite(r["img_s"]) and r["img_s"] > 0, (arm, mode, r)
            assert r["img_s_min"] <= r["img_s"] <= r["img_s_max"]
            assert len(r["windows"]) == 2
            assert all(v >= 0 for v in r["phases_ms"].values())
            if mode != "data":
                assert r["phases_ms"]["forward"] > 0 and r["phases_ms"]["backward"] > 0
                assert 0 < r["frac_ceiling"] < 1e4
    ref = {r["mode"]: r for r in rows if r["arm"] == "reference"}
    assert ref["model"]["x_reference"] == pytest.approx(1.0)
    fast = {r["mode"]: r for r in rows if r["arm"] == "fastmoco"}
    assert fast["model"]["dtype"] == cpu["auto_dtype"] and fast["model"]["channels_last"]
    if not auto_fp32:
        assert {r["dtype"] for r in rows if r["arm"] == "no_amp"} == {"float32"}
    # Every timed arm carries the ceilings measured beside it, in its own process.
    timed = [r for r in rows if "img_s" in r and r["mode"] != "data"]
    assert timed and all(r["arm_ceilings"]["mm_fp32_flops"] > 0 for r in timed)
    assert all(len(r["arm_ceilings"]["samples"]["mm_fp32_flops"]) >= 2 for r in timed)
    # The model mode runs in turns: each window bracketed by its own ceilings, one group here.
    model = [r for r in timed if r["mode"] == "model"]
    assert all(len(r["window_ceilings"]) == len(r["windows"]) and
               all(len(pair) == 2 for pair in r["window_ceilings"]) for r in model)
    assert {r["in_turns"] for r in model} == {0}
    assert result["cases"]["current"]["turn_groups"] == [[r["arm"] for r in model]]
    assert "model mode in turns: reference, fastmoco" in res.stdout
    assert not any("window_ceilings" in r for r in rows if r["mode"] != "model")
    assert result["ceilings"]["mm_fp32_flops"] > 0 and result["ceilings"]["copy_bytes_s"] > 0
    assert result["cases"]["current"]["flops_per_step"] > 0
    assert result["setting"]["commit"] and "cpu" in result["setting"]["device"]
    names = {t["name"] for t in result["targets"]}
    assert "full loop ≥ 95% of its synthetic ceiling" in names  # a target of every CPU kind
    assert ("model-only ≥ 3× reference" in names) == (not auto_fp32)  # a bf16-CPU target
    assert list(out.glob("bench_*.png"))
    assert not (tmp_path / "docs").exists()  # the docs chart only when bench.docs_chart asks
    assert "targets:" in res.stdout and "img/s" in res.stdout


def _copy_by_order(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    with torch.no_grad():
        for a, b in zip(list(dst.parameters()) + list(dst.buffers()),
                        list(src.parameters()) + list(src.buffers()), strict=True):
            a.copy_(b.reshape(a.shape))


def test_reference_arm_computes_the_same_step_as_fastmoco():
    cfg = tiny_config(version="v2", queue_size=32, bn_splits=1, momentum=0.9, temperature=0.2)
    torch.manual_seed(0)
    fast = MoCo(cfg.backbone.name, version="v2", dim=cfg.method.dim, queue_size=32, momentum=0.9,
                temperature=0.2, shuffle_bn="none", cifar_stem=True,
                backbone_kwargs=dict(cfg.backbone.kwargs), loss_backend="torch", ema_backend="loop")
    ref = ReferenceMoCo(cfg)
    _copy_by_order(ref.encoder_q, fast.query_encoder)
    with torch.no_grad():
        for p in fast.key_encoder.parameters():  # a key encoder that differs from the query one
            p.add_(0.01 * torch.randn_like(p))
    _copy_by_order(ref.encoder_k, fast.key_encoder)
    ref.queue.copy_(fast.queue.keys.T)
    x_q, x_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    out = fast(x_q, x_k)
    fast.enqueue(out.keys)
    logits, labels = ref(x_q, x_k)
    loss = F.cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    torch.testing.assert_close(ref.queue.T, fast.queue.keys, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref.encoder_k.parameters(), fast.key_encoder.parameters()):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-5, atol=1e-6)


V3 = ["method.version=v3", "method.queue_size=0", "method.symmetric=true", "method.dim=16",
      "method.mlp_hidden=32", "method.momentum=0.9", "run.precision=fp32",
      "run.channels_last=false", "optim.name=lars", "optim.weight_decay=1e-4"]
BYOL = ["method.name=byol", "method.queue_size=0", "method.symmetric=true", "method.dim=16",
        "method.mlp_hidden=32", "method.momentum=0.9", "run.precision=fp32",
        "run.channels_last=false", "optim.name=lars", "optim.weight_decay=1e-4"]


@pytest.mark.parametrize("overrides", [V3, BYOL], ids=["v3", "byol"])
def test_reference_arm_of_v3_and_byol_computes_the_same_steps_as_fastmoco(overrides):
    """The reference arm's model and optimizer (the authors' formulation, loop EMA and LARS)
    against fastmoco's trainer from the same weights: losses of two steps and the momentum
    encoder after them."""
    cfg = apply_overrides(tiny_config(), ["data.name=synthetic", *overrides])
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    fast = FastMocoArm("fastmoco", cfg, cpu, total_steps=10)
    ref = ReferenceArm(cfg, cpu, None, None, 0)
    ours, theirs = fast.trainer.model, ref.model
    if cfg.method.variant == "v3":
        pairs = [(theirs.base_encoder, ours.query_encoder), (theirs.predictor, ours.predictor),
                 (theirs.momentum_encoder, ours.key_encoder)]
        momentum_encoders = (theirs.momentum_encoder, ours.key_encoder)
    else:
        pairs = [(theirs.online, ours.online), (theirs.predictor, ours.predictor),
                 (theirs.target, ours.target)]
        momentum_encoders = (theirs.target, ours.target)
    for dst, src in pairs:
        dst.load_state_dict(src.state_dict())
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x1, x2 = (torch.randn(8, 3, 16, 16, generator=g) for _ in range(2))
        loss = ref.model.loss(x1, x2)
        ref.optimizer.zero_grad()
        loss.backward()
        ref.optimizer.step()
        ref.model.after_step()
        out = fast.trainer.step(x1, x2, fast.lr, fast.momentum)
        assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    for a, b in zip(*(m.parameters() for m in momentum_encoders), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_arms_that_do_not_apply_to_the_method_say_so():
    """A BYOL case: the split-BN and lightly arms are listed as not applicable, with the
    feature and the methods it exists for; nothing is built for them."""
    cfg = apply_overrides(tiny_config(), ["data.name=synthetic", *BYOL])
    bench = BenchConfig(arms=["no_split_bn", "no_fused_loss", "lightly"], modes=["model"],
                        ceilings=CeilingConfig(enabled=False), isolate=False, arm_defs={
                            "no_split_bn": ArmDef(overrides=["method.shuffle_bn=none"],
                                                  methods=["v1", "v2"], feature="split BN"),
                            "no_fused_loss": ArmDef(overrides=["run.loss_backend=torch"],
                                                    methods=["v1", "v2", "v3"]),
                            "lightly": ArmDef(kind="lightly", methods=["v1", "v2"])})
    case = run_case("byol", cfg, CaseDef(), bench, torch.device("cpu"), {})
    assert case["method"] == "BYOL" and [r["arm"] for r in case["rows"]] == \
        ["no_split_bn", "no_fused_loss", "lightly"]
    skipped = {r["arm"]: r["skipped"] for r in case["rows"]}
    assert skipped["no_split_bn"] == "does not apply to BYOL: split BN exists for MoCo v1, MoCo v2 only"
    assert skipped["no_fused_loss"].endswith("no_fused_loss exists for MoCo v1, MoCo v2, MoCo v3 only")
    assert ArmDef().applies_to("simsiam") and not ArmDef(methods=["v3"]).applies_to("byol")
    assert "BYOL" in format_table({"setting": {"device": "cpu", "torch": "", "threads": 1,
                                               "commit": "", "time": ""}, "ceilings": {},
                                   "cases": {"byol": case}})


def test_lightly_memory_bank_loss_is_moco_infonce():
    pytest.importorskip("lightly")
    from lightly.loss import NTXentLoss

    crit = NTXentLoss(temperature=0.1, memory_bank_size=(48, 16))
    q, k = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16)
    crit(q.detach().clone().requires_grad_(), k)  # fills 6 bank rows: the bank is now in use
    bank = crit.memory_bank.bank.detach().clone()  # K×C
    loss = crit(q, k)
    expected, _ = infonce_loss_reference(F.normalize(q, dim=1), F.normalize(k, dim=1), bank, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_profiler_ranges_count_nested_phases_exclusively():
    cpu = torch.device("cpu")
    with profiler(cpu) as prof:
        start = time.perf_counter()
        with record_function("fastmoco.forward"):
            time.sleep(0.01)
            with record_function("fastmoco.ema"):
                time.sleep(0.03)
        wall = time.perf_counter() - start
    us = phase_us(prof.events(), cpu)
    assert us["ema"] >= 30e3
    assert us["forward"] >= 10e3 and us["forward"] < 30e3  # the ema range is not in forward
    assert us["forward"] + us["ema"] == pytest.approx(wall * 1e6, abs=5e3)
    assert us["backward"] == 0.0


def test_cuda_phases_are_the_kernel_time_launched_inside_each_range():
    """On CUDA a range's time is its kernels' device time, from any thread (backward's kernels
    come from the autograd engine's thread), nested ranges taken out, the ranges' own GPU spans
    (gpu_user_annotation) not counted; a range without kernels counts its wall time."""
    Kernel = namedtuple("Kernel", "name device duration")

    def ev(name, start, end, thread=1, kernels=(), annotation=False):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU, thread=thread,
                               time_range=SimpleNamespace(start=start, end=end),
                               kernels=[Kernel(*k) for k in kernels], is_user_annotation=annotation)

    events = [
        ev("fastmoco.forward", 0, 100, annotation=True, kernels=[("fastmoco.forward", 0, 500)]),
        ev("fastmoco.ema", 10, 20, annotation=True, kernels=[("triton_ema", 0, 7)]),
        ev("aten::conv2d", 30, 40, kernels=[("conv_fwd", 0, 50)]),
        ev("fastmoco.backward", 100, 200, annotation=True),
        ev("aten::convolution_backward", 120, 130, thread=2, kernels=[("conv_bwd", 0, 90)]),
        ev("fastmoco.queue", 200, 230, annotation=True),
        ev("aten::mm", 300, 310, kernels=[("outside", 0, 1000)]),
    ]
    us = phase_us(events, torch.device("cuda"))
    assert us["forward"] == 50 and us["ema"] == 7 and us["backward"] == 90
    assert us["queue"] == 30 and us["optimizer"] == 0


def test_phase_split_of_the_fastmoco_step_is_sane():
    """The profile pass splits a real step: every phase non-negative, forward and backward
    measured, and together about the step's wall time in that pass (the timed windows run
    without the profiler, and a shared machine moves them too much to compare with)."""
    cfg = apply_overrides(tiny_config(), ["data.name=synthetic", "run.precision=fp32"])
    cpu = torch.device("cpu")
    arm = FastMocoArm("fastmoco", cfg, cpu, total_steps=100)
    bench = BenchConfig(warmup=1, windows=1, steps_per_window=1, profile_steps=3)
    row = measure(arm.step, synthetic_batches(arm, cfg, cpu), cpu, 8, bench, from_loader=False)
    phases = row["phases_ms"]
    assert set(phases) == {"data", "forward", "backward", "optimizer", "ema", "loss", "queue"}
    assert all(v >= 0 for v in phases.values()), phases
    assert phases["forward"] > 0 and phases["backward"] > 0, phases
    assert phases["ema"] > 0 and phases["loss"] > 0 and phases["optimizer"] > 0, phases
    step_ms = row["profiled_step_ms"]
    assert 0.5 * step_ms <= sum(phases.values()) - phases["data"] <= 1.5 * step_ms, (phases, step_ms)


def test_overrides_keep_command_line_semantics_and_refuse_groups():
    cfg = apply_overrides(TrainConfig(), ["run.compile=off", "data.eval_split=null", "data.train_split=."])
    assert cfg.run.compile == "off" and cfg.data.eval_split is None and cfg.data.train_split == "."
    with pytest.raises(ValueError, match="dotted keys"):
        apply_overrides(TrainConfig(), ["backbone=resnet50"])
    with pytest.raises(ValueError, match="queue_size"):
        apply_overrides(TrainConfig(), ["method.queue_size=100"])


def test_bench_config_names_unknown_arms_cases_and_modes():
    with pytest.raises(ValueError, match="arm_defs"):
        BenchConfig(arms=["nope"])
    with pytest.raises(ValueError, match="case_defs"):
        BenchConfig(cases=["nope"])
    with pytest.raises(ValueError, match="bench.modes"):
        BenchConfig(modes=["fast"])
    BenchConfig(arms=["x"], arm_defs={"x": ArmDef()}, cases=["c"], case_defs={"c": CaseDef()})


def test_fraction_of_ceiling_pairs_each_window_with_the_pace_around_it():
    """A machine that halves its pace between two windows: each window against the ceilings
    sampled beside it gives the same fraction; one ceiling for the arm (its best) would not."""
    from fastmoco.bench.report import add_ratios
    row = {"arm": "fastmoco", "mode": "model", "dtype": "float32", "img_s": 15.0,
           "windows": [20.0, 10.0],
           "window_ceilings": [[{"mm_fp32_flops": 200.0}, {"mm_fp32_flops": 100.0}],
                               [{"mm_fp32_flops": 100.0}, {"mm_fp32_flops": 100.0}]],
           "arm_ceilings": {"mm_fp32_flops": 200.0}}
    case = {"rows": [row], "flops_per_step": 4.0, "batch": 4}  # 1 FLOP an image
    add_ratios(case, {})
    assert row["frac_ceiling"] == pytest.approx(0.1)  # 20 / max(200, 100) and 10 / 100
    assert row["window_ceiling"] == pytest.approx(150.0)
    del row["window_ceilings"], row["window_ceiling"]
    add_ratios(case, {})
    assert row["frac_ceiling"] == pytest.approx(15.0 / 200.0)  # the median rate, best ceiling


def test_targets_met_and_missed():
    rows = [{"arm": "fastmoco", "mode": "model", "img_s": 90.0, "frac_bf16_ceiling": 0.8},
            {"arm": "reference", "mode": "model", "img_s": 30.0},
            {"arm": "fastmoco", "mode": "full", "img_s": 88.0}]
    targets = [Target(name="3x", other="reference", min=3.0),
               Target(name="ceil", metric="ceiling_bf16", min=0.9),
               Target(name="full", mode="full", metric="vs_mode", other="model", min=0.95),
               Target(name="absent", other="lightly", min=3.0)]
    got = {t["name"]: t for t in check_targets({"c": {"rows": rows}}, targets)}
    assert set(got) == {"3x", "ceil", "full"}
    assert got["3x"]["met"] and got["3x"]["value"] == pytest.approx(3.0)
    assert not got["ceil"]["met"]
    assert got["full"]["met"] and got["full"]["value"] == pytest.approx(88 / 90)
    # Per CPU kind: a no_bf16 target applies where fp32 is the fast path, a bf16 one where bf16 is.
    kinds = [Target(name="fp32", other="reference", min=1.6, cpu="no_bf16"),
             Target(name="bf16", other="reference", min=3.0, cpu="bf16")]
    assert [t["name"] for t in check_targets({"c": {"rows": rows}}, kinds, False)] == ["fp32"]
    assert [t["name"] for t in check_targets({"c": {"rows": rows}}, kinds, True)] == ["bf16"]
    with pytest.raises(ValueError, match="cpu='avx'"):
        check_targets({"c": {"rows": rows}}, [Target(cpu="avx")], True)


def test_drain_takes_prefetched_batches_until_one_must_be_made():
    def loader():
        for _ in range(3):
            yield 0  # prefetched: ready at once
        while True:
            time.sleep(0.02)
            yield 1

    it = loader()
    assert drain(it) == 3
    assert next(it) == 1
