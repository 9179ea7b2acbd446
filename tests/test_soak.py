"""Fault injection (tests/soak_driver.py): a run SIGKILLed, SIGTERMed, restarted on a damaged
checkpoint and on two processes instead of one, each time with the same command, ends with what
uninterrupted runs end with, bit for bit: model, key encoder, queue and its pointer, optimizer
state, RNG streams, every loss. The short version runs in the suite; `make soak` runs the long one.
The interruption steps come from a seed the test prints: FASTMOCO_SOAK_SEED=<seed> draws the same."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from soak_driver import (
    Event,
    draw_plan,
    finish,
    invoke,
    kill_all,
    reference,
    soak,
    tiny_tree,
    verify,
)

from fastmoco.weights.checkpoint import list_checkpoints

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="finds a run's processes (torchrun's workers) in /proc")


def soak_seed() -> int:
    seed = os.environ.get("FASTMOCO_SOAK_SEED")
    seed = int(seed) if seed else random.SystemRandom().randrange(2**31)
    print(f"soak seed {seed} (FASTMOCO_SOAK_SEED={seed} draws the same interruptions)")
    return seed


def run(plans: dict, overrides: list[str], work: Path) -> None:
    """Soak each plan in turn beside the uninterrupted one-process reference; a plan that switches
    to two processes gets its two-process reference from the switch checkpoint on."""
    start = time.perf_counter()
    refs = {"one": reference(1, overrides, work, "one")}
    results = {}

    def start_two(name: str, path: Path) -> None:
        refs[f"{name}-two"] = reference(2, overrides, work, f"{name}-two", start_from=path)
    try:
        for name, plan in plans.items():
            print(f"{name}: {plan.total_steps} steps; {'; '.join(map(str, plan.events))}; "
                  f"processes of each invocation {plan.worlds}")
            results[name] = soak(plan, overrides, work, name,
                                 on_switch=lambda path, name=name: start_two(name, path))
        for proc in refs.values():
            finish(proc)
    finally:
        for proc in refs.values():  # a failed soak leaves no reference running
            if proc.poll() is None:
                kill_all(proc.pid)
                proc.wait()
    for name, result in results.items():
        other = work / f"{name}-two" if f"{name}-two" in refs else None
        print(f"{name}: equal bit for bit: {verify(result, work / 'one', other)}")
    print(f"wall time {time.perf_counter() - start:.0f} s")


def test_soak_short(tiny_cifar, tmp_path):
    """24 steps on 200 CIFAR images: a SIGKILL and a SIGTERM in a random order (one restart on a
    damaged newest checkpoint), then a SIGKILL after which the run goes on on two processes."""
    plan = draw_plan(soak_seed(), 24, kills=1, terms=1, corrupt=1, switch_to=2, checkpoint_every=5)
    run({"soaked": plan}, [f"data.root={tiny_cifar}", "schedule.epochs=2",
                           "run.checkpoint_every_steps=5"], tmp_path)


def test_sigterm_to_the_process_group_stops_gracefully(tiny_cifar, tmp_path):
    """As a terminal or `kill -TERM -PGID` delivers it: the run checkpoints where it stops."""
    event = Event(4, "TERM", 0.05, to="group")
    inv = invoke(1, [f"data.root={tiny_cifar}", "schedule.epochs=2"], tmp_path / "run",
                 tmp_path / "run.log", tmp_path, event)
    assert inv.returncode == 0 and "stopped at step" in inv.log, inv.log[-2000:]
    stopped = int(inv.log.split("stopped at step ")[1].split(";")[0])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [f"checkpoint_{stopped:09d}.pt"]


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_long(cifar_root, tmp_path):
    """300 steps on 400 CIFAR images (12 epochs of 25 steps), checkpoints every 7 steps and every
    0.6 s (wherever the clock puts them: they must not change what the run computes): one run
    interrupted 8 times on one process, another 3 times on one, then switched to two processes and
    interrupted 3 more times there; a few restarts find the newest checkpoint damaged."""
    seed = soak_seed()
    data = tiny_tree(cifar_root, tmp_path / "data", per_class=40)
    plans = {"one-process": draw_plan(seed, 300, kills=6, terms=2, corrupt=2, checkpoint_every=7),
             "switch": draw_plan(seed + 1, 300, kills=2, terms=1, corrupt=2, switch_to=2,
                                 kills_after=2, terms_after=1, checkpoint_every=7)}
    run(plans, [f"data.root={data}", "schedule.epochs=12", "run.checkpoint_every_steps=7",
                "run.checkpoint_every_min=0.01"], tmp_path)
