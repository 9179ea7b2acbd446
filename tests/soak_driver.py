"""Fault injection for `fastmoco train`: a run is interrupted at random steps (SIGKILL to all its
processes, SIGTERM to one of them, a checkpoint cut short or bit-rotted before the restart, a
restart on another number of processes) and restarted with the same command each time; what it
ends with is compared against uninterrupted runs, bit for bit.

The metrics file is append-only: a run restarted after a SIGKILL re-does (and logs again) the
steps after its last complete checkpoint. The run's history is the last record of each step in
file order (a later invocation's record for a step supersedes an earlier one). Every record, the
superseded ones too, must equal the reference of its number of processes: a re-done step computes
exactly what it computed the first time.

A restart on another number of processes re-seeds the RNG streams and sums in another order, so
no tolerance against a run that never switched would be honest (different shuffle-BN permutations
move the loss by far more than rounding). The reference is a run that switches at the same step
on a clean start: the other number of processes resumed, uninterrupted, from a copy of the very
checkpoint the soaked run resumed from; that comparison is exact, as is the one up to the switch
against the uninterrupted one-process run."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from soak_procs import kill_all, trainers

from fastmoco.weights import checkpoint as ckpt

FIELDS = ("epoch", "loss", "pretext_top1", "lr", "momentum")  # per-step record, compared exactly
# A tiny ResNet on CIFAR files (augmented per (seed, epoch, image), one loader worker, so that the
# main process's RNG carries the shuffle-BN permutations from step to step and must be restored).
TRAIN = ["backbone=resnet18_cifar", "+backbone.kwargs.channels=[8,16,32,64]", "pipeline=torchvision",
         "pipeline.num_workers=1", "method.queue_size=64", "method.bn_splits=4",
         "schedule.batch_size=16", "run.log_every=1", "run.progress=false", "knn.enabled=false",
         "run.precision=fp32", "run.compile=off"]
KEEP_ALL = "run.keep_checkpoints=100000"  # the references keep every checkpoint, to compare with
ENV = {"OMP_NUM_THREADS": "1"}  # the same kernels and summation order in every invocation


@dataclass
class Event:
    """One interruption of the soaked run."""
    step: int  # sent once the invocation has logged this step (or a later one)
    signal: str  # KILL: SIGKILL to every process of the run (a node dies); TERM: SIGTERM
    delay_s: float  # after seeing the step: signals land anywhere in a step or a checkpoint write
    # Where a SIGTERM goes: "one" training process (the others learn of it from the stop
    # agreement); or the launcher's process "group" (a terminal, `kill -TERM -PGID`; torchrun
    # sends it on to each of its workers' groups), which holds the data loader's workers too.
    to: str = "one"
    corrupt: str = ""  # before the restart: "truncate" or "flip" a byte of the newest checkpoint
    switch: bool = False  # the restart runs on the other number of processes

    def __str__(self) -> str:
        extra = (f", then {self.corrupt} the newest checkpoint" if self.corrupt else "") + (
            ", then switch" if self.switch else "")
        to = " to the group" if self.signal == "TERM" and self.to == "group" else ""
        return f"SIG{self.signal}{to} at step {self.step} +{self.delay_s} s{extra}"


@dataclass
class Plan:
    seed: int
    total_steps: int
    events: list[Event]
    worlds: list[int]  # processes of each invocation: one more than there are events


def draw_plan(seed: int, total_steps: int, kills: int, terms: int, corrupt: int = 0,
              switch_to: Optional[int] = None, kills_after: int = 0, terms_after: int = 0,
              checkpoint_every: Optional[int] = None) -> Plan:
    """Random distinct steps in [2, total_steps - 4] from `seed`: kills and terms in a random order
    on one process, then (switch_to) a SIGKILL after which the run goes on with switch_to
    processes and kills_after/terms_after more; `corrupt` of the restarts find a damaged file.
    With `checkpoint_every`, about half the SIGKILLs come a few milliseconds after a checkpoint
    step, while its background write is in flight."""
    rng = random.Random(seed)
    before = ["KILL"] * kills + ["TERM"] * terms
    after = ["KILL"] * kills_after + ["TERM"] * terms_after
    rng.shuffle(before)
    rng.shuffle(after)
    kinds = before + (["KILL"] + after if switch_to else [])
    # Not in the last steps: a signal that lands after the run's end interrupts nothing.
    if len(kinds) > total_steps - 5:
        raise ValueError(f"{len(kinds)} interruptions do not fit in {total_steps} steps")
    steps = sorted(rng.sample(range(2, total_steps - 3), len(kinds)))
    events = [Event(s, k, round(rng.uniform(0.0, 0.25), 3)) for s, k in zip(steps, kinds)]
    for i, e in enumerate(events):
        at = e.step // checkpoint_every * checkpoint_every if checkpoint_every else 0
        if e.signal == "KILL" and rng.random() < 0.5 and at > (events[i - 1].step if i else 1):
            e.step, e.delay_s = at, round(rng.uniform(0.005, 0.06), 3)  # mid-copy or mid-write
    for i in rng.sample(range(len(events)), min(corrupt, len(events))):
        events[i].corrupt = rng.choice(["truncate", "flip"])
    worlds = [1] * (len(before) + 1)
    if switch_to:
        events[len(before)].switch = True
        worlds += [switch_to] * (len(after) + 1)
    return Plan(seed, total_steps, events, worlds)


def command(world: int, overrides: list[str]) -> list[str]:
    train = ["-m", "fastmoco", "train", *TRAIN, *overrides]
    if world == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", *train]


class MetricsTail:
    """The whole lines appended to metrics.jsonl since it was made; a torn last one in `torn`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.records: list[dict] = []
        self.torn = b""

    def read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        whole, newline, self.torn = data.rpartition(b"\n")
        if newline:
            self.offset += len(whole) + 1
            self.records += [json.loads(line) for line in whole.split(b"\n")]

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.records if "loss" in r]
        return steps[-1] if steps else -1


