"""MoCo v3's SyncBatchNorm over the whole model (backbone, projector, predictor; timm's
norm-activation layers kept), the settings that cannot go together, and the ImageNet presets
against the authors' settings."""
from __future__ import annotations

import logging

import pytest
import torch
from fastmoco.pipelines.recipes import get_recipe
from moco_v3_cases import DIM, HIDDEN, RESNET, SIZE, VIT, N, make
from torch import nn

from fastmoco import MoCo
from fastmoco.backbone import create_backbone

# --- SyncBatchNorm -------------------------------------------------------------------------

def batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_auto_bn_for_v3_is_syncbn_on_gpus(caplog):
    def mode(world: int, device: str | None) -> str:
        torch.manual_seed(0)
        return MoCo("resnet18", version="v3", dim=DIM, mlp_hidden=HIDDEN, world_size=world,
                    device_type=device, **RESNET).shuffle_bn

    assert mode(1, "cpu") == mode(1, "cuda") == "none"  # one process: BN over the global batch
    assert mode(4, "cuda") == "sync"
    with caplog.at_level(logging.WARNING):  # CPU processes: v1/v2's shuffle BN, said at start
        assert mode(2, "cpu") == "ddp"
    assert "SyncBatchNorm runs on CUDA only" in caplog.text and "method.shuffle_bn=ddp" in caplog.text


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_syncbn_covers_backbone_projector_and_predictor_and_computes_as_bn(kind):
    """The whole model is converted, after its heads exist; without a process group (one
    process) SyncBatchNorm computes plain BN: the converted model gives the same loss and
    gradients as the unconverted one from the same weights."""
    def build(shuffle_bn: str) -> MoCo:
        torch.manual_seed(0)
        if kind == "resnet":
            return MoCo("resnet18", version="v3", dim=DIM, mlp_hidden=HIDDEN, shuffle_bn=shuffle_bn,
                        world_size=2, device_type="cuda", **RESNET)
        return MoCo("vit_tiny_patch16_224", version="v3", dim=DIM, mlp_hidden=HIDDEN,
                    shuffle_bn=shuffle_bn, world_size=2, device_type="cuda", backbone_kwargs=VIT)

    synced, plain = build("sync"), build("none")
    for part in (synced.query_encoder, synced.key_encoder, synced.predictor):
        norms = batchnorms(part)
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert len(batchnorms(synced)) == len(batchnorms(plain))
    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(N, 3, SIZE, SIZE, generator=g) for _ in range(2))
    outs = [m(x1, x2, momentum=0.99) for m in (synced, plain)]
    assert torch.equal(outs[0].loss, outs[1].loss)
    for out in outs:
        out.loss.backward()
    for a, b in zip(synced.parameters(), plain.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    synced.momentum_update(0.9)  # the flat EMA buffers survive the conversion
    torch.testing.assert_close(synced.key_encoder[1][0].weight, synced.query_encoder[1][0].weight)


def test_syncbn_keeps_timms_norm_activation_layers():
    """timm's BatchNormAct2d (EfficientNet, RegNet) becomes SyncBatchNormAct, not a bare
    SyncBatchNorm that would drop its activation."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    torch.manual_seed(0)
    net = create_backbone("mobilenetv3_small_050")
    assert any(isinstance(m, BatchNormAct2d) for m in net.modules())
    moco = MoCo(net, version="v3", dim=DIM, mlp_hidden=HIDDEN, shuffle_bn="sync", world_size=2,
                device_type="cuda")
    norms = batchnorms(moco.backbone)
    assert any(isinstance(m, SyncBatchNormAct) for m in norms)
    assert all(isinstance(m, nn.SyncBatchNorm) for m in norms)


# --- settings that cannot go together ------------------------------------------------------

def test_split_bn_on_a_vit_names_the_setting():
    with pytest.raises(ValueError, match=r"method.shuffle_bn=split .* no BatchNorm.*"
                                         r"set method.shuffle_bn=auto or none"):
        MoCo("vit_tiny_patch16_224", version="v3", dim=DIM, shuffle_bn="split",
             backbone_kwargs=dict(img_size=SIZE, patch_size=8, depth=1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(freeze_patch_embed=True), r"set backbone.freeze_patch_embed=false"),
    (dict(pos_embed="sincos"), r"set backbone.pos_embed=learned"),
])
def test_vit_recipe_on_a_convnet_names_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoCo("resnet18", version="v3", dim=DIM, **kwargs, **RESNET)


@pytest.mark.parametrize("overrides, match", [
    (["method=moco_v3", "method.queue_size=65536"],
     r"method.queue_size=65536: MoCo v3 has no queue.*set method.queue_size=0"),
    (["method.version=v3"], r"method.queue_size=65536: MoCo v3 has no queue"),
    (["method.predictor_hidden=512"], r"method.predictor_hidden=512: MoCo v2 has no predictor"),
    (["method=moco_v3", "method.predictor_hidden=0"], r"method.predictor_hidden=0: choose a positive"),
    (["backbone.pos_embed=sin"], r"backbone.pos_embed='sin': choose one of learned, sincos"),
    (["optim.betas=[0.9,1.5]"], r"optim.betas=\[0.9, 1.5\]"),
])
def test_each_v3_setting_is_checked_when_composed(overrides, match):
    with pytest.raises(ValueError, match=match):
        make(overrides)


def test_v3_syncbn_on_cpu_processes_when_asked_stops_at_start():
    cfg = make(["method=moco_v3", "method.shuffle_bn=sync"])
    with pytest.raises(ValueError, match=r"method.shuffle_bn=sync needs CUDA"):
        cfg.check(2, "cpu")
    make(["method=moco_v3", "schedule.batch_size=30"]).check(2, "cpu")  # auto: no bn_splits rule


# --- the presets ---------------------------------------------------------------------------

@pytest.mark.parametrize("experiment, expect", [
    ("imagenet_moco_v3_r50_100ep", dict(
        backbone="resnet50", epochs=100, warmup=10, optim=("lars", 0.6, 1e-6), T=1.0,
        recipe="v3_resnet", crop=0.2, vit=(False, "learned", {}))),
    ("imagenet_moco_v3_vit_small_300ep", dict(
        backbone="vit_small_patch16_224", epochs=300, warmup=40, optim=("adamw", 1.5e-4, 0.1),
        T=0.2, recipe="v3", crop=0.08,
        vit=(True, "sincos", {"num_heads": 12, "weight_init": "moco"}))),
    ("imagenet_moco_v3_vit_base_300ep", dict(
        backbone="vit_base_patch16_224", epochs=300, warmup=40, optim=("adamw", 1.5e-4, 0.1),
        T=0.2, recipe="v3", crop=0.08, vit=(True, "sincos", {"weight_init": "moco"}))),
])
def test_v3_presets_hold_the_authors_settings(experiment, expect):
    cfg = make([f"experiment={experiment}", "data.root=/data/imagenet"])
    m, o, s, b = cfg.method, cfg.optim, cfg.schedule, cfg.backbone
    assert (m.version, m.dim, m.mlp_hidden, m.queue_size, m.symmetric) == ("v3", 256, 4096, 0, True)
    assert (m.momentum, m.momentum_schedule, m.temperature, m.shuffle_bn) == \
        (0.99, "cosine", expect["T"], "auto")
    assert (o.name, o.lr, o.weight_decay, o.base_batch, tuple(o.betas), o.momentum) == \
        (*expect["optim"], 256, (0.9, 0.999), 0.9)
    assert (s.batch_size, s.epochs, s.warmup_epochs, s.lr_schedule) == \
        (4096, expect["epochs"], expect["warmup"], "cosine")
    assert (b.name, b.freeze_patch_embed, b.pos_embed, dict(b.kwargs)) == \
        (expect["backbone"], *expect["vit"])
    assert (cfg.data.recipe, cfg.data.image_size) == (expect["recipe"], 224)
    views = get_recipe(cfg.data.recipe)  # --crop-min, blur 1.0 / 0.1, solarize 0 / 0.2
    assert views.query.crop_scale == views.key.crop_scale == (expect["crop"], 1.0)
    assert (views.query.blur_p, views.key.blur_p, views.query.solarize_p, views.key.solarize_p) == \
        (1.0, 0.1, 0.0, 0.2)
    cfg.check(16, "cuda")
