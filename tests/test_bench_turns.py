"""The bench's arms in turns: stages round by round (in reverse every other round), a failing arm
skipped with its reason while the others finish, groups that close when memory runs short, the
ratios between arms of one group taken round by round, and a real case in spawned processes."""
from __future__ import annotations

import pytest
import torch
from test_bench import tiny_config

from fastmoco.bench import ArmDef, BenchConfig, CaseDef, CeilingConfig, turns
from fastmoco.bench.driver import run_case
from fastmoco.bench.measure import finish, measure_stages
from fastmoco.bench.report import add_ratios, speed_ratio
from fastmoco.config import apply_overrides


def logged_stages(name: str, n: int, log: list, fail_at: int | None = None):
    """An arm of `n` stages that logs (name, stage) and returns its name."""
    for stage in range(n):
        if stage == fail_at:
            raise ValueError(f"{name} broke")
        log.append((name, stage))
        yield
    return f"{name} done"


def test_stages_run_round_by_round_in_reverse_every_other_round():
    log: list = []
    arms = {n: (n, 4, log) for n in ("a", "b", "c")}
    groups = turns.in_turns(arms, logged_stages, isolate=False)
    assert groups == [{"a": "a done", "b": "b done", "c": "c done"}]
    # stage 0 (build, warm-up) as each arm joins; then rounds: forward, reversed, forward
    assert log == [("a", 0), ("b", 0), ("c", 0),
                   ("a", 1), ("b", 1), ("c", 1),
                   ("c", 2), ("b", 2), ("a", 2),
                   ("a", 3), ("b", 3), ("c", 3)]


def test_a_failing_arm_is_skipped_with_its_reason_and_the_others_finish():
    log: list = []
    arms = {"a": ("a", 3, log), "bad": ("bad", 3, log, 2), "early": ("early", 3, log, 0)}
    (group,) = turns.in_turns(arms, logged_stages, isolate=False)
    assert group["a"] == "a done"
    assert isinstance(group["bad"], turns.ArmFailed) and "ValueError: bad broke" in str(group["bad"])
    assert isinstance(group["early"], turns.ArmFailed) and "early broke" in str(group["early"])
    assert [s for n, s in log if n == "a"] == [0, 1, 2]


def test_an_arm_whose_stages_end_before_its_windows_is_skipped():
    log: list = []
    (group,) = turns.in_turns({"a": ("a", 3, log), "short": ("short", 0, log)}, logged_stages,
                              isolate=False)
    assert group["a"] == "a done"
    assert "ended before its first timed window" in str(group["short"])


def test_groups_close_when_the_memory_left_would_not_hold_another_arm(monkeypatch):
    log: list = []
    monkeypatch.setattr(turns.LocalRun, "peak", {"host": 2 * 2**30, "device": 0})
    monkeypatch.setattr(turns, "memory_available_bytes", lambda: 5 * 2**30)  # room for two more
    arms = {n: (n, 3, log) for n in "abc"}
    assert [list(g) for g in turns.in_turns(arms, logged_stages, isolate=False)] == [["a", "b", "c"]]
    monkeypatch.setattr(turns, "memory_available_bytes", lambda: 2 * 2**30)  # not one more
    log.clear()
    assert [list(g) for g in turns.in_turns(arms, logged_stages, isolate=False)] == \
        [["a"], ["b"], ["c"]]
    assert log[:3] == [("a", 0), ("a", 1), ("a", 2)]  # a's group ends before b is built


def test_ratios_in_turns_are_the_median_of_the_per_round_ratios():
    """A machine whose pace moves between rounds: the per-round ratios are 2, 1 and 2 (median
    2), the ratio of the medians 10 / 10 = 1. Rows of different groups fall back to that."""
    ref = {"arm": "reference", "mode": "model", "img_s": 10.0, "windows": [20.0, 10.0, 5.0],
           "in_turns": 0}
    fast = {"arm": "fastmoco", "mode": "model", "img_s": 10.0, "windows": [40.0, 10.0, 10.0],
            "in_turns": 0}
    assert speed_ratio(fast, ref) == pytest.approx(2.0)
    assert speed_ratio(fast | {"in_turns": 1}, ref) == pytest.approx(1.0)
    case = {"rows": [ref, fast], "batch": 4}
    add_ratios(case, {})
    assert fast["x_reference"] == pytest.approx(2.0) and ref["x_reference"] == pytest.approx(1.0)
    fast["in_turns"] = 1
    add_ratios(case, {})
    assert fast["x_reference"] == pytest.approx(1.0)


