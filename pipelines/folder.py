"""Scan an image folder into an ImageList, skipping (and counting) files that are not images."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .cache import cache_dir
from .seeds import epoch_permutation

log = logging.getLogger(__name__)

EXTENSIONS = (".jpg", ".jpeg", ".png")
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TAIL_BYTES = 4096  # JPEG EOI / PNG IEND must sit in the last few KiB (some files carry padding)
ENV_VAR = "FASTMOCO_DATA"


@dataclass
class ImageList:
    """Image paths with integer labels; `skipped` holds (path, reason) for rejected files."""

    files: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    root: str = ""
    verified: bool = False  # True when every file was fully decoded at scan time

    def __len__(self) -> int:
        return len(self.files)


def scan_image_folder(
    root: str | Path, *, max_images: int | None = None, seed: int = 0, verify: bool = False
) -> ImageList:
    """List root/<class>/**.{jpg,jpeg,png} (or a flat folder as class "") and check each file cheaply.

    The cheap check reads the head (JPEG/PNG magic) and tail (JPEG EOI / PNG IEND) of each file,
    which catches non-images, empty, unreadable and truncated files; `verify=True` also decodes
    every file with PIL (cached on disk by path, size and mtime) to catch corrupt data in between.
    Empty class folders are kept as classes with no images so labels agree across splits.
    `max_images` keeps a random subset drawn with `seed`; files are returned in sorted order.
    """
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {str(root)!r} is not a directory; point it at an ImageFolder "
            f"(root/<class>/*.jpg) or a flat folder of images: set {ENV_VAR}=/path/to/data "
            f"or pass data.root=/path/to/data"
        )
    classes, candidates, skipped = _list_candidates(root)
    order = list(range(len(candidates)))
    if max_images is not None and max_images < len(candidates):
        random.Random(seed).shuffle(order)
    else:
        max_images = len(candidates)
    cache = _VerifyCache(root) if verify else None
    kept: list[int] = []
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        start = 0
        while len(kept) < max_images and start < len(order):
            chunk = order[start : start + max(64, max_images - len(kept))]
            start += len(chunk)
            check = (lambda i: cache.check(candidates[i][0])) if cache else (lambda i: check_image(candidates[i][0]))
            for i, reason in zip(chunk, pool.map(check, chunk)):
                if reason is None and len(kept) < max_images:
                    kept.append(i)
                elif reason is not None:
                    skipped.append((candidates[i][0], reason))
    if cache:
        cache.save()
    kept.sort()
    files = [candidates[i][0] for i in kept]
    labels = [candidates[i][1] for i in kept]
    _log_skipped(root, skipped)
    if not files:
        raise ValueError(
            f"no readable .jpg/.jpeg/.png images under {str(root)!r} ({len(skipped)} files skipped); "
            f"expected root/<class>/*.jpg or a flat folder of images: set {ENV_VAR} or data.root "
            f"to a folder that holds them"
        )
    present = {c for _, c in candidates}
    for c, name in enumerate(classes):
        if c not in present:
            log.warning("class folder %r under %s has no images; kept as an empty class", name, root)
    return ImageList(files, labels, classes, skipped, str(root), verify)


def _list_candidates(root: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """Classes, (path, label) candidates by extension, and non-image files skipped by name."""
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    top = sorted(e.name for e in os.scandir(root) if not e.is_dir() and not e.name.startswith("."))
    skipped: list[tuple[str, str]] = []
    per_class = [_walk(root / d, skipped) for d in subdirs]
    if any(per_class):
        candidates = [(p, c) for c, paths in enumerate(per_class) for p in paths]
        if any(n.lower().endswith(EXTENSIONS) for n in top):
            log.warning("%s is an ImageFolder; images directly under it are ignored", root)
        return subdirs, candidates, skipped
    skipped.clear()
    flat = _walk(root, skipped, recurse=False)
    return [""], [(p, 0) for p in flat], skipped


def _walk(folder: Path, skipped: list[tuple[str, str]], recurse: bool = True) -> list[str]:
    """Sorted image paths under `folder`; other files go to `skipped`."""
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recurse else []
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if name.lower().endswith(EXTENSIONS):
                paths.append(path)
            else:
                skipped.append((path, f"extension not in {EXTENSIONS}"))
    return sorted(paths)


def check_image(path: str) -> str | None:
    """None when `path` looks like a whole JPEG or PNG (magic bytes and end marker), else the reason."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if not head:
                return "empty file"
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError as e:
        return f"unreadable: {type(e).__name__}: {e.strerror or e}"
    return check_markers(head, tail)


def check_markers(head: bytes, tail: bytes) -> str | None:
    """None when `head` opens a JPEG/PNG and `tail` (its last TAIL_BYTES) holds the end marker, else why."""
    if head.startswith(JPEG_MAGIC):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(PNG_MAGIC):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    return "not a JPEG or PNG (bad magic bytes)"


def decode_check(path: str) -> str | None:
    """None when PIL decodes the whole file, else the reason (cheap check first)."""
    return check_image(path) or pil_check(path)


def pil_check(source: str | IO[bytes]) -> str | None:
    """None when PIL decodes the whole image (a path or a binary file object), else the reason."""
    from PIL import Image

    try:
        with Image.open(source) as img:
            img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))  # DCT scaling still reads every byte
            img.load()
    except Exception as e:  # PIL raises many types for bad data
        return f"decode failed: {type(e).__name__}: {e}"
    return None


class _VerifyCache:
    """decode_check results cached per root in cache_dir("verify"), keyed by path, size and mtime."""

    def __init__(self, root: Path) -> None:
        self.path = cache_dir("verify") / (hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16] + ".json")
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def check(self, path: str) -> str | None:
        try:
            st = os.stat(path)
            key = [st.st_size, st.st_mtime_ns]
        except OSError as e:
            return f"unreadable: {type(e).__name__}: {e.strerror or e}"
        hit = self.entries.get(path)
        if hit is not None and hit[:2] == key:
            return hit[2]
        reason = decode_check(path)
        if not (reason or "").startswith("unreadable"):  # permissions may change; don't cache those
            self.entries[path] = key + [reason]
            self.dirty = True
        return reason

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not write verify cache %s: %s", self.path, e)


def _log_skipped(root: Path, skipped: list[tuple[str, str]]) -> None:
    if skipped:
        first = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        log.warning("skipped %d files under %s (first: %s)", len(skipped), root, first)


def epoch_steps(n: int, batch_size: int, rank: int, world_size: int, unit: str = "images") -> int:
    """Full batches per rank and epoch (drop_last); an error when there is not even one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    steps = n // (batch_size * world_size)
    if steps == 0:
        raise ValueError(
            f"{n} images cannot fill one batch of {batch_size} on each of {world_size} ranks; "
            f"lower batch_size or add {unit}"
        )
    return steps


def check_start(start: int, steps: int) -> int:
    """`start` when an epoch of `steps` batches can start there (start == steps: nothing left)."""
    if not 0 <= start <= steps:
        raise ValueError(f"cannot start an epoch of {steps} batches at batch {start}; a checkpoint's batch_in_epoch "
                         f"must come from a run with the same data, batch size and world size")
    return start


def shard_indices(n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> list[int]:
    """Rank's indices for one epoch: a permutation seeded by seed + epoch, cut to whole global
    batches (drop_last), strided over ranks so that shards are disjoint and cover the kept part."""
    steps = epoch_steps(n, batch_size, rank, world_size)
    perm = epoch_permutation(n, seed, epoch)[: steps * batch_size * world_size]
    return perm[rank::world_size].tolist()
