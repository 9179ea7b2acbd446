"""BYOL's and SimSiam's heads against the papers' layouts; checkpoints that resume exactly (one
step at a time and through `fastmoco train`) and that name the settings of another method or
width; the settings that cannot go together; the ImageNet presets and the CPU demo's method."""
from __future__ import annotations

import io

import pytest
import torch
from fastmoco.pipelines.recipes import get_recipe
from siamese_cases import BYOL_TINY, DIM, HIDDEN, SIMSIAM_TINY, make, trainer_for, views
from torch import nn

from fastmoco.methods.byol import BYOL
from fastmoco.methods.simsiam import SimSiam
from fastmoco.training.trainer import check_model_state

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
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
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
    check_model_state(byol.model, state)  # its own: no error


def test_train_checkpoints_and_resumes_byol_exactly(tiny_cifar, tmp_path):
    """The loop end to end: kNN, metrics (pretext top-1 in [0, 100]), epoch checkpoints, the
    exported backbone, and a resume from the first epoch's checkpoint that gives the same losses."""
    import json
    import shutil

    from fastmoco.training.loop import train
    from fastmoco.weights.checkpoint import list_checkpoints, load_checkpoint
    from fastmoco.weights.load import load_backbone

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
