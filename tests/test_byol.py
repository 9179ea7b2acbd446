"""BYOL against a formulation re-derived from its paper's Algorithm 1 and the authors' code
(deepmind-research/byol: byol_experiment.py, utils/helpers.py, utils/optimizers.py,
utils/schedules.py): loss, gradients, the target update after the optimizer step and every
parameter and BN statistic after a few steps of the real training step (build_trainer,
Trainer.step); the lr and target-momentum schedules."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from fastmoco.kernels import flat_layout, matching_flat_buffers
from siamese_cases import BYOL_TINY, DIM, HIDDEN, TOL, assert_same_state, trainer_for, views
from torch import nn

from fastmoco.config import TrainConfig
from fastmoco.methods.byol import BYOL, regression_loss
from fastmoco.training.schedules import lr_at, momentum_at
from fastmoco.training.trainer import Trainer

# --- BYOL, re-derived -------------------------------------------------------------------------

def byol_mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """networks.MLP: hk.Linear (with bias), BatchNorm, relu, hk.Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


def l2_normalize(x: torch.Tensor, epsilon: float = 1e-12) -> torch.Tensor:
    """helpers.l2_normalize."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=-1, keepdim=True), min=epsilon))


def byol_regression_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """helpers.regression_loss: ‖x̄ − ȳ‖² per row."""
    return ((l2_normalize(x) - l2_normalize(y)) ** 2).sum(dim=-1)


class PaperBYOL(nn.Module):
    """byol_experiment.py: loss_fn and the target half of _update_fn, in one process."""

    def __init__(self, online: nn.Module, predictor: nn.Module, target: nn.Module) -> None:
        super().__init__()
        self.online, self.predictor, self.target = online, predictor, target
        self.target.requires_grad_(False)

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        p1 = self.predictor(self.online(x1))  # outputs_view1, then outputs_view2
        p2 = self.predictor(self.online(x2))
        with torch.no_grad():
            z1, z2 = self.target(x1), self.target(x2)
        repr_loss = byol_regression_loss(p1, z2) + byol_regression_loss(p2, z1)
        return repr_loss.mean()

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target_params = x + (1 - tau) * (y - x), after the online update."""
        for x, y in zip(self.target.parameters(), self.online.parameters(), strict=True):
            x.copy_(x + (1 - tau) * (y - x))


def exclude_bias_and_norm(name: str, module: nn.Module) -> bool:
    """optimizers.exclude_bias_and_norm by name: False for biases and normalisation layers."""
    return not (name.endswith("bias") or isinstance(module, nn.modules.batchnorm._BatchNorm))


class PaperLARS:
    """optimizers.lars: add_weight_decay and scale_by_lars (both filtered), then −lr."""

    def __init__(self, model: nn.Module, weight_decay: float, momentum: float = 0.9,
                 eta: float = 1e-3) -> None:
        self.params = []
        for mod_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    self.params.append((p, exclude_bias_and_norm(name, module)))
        self.mu = [torch.zeros_like(p) for p, _ in self.params]
        self.weight_decay, self.momentum, self.eta = weight_decay, momentum, eta

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for (p, adapt), mu in zip(self.params, self.mu):
            u = p.grad + self.weight_decay * p if adapt else p.grad
            if adapt:
                p_norm, u_norm = torch.linalg.norm(p), torch.linalg.norm(u)
                ratio = torch.where(p_norm > 0., torch.where(u_norm > 0, self.eta * p_norm / u_norm,
                                                             1.0), 1.0)
                u = u * ratio
            mu.mul_(self.momentum).add_(u)
            p.add_(-lr * mu)


def target_ema(step: int, base_ema: float, max_steps: int) -> float:
    """schedules.target_ema."""
    decay = 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))
    return 1. - (1. - base_ema) * decay


def learning_schedule(step: int, batch_size: int, base_lr: float, total_steps: int,
                      warmup_steps: int) -> float:
    """schedules.learning_schedule."""
    scaled_lr = base_lr * batch_size / 256.
    if step < warmup_steps:
        return step / warmup_steps * scaled_lr
    step, total = step - warmup_steps, total_steps - warmup_steps
    return scaled_lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def byol_pair() -> tuple[Trainer, TrainConfig, PaperBYOL]:
    trainer, cfg = trainer_for(BYOL_TINY)
    byol = trainer.model
    assert isinstance(byol, BYOL)
    width = byol.backbone.num_features
    online = nn.Sequential(copy.deepcopy(byol.backbone), byol_mlp(width, HIDDEN, DIM))
    target = copy.deepcopy(online)
    paper = PaperBYOL(online, byol_mlp(DIM, HIDDEN, DIM), target)
    # A strict load: any difference in the heads' layers fails here.
    paper.online.load_state_dict(byol.online.state_dict())
    paper.predictor.load_state_dict(byol.predictor.state_dict())
    paper.target.load_state_dict(byol.target.state_dict())
    return trainer, cfg, paper


