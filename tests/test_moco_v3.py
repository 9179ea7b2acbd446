"""MoCo v3 against a re-derivation of the authors' code (facebookresearch/moco-v3: builder.py,
vits.py, main_moco.py): heads, loss, gradients, momentum update and BN statistics over a few
steps for a ResNet and a ViT; the ViT's sin-cos position embeddings and frozen patch projection.
SyncBatchNorm, the settings and the presets: test_moco_v3_settings.py."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from moco_v3_cases import DIM, HIDDEN, RESNET, SIZE, VIT, N
from torch import nn

from fastmoco import MoCo
from fastmoco.backbone import create_backbone, is_vit, sincos_2d
from fastmoco.config import OptimConfig
from fastmoco.training.optim import build_optimizer
from fastmoco.training.schedules import momentum_at

CPU = torch.device("cpu")
DTYPE = torch.float64
# Both sides compute in float64; sums are ordered differently (fused/chunked loss, flat EMA as a
# lerp), a few steps of SGD/AdamW: far below 1e6 ulps, far above a real difference.
TOL = dict(rtol=1e6 * torch.finfo(DTYPE).eps, atol=1e6 * torch.finfo(DTYPE).eps)
STEPS, LR = 3, 0.05
ADAM_EPS = 1e-5


# --- the authors' code, re-derived ---------------------------------------------------------

def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int,
              last_bn: bool = True) -> nn.Sequential:
    """builder.py `_build_mlp`."""
    mlp = []
    for l in range(num_layers):
        dim1 = input_dim if l == 0 else mlp_dim
        dim2 = output_dim if l == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if l < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def authors_sincos(h: int, w: int, embed_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """vits.py `build_2d_sincos_position_embedding`, with its zero entry for the class token."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")  # their (old default) indexing
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1. / (temperature**omega)
    out_w = torch.einsum('m,d->md', [grid_w.flatten(), omega])
    out_h = torch.einsum('m,d->md', [grid_h.flatten(), omega])
    pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)],
                        dim=1)[None, :, :]
    pe_token = torch.zeros([1, 1, embed_dim], dtype=torch.float32)
    return torch.cat([pe_token, pos_emb], dim=1)


