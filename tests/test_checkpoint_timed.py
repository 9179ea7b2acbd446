"""Checkpoints every N steps or minutes: the snapshot taken in the step, written in the
background, equal to a synchronous save; where they fall in a run; a failed write; the checks."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from soak_driver import assert_same

import fastmoco.weights.checkpoint as ckpt
from fastmoco.config import RunConfig, TrainConfig, from_hydra
from fastmoco.data import build_loader
from fastmoco.runtime import local_runtime
from fastmoco.training import state as resume
from fastmoco.training.checkpointing import PeriodicCheckpoints, to_host
from fastmoco.training.loop import train
from fastmoco.training.position import RunPosition
from fastmoco.training.trainer import build_trainer

STEPS_PER_EPOCH = 12
# A tiny ResNet on synthetic images (the same batch every step, made once): no files, no workers.
FAST = ["backbone=resnet18_cifar", "+backbone.kwargs.channels=[8,16,32,64]", "data=synthetic",
        f"data.synthetic_images={16 * STEPS_PER_EPOCH}", "data.image_size=16", "method.queue_size=64",
        "method.bn_splits=4", "schedule.batch_size=16", "run.log_every=1", "run.progress=false",
        "run.precision=fp32", "run.compile=off", "knn.enabled=false", "run.keep_checkpoints=10"]


def make_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=FAST + overrides))


def steps_of(run_dir: Path) -> list[int]:
    return [int(p.name[len("checkpoint_"):-len(".pt")]) for p in ckpt.list_checkpoints(run_dir)]


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.parametrize("setting, value", [
    ("checkpoint_every_steps", 0), ("checkpoint_every_steps", -5),
    ("checkpoint_every_min", 0.0), ("checkpoint_every_min", -1.0),
    ("checkpoint_every_min", math.nan), ("keep_checkpoints", 1),
])
def test_bad_checkpoint_settings_name_the_setting(setting, value):
    with pytest.raises(ValueError, match=f"run.{setting}="):
        RunConfig(**{setting: value})


def test_checkpoint_intervals_are_off_by_default_and_set_from_the_command_line():
    assert (RunConfig().checkpoint_every_steps, RunConfig().checkpoint_every_min) == (None, None)
    cfg = make_config(["run.checkpoint_every_steps=500", "run.checkpoint_every_min=30"])
    assert (cfg.run.checkpoint_every_steps, cfg.run.checkpoint_every_min) == (500, 30.0)
    with pytest.raises(Exception, match="run.checkpoint_every_min=0"):
        make_config(["run.checkpoint_every_min=0"])


def test_to_host_is_a_copy_later_changes_do_not_reach():
    live = {"w": torch.ones(3), "opt": {"state": {0: {"buf": torch.zeros(2)}}, "groups": [{"lr": 0.1}]},
            "rng": (3, (1, 2), None)}
    snap = to_host(live)
    live["w"].add_(1)
    live["opt"]["state"][0]["buf"].add_(1)
    live["opt"]["groups"][0]["lr"] = 0.2
    assert_same(snap, {"w": torch.ones(3), "opt": {"state": {0: {"buf": torch.zeros(2)}},
                                                   "groups": [{"lr": 0.1}]}, "rng": (3, (1, 2), None)})


class Gate:
    """Holds the background writer's save_checkpoint until opened."""

    def __init__(self, monkeypatch) -> None:
        self.opened, self.entered = threading.Event(), threading.Event()
        real = ckpt.save_checkpoint

        def save(*args, **kwargs):
            self.entered.set()
            assert self.opened.wait(timeout=120), "the gate was never opened"
            return real(*args, **kwargs)
        monkeypatch.setattr(ckpt, "save_checkpoint", save)


