"""LARS against a hand-written per-tensor reference (MoCo v3's update), set_lr, state_dict
resume, and the param groups build_optimizer makes."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from fastmoco.config import OptimConfig
from fastmoco.training.optim import LARS, build_optimizer, set_lr

CPU = torch.device("cpu")


def reference_lars(params, grads, bufs, lr, wd, momentum, eta):
    """One LARS step in plain python over lists of float64 tensors: for tensors with ndim > 1,
    d = g + wd·w scaled by η‖w‖/‖d‖ (1 when either norm is 0); 1-D tensors get d = g. Then
    buf = momentum·buf + d, w -= lr·buf. Returns the new (params, bufs)."""
    new_p, new_b = [], []
    for w, g, b in zip(params, grads, bufs, strict=True):
        d = g.clone()
        if w.ndim > 1:
            d = g + wd * w
            wn = math.sqrt(sum(float(x) ** 2 for x in w.flatten()))
            dn = math.sqrt(sum(float(x) ** 2 for x in d.flatten()))
            d = d * (eta * wn / dn if wn > 0 and dn > 0 else 1.0)
        b = momentum * b + d
        new_p.append(w - lr * b)
        new_b.append(b)
    return new_p, new_b


def make_params(dtype, seed=0):
    """A conv weight, a linear weight, a bias and a BN-like gain: 2-D+ and 1-D tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (5, 7), (5,), (4,)]
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def grads_for(params, step, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]


def run_lars(params, opt, lrs, seed=100):
    for step, lr in enumerate(lrs):
        set_lr(opt, lr)
        for p, g in zip(params, grads_for(params, step, seed)):
            p.grad = g.to(p.dtype).clone()
        opt.step()


def run_reference(params, lrs, wd, momentum, eta, seed=100):
    ps = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ps]
    for step, lr in enumerate(lrs):
        ps, bufs = reference_lars(ps, grads_for(params, step, seed), bufs, lr, wd, momentum, eta)
    return ps, bufs


@pytest.mark.parametrize("steps", [1, 4])
def test_lars_matches_reference_float64(steps):
    params = make_params(torch.float64)
    expected, exp_bufs = run_reference(params, [0.5] * steps, wd=0.05, momentum=0.9, eta=0.01)
    opt = LARS(params, lr=0.5, weight_decay=0.05, momentum=0.9, trust_coefficient=0.01)
    run_lars(params, opt, [0.5] * steps)
    for p, e, b, eb in zip(params, expected, [opt.state[p]["momentum_buffer"] for p in params],
                           exp_bufs):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, eb, rtol=1e-12, atol=1e-12)


def test_lars_matches_reference_float32():
    params = make_params(torch.float32)
    start = [p.detach().clone() for p in params]
    lrs = [0.3, 0.3, 0.3]
    opt = LARS(params, lr=0.3, weight_decay=1e-4, momentum=0.9)  # default η = 0.001
    run_lars(params, opt, lrs)
    expected, _ = run_reference(start, lrs, wd=1e-4, momentum=0.9, eta=0.001)
    for p, s, e in zip(params, start, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-7)
        assert not torch.equal(p.detach(), s)  # every tensor moved


def test_lars_trust_ratio_scales_matrices_not_vectors():
    """A 2-D step is η‖w‖/‖g + wd·w‖ times the 1-D step for the same gradient (one step, no buf)."""
    w2 = nn.Parameter(torch.full((2, 2), 3.0, dtype=torch.float64))  # ‖w‖ = 6
    w1 = nn.Parameter(torch.full((4,), 3.0, dtype=torch.float64))
    opt = LARS([w2, w1], lr=1.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.1)
    w2.grad = torch.full((2, 2), 2.0, dtype=torch.float64)  # ‖g‖ = 4 -> ratio 0.1·6/4 = 0.15
    w1.grad = torch.full((4,), 2.0, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w2.detach(), torch.full((2, 2), 3.0 - 0.15 * 2.0, dtype=torch.float64))
    torch.testing.assert_close(w1.detach(), torch.full((4,), 3.0 - 2.0, dtype=torch.float64))


def test_lars_excludes_1d_params_from_weight_decay():
    """With zero gradient, a matrix decays (ratio η‖w‖/‖wd·w‖ = η/wd) and a bias does not move."""
    w = nn.Parameter(torch.ones(3, 3, dtype=torch.float64))
    b = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LARS([w, b], lr=1.0, weight_decay=0.5, momentum=0.0, trust_coefficient=0.01)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    # d = 0.5·w, ratio = 0.01·3/(0.5·3) = 0.02 -> step 0.01·w
    torch.testing.assert_close(w.detach(), torch.full((3, 3), 0.99, dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.ones(3, dtype=torch.float64))


def test_lars_zero_weight_uses_ratio_one():
    """w = 0: η·‖w‖/‖g‖ would be 0 and freeze the tensor forever; the ratio is 1 instead."""
    w = nn.Parameter(torch.zeros(2, 3))
    opt = LARS([w], lr=0.1, weight_decay=1e-4, momentum=0.9)
    g = torch.arange(6.0).reshape(2, 3) - 2.5
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), -0.1 * g)