def test_byol_steps_match_the_papers_algorithm():
    """Three steps of Trainer.step (LARS, cosine τ) against loss_fn + lars + the target update:
    loss, every online gradient, then every parameter and BN statistic of the online network,
    predictor and target."""
    trainer, cfg, paper = byol_pair()
    byol = trainer.model
    opt = PaperLARS(nn.ModuleList([paper.online, paper.predictor]), cfg.optim.weight_decay)
    total, lrs = 4, (0.3, 0.2, 0.1)  # the schedule's length: 4 steps, of which 3 run
    for step, (x1, x2) in enumerate(views()):
        tau = momentum_at(step, total, cfg.method.momentum, "cosine")
        assert tau == pytest.approx(target_ema(step, cfg.method.momentum, total), rel=1e-15)
        out = trainer.step(x1, x2, lrs[step], tau)
        loss = paper.loss(x1, x2)
        torch.testing.assert_close(out.loss, loss, **TOL)
        for p in [*paper.online.parameters(), *paper.predictor.parameters()]:
            p.grad = None
        loss.backward()
        if step == 0:
            ours = [*byol.online.parameters(), *byol.predictor.parameters()]
            theirs = [*paper.online.parameters(), *paper.predictor.parameters()]
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a.grad, b.grad, **TOL)
        opt.step(lrs[step])
        paper.update_target(tau)
    for a, b in ((byol.online, paper.online), (byol.predictor, paper.predictor),
                 (byol.target, paper.target)):
        assert_same_state(a, b)
    # The target moved, and is not the online network: the test can fail.
    assert not torch.allclose(byol.target[1][0].weight, paper.online[1][0].weight)
    assert not torch.equal(byol.target[1][0].weight, byol_pair()[0].model.target[1][0].weight)


def test_byol_target_moves_after_the_optimizer_step_through_the_flat_ema():
    """ξ ← τξ + (1 − τ)θ with θ after this step's update (the paper's order; MoCo updates its key
    encoder before the forward), as one lerp over the flat buffers."""
    trainer, _ = trainer_for(BYOL_TINY)
    byol = trainer.model
    assert flat_layout(byol.online) is not None
    assert matching_flat_buffers(byol.target, byol.online) is not None
    (x1, x2), (y1, y2) = views(2)
    trainer.step(x1, x2, 0.3, 0.9)  # online and target now differ
    target = [p.detach().clone() for p in byol.target.parameters()]
    tau = 0.7
    trainer.step(y1, y2, 0.3, tau)
    for xi, old, theta in zip(byol.target.parameters(), target, byol.online.parameters()):
        torch.testing.assert_close(xi, old + (1 - tau) * (theta - old), rtol=1e-6, atol=1e-7)


def test_byol_loss_is_the_sum_of_the_two_directions_means():
    """ℓ = 2 − 2·cos per row, mean over rows: 0 for a perfect prediction, 2 orthogonal, 4
    opposite; BYOL adds both directions (the paper's L + L̃), so the step's loss lies in [0, 8]."""
    z = torch.randn(6, DIM)
    orth = torch.linalg.qr(torch.randn(DIM, 2))[0].T  # two orthonormal rows
    assert regression_loss(3 * z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(orth[:1], orth[1:]).item() == pytest.approx(2.0, abs=1e-6)
    assert regression_loss(-z, z).item() == pytest.approx(4.0, abs=1e-6)
    torch.testing.assert_close(regression_loss(z, z.flip(0)),
                               byol_regression_loss(z, z.flip(0)).mean(), **TOL)
    torch.manual_seed(0)
    byol = BYOL("resnet18", dim=DIM, mlp_hidden=HIDDEN, cifar_stem=True,
                backbone_kwargs=dict(channels=(8, 16, 32, 64)))
    x1, x2 = views(1)[0]
    out = byol(x1, x2)
    p1, p2 = byol.predictor(byol.online(x1)), byol.predictor(byol.online(x2))
    z1, z2 = byol.target(x1), byol.target(x2)
    expected = byol_regression_loss(p1, z2).mean() + byol_regression_loss(p2, z1).mean()
    torch.testing.assert_close(out.loss, expected, **TOL)
    assert out.keys is None and 0 <= out.accuracy.item() <= 100


def test_byol_schedules_against_the_authors():
    """τ equals their target_ema at every step. The lr equals their learning_schedule after
    warm-up; during warm-up fastmoco's step s takes their step s + 1 ((s+1)/W: it reaches the
    base lr on the last warm-up step; theirs starts at 0)."""
    total, warm, base, batch = 50, 10, 0.2, 4096
    for s in range(total):
        assert momentum_at(s, total, 0.996, "cosine") == pytest.approx(
            target_ema(s, 0.996, total), rel=1e-15, abs=1e-15)
        ours = lr_at(s, total, base * batch / 256, "cosine", warm)
        if s >= warm:
            assert ours == pytest.approx(learning_schedule(s, batch, base, total, warm), rel=1e-12)
        else:
            assert ours == pytest.approx(learning_schedule(s + 1, batch, base, total, warm),
                                         rel=1e-12)
    assert learning_schedule(0, batch, base, total, warm) == 0.0
    assert lr_at(0, total, 3.2, "cosine", warm) == pytest.approx(3.2 / warm)
