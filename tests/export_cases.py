"""What the export tests share: runs made without training, a MoCo model with
perturbed weights and BN statistics (query and key encoders different) saved as `fastmoco train`
saves it, as module-scoped fixtures; and the comparison of features to fp32 rounding."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fastmoco.config import BackboneConfig, DataConfig, MethodConfig, TrainConfig
from fastmoco.methods.moco import MoCo
from fastmoco.weights.checkpoint import save_checkpoint

STEP = 7
NARROW = {"channels": [8, 16, 32, 64]}


@torch.no_grad()
def perturb_(encoder: nn.Module, seed: int) -> None:
    """Weights and BN statistics away from their init, so a key mix-up cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for name, t in encoder.state_dict().items():  # shares storage with the module
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g)
        if name.endswith("running_var"):
            t.copy_(1 + 0.3 * torch.rand(t.shape, generator=g))
        elif name.endswith("gamma"):  # ConvNeXt's layer scale (init 1e-6): make the blocks count
            t.copy_(0.5 + 0.1 * noise)
        elif name.endswith(("running_mean", "bias")):
            t.copy_(0.1 * noise)
        elif name.endswith("norm.weight") or ".bn" in name or name.startswith("bn"):
            t.copy_(1 + 0.1 * noise)
        else:
            t.mul_(1 + 0.1 * noise)


def make_run(root: Path, name: str, *, cifar_stem: bool = False, kwargs: dict | None = None,
             image_size: int = 64, recipe: str = "v2") -> MoCo:
    """A run directory holding one checkpoint as training writes it; returns the MoCo model."""
    torch.manual_seed(0)
    kwargs = dict(kwargs or {})
    cfg = TrainConfig(
        method=MethodConfig(dim=16, queue_size=32, mlp_hidden=32),
        backbone=BackboneConfig(name=name, cifar_stem=cifar_stem, kwargs=kwargs),
        data=DataConfig(name="synthetic", image_size=image_size, recipe=recipe),
    )
    cfg.run.dir = str(root)
    moco = MoCo(name, version="v2", dim=16, queue_size=32, mlp_hidden=32, cifar_stem=cifar_stem,
                backbone_kwargs=kwargs)
    perturb_(moco.query_encoder, 1)
    perturb_(moco.key_encoder, 2)
    moco.eval()
    save_checkpoint(root, STEP, {"model": moco.state_dict(), "config": dataclasses.asdict(cfg),
                                 "progress": {"step": STEP}})
    return moco


# The runs the tests export, by fixture name: the backbone and make_run's settings.
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    # torchvision's widths, standard stem, at 64 px, recipe v2
    "r18": ("resnet18", {}),
    # a narrow ResNet-18 with the CIFAR stem at 32 px, recipe cifar
    "cifar": ("resnet18", dict(cifar_stem=True, kwargs=NARROW, image_size=32, recipe="cifar")),
    "convnext": ("convnext_atto", {}),
}


def exported_run(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, MoCo]:
    """The run `name` (a key of RUNS): its directory and its MoCo model. conftest.py makes each
    a session fixture, built once for every export test file (none changes a run)."""
    root = tmp_path_factory.mktemp(f"{name}_run")
    backbone, kwargs = RUNS[name]
    return root, make_run(root, backbone, **kwargs)


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


@torch.no_grad()
def assert_same_features(model: nn.Module, reference: nn.Module, size: int) -> None:
    x = images(size)
    got, want = model.eval()(x), reference.eval()(x)
    assert got.shape == want.shape
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