@dataclass
class Invocation:
    world: int
    event: Optional[Event]
    returncode: int = 0
    records: list[dict] = field(default_factory=list)  # the metrics lines it appended
    signalled_after: Optional[int] = None  # the last step it had logged when the signal went out
    resumed_from: Optional[int] = None  # the step of the checkpoint it resumed from
    corrupted: Optional[str] = None  # the checkpoint damaged before it started
    torn_write: bool = False  # its SIGKILL left a checkpoint write half done (a temporary file)
    log: str = ""

    def describe(self) -> str:
        e = self.event
        what = "ran to the end" if e is None else (
            f"SIG{e.signal} once step {e.step} was logged (+{e.delay_s} s): sent after step "
            f"{self.signalled_after}")
        start = "from scratch" if self.resumed_from is None else f"from step {self.resumed_from}"
        damaged = f", {self.corrupted} damaged first" if self.corrupted else ""
        torn = ", a checkpoint write left half done" if self.torn_write else ""
        return f"{self.world} process(es), {start}{damaged}: {what}, exit {self.returncode}{torn}"


def invoke(world: int, overrides: list[str], run_dir: Path, log_path: Path, cwd: Path,
           event: Optional[Event] = None, timeout_s: float = 600.0) -> Invocation:
    """Run `fastmoco train` once; with `event`, signal it as the event says."""
    tail, inv = MetricsTail(run_dir / "metrics.jsonl"), Invocation(world, event)
    rng = random.Random(event.step if event else 0)  # which worker gets a SIGTERM
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(world, overrides + [f"run.dir={run_dir}"]), stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **ENV},
                                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{log_path.name} ran past {timeout_s} s")
                tail.read()
                if event and inv.signalled_after is None and tail.last_step >= event.step:
                    time.sleep(event.delay_s)
                    tail.read()
                    inv.signalled_after = tail.last_step
                    if event.signal == "KILL":
                        kill_all(proc.pid)
                    elif event.to == "group":
                        os.killpg(proc.pid, signal.SIGTERM)
                    else:
                        os.kill(rng.choice(trainers(proc.pid)), signal.SIGTERM)
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                kill_all(proc.pid)
                proc.wait()
    tail.read()
    inv.returncode, inv.records, inv.log = proc.returncode, tail.records, log_path.read_text()
    if tail.torn:
        raise AssertionError(f"{log_path.name}: metrics.jsonl ends in a torn line {tail.torn[:80]!r}")
    found = re.search(r"resumed from (\S+) at step (\d+)", inv.log)
    inv.resumed_from = int(found.group(2)) if found else None
    return inv


def damage(path: Path, how: str) -> None:
    """Cut the file to half its length, or flip one byte in the middle of its largest record
    (stored uncompressed, so the byte is data the record's CRC-32 covers)."""
    if how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
        return
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


@dataclass
class Soak:
    plan: Plan
    run_dir: Path
    invocations: list[Invocation] = field(default_factory=list)
    switch_checkpoint: Optional[Path] = None  # copy of what the switched run resumed from


