"""Shared fixtures: the real data beside the project, small image trees, a clean environment."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CIFAR = Path(os.environ.get("FASTMOCO_TEST_CIFAR", SHARED / "cifar10"))
IMAGENET_SAMPLES = SHARED / "imagenet-samples"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on a lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (CIFAR / "train").is_dir():
        pytest.skip(f"CIFAR-10 JPEGs not found at {CIFAR} (set FASTMOCO_TEST_CIFAR)")
    return CIFAR


@pytest.fixture(scope="session")
def imagenet_samples() -> Path:
    if not IMAGENET_SAMPLES.is_dir():
        pytest.skip(f"ImageNet samples not found at {IMAGENET_SAMPLES}")
    return IMAGENET_SAMPLES


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory, cifar_root) -> Path:
    """A CIFAR-10 tree of 20 train and 10 test images per class, as symlinks (nothing copied)."""
    out = tmp_path_factory.mktemp("tiny_cifar")
    for split, n in (("train", 20), ("test", 10)):
        for cls in sorted(p.name for p in (cifar_root / split).iterdir()):
            d = out / split / cls
            d.mkdir(parents=True)
            for f in sorted((cifar_root / split / cls).iterdir())[:n]:
                (d / f.name).symlink_to(f)
    return out


@pytest.fixture
def rerun_in_triton_interpreter():
    """Run a test file's Triton cases again in a TRITON_INTERPRET=1 subprocess: the flag must be
    set before triton is first imported, and this process imports it for the compile checks."""
    def rerun(test_file: str, selection: str) -> None:
        from fastmoco.kernels.launch import interpreter_active

        if interpreter_active():
            pytest.skip("this process is the interpreter run")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider",
               "-k", selection]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert " passed" in r.stdout, r.stdout[-2000:]
    return rerun


@pytest.fixture
def tiny_moco():
    """A builder of the float64 MoCo v2 test model through the one build path: ResNet-18 with
    the CIFAR stem at channels 8-64, K 64, batch 8, split BN 2, fp32 settings, plus the given
    overrides; every BN weight drawn from U(0.5, 1.5) with a fixed seed (timm zero-initialises
    each block's last BN, and no gradient would reach the convolutions inside the block)."""
    from fastmoco.config import TrainConfig, apply_overrides
    from fastmoco.runtime import local_runtime
    from fastmoco.training.trainer import build_model

    def make(*overrides: str):
        cfg = apply_overrides(TrainConfig(), [
            "backbone.name=resnet18", "backbone.cifar_stem=true", "method.queue_size=64",
            "schedule.batch_size=8", "method.dim=16", "method.mlp_hidden=32",
            "method.bn_splits=2", "run.device=cpu", "run.precision=fp32",
            "+backbone.kwargs.channels=[8,16,32,64]", *overrides])
        torch.manual_seed(0)
        model = build_model(cfg, local_runtime(cfg)).double()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "bn" in name and name.endswith("weight"):
                    p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
        return model

    return make


# The runs the export tests export (tests/export_cases.py): built once for all their files.
@pytest.fixture(scope="session")
def r18(tmp_path_factory):
    from export_cases import exported_run
    return exported_run(tmp_path_factory, "r18")


@pytest.fixture(scope="session")
def cifar(tmp_path_factory):
    from export_cases import exported_run
    return exported_run(tmp_path_factory, "cifar")


@pytest.fixture(scope="session")
def convnext(tmp_path_factory):
    from export_cases import exported_run
    return exported_run(tmp_path_factory, "convnext")
