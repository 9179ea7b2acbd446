"""SimSiam against a re-derivation of the authors' code (facebookresearch/simsiam: builder.py,
main_simsiam.py): loss, gradients with the predictor at a fixed lr, the stop-gradient, and every
parameter and BN statistic after a few steps of the real training step (build_trainer,
Trainer.step)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from siamese_cases import DIM, PRED, SIMSIAM_TINY, STEPS, TOL, assert_same_state, trainer_for, views
from torch import nn

from fastmoco.config import TrainConfig
from fastmoco.methods.simsiam import SimSiam, negative_cosine
from fastmoco.training.trainer import Trainer

# --- SimSiam, re-derived ----------------------------------------------------------------------

class AuthorsSimSiam(nn.Module):
    """builder.py SimSiam around our backbone (their encoder: torchvision's, fc replaced)."""

    def __init__(self, backbone: nn.Module, dim: int, pred_dim: int) -> None:
        super().__init__()
        prev_dim = backbone.num_features
        fc = nn.Linear(prev_dim, dim)
        fc.bias.requires_grad = False  # not use bias as followed by BN
        self.encoder = nn.Sequential(backbone, nn.Sequential(
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
            fc, nn.BatchNorm1d(dim, affine=False)))
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                                       nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, stop_gradient: bool = True):
        z1 = self.encoder(x1)
        z2 = self.encoder(x2)
        p1 = self.predictor(z1)
        p2 = self.predictor(z2)
        if not stop_gradient:  # only to show that the test sees the difference
            return p1, p2, z1, z2
        return p1, p2, z1.detach(), z2.detach()


def simsiam_loss(p1, p2, z1, z2) -> torch.Tensor:
    """main_simsiam.py train()."""
    criterion = nn.CosineSimilarity(dim=1)
    return -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5


def adjust_learning_rate(optimizer, init_lr: float, epoch: int, epochs: int) -> None:
    """main_simsiam.py: cosine per epoch; fix_lr groups stay at init_lr."""
    cur_lr = init_lr * 0.5 * (1. + math.cos(math.pi * epoch / epochs))
    for param_group in optimizer.param_groups:
        param_group['lr'] = init_lr if param_group.get('fix_lr') else cur_lr


def simsiam_pair(fc_bias: float | None = None) -> tuple[Trainer, TrainConfig, AuthorsSimSiam]:
    """Ours and theirs from the same weights. Their last fc keeps its frozen init bias, which
    the BN after it cancels in every output, but not in that BN's running mean: `fc_bias` sets
    it (None: a random one, 0: none, so that the running statistics match too)."""
    trainer, cfg = trainer_for(SIMSIAM_TINY)
    ours = trainer.model
    assert isinstance(ours, SimSiam) and ours.key_encoder is None
    theirs = AuthorsSimSiam(copy.deepcopy(ours.backbone), DIM, PRED)
    with torch.no_grad():
        bias = theirs.encoder[1][6].bias
        bias.normal_() if fc_bias is None else bias.fill_(fc_bias)
    missing, unexpected = theirs.encoder.load_state_dict(ours.encoder.state_dict(), strict=False)
    assert (missing, unexpected) == (["1.6.bias"], [])
    theirs.predictor.load_state_dict(ours.predictor.state_dict())
    return trainer, cfg, theirs


def test_simsiam_steps_match_the_authors_code():
    """Three steps (one an epoch) of Trainer.step with the predictor at a fixed lr against
    builder.py + main_simsiam.py's loop (SGD, --fix-pred-lr, per-epoch cosine): loss, every
    gradient, then every parameter and BN statistic."""
    trainer, cfg, theirs = simsiam_pair(fc_bias=0.0)
    ours = trainer.model
    init_lr = cfg.optim.lr_for(cfg.schedule.batch_size)
    their_opt = torch.optim.SGD(
        [{'params': theirs.encoder.parameters(), 'fix_lr': False},
         {'params': theirs.predictor.parameters(), 'fix_lr': True}],
        init_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    for epoch, (x1, x2) in enumerate(views()):
        adjust_learning_rate(their_opt, init_lr, epoch, STEPS)
        lr = init_lr * 0.5 * (1. + math.cos(math.pi * epoch / STEPS))
        out = trainer.step(x1, x2, lr, 0.0)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [lr, init_lr]
        loss = simsiam_loss(*theirs(x1, x2))
        torch.testing.assert_close(out.loss, loss, **TOL)
        their_opt.zero_grad()
        loss.backward()
        if epoch == 0:
            a = [p for p in ours.parameters() if p.requires_grad]
            b = [p for p in theirs.parameters() if p.requires_grad]
            assert len(a) == len(b)
            for pa, pb in zip(a, b):
                torch.testing.assert_close(pa.grad, pb.grad, **TOL)
        their_opt.step()
    for a, b in ((ours.predictor, theirs.predictor),):
        assert_same_state(a, b)
    sa, sb = ours.encoder.state_dict(), theirs.encoder.state_dict()
    assert sb.keys() - sa.keys() == {"1.6.bias"}
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], **TOL, msg=lambda s: f"{name}: {s}")


def test_simsiam_gradient_stops_at_the_target_branch():
    """The gradient is the stop-gradient one; without the stop it would differ (the test can
    fail), and the projections carry no gradient back through z."""
    trainer, _, theirs = simsiam_pair()
    ours = trainer.model
    x1, x2 = views(1)[0]
    ours(x1, x2).loss.backward()
    stopped = copy.deepcopy(theirs)
    simsiam_loss(*stopped(x1, x2)).backward()
    simsiam_loss(*theirs(x1, x2, stop_gradient=False)).backward()
    w = lambda m: m.encoder[1][0].weight.grad  # noqa: E731
    torch.testing.assert_close(w(ours), w(stopped), **TOL)
    assert not torch.allclose(w(ours), w(theirs), rtol=1e-3, atol=1e-6)
    assert negative_cosine(torch.ones(2, 3), torch.ones(2, 3)).item() == pytest.approx(-1.0)