def soak(plan: Plan, overrides: list[str], work: Path, name: str, say=print,
         on_switch: Optional[Callable[[Path], None]] = None) -> Soak:
    """Run `plan`: each invocation until its event, then the same command again (on the next
    invocation's number of processes), to the end of the run; `on_switch` gets the copy of the
    checkpoint the switched run resumes from, as soon as it is known."""
    result = Soak(plan, work / name)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    corrupt = ""
    for i, world in enumerate(plan.worlds):
        event = plan.events[i] if i < len(plan.events) else None
        damaged = None
        if corrupt:
            found = ckpt.list_checkpoints(result.run_dir)
            if len(found) >= 2:  # with one, there is nothing to fall back to: the resume must stop
                damaged = found[-1]
                damage(damaged, corrupt)
            else:
                say(f"  [{name} {i}] {len(found)} checkpoint(s): none damaged, none to fall back to")
        if i > 0 and world != plan.worlds[i - 1]:
            path, _ = ckpt.read_newest(result.run_dir)  # what the switched run will resume from
            result.switch_checkpoint = work / f"{name}-switch" / path.name
            result.switch_checkpoint.parent.mkdir()
            shutil.copy(path, result.switch_checkpoint)
            if on_switch is not None:
                on_switch(result.switch_checkpoint)
        inv = invoke(world, overrides, result.run_dir, work / "logs" / f"{name}-{i}.log", work, event)
        inv.corrupted = f"{damaged.name} ({corrupt})" if damaged else None
        inv.torn_write = any(ckpt.checkpoint_dir(result.run_dir).glob(".checkpoint_*.tmp"))
        result.invocations.append(inv)
        say(f"  [{name} {i}] {inv.describe()}")
        if damaged is not None:
            assert f"{damaged.name} cannot be read" in inv.log, inv.log[-3000:]
            assert inv.resumed_from is not None and inv.resumed_from < step_of(damaged), inv.log[-3000:]
        stopped = "stopped at step" in inv.log
        if event is None or (inv.returncode == 0 and not stopped):
            assert inv.returncode == 0 and "done:" in inv.log, inv.log[-3000:]
            if event is not None:
                say(f"  [{name}] the run ended before SIG{event.signal} took effect; "
                    f"{len(plan.events) - i - 1} interruption(s) left undone")
            break
        if event.signal == "KILL":
            assert inv.returncode == -signal.SIGKILL, inv.log[-3000:]
        else:  # a graceful stop: a checkpoint at the step all processes agreed on, exit 0
            launcher = world > 1 and event.to == "group"  # torchrun itself exits 1 on a signal
            assert stopped and (inv.returncode == 0 or launcher), inv.log[-3000:]
        corrupt = event.corrupt
    return result


def step_of(path: Path) -> int:
    return int(path.name[len("checkpoint_"):-len(".pt")])


def reference(world: int, overrides: list[str], work: Path, name: str,
              start_from: Optional[Path] = None) -> subprocess.Popen:
    """Start an uninterrupted run (keeping every checkpoint), from scratch or from a copy of
    `start_from`; the caller waits for it."""
    run_dir = work / name
    if start_from is not None:
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copy(start_from, run_dir / "checkpoints" / start_from.name)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log = open(work / "logs" / f"{name}.log", "w")
    proc = subprocess.Popen(command(world, overrides + [KEEP_ALL, f"run.dir={run_dir}"]),
                            stdout=log, stderr=subprocess.STDOUT, cwd=work,
                            env={**os.environ, **ENV}, start_new_session=True)
    log.close()
    return proc


def finish(proc: subprocess.Popen, timeout_s: float = 1200.0) -> None:
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_all(proc.pid)
        proc.wait()
        raise
    assert rc == 0, f"a reference run failed (exit {rc}): see its log under logs/"


def records(run_dir: Path) -> list[dict]:
    """Every line of the run's metrics.jsonl (a line that is not JSON fails here)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def history(recs: list[dict]) -> dict[int, dict]:
    """The run's loss history: the last record of each step in file order."""
    return {r["step"]: r for r in recs if "loss" in r}