def test_lars_zero_update_stays_finite():
    """‖g + wd·w‖ = 0 (here g = 0, wd = 0): no 0/0, the tensor stays put."""
    w = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
    before = w.detach().clone()
    opt = LARS([w], lr=0.1, weight_decay=0.0, momentum=0.9)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), before)
    assert torch.isfinite(opt.state[w]["momentum_buffer"]).all()


def test_lars_skips_params_without_grad():
    params = make_params(torch.float64)
    before = [p.detach().clone() for p in params]
    opt = LARS(params, lr=0.5, weight_decay=0.1)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert not torch.equal(params[0].detach(), before[0])
    for p, b in zip(params[1:], before[1:]):
        assert torch.equal(p.detach(), b) and p not in opt.state


def test_set_lr_takes_effect():
    """A step after set_lr uses the new lr: matches the reference run with the lr sequence."""
    params = make_params(torch.float64)
    lrs = [0.5, 0.05, 2.0]
    expected, _ = run_reference(params, lrs, wd=0.01, momentum=0.9, eta=0.02)
    opt = LARS(params, lr=123.0, weight_decay=0.01, momentum=0.9, trust_coefficient=0.02)
    run_lars(params, opt, lrs)
    assert all(g["lr"] == 2.0 for g in opt.param_groups)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_set_lr_sets_every_group():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    set_lr(opt, 0.7)
    assert [g["lr"] for g in opt.param_groups] == [0.7, 0.7]


def test_lars_state_dict_round_trip_resumes_identically():
    """Two steps, save (through torch.save / weights_only load), then two more steps in a fresh
    optimizer: bit-identical to four uninterrupted steps."""
    lrs = [0.4, 0.3, 0.2, 0.1]
    straight = make_params(torch.float32)
    opt = LARS(straight, lr=0.4, weight_decay=1e-3, momentum=0.9, trust_coefficient=0.01)
    run_lars(straight, opt, lrs)

    first = make_params(torch.float32)
    opt1 = LARS(first, lr=0.4, weight_decay=1e-3, momentum=0.9, trust_coefficient=0.01)
    run_lars(first, opt1, lrs[:2])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = LARS(resumed, lr=9.9, weight_decay=1e-3, momentum=0.9, trust_coefficient=0.01)
    opt2.load_state_dict(saved["opt"])
    for step, lr in enumerate(lrs[2:], start=2):
        set_lr(opt2, lr)
        for p, g in zip(resumed, grads_for(resumed, step)):
            p.grad = g.float()
        opt2.step()
    for p, q in zip(straight, resumed):
        assert torch.equal(p.detach(), q.detach())


def test_lars_step_leaves_grads_unchanged():
    """As torch's optimizers and MoCo v3's LARS do (gradient accumulation, grad-norm logging)."""
    params = make_params(torch.float32)
    opt = LARS(params, lr=0.1, weight_decay=1e-4)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g.float()
    grads = [p.grad.clone() for p in params]
    opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW),
                                      ("lars", LARS)])
def test_build_optimizer_one_group_of_trainable_params(name, cls):
    """One group holding every trainable parameter (frozen ones left out) with the config's
    hyper-parameters: SGD and AdamW decay every tensor, as MoCo v1/v2 and v3-ViT do; LARS leaves
    1-D tensors out inside its step (tested above)."""
    m = Tiny()
    cfg = OptimConfig(name=name, momentum=0.8, weight_decay=3e-4, betas=(0.8, 0.95))
    opt = build_optimizer(m.parameters(), cfg, lr=0.25, device=CPU)
    assert type(opt) is cls
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable(m)]
    assert group["lr"] == 0.25 and group["weight_decay"] == 3e-4
    if name == "adamw":
        assert tuple(group["betas"]) == (0.8, 0.95)
    else:
        assert group["momentum"] == 0.8
    if name == "lars":
        assert group["trust_coefficient"] == 0.001


def test_build_optimizer_lars_step_leaves_bn_and_bias_undecayed():
    """Through build_optimizer: with zero gradients, conv/fc weights decay, BN and biases don't."""
    m = Tiny().double()
    opt = build_optimizer(m.parameters(), OptimConfig(name="lars", weight_decay=0.1), 1.0, CPU)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in trainable(m):
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (n in ("conv.weight", "fc.weight")), n


def test_build_optimizer_unknown_name():
    """Refused with a ValueError naming the setting, by the config or by build_optimizer."""
    with pytest.raises(ValueError, match="optim.name='lamb'"):
        build_optimizer(Tiny().parameters(), OptimConfig(name="lamb"), 0.1, CPU)
    cfg = OptimConfig()
    cfg.name = "lamb"  # past any check the config makes when it is built
    with pytest.raises(ValueError, match="optim.name='lamb'"):
        build_optimizer(Tiny().parameters(), cfg, 0.1, CPU)