def tiny_trainer(run_dir: Path, overrides: list[str] = ()):
    cfg = make_config([f"run.dir={run_dir}", *overrides])
    rt = local_runtime(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    trainer = build_trainer(cfg, rt, steps=100)
    batch = next(iter(build_loader(cfg, rt)))
    progress = RunPosition(total_steps=100)

    def step() -> None:
        trainer.step(*batch, lr=0.05, momentum=0.9)
        progress.advance()
        torch.rand(1)  # and the RNG moves on
    return cfg, trainer, progress, step


def test_background_checkpoint_equals_a_synchronous_save_of_the_same_step(tmp_path, monkeypatch):
    cfg, trainer, progress, step = tiny_trainer(tmp_path, ["run.checkpoint_every_steps=2"])
    checkpoints = PeriodicCheckpoints(trainer, progress, cfg, None, steps_per_epoch=1000)
    step(), step()
    resume.save(trainer, progress, cfg, None)  # the reference: today's synchronous save
    sync = tmp_path / "sync.pt"
    os.replace(ckpt.checkpoint_dir(tmp_path) / "checkpoint_000000002.pt", sync)

    gate = Gate(monkeypatch)
    checkpoints.after_step()  # step 2: due; the write waits at the gate
    assert gate.entered.wait(timeout=120) and checkpoints.writer.busy
    for _ in range(3):  # later steps change the model, queue, optimizer and RNG in place
        step()
    gate.opened.set()
    checkpoints.close()
    assert checkpoints.writer.failures == 0
    background = ckpt.load_checkpoint(ckpt.checkpoint_dir(tmp_path) / "checkpoint_000000002.pt")
    assert_same(background, ckpt.load_checkpoint(sync))
    # ...and the later steps did change what a checkpoint would hold now.
    now = trainer.state_dict()["model"]
    assert int(now["queue.ptr"]) != int(background["model"]["queue.ptr"])
    assert not torch.equal(now["queue.keys"], background["model"]["queue.keys"])


def test_timed_checkpoints_follow_the_clock_and_never_wait_for_a_write(tmp_path, monkeypatch):
    """Every 1 minute, 25 s per step: due at 75 s (step 3), then 60 s after each checkpoint;
    one that comes due while a write is in flight is taken when the write is done, not waited for."""
    cfg, trainer, progress, step = tiny_trainer(tmp_path, ["run.checkpoint_every_min=1"])
    now = {"t": 0.0}
    monkeypatch.setattr(PeriodicCheckpoints, "clock", staticmethod(lambda: now["t"]))
    checkpoints = PeriodicCheckpoints(trainer, progress, cfg, None, steps_per_epoch=1000)
    taken = []
    gate = Gate(monkeypatch)
    gate.opened.set()

    def run(steps: int, wait: bool = True) -> None:
        for _ in range(steps):
            step()
            now["t"] += 25.0
            before = len(checkpoints.snapshot_seconds)
            checkpoints.after_step()  # with a write in flight: returns at once, or hangs here
            if len(checkpoints.snapshot_seconds) > before:
                taken.append(progress.step)
            if wait:
                checkpoints.close()  # the write ends within its step
    run(9)
    assert taken == [3, 6, 9]
    gate.opened.clear()  # now the write of step 12 stays in flight for the next steps
    run(3, wait=False)
    assert taken == [3, 6, 9, 12] and checkpoints.writer.busy
    run(4, wait=False)  # 100 s since step 12: due, but the write is still in flight
    assert taken == [3, 6, 9, 12] and checkpoints.writer.busy
    gate.opened.set()
    checkpoints.close()
    run(1)
    assert taken[-1] == 17 and steps_of(tmp_path) == [3, 6, 9, 12, 17]


def test_a_lagging_agreement_takes_one_checkpoint_not_two(tmp_path, monkeypatch):
    """With several processes the time flag is agreed one step late (AnyProcess): the flag posted
    in the step of a checkpoint must not take a second one in the next step."""
    cfg, trainer, progress, step = tiny_trainer(tmp_path, ["run.checkpoint_every_min=1"])
    now = {"t": 0.0}
    monkeypatch.setattr(PeriodicCheckpoints, "clock", staticmethod(lambda: now["t"]))
    checkpoints = PeriodicCheckpoints(trainer, progress, cfg, None, steps_per_epoch=1000)
    posted = [False]

    def lagging(flag: bool) -> bool:  # what every process sees: the previous step's flag
        posted.append(flag)
        return posted[-2]
    checkpoints._agree = lagging
    for _ in range(10):
        step()
        now["t"] += 25.0
        checkpoints.after_step()
        checkpoints.close()
    assert steps_of(tmp_path) == [4, 8]  # due at 75 s (step 3), agreed at step 4; then 4 → 8


def test_step_checkpoints_fall_at_their_steps_and_resume_exactly(tmp_path, caplog):
    """Every 6 steps over 2 epochs of 12: steps 6 and 18 mid-epoch, 12 at the epoch's end (with
    the next epoch's position), 24 at the end; resuming from step 6 (the newer step-12 file
    truncated: it falls back) gives the uninterrupted run's losses."""
    common = ["schedule.epochs=2", "run.checkpoint_every_steps=6", "run.checkpoint_every_epochs=5"]
    a = tmp_path / "a"
    train(make_config(common + [f"run.dir={a}"]))
    assert steps_of(a) == [6, 12, 18, 24]
    progress = {s: ckpt.load_checkpoint(p)["progress"] for s, p in zip(steps_of(a), ckpt.list_checkpoints(a))}
    assert [(progress[s]["epoch"], progress[s]["batch_in_epoch"]) for s in (6, 12, 18)] == [
        (0, 6), (1, 0), (1, 6)]
    state6 = ckpt.load_checkpoint(ckpt.list_checkpoints(a)[0])
    assert int(state6["model"]["queue.ptr"]) == 6 * 16 % 64

    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    six, twelve = ckpt.list_checkpoints(a)[:2]
    shutil.copy(six, b / "checkpoints" / six.name)
    (b / "checkpoints" / twelve.name).write_bytes(twelve.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        train(make_config(common + [f"run.dir={b}"]))
    assert "checkpoint_000000012.pt cannot be read" in caplog.text
    full, resumed = losses(a), losses(b)
    assert sorted(resumed) == list(range(7, 25))
    for s, loss in resumed.items():  # the same process kind and order: exact, no tolerance
        assert loss == full[s], s


def test_a_failed_write_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
    real = torch.save

    def disk_full_at_step_6(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("progress", {}).get("step") == 6:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full_at_step_6)
    with caplog.at_level("INFO"):
        summary = train(make_config([f"run.dir={tmp_path}", "schedule.steps=10",
                                     "run.checkpoint_every_steps=3"]))
    assert summary["step"] == 10
    assert "checkpoint of step 6 not written (OSError" in caplog.text
    assert "the last good checkpoint is" in caplog.text and "checkpoint_000000003.pt" in caplog.text
    assert steps_of(tmp_path) == [3, 9, 10]
    assert sorted(os.listdir(ckpt.checkpoint_dir(tmp_path))) == [
        "checkpoint_000000003.pt", "checkpoint_000000009.pt", "checkpoint_000000010.pt"]


def test_read_only_run_dir_stops_at_start(tmp_path, monkeypatch):
    cfg = make_config([f"run.dir={tmp_path}", "schedule.steps=1"])

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match=f"run.dir={tmp_path} is not writable.*set run.dir"):
        train(cfg)


@pytest.fixture(scope="module")
def run_of_four_steps(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("four_steps")
    train(make_config([f"run.dir={run_dir}", "schedule.steps=4"]))
    return run_dir


@pytest.mark.parametrize("override, match", [
    ("schedule.batch_size=32", "global batch 16 but schedule.batch_size=32: keep the global batch"),
    ("method.queue_size=128", "queue of 64 keys but method.queue_size=128: set method.queue_size=64"),
    # A queue-less method on a MoCo run's directory: the method, not its queue of 0, is the fix.
    ("method=byol method.queue_size=0", r"another model.*method.version=v2.*method.queue_size=64.*new run.dir"),
])
def test_resume_with_another_batch_or_queue_names_the_fix(run_of_four_steps, tmp_path, override, match):
    run_dir = tmp_path / "run"
    shutil.copytree(run_of_four_steps, run_dir)
    with pytest.raises(ValueError, match=match):
        train(make_config([f"run.dir={run_dir}", "schedule.steps=8", *override.split()]))


def test_two_processes_agree_on_timed_checkpoints(tmp_path):
    """Two gloo processes with a checkpoint due every few milliseconds by rank 0's clock and every
    5 steps: no process waits on another (the run ends), and each checkpoint holds both RNGs."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "fastmoco",
           "train", *FAST, f"run.dir={run_dir}", "schedule.steps=12",
           "run.checkpoint_every_min=0.0001", "run.checkpoint_every_steps=5",
           "run.keep_checkpoints=20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = steps_of(run_dir)
    # Timed ones come on top: due every 6 ms, they come at least every other step unless a write
    # is in flight (a step here takes tens of milliseconds, a write of this model a few).
    assert {5, 10, 12} <= set(steps) and len(steps) > 3
    for path in ckpt.list_checkpoints(run_dir):
        state = ckpt.load_checkpoint(path)
        assert (state["world_size"], len(state["rng"])) == (2, 2)
