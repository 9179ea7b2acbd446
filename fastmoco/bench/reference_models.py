"""The reference arm's models: each method as its authors wrote it, kept deliberately plain.

MoCo v1/v2: facebookresearch/moco builder.py (the CIFAR demo's split BN); v3: moco-v3
builder.py and optimizer.py (LARS); BYOL: deepmind-research/byol (byol_experiment.py, helpers,
optimizers.py) in torch; SimSiam: facebookresearch/simsiam builder.py and main_simsiam.py.
Python loops for the momentum update and LARS, eager einsum / cross_entropy / cosine, fp32.
Only the backbone is shared with fastmoco (timm, same config). Every model has
`loss(x1, x2)` (forward and loss, its parts in fastmoco's profiler ranges) and `after_step()`
(what follows the optimizer step: BYOL's target update)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastmoco.backbone import create_backbone, feature_dim, is_vit
from fastmoco.config import TrainConfig
from fastmoco.trace import phase


class SplitBatchNorm(nn.BatchNorm2d):
    """The CIFAR demo's shuffle-BN stand-in: BN statistics over `num_splits` sub-batches."""

    def __init__(self, num_features: int, num_splits: int) -> None:
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training:
            return super().forward(x)
        mean_split = self.running_mean.repeat(self.num_splits)
        var_split = self.running_var.repeat(self.num_splits)
        out = F.batch_norm(
            x.view(-1, c * self.num_splits, h, w), mean_split, var_split,
            self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
            True, self.momentum, self.eps).view(n, c, h, w)
        self.running_mean.data.copy_(mean_split.view(self.num_splits, c).mean(dim=0))
        self.running_var.data.copy_(var_split.view(self.num_splits, c).mean(dim=0))
        return out


def _split_bn_(module: nn.Module, num_splits: int) -> None:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, SplitBatchNorm(child.num_features, num_splits))
        else:
            _split_bn_(child, num_splits)


def _backbone(cfg: TrainConfig) -> nn.Module:
    b = cfg.backbone
    return create_backbone(b.name, cifar_stem=b.cifar_stem, pos_embed=b.pos_embed,
                           freeze_patch_embed=b.freeze_patch_embed, **dict(b.kwargs))


@torch.no_grad()
def _momentum_update(target: nn.Module, source: nn.Module, m: float) -> None:
    """builder.py's loop: param_k.data = param_k.data * m + param_q.data * (1 - m)."""
    for param_q, param_k in zip(source.parameters(), target.parameters()):
        param_k.data = param_k.data * m + param_q.data * (1.0 - m)


class ReferenceMoCo(nn.Module):
    """builder.MoCo: query/key encoders, a C×K queue, Algorithm 1 in `forward`."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        m = cfg.method
        self.K, self.m, self.T = m.queue_size, m.momentum, m.temperature

        def encoder() -> nn.Module:
            net = _backbone(cfg)
            if m.bn_splits > 1:
                _split_bn_(net, m.bn_splits)
            width = feature_dim(net)
            if m.version == "v1":
                return nn.Sequential(net, nn.Linear(width, m.dim))
            hidden = m.mlp_hidden or width
            return nn.Sequential(net, nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, m.dim))

        self.encoder_q = encoder()
        self.encoder_k = encoder()
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(m.dim, self.K), dim=0))  # C×K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor):
        with phase("forward"):
            q = F.normalize(self.encoder_q(im_q), dim=1)  # N×C
        with torch.no_grad():
            with phase("ema"):
                _momentum_update(self.encoder_k, self.encoder_q, self.m)
            with phase("forward"):
                idx_shuffle = torch.randperm(im_k.shape[0], device=im_k.device)
                idx_unshuffle = torch.argsort(idx_shuffle)
                k = F.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)[idx_unshuffle]  # N×C
        with phase("loss"):
            l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # N×1
            l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # N×K
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # N×(1+K)
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        with phase("queue"):
            self._dequeue_and_enqueue(k)
        return logits, labels

    def loss(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        """main_moco.py: criterion(output, target)."""
        output, target = self(im_q, im_k)
        with phase("loss"):
            return F.cross_entropy(output, target)

    def after_step(self) -> None:
        pass


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int,
              last_bn: bool = True) -> nn.Sequential:
    """moco-v3 builder.py `_build_mlp`."""
    mlp: list[nn.Module] = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


class ReferenceMoCoV3(nn.Module):
    """moco-v3 builder.py MoCo_ResNet / MoCo_ViT in one process."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        m = cfg.method
        self.T, self.m = m.temperature, m.momentum
        backbone = _backbone(cfg)
        vit, width, hidden = is_vit(backbone), feature_dim(backbone), m.mlp_hidden or 4096
        self.base_encoder = nn.Sequential(backbone, build_mlp(3 if vit else 2, width, hidden, m.dim))
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.predictor = build_mlp(2, m.dim, m.predictor_hidden or hidden, m.dim, last_bn=vit)
        for param_m in self.momentum_encoder.parameters():
            param_m.requires_grad = False

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        labels = torch.arange(logits.shape[0], dtype=torch.long, device=logits.device)
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        with phase("forward"):
            q1 = self.predictor(self.base_encoder(x1))
            q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            with phase("ema"):
                _momentum_update(self.momentum_encoder, self.base_encoder, self.m)
            with phase("forward"):
                k1 = self.momentum_encoder(x1)
                k2 = self.momentum_encoder(x2)
        with phase("loss"):
            return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)

    def after_step(self) -> None:
        pass


