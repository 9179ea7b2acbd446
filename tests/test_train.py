"""The loop end to end on a few steps: CLI, metrics, checkpoints, exact resume, config errors."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from fastmoco.config import TrainConfig, apply_overrides, from_hydra
from fastmoco.training.loop import train
from fastmoco.weights.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FAST = ["backbone=resnet18_cifar", "+backbone.kwargs.channels=[8,16,32,64]", "pipeline=torchvision",
        "pipeline.num_workers=1", "method.queue_size=64", "method.bn_splits=4",
        "schedule.batch_size=16", "run.log_every=1", "run.progress=false", "knn.batch_size=100"]


def make_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=overrides))


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_cli_runs_a_few_steps_and_writes_metrics_and_checkpoint(tiny_cifar, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastmoco", "train", *FAST, f"data.root={tiny_cifar}",
           "schedule.steps=3", f"run.dir={run_dir}", "knn.k=20"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kNN top-1 on the test split" in res.stdout and "at random init" in res.stdout
    # The baseline is the random network with BN statistics of the data (200 train images here).
    assert "BN statistics re-estimated on 200 train images" in res.stdout
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["images_per_s"] > 0 and 0 <= r["pretext_top1"] <= 100 for r in steps)
    assert any("tensorboard" in p.name for p in run_dir.iterdir())
    (ckpt,) = list_checkpoints(run_dir)
    state = load_checkpoint(ckpt)
    assert state["progress"]["step"] == 3
    assert {"queue.keys", "queue.ptr"} <= set(state["model"])
    assert any(k.startswith("key_encoder.") for k in state["model"])
    assert int(state["model"]["queue.ptr"]) == (3 * 16) % 64


def test_resume_from_epoch_checkpoint_gives_the_same_losses(tiny_cifar, tmp_path):
    common = FAST + [f"data.root={tiny_cifar}", "schedule.epochs=2", "knn.enabled=false",
                     "run.keep_checkpoints=5"]
    a = tmp_path / "a"
    train(make_config(common + [f"run.dir={a}"]))
    full = losses(a)
    steps_per_epoch = 200 // 16
    assert len(full) == 2 * steps_per_epoch
    # An interrupted run: only the checkpoint written after epoch 1 survives.
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    first = list_checkpoints(a)[0]
    assert load_checkpoint(first)["progress"]["step"] == steps_per_epoch
    shutil.copy(first, b / "checkpoints" / first.name)
    train(make_config(common + [f"run.dir={b}"]))
    resumed = losses(b)
    assert sorted(resumed) == list(range(steps_per_epoch + 1, 2 * steps_per_epoch + 1))
    # Exact by construction: the same process kind, kernels and summation order on both sides
    # (no tolerance to tune per machine); a resume that lost any state moves the loss.
    for step, loss in resumed.items():
        assert loss == full[step], step


def test_stop_at_step_keeps_the_schedule_and_resumes_to_the_end(tiny_cifar, tmp_path):
    """schedule.stop_at_step stops mid-epoch with a checkpoint, the lr where the whole schedule
    has it; run again without it, the run ends as one that never stopped, step for step."""
    common = FAST + [f"data.root={tiny_cifar}", "schedule.epochs=1", "knn.enabled=false"]
    full_dir, parts_dir = tmp_path / "full", tmp_path / "parts"
    train(make_config(common + [f"run.dir={full_dir}"]))
    stopped = train(make_config(common + [f"run.dir={parts_dir}", "schedule.stop_at_step=5"]))
    assert stopped["stopped"] and stopped["step"] == 5
    assert load_checkpoint(list_checkpoints(parts_dir)[-1])["progress"]["step"] == 5
    again = train(make_config(common + [f"run.dir={parts_dir}", "schedule.stop_at_step=5"]))
    assert again["stopped"] and again["step"] == 5  # the same command: nothing more to do
    train(make_config(common + [f"run.dir={parts_dir}"]))
    records = {d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
               for d in (full_dir, parts_dir)}
    by_step = {d: {r["step"]: (r["loss"], r["lr"]) for r in recs if "loss" in r}
               for d, recs in records.items()}
    assert sorted(by_step[parts_dir]) == sorted(by_step[full_dir]) == list(range(1, 200 // 16 + 1))
    assert by_step[parts_dir] == by_step[full_dir]  # losses and lrs, bit for bit


def test_sigterm_checkpoints_mid_epoch_and_resume_continues(tiny_cifar, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastmoco", "train", *FAST, f"data.root={tiny_cifar}",
           "schedule.epochs=3", "knn.enabled=false", f"run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out
    (ckpt,) = list_checkpoints(run_dir)
    stopped = load_checkpoint(ckpt)["progress"]
    assert 4 <= stopped["step"] < 36
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = sorted(losses(run_dir))
    assert steps[-1] == 3 * (200 // 16)
    assert stopped["step"] + 1 in steps


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["method.queue_size=100"], ValueError, r"method.queue_size=100 must be a multiple.*set method.queue_size=96"),
        (["backbone.name=resnet_nope"], ValueError, "unknown timm backbone 'resnet_nope'"),
        (["data.root=/nonexistent/cifar"], FileNotFoundError, "FASTMOCO_DATA"),
        (["method.bn_splits=3"], ValueError, "not a multiple of method.bn_splits=3"),
    ],
)
def test_config_errors_name_the_fix(tiny_cifar, tmp_path, overrides, error, match):
    base = FAST + [f"data.root={tiny_cifar}", f"run.dir={tmp_path}", "schedule.steps=1"]
    with pytest.raises(error, match=match):
        train(make_config(base + overrides))


def test_experiment_presets_compose():
    v1 = make_config(["experiment=imagenet_moco_v1"])
    assert (v1.method.version, v1.method.temperature, v1.method.queue_size) == ("v1", 0.07, 65536)
    assert (v1.optim.lr, v1.schedule.batch_size, v1.schedule.lr_schedule) == (0.03, 256, "step")
    assert v1.data.recipe == "v1" and v1.backbone.name == "resnet50"
    v2 = make_config(["experiment=imagenet_moco_v2"])
    assert (v2.method.version, v2.method.temperature, v2.data.recipe) == ("v2", 0.2, "v2")
    assert v2.schedule.lr_schedule == "cosine" and v2.method.momentum == 0.999
    c = make_config(["experiment=cifar10_moco_v2"])
    assert (c.method.queue_size, c.method.momentum, c.method.temperature) == (4096, 0.99, 0.1)
    assert (c.optim.lr, c.optim.weight_decay, c.schedule.batch_size, c.schedule.epochs) == (0.06, 5e-4, 512, 200)
    assert c.backbone.cifar_stem
    # The CPU demo picks one of its sizes by measurement; each applies and passes the checks.
    d = make_config(["experiment=cpu_demo"])
    assert d.schedule.time_budget_min and d.schedule.min_steps > 0 and len(d.schedule.sizes) >= 2
    widths = [apply_overrides(d, s).backbone.kwargs["channels"][0] for s in d.schedule.sizes]
    assert widths == sorted(widths, reverse=True)  # largest first


def test_time_budget_replans_on_the_pace_so_far(monkeypatch):
    """1 s steps for 100 s of budget plan ~100 steps; when steps slow to 2 s, the re-plans (at
    10, 50, 75 and 90 % of the plan) cut the run so that it still ends within the budget."""
    from fastmoco.training import budget as budget_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(budget_mod.time, "perf_counter", lambda: clock["t"])
    budget = budget_mod.TimeBudget(100.0, start_step=0, device=torch.device("cpu"))
    total, decisions = 10_000, []
    step = 0
    while step < total:
        clock["t"] += 1.0 if step < 20 else 2.0  # the machine slows down after 20 steps
        step += 1
        if budget.decide(step, total):
            total = budget.total_steps
            decisions.append((step, total))
    assert decisions[0] == (13, 100), decisions  # the first plan: 1 s per step, 100 s
    # 10 % of 100 falls before the calibration ends: that re-plan comes right after it.
    assert [s for s, _ in decisions] == [13, 14, 50], decisions
    assert clock["t"] <= 100.0 * 1.03, (clock["t"], decisions)  # without re-plans: 180 s
    # A machine that slows down late (after the half-way re-plan) is caught by the later ones.
    clock["t"], step, total = 0.0, 0, 10_000
    late = budget_mod.TimeBudget(100.0, start_step=0, device=torch.device("cpu"))
    while step < total:
        clock["t"] += 1.0 if step < 60 else 2.0
        step += 1
        if late.decide(step, total):
            total = late.total_steps
    assert clock["t"] <= 100.0 * 1.03, clock["t"]  # re-planning at 10 % and 50 % only: 140 s
    # A budget never adds steps beyond the schedule's own.
    clock["t"] = 0.0
    short = budget_mod.TimeBudget(100.0, start_step=0, device=torch.device("cpu"))
    for step in range(1, 14):
        clock["t"] += 1.0
        short.decide(step, 50)
    assert short.total_steps == 50


def test_replan_keeps_the_lr_where_it_is():
    """A re-plan from 100 to 61 steps at step 50: the lr stays at its value, then follows the
    rest of the cosine to its end exactly at the new last step; the progress round-trips."""
    from fastmoco.training.position import RunPosition
    from fastmoco.training.schedules import lr_at

    progress = RunPosition(step=50, total_steps=100)
    before = lr_at(*progress.schedule_position(), 1.0)
    progress.replan(61)
    assert lr_at(*progress.schedule_position(), 1.0) == pytest.approx(before)
    progress.step = 61
    position, length = progress.schedule_position()
    assert (position, length) == (pytest.approx(100.0), 100) and lr_at(position, length, 1.0) < 1e-9
    progress.step = 55
    again = RunPosition(**progress.to_dict())  # as a checkpoint stores it
    assert again.schedule_position() == progress.schedule_position()
    progress.replan(70)  # a second re-plan anchors on the first
    assert progress.schedule_position() == pytest.approx(again.schedule_position())


@pytest.mark.slow
def test_the_loss_falls_over_50_steps_on_a_tiny_set(tiny_cifar, tmp_path):
    """MoCo v3 (in-batch keys: no queue to fill, whose real keys first raise a v1/v2 loss) on 200
    CIFAR images: the mean loss of the last 10 steps is well below that of the first 10
    (measured 3.1 → 2.6 nats)."""
    cfg = make_config(FAST + [
        f"data.root={tiny_cifar}", f"run.dir={tmp_path}", "method=moco_v3", "method.queue_size=0", "method.dim=32",
        "method.mlp_hidden=64", "method.temperature=0.2", "optim=lars", "optim.lr=1.0",
        "optim.base_batch=null", "schedule.batch_size=32", "schedule.lr_schedule=constant",
        "schedule.steps=50", "run.precision=fp32", "knn.enabled=false"])
    train(cfg)
    loss = [v for _, v in sorted(losses(tmp_path).items())]
    assert len(loss) == 50
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < first - 0.2, (first, last)


def test_checkpoints_from_before_the_budgeted_flag_keep_their_plan():
    """A progress saved without `budgeted` had a plan exactly when it recorded a number of steps
    under a time budget: resuming must not re-plan it from a fresh budget."""
    from fastmoco.training.state import progress_of

    cfg = make_config(["experiment=cpu_demo"])
    old = {"progress": {"step": 500, "epoch": 0, "batch_in_epoch": 500, "knn": {}, "total_steps": 1800,
                        "schedule_length": 0, "anchor_step": 0, "anchor_position": 0.0}}
    assert progress_of(old, cfg).budgeted
    cfg.schedule.time_budget_min = None
    assert not progress_of(old, cfg).budgeted