class AuthorsMoCo(nn.Module):
    """builder.py MoCo_ResNet / MoCo_ViT in one process (rank 0, world 1)."""

    def __init__(self, backbone: nn.Module, momentum_backbone: nn.Module, width: int, vit: bool,
                 T: float) -> None:
        super().__init__()
        self.T = T
        layers = 3 if vit else 2
        self.base_encoder = nn.Sequential(backbone, build_mlp(layers, width, HIDDEN, DIM))
        self.momentum_encoder = nn.Sequential(momentum_backbone, build_mlp(layers, width, HIDDEN, DIM))
        self.predictor = build_mlp(2, DIM, HIDDEN, DIM, last_bn=vit)
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)
            param_m.requires_grad = False

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1. - m)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        logits = torch.einsum('nc,mc->nm', [q, k]) / self.T
        labels = torch.arange(logits.shape[0], dtype=torch.long)
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class AuthorsLARS(torch.optim.Optimizer):
    """moco/optimizer.py: no rate scaling or weight decay for parameters <= 1-D."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g['params']:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g['weight_decay'])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0,
                                                (g['trust_coefficient'] * param_norm / update_norm), one),
                                    one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if 'mu' not in param_state:
                    param_state['mu'] = torch.zeros_like(p)
                mu = param_state['mu']
                mu.mul_(g['momentum']).add_(dp)
                p.add_(mu, alpha=-g['lr'])


def adjust_moco_momentum(epoch: float, epochs: int, moco_m: float) -> float:
    """main_moco.py, with --moco-m-cos."""
    return 1. - 0.5 * (1. + math.cos(math.pi * epoch / epochs)) * (1. - moco_m)


# --- the two sides -------------------------------------------------------------------------

def ours_and_theirs(kind: str) -> tuple[MoCo, AuthorsMoCo]:
    torch.manual_seed(0)
    if kind == "resnet":
        moco = MoCo("resnet18", version="v3", dim=DIM, mlp_hidden=HIDDEN, temperature=1.0,
                    **RESNET)
        backbones = [create_backbone("resnet18", channels=(8, 16, 32, 64))
                     for _ in range(2)]
    else:
        moco = MoCo("vit_tiny_patch16_224", version="v3", dim=DIM, mlp_hidden=HIDDEN,
                    temperature=0.2, pos_embed="sincos", freeze_patch_embed=True,
                    backbone_kwargs=VIT)
        backbones = [timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT)
                     for _ in range(2)]
        for b in backbones:  # what vits.py and --stop-grad-conv1 do to their own ViT
            b.pos_embed.requires_grad = False
            b.patch_embed.proj.weight.requires_grad = False
            b.patch_embed.proj.bias.requires_grad = False
    theirs = AuthorsMoCo(*backbones, moco.backbone.num_features, kind == "vit", moco.temperature)
    # Same weights: a strict load, so any difference in the heads' layers fails here.
    theirs.base_encoder.load_state_dict(moco.query_encoder.state_dict())
    theirs.momentum_encoder.load_state_dict(moco.key_encoder.state_dict())
    theirs.predictor.load_state_dict(moco.predictor.state_dict())
    if kind == "vit":  # the loaded table is theirs
        torch.testing.assert_close(theirs.base_encoder[0].pos_embed.detach(),
                                   authors_sincos(4, 4, 192), rtol=0, atol=0)
    return moco.to(DTYPE), theirs.to(DTYPE)


def optimizers(kind: str, moco: MoCo, theirs: AuthorsMoCo):
    if kind == "resnet":  # LARS as main_moco.py builds it: every parameter, one group
        cfg = OptimConfig(name="lars", weight_decay=1e-6)
        return build_optimizer(moco.parameters(), cfg, LR, CPU), \
            AuthorsLARS(theirs.parameters(), LR, weight_decay=1e-6, momentum=0.9)
    # Betas: torch's defaults on both sides, as theirs. Some tensors have a zero gradient in exact
    # arithmetic (the attention's key bias: softmax ignores a shift of every key; the last
    # LayerNorm's bias, ahead of the projector's BN): Adam's first step is g/(|g|+eps), so with
    # eps 1e-8 it turns their ~1e-16 rounding noise into ~1e-8·lr steps that differ per side.
    # eps 1e-5 on both sides keeps those below the tolerance (lr·1e-16/1e-5 a step); the update
    # rule is torch's AdamW on both sides all the same.
    cfg = OptimConfig(name="adamw", weight_decay=0.1)
    ours = build_optimizer(moco.parameters(), cfg, LR, CPU)
    for group in ours.param_groups:
        group["eps"] = ADAM_EPS
    return ours, torch.optim.AdamW(theirs.parameters(), LR, weight_decay=0.1, eps=ADAM_EPS)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_steps_match_the_authors_code(kind):
    """Loss, gradients of every query-side tensor, the momentum encoder (cosine schedule) and
    every BN statistic after three steps: ours equals builder.py + main_moco.py's loop."""
    moco, theirs = ours_and_theirs(kind)
    ours_opt, their_opt = optimizers(kind, moco, theirs)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(N, 3, SIZE, SIZE, generator=g, dtype=DTYPE),
                torch.randn(N, 3, SIZE, SIZE, generator=g, dtype=DTYPE)) for _ in range(STEPS)]
    epochs, iters = 2, 2  # the schedule's length: 4 steps, of which 3 run
    for step, (x1, x2) in enumerate(batches):
        m = momentum_at(step, epochs * iters, 0.99, "cosine")
        assert m == pytest.approx(adjust_moco_momentum(step / iters, epochs, 0.99), rel=1e-15)
        out = moco(x1, x2, momentum=m)
        loss = theirs(x1, x2, adjust_moco_momentum(step / iters, epochs, 0.99))
        torch.testing.assert_close(out.loss, loss, **TOL)
        for opt, value in ((ours_opt, out.loss), (their_opt, loss)):
            opt.zero_grad()
            value.backward()
        if step == 0:
            ours = [*moco.query_encoder.parameters(), *moco.predictor.parameters()]
            ref = [*theirs.base_encoder.parameters(), *theirs.predictor.parameters()]
            assert len(ours) == len(ref)
            for a, b in zip(ours, ref):
                assert (a.grad is None) == (b.grad is None)
                if a.grad is not None:
                    torch.testing.assert_close(a.grad, b.grad, **TOL)
        ours_opt.step()
        their_opt.step()
    pairs = ((moco.query_encoder, theirs.base_encoder), (moco.key_encoder, theirs.momentum_encoder),
             (moco.predictor, theirs.predictor))
    for a, b in pairs:  # parameters and BN running statistics (the encoders' order shows here)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:
            torch.testing.assert_close(sa[name], sb[name], **TOL, msg=lambda s: f"{name}: {s}")
    # The momentum encoder moved (the test can fail): it is no longer the query encoder.
    assert not torch.allclose(moco.key_encoder[1][0].weight, moco.query_encoder[1][0].weight)


