"""Checkpoints: written atomically, found by step, checked and loaded with weights_only=True; an
unreadable newest checkpoint gives way to the one before it."""
from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)
_NAME = re.compile(r"^checkpoint_(\d{9})\.pt$")


UNREADABLE_SUFFIX = ".unreadable"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, rename over the target, fsync the
    folder: a crash (or a power cut) leaves either the old checkpoint or the new one, never half
    of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable: until the folder itself is synced, a power cut can
    bring back the old directory entry."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(run_dir: str | Path) -> None:
    """Raise OSError unless a checkpoint can be written into run_dir (read-only file system, no
    permission); leftovers of writers killed mid-write (temporary names) are removed."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=d, prefix=".write_probe.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)
    for stale in d.glob(".checkpoint_*.tmp"):
        stale.unlink(missing_ok=True)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Save `state` as checkpoint_<step>.pt and drop all but the newest `keep`."""
    d = checkpoint_dir(run_dir)
    path = d / f"checkpoint_{step:09d}.pt"
    save_atomic(state, path)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Load tensors and plain containers only: a checkpoint cannot run code on load. `mmap`:
    tensors map the file instead of being read (a look at the config reads little)."""
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def verify_checkpoint(path: str | Path) -> None:
    """Raise ValueError if a record of the file fails its CRC-32 (torch.save stores one per
    record, torch.load does not check them): a flipped bit in the weights otherwise loads."""
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"record {bad} fails its CRC-32 check")


def read_newest(run_dir: str | Path, set_aside: bool = False
                ) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """The newest checkpoint that reads back whole, and its contents; (None, None) without any.
    Each unreadable one (truncated, empty, bit rot, not a checkpoint) is logged by name and
    the one before it tried; if none reads, the error lists them all. With `set_aside`, once one
    reads, the unreadable newer ones are renamed to <name>.unreadable: kept for a look, but no
    longer counted among the `keep` newest, where they would push out a readable one."""
    failures, unreadable = [], []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            state = load_checkpoint(path)
            if not isinstance(state, dict) or "progress" not in state:
                raise ValueError("it holds no run progress")
        except Exception as e:  # any reason a file does not read back is a reason to fall back
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
            log.warning("checkpoint %s cannot be read (%s): falling back to the one before it",
                        path.name, reason)
            failures.append(f"{path.name} ({reason})")
            unreadable.append(path)
            continue
        for bad in unreadable if set_aside else []:
            aside = bad.with_name(bad.name + UNREADABLE_SUFFIX)
            bad.replace(aside)
            log.warning("checkpoint %s set aside as %s", bad.name, aside.name)
        return path, state
    if failures:
        raise RuntimeError(
            f"no checkpoint in {checkpoint_dir(run_dir)} can be read: {'; '.join(failures)}. Move "
            f"them aside to start over, or give this run another run.dir")
    return None, None


def rng_state() -> dict[str, Any]:
    """Every random stream the run draws from (python, torch CPU, the CUDA devices)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine %d GPUs: CUDA RNG not restored",
                        len(cuda), torch.cuda.device_count())
