"""lr_at and momentum_at against their closed forms, computed here."""
from __future__ import annotations

import math

import pytest

from fastmoco.training.schedules import lr_at, momentum_at

BASE = 0.6


def test_warmup_is_linear_and_reaches_base_lr_at_its_end():
    total, warm = 100, 10
    lrs = [lr_at(s, total, BASE, "cosine", warmup_steps=warm) for s in range(warm)]
    assert lrs == pytest.approx([BASE * (s + 1) / warm for s in range(warm)], rel=1e-12)
    diffs = [b - a for a, b in zip(lrs, lrs[1:])]
    assert diffs == pytest.approx([BASE / warm] * (warm - 1), rel=1e-9)
    assert lrs[-1] == pytest.approx(BASE, rel=1e-12)
    # the first step after warm-up starts the cosine at its top
    assert lr_at(warm, total, BASE, "cosine", warmup_steps=warm) == pytest.approx(BASE, rel=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_warmup_applies_to_every_schedule(schedule):
    assert lr_at(4, 100, BASE, schedule, warmup_steps=10) == pytest.approx(BASE * 0.5, rel=1e-12)


def test_cosine_without_warmup():
    total = 1000
    assert lr_at(0, total, BASE, "cosine") == pytest.approx(BASE, rel=1e-12)
    assert lr_at(total // 2, total, BASE, "cosine") == pytest.approx(BASE / 2, rel=1e-12)
    assert lr_at(total, total, BASE, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert lr_at(total - 1, total, BASE, "cosine") < 1e-5 * BASE
    for s in (1, 137, 250, 901):
        expected = BASE * 0.5 * (1 + math.cos(math.pi * s / total))
        assert lr_at(s, total, BASE, "cosine") == pytest.approx(expected, rel=1e-12)


def test_cosine_after_warmup_runs_over_the_remaining_steps():
    total, warm = 110, 10
    for s in (10, 35, 60, 85, 110):
        expected = BASE * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert lr_at(s, total, BASE, "cosine", warm) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lr_at(60, total, BASE, "cosine", warm) == pytest.approx(BASE / 2, rel=1e-12)


def test_cosine_is_monotone_and_stays_at_zero_past_the_end():
    lrs = [lr_at(s, 50, BASE, "cosine") for s in range(51)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(75, 50, BASE, "cosine") == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("total", [200, 1000, 2500, 390 * 200])
def test_step_drops_tenfold_exactly_at_milestones(total):
    """MoCo v1: ×0.1 at 120 and 160 of 200 epochs, i.e. fractions 0.6 and 0.8 of the steps."""
    m1, m2 = total * 3 // 5, total * 4 // 5
    assert lr_at(0, total, BASE, "step") == BASE
    assert lr_at(m1 - 1, total, BASE, "step") == BASE
    assert lr_at(m1, total, BASE, "step") == pytest.approx(BASE * 0.1, rel=1e-12)
    assert lr_at(m2 - 1, total, BASE, "step") == pytest.approx(BASE * 0.1, rel=1e-12)
    assert lr_at(m2, total, BASE, "step") == pytest.approx(BASE * 0.01, rel=1e-12)
    assert lr_at(total - 1, total, BASE, "step") == pytest.approx(BASE * 0.01, rel=1e-12)


def test_step_custom_milestones():
    total = 100
    got = [lr_at(s, total, 1.0, "step", milestones=(0.25, 0.5, 0.75)) for s in range(total)]
    expected = [0.1 ** (s // 25) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-12)


def test_constant():
    assert {lr_at(s, 77, BASE, "constant") for s in range(78)} == {BASE}


def test_momentum_constant():
    assert {momentum_at(s, 100, 0.999, "constant") for s in range(101)} == {0.999}
    assert momentum_at(5, 100, 0.99) == 0.99  # constant is the default


def test_momentum_cosine_from_base_to_one():
    """MoCo v3 / BYOL: m = 1 − (1 − base)(cos(πt/T) + 1)/2."""
    base, total = 0.99, 1000
    assert momentum_at(0, total, base, "cosine") == pytest.approx(base, rel=1e-12)
    assert momentum_at(total // 2, total, base, "cosine") == pytest.approx((1 + base) / 2, rel=1e-12)
    assert momentum_at(total, total, base, "cosine") == pytest.approx(1.0, rel=1e-12)
    for s in (1, 123, 777):
        expected = 1 - (1 - base) * (math.cos(math.pi * s / total) + 1) / 2
        assert momentum_at(s, total, base, "cosine") == pytest.approx(expected, rel=1e-12)
    ms = [momentum_at(s, total, base, "cosine") for s in range(total + 1)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))


def test_unknown_schedules_raise():
    with pytest.raises(ValueError, match="cosine, step or constant"):
        lr_at(0, 10, BASE, "linear")
    with pytest.raises(ValueError, match="constant or cosine"):
        momentum_at(0, 10, 0.99, "linear")
