"""Where fastmoco caches what it derives from the data (verify results, WebDataset indexes)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FASTMOCO_CACHE"


def cache_dir(kind: str = "") -> Path:
    """$FASTMOCO_CACHE/<kind>, else $XDG_CACHE_HOME/fastmoco/<kind>, else ~/.cache/fastmoco/<kind>."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastmoco"
    return Path(root) / kind