def assert_same(got: Any, want: Any, where: str = "state") -> None:
    """Equal leaf by leaf: tensors bit for bit (same dtype and shape), everything else by ==."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), f"{where}: differs at {int((got != want).sum())} element(s)"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where}: keys {set(got) ^ set(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


def same_checkpoint(got: Path, want: Path, steps_per_epoch: int) -> None:
    """Everything in the two checkpoints equal; their configs up to run.dir and how many
    checkpoints each keeps. A stop at an epoch's last batch records (that epoch, all its
    batches), which resumes as (the next epoch, batch 0), where an epoch's end records the latter."""
    a, b = ckpt.load_checkpoint(got), ckpt.load_checkpoint(want)
    for state in (a, b):
        state["config"]["run"].pop("dir")
        state["config"]["run"].pop("keep_checkpoints")
        p = state["progress"]
        if p["batch_in_epoch"] == steps_per_epoch and p["step"] < p["total_steps"]:
            p["epoch"], p["batch_in_epoch"] = p["epoch"] + 1, 0
    assert_same(a, b, f"{got.name} vs the reference's")


def verify(result: Soak, one: Path, other: Optional[Path] = None) -> dict[str, int]:
    """Compare the soaked run against `one` (uninterrupted, one process) and, where it switched,
    `other` (the other number of processes from the switch checkpoint on): every metrics record,
    the history, every checkpoint both hold a copy of (the final one at least). Returns counts."""
    total, ref1 = result.plan.total_steps, history(records(one))
    assert sorted(ref1) == list(range(1, total + 1))
    per_epoch = sum(r["epoch"] == 0 for r in ref1.values())
    switch = step_of(result.switch_checkpoint) if result.switch_checkpoint else total
    ref2 = history(records(other)) if other else {}
    assert sorted(ref2) == list(range(switch + 1, total + 1 if other else switch + 1))
    compared = 0
    for i, inv in enumerate(result.invocations):  # superseded records too: re-done steps are exact
        ref = ref1 if inv.world == 1 else ref2
        for rec in inv.records:
            if "loss" in rec:
                want = ref[rec["step"]]
                got_, want_ = [rec[f] for f in FIELDS], [want[f] for f in FIELDS]
                assert got_ == want_, (f"invocation {i} ({inv.world} process(es)), step "
                                       f"{rec['step']}: {dict(zip(FIELDS, got_))} vs the reference's "
                                       f"{dict(zip(FIELDS, want_))}")
                compared += 1
    soaked = history(records(result.run_dir))
    assert sorted(soaked) == list(range(1, total + 1)), "steps missing from the history"
    spliced = {s: (ref1[s] if s <= switch else ref2[s]) for s in soaked}
    for s, rec in soaked.items():
        assert [rec[f] for f in FIELDS] == [spliced[s][f] for f in FIELDS], f"history, step {s}"
        assert (rec["lr"], rec["momentum"]) == (ref1[s]["lr"], ref1[s]["momentum"]), s  # any world
    if result.switch_checkpoint:
        # Its RNG streams are re-seeded on the other number of processes, and the reference after
        # the switch starts from a copy of it: only the one-process reference can check it. It has
        # every periodic checkpoint; a SIGTERM's is checked by the steps of the one-process
        # invocation that resumed from it (the switch is a SIGKILL after at least one such step).
        want = ckpt.checkpoint_dir(one) / result.switch_checkpoint.name
        if want.exists():
            same_checkpoint(result.switch_checkpoint, want, per_epoch)
        else:
            assert any(inv.world == 1 and inv.resumed_from == switch and inv.records
                       for inv in result.invocations), "the switch checkpoint was never checked"
    final = f"checkpoint_{total:09d}.pt"
    same_checkpoint(ckpt.checkpoint_dir(result.run_dir) / final,
                    ckpt.checkpoint_dir(other if other else one) / final, per_epoch)
    checkpoints = 0
    for path in ckpt.list_checkpoints(result.run_dir):
        ref_dir = one if step_of(path) <= switch or other is None else other
        want = ckpt.checkpoint_dir(ref_dir) / path.name
        if want.exists():  # a SIGTERM's (or a timed one) may have no counterpart
            same_checkpoint(path, want, per_epoch)
            checkpoints += 1
    return {"records": compared, "history_steps": len(soaked), "checkpoints": checkpoints}


def tiny_tree(cifar_root: Path, out: Path, per_class: int) -> Path:
    """A train split of `per_class` images per class, as symlinks to `cifar_root`'s."""
    for cls in sorted(p.name for p in (cifar_root / "train").iterdir()):
        d = out / "train" / cls
        d.mkdir(parents=True)
        for f in sorted((cifar_root / "train" / cls).iterdir())[:per_class]:
            (d / f.name).symlink_to(f)
    return out