# --- heads ---------------------------------------------------------------------------------

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


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_heads_are_the_authors_variant(kind):
    """ResNet: 2-layer projector, predictor without a last BN; ViT: 3-layer projector, predictor
    ending in BN without affine. Default widths 4096 and 256, as --moco-mlp-dim/--moco-dim."""
    torch.manual_seed(0)
    if kind == "resnet":
        moco = MoCo("resnet18", version="v3", dim=256, **RESNET)
    else:
        moco = MoCo("vit_tiny_patch16_224", version="v3", dim=256,
                    backbone_kwargs=dict(img_size=SIZE, patch_size=8, depth=1))
    vit = kind == "vit"
    width = moco.backbone.num_features
    assert is_vit(moco.backbone) == vit
    assert layout(moco.query_encoder[1]) == layout(build_mlp(3 if vit else 2, width, 4096, 256))
    assert layout(moco.predictor) == layout(build_mlp(2, 256, 4096, 256, last_bn=vit))
    assert layout(moco.key_encoder[1]) == layout(moco.query_encoder[1])


def test_predictor_width_of_its_own():
    torch.manual_seed(0)
    moco = MoCo("resnet18", version="v3", dim=DIM, mlp_hidden=HIDDEN, predictor_hidden=8, **RESNET)
    assert layout(moco.predictor)[0] == ("fc", DIM, 8, False)
    assert layout(moco.query_encoder[1])[0] == ("fc", 64, HIDDEN, False)


def test_vit_is_decided_by_structure_not_name():
    assert is_vit(timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1))
    assert is_vit(timm.create_model("deit_tiny_patch16_224", num_classes=0, depth=1))
    assert not is_vit(timm.create_model("resnet18", num_classes=0))
    assert not is_vit(timm.create_model("convnext_atto", num_classes=0))


# --- the ViT's position embeddings and patch projection ------------------------------------

def test_sincos_equals_the_authors_table_and_a_per_entry_formula():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", pos_embed="sincos", **VIT)  # 4×4 grid, width 192
    table = vit.pos_embed.detach()
    assert table.shape == (1, 1 + 16, 192) and not vit.pos_embed.requires_grad
    torch.testing.assert_close(table, authors_sincos(4, 4, 192), rtol=0, atol=0)
    # Independent of both: entry by entry, a patch in row r, column c of a non-square grid.
    h, w, d = 3, 5, 8
    got = sincos_2d((h, w), d)
    for r in range(h):
        for c in range(w):
            for i in range(d // 4):
                omega = 10000.0 ** (-i / (d // 4))
                expect = [math.sin(r * omega), math.cos(r * omega), math.sin(c * omega),
                          math.cos(c * omega)]
                row = got[r * w + c]
                assert [row[i + j * d // 4].item() for j in range(4)] == \
                    pytest.approx(expect, abs=1e-6)


def test_sincos_leaves_the_tokens_without_a_table_entry_alone():
    """timm ViTs whose class token has no position embedding (no_embed_class): the table holds
    the patches only."""
    vit = create_backbone("vit_tiny_patch16_224", pos_embed="sincos", no_embed_class=True, **VIT)
    torch.testing.assert_close(vit.pos_embed.detach(), authors_sincos(4, 4, 192)[:, 1:],
                               rtol=0, atol=0)


def test_patch_projection_is_random_frozen_and_unchanged_by_training():
    torch.manual_seed(0)
    moco = MoCo("vit_tiny_patch16_224", version="v3", dim=DIM, mlp_hidden=HIDDEN,
                pos_embed="sincos", freeze_patch_embed=True, backbone_kwargs=VIT)
    proj = moco.backbone.patch_embed.proj
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 192))  # vits.py: xavier-uniform over 3·p·p + width
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.9 * bound
    assert torch.equal(proj.bias, torch.zeros_like(proj.bias))
    frozen = {"proj.weight": proj.weight, "proj.bias": proj.bias, "pos_embed": moco.backbone.pos_embed}
    assert not any(p.requires_grad for p in frozen.values())
    before = {k: v.detach().clone() for k, v in frozen.items()}
    opt = build_optimizer(moco.parameters(), OptimConfig(name="adamw", weight_decay=0.1), 1e-2, CPU)
    assert not {id(p) for p in frozen.values()} & {id(p) for p in opt.param_groups[0]["params"]}
    for _ in range(2):
        out = moco(torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE), momentum=0.99)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(v.grad is None for v in frozen.values())
    for k, v in frozen.items():
        assert torch.equal(v, before[k]), k
    key_backbone = moco.key_encoder[0]  # the momentum copy keeps the same frozen tensors
    torch.testing.assert_close(key_backbone.patch_embed.proj.weight, proj.weight)
    trained = moco.backbone.blocks[0].attn.qkv.weight
    assert trained.grad is not None  # the rest trains