def _byol_mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """BYOL's networks.MLP: Linear (bias), BatchNorm, relu, Linear (bias)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


def _l2_normalize(x: torch.Tensor, epsilon: float = 1e-12) -> torch.Tensor:
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=-1, keepdim=True), min=epsilon))


class ReferenceBYOL(nn.Module):
    """byol_experiment.py's loss_fn and target update, in torch."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        m = cfg.method
        self.tau = m.momentum
        backbone = _backbone(cfg)
        hidden = m.mlp_hidden or 4096
        self.online = nn.Sequential(backbone, _byol_mlp(feature_dim(backbone), hidden, m.dim))
        self.predictor = _byol_mlp(m.dim, m.predictor_hidden or hidden, m.dim)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)

    @staticmethod
    def regression_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """helpers.regression_loss: ‖x̄ − ȳ‖² per row."""
        return ((_l2_normalize(x) - _l2_normalize(y)) ** 2).sum(dim=-1)

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        with phase("forward"):
            p1 = self.predictor(self.online(x1))
            p2 = self.predictor(self.online(x2))
            with torch.no_grad():
                z1, z2 = self.target(x1), self.target(x2)
        with phase("loss"):
            return (self.regression_loss(p1, z2) + self.regression_loss(p2, z1)).mean()

    @torch.no_grad()
    def after_step(self) -> None:
        """_update_fn: target = x + (1 - tau) * (y - x), after the online update."""
        with phase("ema"):
            for x, y in zip(self.target.parameters(), self.online.parameters()):
                x.data = x.data + (1 - self.tau) * (y.data - x.data)


class ReferenceSimSiam(nn.Module):
    """simsiam builder.py and main_simsiam.py's loss."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        m = cfg.method
        backbone = _backbone(cfg)
        prev_dim = feature_dim(backbone)
        fc = nn.Linear(prev_dim, m.dim)
        fc.bias.requires_grad = False  # not use bias as followed by BN
        self.encoder = nn.Sequential(backbone, nn.Sequential(
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
            fc, nn.BatchNorm1d(m.dim, affine=False)))
        pred_dim = m.predictor_hidden or 512
        self.predictor = nn.Sequential(nn.Linear(m.dim, pred_dim, bias=False),
                                       nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                                       nn.Linear(pred_dim, m.dim))
        self.criterion = nn.CosineSimilarity(dim=1)

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        with phase("forward"):
            z1 = self.encoder(x1)
            z2 = self.encoder(x2)
            p1 = self.predictor(z1)
            p2 = self.predictor(z2)
        with phase("loss"):
            return -(self.criterion(p1, z2.detach()).mean()
                     + self.criterion(p2, z1.detach()).mean()) * 0.5

    def after_step(self) -> None:
        pass


class ReferenceLARS(torch.optim.Optimizer):
    """moco-v3 optimizer.py: a loop over tensors; no decay or trust ratio for tensors <= 1-D
    (BYOL's exclude_bias_and_norm leaves out the same ones)."""

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0., torch.where(
                        update_norm > 0, (g["trust_coefficient"] * param_norm / update_norm), one),
                        one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def reference_model(cfg: TrainConfig) -> nn.Module:
    """The configured method as its authors wrote it."""
    variant = cfg.method.variant
    if variant == "v3":
        return ReferenceMoCoV3(cfg)
    if variant == "byol":
        return ReferenceBYOL(cfg)
    if variant == "simsiam":
        return ReferenceSimSiam(cfg)
    return ReferenceMoCo(cfg)


def reference_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The authors' optimizer of the configured kind: torch's SGD or AdamW as their scripts
    build them (defaults, every trainable parameter in one group), or moco-v3's LARS."""
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    if o.name == "lars":
        return ReferenceLARS(params, lr, weight_decay=o.weight_decay, momentum=o.momentum)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr, momentum=o.momentum, weight_decay=o.weight_decay)