def test_bracketed_windows_sample_the_ceiling_just_before_and_after_each():
    samples = iter(range(100))
    bench = BenchConfig(warmup=1, windows=3, steps_per_window=1, profile_steps=0)
    batches = iter(lambda: (None, None), 0)
    for bracket, calls in ((False, 4), (True, 6)):
        start = next(samples) + 1
        row = finish(measure_stages(lambda *_: None, batches, torch.device("cpu"), 1, bench, False,
                                    ceiling=lambda: {"mm": next(samples) + 1}, bracket=bracket))
        pairs = [[a["mm"], b["mm"]] for a, b in row["window_ceilings"]]
        first = pairs[0][0]
        if bracket:  # a fresh sample before each window
            assert pairs == [[first, first + 1], [first + 2, first + 3], [first + 4, first + 5]]
        else:  # the sample after a window is the one before the next
            assert pairs == [[first, first + 1], [first + 1, first + 2], [first + 2, first + 3]]
        assert first == start + 1 and next(samples) + 1 - first == calls


def test_a_case_in_turns_in_spawned_processes_with_a_broken_arm():
    """Each arm in its own process: the good arms are timed in turns (one group), the one whose
    build fails is skipped with the error from its process, and the others' rows carry it all."""
    cfg = apply_overrides(tiny_config(), ["data.name=synthetic", "run.precision=fp32"])
    bench = BenchConfig(arms=["reference", "fastmoco", "broken"], modes=["model"], warmup=1,
                        windows=2, steps_per_window=1, profile_steps=0,
                        ceilings=CeilingConfig(mm_size=64, copy_mb=4, flops=False),
                        arm_defs={"reference": ArmDef(kind="reference"), "fastmoco": ArmDef(),
                                  "broken": ArmDef(overrides=["backbone.name=no_such_net"])})
    case = run_case("c", cfg, CaseDef(), bench, torch.device("cpu"), {})
    rows = {r["arm"]: r for r in case["rows"]}
    assert list(rows) == ["reference", "fastmoco", "broken"]
    assert "no_such_net" in rows["broken"]["skipped"]
    for name in ("reference", "fastmoco"):
        r = rows[name]
        assert r["in_turns"] == 0 and len(r["windows"]) == 2 and r["img_s"] > 0
        assert len(r["window_ceilings"]) == 2 and r["peak_mem_mb"] > 0
    assert rows["fastmoco"]["x_reference"] == pytest.approx(
        speed_ratio(rows["fastmoco"], rows["reference"]))


def test_an_arm_that_fails_in_turns_is_not_built_again_for_its_other_modes(tiny_cifar):
    cfg = apply_overrides(tiny_config(), [f"data.root={tiny_cifar}", "data.name=cifar10",
                                          "run.precision=fp32"])
    bench = BenchConfig(arms=["fastmoco", "broken"], modes=["model", "full"], warmup=1, windows=1,
                        steps_per_window=1, profile_steps=0, isolate=False,
                        ceilings=CeilingConfig(enabled=False),
                        arm_defs={"fastmoco": ArmDef(modes=["model"]),
                                  "broken": ArmDef(overrides=["backbone.name=no_such_net"])})
    saved = []
    case = run_case("c", cfg, CaseDef(), bench, torch.device("cpu"), {},
                    on_arm=lambda c: saved.append([r["arm"] + "/" + r["mode"] for r in c["rows"]]))
    rows = [(r["arm"], r["mode"], "skipped" in r) for r in case["rows"]]
    assert rows == [("fastmoco", "model", False), ("broken", "model", True),
                    ("broken", "full", True)]
    assert case["rows"][1]["skipped"] == case["rows"][2]["skipped"]
    assert case["turn_groups"] == [["fastmoco"]]
    assert saved[0] == ["fastmoco/model", "broken/model"]  # saved as the group ended
