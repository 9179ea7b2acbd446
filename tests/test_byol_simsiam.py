"""BYOL and SimSiam against formulations re-derived from their papers' Algorithm 1 and the
authors' code (deepmind-research/byol: byol_experiment.py, utils/helpers.py, utils/optimizers.py,
utils/schedules.py; facebookresearch/simsiam: builder.py, main_simsiam.py): loss, gradients,
target update, stop-gradient and every parameter and BN statistic after a few steps of the real
training step (build_trainer, Trainer.step); heads, schedules, checkpoints, settings."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from fastmoco.build import build_trainer, check_model_state, local_runtime
from fastmoco.byol import BYOL, regression_loss
from fastmoco.config import TrainConfig, apply_overrides, from_hydra
from fastmoco.kernels import flat_layout, matching_flat_buffers
from fastmoco.momentum import lr_at, momentum_at
from fastmoco.pipelines.recipes import get_recipe
from fastmoco.simsiam import SimSiam, negative_cosine

N, SIZE, STEPS = 8, 16, 3
DIM, HIDDEN, PRED = 16, 32, 8
# fp32 on both sides. SimSiam's side runs the same operations in the same order (bit-equal here);
# BYOL's differs in the order of a few sums (LARS's norms, the lerp form of the EMA, the loss's
# two means): measured at most 0.3 of this tolerance after three steps (on the block BN scales
# that start at 0), while a real difference (a missing stop-gradient, the EMA before the
# optimizer step) is orders of magnitude above it.
TOL = dict(rtol=1e-5, atol=1e-6)
TINY = ["backbone.cifar_stem=true", "+backbone.kwargs.channels=[8,16,32,64]",
        f"schedule.batch_size={N}", f"data.image_size={SIZE}", "run.compile=off",
        "run.precision=fp32", "run.channels_last=false", "run.device=cpu",
        "method.queue_size=0", "method.symmetric=true", f"method.dim={DIM}"]
BYOL_TINY = TINY + ["method.name=byol", f"method.mlp_hidden={HIDDEN}", "method.momentum=0.99",
                    "method.momentum_schedule=cosine", "optim.name=lars", "optim.lr=0.4",
                    "optim.weight_decay=1e-3"]
SIMSIAM_TINY = TINY + ["method.name=simsiam", f"method.predictor_hidden={PRED}",
                       "method.momentum=0", "optim.lr=0.05", "optim.fix_predictor_lr=true"]


def make(overrides: list[str]) -> TrainConfig:
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=overrides))


def trainer_for(overrides: list[str], seed: int = 0):
    cfg = apply_overrides(TrainConfig(), overrides)
    torch.manual_seed(seed)
    return build_trainer(cfg, local_runtime(cfg), steps=100), cfg


def views(steps: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randn(N, 3, SIZE, SIZE, generator=g))
            for _ in range(steps)]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Every parameter and BN statistic, by name."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], **TOL, msg=lambda s: f"{name}: {s}")


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


def byol_pair():
    trainer, cfg = trainer_for(BYOL_TINY)
    byol = trainer.moco
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
    byol = trainer.moco
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
    assert not torch.equal(byol.target[1][0].weight, byol_pair()[0].moco.target[1][0].weight)


def test_byol_target_moves_after_the_optimizer_step_through_the_flat_ema():
    """ξ ← τξ + (1 − τ)θ with θ after this step's update (the paper's order; MoCo updates its key
    encoder before the forward), as one lerp over the flat buffers."""
    trainer, _ = trainer_for(BYOL_TINY)
    byol = trainer.moco
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


def simsiam_pair(fc_bias: float | None = None):
    """Ours and theirs from the same weights. Their last fc keeps its frozen init bias, which
    the BN after it cancels in every output, but not in that BN's running mean: `fc_bias` sets
    it (None: a random one, 0: none, so that the running statistics match too)."""
    trainer, cfg = trainer_for(SIMSIAM_TINY)
    ours = trainer.moco
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
    ours = trainer.moco
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
    ours = trainer.moco
    x1, x2 = views(1)[0]
    ours(x1, x2).loss.backward()
    stopped = copy.deepcopy(theirs)
    simsiam_loss(*stopped(x1, x2)).backward()
    simsiam_loss(*theirs(x1, x2, stop_gradient=False)).backward()
    w = lambda m: m.encoder[1][0].weight.grad  # noqa: E731
    torch.testing.assert_close(w(ours), w(stopped), **TOL)
    assert not torch.allclose(w(ours), w(theirs), rtol=1e-3, atol=1e-6)
    assert negative_cosine(torch.ones(2, 3), torch.ones(2, 3)).item() == pytest.approx(-1.0)


# --- heads -------------------------------------------------------------------------------------

def layout(module: nn.Module) -> list[tuple]:
    out = []
    for m in module:
        if isinstance(m, nn.Linear):
            out.append(("fc", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("bn", m.num_features, m.affine))
        else:
            out.append((type(m).__name__,))
    return out


def test_heads_are_the_authors():
    """BYOL: fc 4096 (bias) - BN - ReLU - fc 256 (bias), the predictor the same shape on 256;
    SimSiam: 3 fcs of the backbone's width with BN, the last BN without affine, and the
    2048-512-2048 predictor whose output fc has a bias."""
    torch.manual_seed(0)
    small = dict(cifar_stem=True, backbone_kwargs=dict(channels=(8, 16, 32, 64)))
    byol = BYOL("resnet18", **small)
    assert layout(byol.online[1]) == [("fc", 64, 4096, True), ("bn", 4096, True), ("ReLU",),
                                      ("fc", 4096, 256, True)]
    assert layout(byol.predictor) == [("fc", 256, 4096, True), ("bn", 4096, True), ("ReLU",),
                                      ("fc", 4096, 256, True)]
    assert layout(byol.target[1]) == layout(byol.online[1])
    simsiam = SimSiam("resnet18", **small)
    assert layout(simsiam.encoder[1]) == [
        ("fc", 64, 64, False), ("bn", 64, True), ("ReLU",), ("fc", 64, 64, False), ("bn", 64, True),
        ("ReLU",), ("fc", 64, 2048, False), ("bn", 2048, False)]
    assert layout(simsiam.predictor) == [("fc", 2048, 512, False), ("bn", 512, True), ("ReLU",),
                                         ("fc", 512, 2048, True)]


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [BYOL_TINY, SIMSIAM_TINY], ids=["byol", "simsiam"])
def test_checkpoint_round_trip_resumes_exactly(overrides):
    """Two steps, a checkpoint through torch.save, a fresh trainer (another seed) loads it: the
    next two steps give the same losses and the same state, bit for bit (target, optimizer
    momentum buffers and the predictor's fixed-lr group included)."""
    batches = views(4)
    a, _ = trainer_for(overrides)
    for x1, x2 in batches[:2]:
        a.step(x1, x2, 0.1, 0.99)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b, _ = trainer_for(overrides, seed=123)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for x1, x2 in batches[2:]:
        la, lb = a.step(x1, x2, 0.05, 0.995).loss, b.step(x1, x2, 0.05, 0.995).loss
        assert torch.equal(la, lb)
    for (k, va), vb in zip(a.moco.state_dict().items(), b.moco.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.optimizer.param_groups[-1].get("fixed_lr") == b.optimizer.param_groups[-1].get("fixed_lr")


def test_a_checkpoint_of_another_method_or_width_names_the_settings():
    byol, _ = trainer_for(BYOL_TINY)
    state = {**byol.state_dict(), "config": {"method": {"name": "byol", "dim": DIM,
                                                        "mlp_hidden": HIDDEN, "queue_size": 0}}}
    simsiam, _ = trainer_for(SIMSIAM_TINY)
    with pytest.raises(ValueError, match=r"another model.*method.name=byol method.dim=16 "
                                         r"method.mlp_hidden=32.*new run.dir"):
        simsiam.load_state_dict(state)
    wider, _ = trainer_for(BYOL_TINY + ["method.mlp_hidden=48"])
    with pytest.raises(ValueError, match=r"21 tensors differ, e.g. key_encoder.1.0.bias is "
                                         r"\[32\] there, \[48\] here"):
        wider.load_state_dict(state)
    check_model_state(byol.moco, state)  # its own: no error


def test_train_checkpoints_and_resumes_byol_exactly(tiny_cifar, tmp_path):
    """The loop end to end: kNN, metrics (pretext top-1 in [0, 100]), epoch checkpoints, the
    exported backbone, and a resume from the first epoch's checkpoint that gives the same losses."""
    import json
    import shutil

    from fastmoco.checkpoint import list_checkpoints, load_checkpoint
    from fastmoco.train import train
    from fastmoco.weights import load_backbone

    common = ["method=byol", "backbone=resnet18_cifar", "+backbone.kwargs.channels=[8,16,32,64]",
              "method.mlp_hidden=32", "method.dim=16", "pipeline=torchvision",
              "pipeline.num_workers=1", "schedule.batch_size=16", "schedule.epochs=2",
              "data.max_images=64", "run.log_every=1", "run.progress=false", "knn.k=20",
              "knn.batch_size=100", "knn.init_bn_calibration_images=0", "run.keep_checkpoints=5",
              f"data.root={tiny_cifar}"]
    a = tmp_path / "a"
    summary = train(make(common + [f"run.dir={a}"]))
    assert summary["step"] == 8 and summary["knn_final"] is not None

    def losses(run):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["pretext_top1"]) for r in recs if "loss" in r}

    full = losses(a)
    assert sorted(full) == list(range(1, 9))
    assert all(0 <= top1 <= 100 for _, top1 in full.values())
    first = list_checkpoints(a)[0]
    state = load_checkpoint(first)
    assert state["progress"]["step"] == 4 and state["config"]["method"]["name"] == "byol"
    assert any(k.startswith("key_encoder.") for k in state["model"])
    assert "queue.keys" not in state["model"]
    model, info = load_backbone(a)
    byol_state = load_checkpoint(list_checkpoints(a)[-1])["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, byol_state[f"query_encoder.0.{k}"]), k
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copy(first, b / "checkpoints" / first.name)
    train(make(common + [f"run.dir={b}", "knn.enabled=false"]))
    resumed = losses(b)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, value in resumed.items():
        assert value == full[step], step


# --- settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (["method=byol", "method.queue_size=4096"],
     r"method.queue_size=4096: BYOL has no queue.*set method.queue_size=0 \(method=byol does\)"),
    (["method=simsiam", "method.queue_size=65536"], r"SimSiam has no queue.*method=simsiam does"),
    (["method.name=byol"], r"method.queue_size=65536: BYOL has no queue"),
    (["method=byol", "method.shuffle_bn=ddp"], r"method.shuffle_bn=ddp: BYOL has no negatives.*"
                                               r"set method.shuffle_bn=auto"),
    (["method=simsiam", "method.shuffle_bn=split"], r"method.shuffle_bn=split: SimSiam"),
    (["method=simsiam", "method.momentum=0.99"], r"SimSiam has no momentum encoder.*"
                                                 r"set method.momentum=0"),
    (["method=simsiam", "method.momentum_schedule=cosine"], r"SimSiam has no momentum encoder"),
    (["method=byol", "method.symmetric=false"], r"method.symmetric=false: BYOL's loss is symmetric"),
    (["method=moco_v2", "method.predictor_hidden=512"], r"MoCo v2 has no predictor"),
    (["method=byol", "method.predictor_hidden=0"], r"method.predictor_hidden=0: choose a positive"),
    (["method.name=swav"], r"method.name='swav': choose one of moco, byol, simsiam"),
])
def test_each_setting_is_checked_when_composed(overrides, match):
    with pytest.raises(ValueError, match=match):
        make(overrides)


