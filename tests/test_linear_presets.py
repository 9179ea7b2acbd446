"""The linear protocol's optimizer (linear.optimizer=sgd|lars) and the BYOL and SimSiam presets:
LARS steps the classifier as SimSiam's main_lincls does (apex's LARC over fc weight and bias),
the presets compose as the CLI composes them, and a bad setting stops at start, named."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch import nn

from fastmoco.config import from_hydra
from fastmoco.evaluation.commands import linear_optimizer
from fastmoco.evaluation.config import EvalConfig, LinearConfig
from fastmoco.training.optim import LARS


def eval_config(overrides: list[str]) -> EvalConfig:
    """As `fastmoco eval linear` composes it (conf/eval.yaml, the linear/ group)."""
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        return from_hydra(compose(config_name="eval", overrides=["checkpoint=resnet18", *overrides]),
                          EvalConfig)


def larc_sgd_step(params, grads, bufs, lr, momentum, trust=0.001, eps=1e-8):
    """One step of apex's LARC(clip=False) around torch's SGD (weight decay 0), as SimSiam's
    main_lincls --lars builds it, over float64 tensors: each gradient scaled by
    trust·‖θ‖/(‖g‖ + eps) when both norms are non-zero (else left as it is), then torch's SGD:
    buf = g on the first step, momentum·buf + g after, θ -= lr·buf. Returns (params, bufs)."""
    new_p, new_b = [], []
    for w, g, b in zip(params, grads, bufs, strict=True):
        wn, gn = w.norm().item(), g.norm().item()
        if wn != 0 and gn != 0:
            g = g * (trust * wn / (gn + eps))
        b = g.clone() if b is None else momentum * b + g
        new_p.append(w - lr * b)
        new_b.append(b)
    return new_p, new_b


def test_lars_steps_weight_and_bias_as_simsiams_larc():
    """Two steps from main_lincls's init (weight N(0, 0.01), bias 0): on the first the zero bias
    takes LARC's plain step (its norm is 0), on the second it is adapted like the weight. Each
    step's update against LARC re-derived in float64. lr 100 makes the update a tenth of the
    weights, so the fp32 rounding of the weights before and after (2^-24 relative each) stays
    near 1e-6 of the update; the fp32 step itself is a few roundings (~1e-7 relative)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    classifier = nn.Linear(32, 10)
    with torch.no_grad():
        classifier.weight.normal_(0, 0.01, generator=g)
        classifier.bias.zero_()
    lr, lc = 100.0, LinearConfig(optimizer="lars", momentum=0.9, weight_decay=0.0)
    optimizer = linear_optimizer(classifier, lc, lr)
    assert isinstance(optimizer, LARS)
    ref = [p.detach().double().clone() for p in classifier.parameters()]
    bufs = [None, None]
    for step in range(2):
        before = [p.detach().clone() for p in classifier.parameters()]
        optimizer.zero_grad()
        F.cross_entropy(classifier(x), y).backward()
        optimizer.step()
        w, b = (t.clone().requires_grad_() for t in ref)
        grads = torch.autograd.grad(F.cross_entropy(x.double() @ w.T + b, y), (w, b))
        new_ref, new_bufs = larc_sgd_step(ref, grads, bufs, lr, lc.momentum)
        for p, p0, r, r0 in zip(classifier.parameters(), before, new_ref, ref):
            got, want = (p.detach() - p0).double(), r - r0
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6 * want.abs().max().item())
        if step == 1:
            # Pretraining's rule (1-D tensors not adapted) would step the bias by its raw
            # gradients: several times further than LARC does here.
            raw = -lr * (lc.momentum * bufs[1] + grads[1])
            assert (new_ref[1] - ref[1]).norm() < 0.5 * raw.norm()
        ref, bufs = new_ref, new_bufs


def test_sgd_is_torchs_with_nesterov_when_asked():
    classifier = nn.Linear(8, 3)
    sgd = linear_optimizer(classifier, LinearConfig(), 0.1)
    nesterov = linear_optimizer(classifier, LinearConfig(nesterov=True), 0.1)
    assert type(sgd) is torch.optim.SGD and type(nesterov) is torch.optim.SGD
    assert [g["nesterov"] for g in (*sgd.param_groups, *nesterov.param_groups)] == [False, True]
    assert nesterov.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("preset, expected, lr", [
    ("simsiam", dict(optimizer="lars", nesterov=False, epochs=90, batch_size=4096, lr=0.02,
                     base_batch=256, momentum=0.9, weight_decay=0.0, lr_schedule="cosine",
                     train_view="rrc"), 0.32),
    ("byol", dict(optimizer="sgd", nesterov=True, epochs=80, batch_size=4096, lr=0.2,
                  base_batch=256, momentum=0.9, weight_decay=0.0, lr_schedule="cosine",
                  train_view="rrc"), 3.2),
])
def test_presets_compose_as_the_cli_does(preset, expected, lr):
    lc = eval_config([f"linear={preset}"]).linear
    assert {k: getattr(lc, k) for k in expected} == expected
    assert math.isclose(lc.lr_for(lc.batch_size), lr, rel_tol=1e-12)
    optimizer = linear_optimizer(nn.Linear(8, 3), lc, lr)
    if preset == "simsiam":
        assert isinstance(optimizer, LARS) and optimizer.param_groups[0]["exclude_1d"] is False
    else:
        assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["nesterov"]


@pytest.mark.parametrize("overrides, match", [
    (["linear.optimizer=adam"], r"linear.optimizer='adam': choose one of sgd, lars"),
    (["linear=simsiam", "linear.nesterov=true"], r"linear.nesterov=true with linear.optimizer=lars"),
    (["linear.nesterov=true", "linear.momentum=0"], r"linear.nesterov=true .* linear.momentum=0"),
])
def test_bad_optimizer_settings_stop_at_start(overrides, match):
    with pytest.raises(ValueError, match=match):
        eval_config(overrides)


@pytest.mark.parametrize("method, preset", [
    ({"name": "byol", "version": "v2"}, "byol"), ({"name": "simsiam", "version": "v2"}, "simsiam"),
    ({"name": "moco", "version": "v3"}, "moco_v3"), ({"name": "moco", "version": "v2"}, None),
    ({"name": "moco", "version": "v1"}, None)])
def test_eval_linear_takes_the_preset_of_the_checkpoints_method(tmp_path, capsys, method, preset):
    """`fastmoco eval linear checkpoint=RUN` without a linear= choice adds the pretraining
    method's preset (MoCo v1/v2 keep the default, main_lincls); a choice on the command line,
    or a source that is not a fastmoco run, adds nothing."""
    from fastmoco.cli import method_linear_preset

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "config": {"method": method, "backbone": {"name": "resnet18"}}},
               run / "checkpoints" / "checkpoint_000000010.pt")
    added = method_linear_preset([f"checkpoint={run}", "linear.mode=cached"])
    assert added == ([f"linear={preset}"] if preset else [])
    if preset:
        assert f"linear={preset}: the linear protocol" in capsys.readouterr().out
        assert eval_config(added).linear == eval_config([f"linear={preset}"]).linear
    for chosen in ("linear=cifar", "+linear=cifar", "~linear"):
        assert method_linear_preset([f"checkpoint={run}", chosen]) == []
    assert method_linear_preset(["checkpoint=resnet18"]) == []  # a timm name: random init
    assert method_linear_preset([f"checkpoint={tmp_path / 'missing'}"]) == []
