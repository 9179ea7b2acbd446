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