def test_fixed_predictor_lr_needs_a_predictor():
    cfg = make(["optim.fix_predictor_lr=true", "method.queue_size=4096"])
    with pytest.raises(ValueError, match=r"optim.fix_predictor_lr=true: MoCo v2 has no predictor"):
        cfg.check(1, "cpu")
    make(["method=simsiam", "optim.fix_predictor_lr=true"]).check(1, "cpu")


def test_the_model_refuses_a_shuffle_without_negatives():
    """Direct API users get the config's message from the model."""
    with pytest.raises(ValueError, match=r"method.shuffle_bn=ddp: BYOL has no negatives"):
        BYOL("resnet18", shuffle_bn="ddp")


def test_bn_is_synchronised_over_the_whole_model_on_gpus_only(caplog):
    torch.manual_seed(0)
    small = dict(cifar_stem=True, backbone_kwargs=dict(channels=(8, 16, 32, 64)), dim=DIM,
                 mlp_hidden=HIDDEN)
    assert BYOL("resnet18", world_size=1, device_type="cuda", **small).shuffle_bn == "none"
    synced = BYOL("resnet18", world_size=4, device_type="cuda", **small)
    assert synced.shuffle_bn == "sync"
    for part in (synced.online, synced.predictor, synced.target):
        norms = [m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    with caplog.at_level("WARNING"):
        assert SimSiam("resnet18", world_size=2, device_type="cpu", **small).shuffle_bn == "none"
    assert "SyncBatchNorm runs on CUDA only" in caplog.text


# --- presets and hydra -----------------------------------------------------------------------------

@pytest.mark.parametrize("experiment, expect", [
    ("imagenet_byol_300ep", dict(name="byol", epochs=300, warmup=10, batch=4096, m=0.99,
                                 optim=("lars", 0.3, 1e-6, False), recipe="v3",
                                 widths=(256, 4096, None))),
    ("imagenet_byol_1000ep", dict(name="byol", epochs=1000, warmup=10, batch=4096, m=0.996,
                                  optim=("lars", 0.2, 1.5e-6, False), recipe="v3",
                                  widths=(256, 4096, None))),
    ("imagenet_simsiam_100ep", dict(name="simsiam", epochs=100, warmup=0, batch=512, m=0.0,
                                    optim=("sgd", 0.05, 1e-4, True), recipe="v2",
                                    widths=(2048, None, 512))),
])
def test_presets_hold_the_authors_settings(experiment, expect):
    cfg = make([f"experiment={experiment}", "data.root=/data/imagenet"])
    m, o, s = cfg.method, cfg.optim, cfg.schedule
    assert (m.name, m.queue_size, m.symmetric, m.shuffle_bn, m.momentum) == \
        (expect["name"], 0, True, "auto", expect["m"])
    assert m.momentum_schedule == ("cosine" if expect["name"] == "byol" else "constant")
    assert (m.dim, m.mlp_hidden, m.predictor_hidden) == expect["widths"]
    assert (o.name, o.lr, o.weight_decay, o.fix_predictor_lr, o.base_batch, o.momentum) == \
        (*expect["optim"], 256, 0.9)
    assert (s.batch_size, s.epochs, s.warmup_epochs, s.lr_schedule) == \
        (expect["batch"], expect["epochs"], expect["warmup"], "cosine")
    assert (cfg.backbone.name, cfg.data.recipe, cfg.data.image_size) == \
        ("resnet50", expect["recipe"], 224)
    if expect["name"] == "byol":  # the paper's blocks: the last BN scale starts at 1
        assert dict(cfg.backbone.kwargs) == {"zero_init_last": False}
        views = get_recipe("v3")  # blur 1.0 / 0.1, solarize 0 / 0.2, crop 0.08-1
        assert (views.query.blur_p, views.key.blur_p, views.query.solarize_p, views.key.solarize_p,
                views.query.crop_scale) == (1.0, 0.1, 0.0, 0.2, (0.08, 1.0))
    cfg.check(16, "cuda")


@pytest.mark.parametrize("overrides", [
    ["method=moco_v3", "experiment=cpu_demo"], ["experiment=cpu_demo", "method=moco_v3"],
    ["experiment=cpu_demo", "method=byol"], ["method=simsiam", "experiment=cpu_demo"],
])
def test_the_command_lines_method_wins_over_the_cpu_demo(overrides):
    cfg = make(overrides)
    chosen = next(o.split("=")[1] for o in overrides if o.startswith("method="))
    variant = {"moco_v3": "v3", "byol": "byol", "simsiam": "simsiam"}[chosen]
    assert cfg.method.variant == variant and cfg.method.queue_size == 0
    assert cfg.run.dir == f"runs/cpu_demo_{chosen}"
    assert cfg.schedule.batch_size == 64 and cfg.schedule.time_budget_min  # the demo's own
    cfg.check(1, "cpu")
    demo = make(["experiment=cpu_demo"])  # alone: the MoCo v2 demo as before
    assert (demo.method.variant, demo.method.queue_size, demo.method.momentum,
            demo.method.temperature, demo.method.bn_splits, demo.run.dir) == \
        ("v2", 4096, 0.99, 0.1, 2, "runs/cpu_demo")
