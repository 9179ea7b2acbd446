"""Fetch CIFAR-10 once, where the machine is online, as JPEG files in ImageFolder layout."""
from __future__ import annotations

import logging
from pathlib import Path

from fastmoco.pipelines.cache import cache_dir

log = logging.getLogger(__name__)


def ensure_cifar10(dest: Path | None = None) -> Path:
    """<dest>/{train,test}/<class>/NNNNN.jpg, downloaded by torchvision and written once."""
    dest = dest or cache_dir("cifar10")
    done = dest / ".complete"
    if done.exists():
        return dest
    from torchvision.datasets import CIFAR10

    raw = cache_dir("cifar10-raw")
    log.info("downloading CIFAR-10 to %s and writing JPEGs to %s (once)", raw, dest)
    for split, train in (("train", True), ("test", False)):
        ds = CIFAR10(str(raw), train=train, download=True)
        for i, (img, label) in enumerate(ds):
            folder = dest / split / ds.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:05d}.jpg", quality=95)
    done.touch()
    return dest
