"""The processes of a `fastmoco train` run as /proc shows them (torchrun's workers in sessions
of their own, the data loader's workers forked from a trainer), for the soak driver to signal."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def trainers(pid: int) -> list[int]:
    """The `fastmoco train` processes at or below `pid` (not torchrun, not loader workers)."""
    found = []
    for p in [pid, *descendants(pid)]:
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"-m\0fastmoco\0train" in cmdline and b"torch.distributed.run" not in cmdline:
            found.append(p)
    # Loader workers are forks of a trainer (the same command line): not those.
    return sorted(p for p in found if parent(p) not in found)


def parent(pid: int) -> Optional[int]:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def kill_all(pid: int) -> None:
    """SIGKILL `pid` and everything below it (twice over, for a child started in between)."""
    for _ in range(2):
        for p in [pid, *descendants(pid)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
