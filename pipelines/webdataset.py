"""WebDataset tar shards: scan and index them (DALI's v1.2 index format), skipping bad entries."""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from functools import lru_cache
from typing import NamedTuple, Sequence

import numpy as np

from .cache import cache_dir as default_cache_dir
from .folder import ENV_VAR, TAIL_BYTES, check_markers, pil_check
from .seeds import epoch_permutation, window_permutation

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png")  # the reader's image output takes any of these, any case
INDEX_VERSION = "v1.2"  # `v1.2 <samples>`, then per sample: `<ext> <data offset> <size> <name>` per component
CACHE_FORMAT = 1


class Entry(NamedTuple):
    """One sample of an index: its image member and, if any, its .cls member (offset, size)."""

    key: str
    image: tuple[str, int, int, str]  # ext, data offset, size, member name
    cls: tuple[str, int, int, str] | None


@dataclass
class ShardList:
    """Indexed tar shards: the loaders read `tars` through `indexes` (our filtered DALI indexes)."""

    tars: list[str]
    indexes: list[str]
    counts: list[int]  # samples per shard, as indexed
    labels: list[int] | None  # per sample in index order (from .cls), None when unlabeled
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("tar:key", reason)
    root: str = ""
    verified: bool = False

    def __len__(self) -> int:
        return sum(self.counts)

    def members(self) -> list[Member]:
        """The image member of every sample, in index order."""
        return [Member(tar, e.image[1], e.image[2], e.image[3])
                for tar, idx in zip(self.tars, self.indexes) for e in read_index(idx)]


class Member(NamedTuple):
    """Where one image lies inside a tar."""

    tar: str
    offset: int
    size: int
    name: str

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"


def is_webdataset(root: str | Path | Sequence[str]) -> bool:
    """True for a list of paths, a glob of .tar files, or a folder that holds *.tar."""
    if not isinstance(root, (str, Path)):
        return True
    root = str(root)
    if glob.has_magic(root) or root.endswith(".tar"):
        return True
    return os.path.isdir(root) and any(e.name.endswith(".tar") and e.is_file() for e in os.scandir(root))


def find_tars(root: str | Path | Sequence[str]) -> list[str]:
    """Sorted tar paths from a folder of *.tar, a glob, or an explicit list (kept in its order)."""
    if not isinstance(root, (str, Path)):
        tars = [os.path.expanduser(str(p)) for p in root]
    else:
        root = os.path.expanduser(str(root))
        if os.path.isdir(root):
            tars = sorted(str(p) for p in Path(root).glob("*.tar"))
        else:
            tars = sorted(glob.glob(root)) if glob.has_magic(root) else [root]
    missing = [t for t in tars if not os.path.isfile(t)]
    if not tars or missing:
        raise FileNotFoundError(
            f"no WebDataset shards at {root!r}{f' (missing: {missing[:3]})' if missing else ''}; point "
            f"{ENV_VAR} or data.root at a folder of *.tar shards (<key>.jpg + optional <key>.cls), "
            f"a glob like /data/train-*.tar, or a list of tar paths"
        )
    return tars


def scan_webdataset(root: str | Path | Sequence[str], *, max_images: int | None = None, seed: int = 0,
                    verify: bool = False, cache_dir: str | Path | None = None) -> ShardList:
    """Index every shard (cached by path, size and mtime) and drop entries that are not images.

    Each image member gets the cheap check of scan_image_folder (magic bytes, end marker);
    `verify=True` also decodes it with PIL. Samples without a .jpg/.jpeg/.png member, with a
    bad member or an unreadable .cls are left out of the index and listed in `skipped`.
    `max_images` keeps whole shards drawn with `seed` (the last one cut) until it has that many.
    """
    tars = find_tars(root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir("wds")
    with ThreadPoolExecutor(max_workers=min(8, len(tars))) as pool:
        metas = list(pool.map(lambda t: _cached_index(t, cache, verify), tars))
    kept = [(t, m) for t, m in zip(tars, metas) if m["count"] > 0]
    skipped = [(s, r) for m in metas for s, r in m["skipped"]]
    for t, m in zip(tars, metas):
        if m["count"] == 0:
            log.warning("shard %s has no readable image samples; left out", t)
    if not kept:
        raise ValueError(f"no readable image samples in {len(tars)} shards at {root!r} ({len(skipped)} skipped); "
                         f"shards must hold <key>.jpg/.jpeg/.png members")
    if max_images is not None and max_images < sum(m["count"] for _, m in kept):
        kept = _subset(kept, max_images, seed)
    labels: list[int] | None = [l for _, m in kept for l in m["labels"]]
    if -1 in labels:
        if any(l >= 0 for l in labels):
            log.warning("only some samples under %s carry a .cls label; labels ignored", root)
        labels = None
    classes = [str(c) for c in range(max(labels) + 1)] if labels else [""]
    if skipped:
        log.warning("skipped %d WebDataset samples (first: %s)", len(skipped),
                    "; ".join(f"{s}: {r}" for s, r in skipped[:5]))
    return ShardList([t for t, _ in kept], [m["index"] for _, m in kept], [m["count"] for _, m in kept],
                     labels, classes, skipped, str(root), verify or all(m["verified"] for _, m in kept))


def _subset(kept: list[tuple[str, dict]], n: int, seed: int) -> list[tuple[str, dict]]:
    """Whole shards in a seeded random order until n samples; the last shard's index is cut."""
    import random

    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for i in order:
        tar, meta = kept[i]
        if total + meta["count"] > n:
            idx = Path(meta["index"])
            cut = n - total
            meta = write_index(idx.with_name(f"{idx.stem}.first{cut}.idx"), read_index(idx)[:cut],
                               {**meta, "labels": meta["labels"][:cut]})
        out.append((tar, meta))
        total += meta["count"]
        if total >= n:
            break
    order_in_list = {t: j for j, (t, _) in enumerate(kept)}
    return sorted(out, key=lambda tm: order_in_list[tm[0]])


def _cache_paths(tar: str, cache: Path) -> tuple[Path, Path]:
    st = os.stat(tar)
    h = hashlib.sha1(f"{os.path.abspath(tar)}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()[:20]
    return cache / f"{h}.idx", cache / f"{h}.v.idx"


def _cached_index(tar: str, cache: Path, verify: bool) -> dict:
    """The shard's index metadata from the cache (a verified index serves both), built when missing."""
    plain, verified = _cache_paths(tar, cache)
    for idx in (verified,) if verify else (verified, plain):
        try:
            meta = json.loads(idx.with_suffix(".json").read_text())
            if idx.is_file():
                return {**meta, "index": str(idx), "skipped": [tuple(s) for s in meta["skipped"]]}
        except (OSError, ValueError):
            pass
    return _build_index(tar, verified if verify else plain, verify)


def _build_index(tar: str, idx: Path, verify: bool) -> dict:
    entries, labels, skipped = [], [], []
    with open(tar, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        for m in tf:  # members of a sample are consecutive (WebDataset's convention, as DALI groups them)
            base = os.path.basename(m.name)
            if not m.isreg() or base.startswith(".") or "." not in base:
                continue
            dot = len(m.name) - len(base) + base.index(".")
            key, ext = m.name[:dot], m.name[dot + 1 :]
            if groups and groups[-1][0] == key:
                groups[-1][1][ext] = m
            else:
                groups.append((key, {ext: m}))
        for key, members in groups:
            entry, label, reason = _entry(f, key, members, verify)
            if reason is not None:
                skipped.append((f"{tar}:{key}", reason))
            else:
                entries.append(entry)
                labels.append(label)
    return write_index(idx, entries, {"tar": tar, "labels": labels, "skipped": skipped, "verified": verify})


def _entry(f, key: str, members: dict[str, tarfile.TarInfo], verify: bool) -> tuple[Entry | None, int, str | None]:
    """The sample's index entry and label (-1 without .cls), or the reason it is left out."""
    ext, image = next(((e, m) for e, m in members.items() if e.lower() in IMAGE_EXTS), (None, None))
    if image is None:
        return None, -1, f"no .jpg/.jpeg/.png member (has {sorted(members)})"
    if any(c.isspace() for c in image.name):
        return None, -1, "member name contains whitespace (the index format cannot hold it)"
    reason = check_member(f, image.offset_data, image.size, decode=verify)
    if reason is not None:
        return None, -1, reason
    label, cls = -1, members.get("cls")
    if cls is not None:
        f.seek(cls.offset_data)
        try:
            label = int(f.read(cls.size).strip() or b"x")
        except ValueError:
            return None, -1, ".cls is not an integer"
        if label < 0:
            return None, -1, ".cls is negative"
    comp = lambda m, e: (e, m.offset_data, m.size, m.name)  # noqa: E731
    return Entry(key, comp(image, ext), comp(cls, "cls") if cls is not None else None), label, None


def check_member(f, offset: int, size: int, decode: bool = False) -> str | None:
    """None when the member at `offset` looks like a whole JPEG/PNG (and decodes, if asked), else why."""
    f.seek(offset)
    head = f.read(16)
    if not head or size == 0:
        return "empty member"
    tail_start = offset + max(0, size - TAIL_BYTES)
    f.seek(tail_start)
    reason = check_markers(head, f.read(offset + size - tail_start))
    if reason is not None or not decode:
        return reason
    f.seek(offset)
    return pil_check(io.BytesIO(f.read(size)))


def write_index(idx: Path, entries: Sequence[Entry], meta: dict) -> dict:
    """Write a DALI v1.2 index (+ a JSON sidecar with labels and skips) atomically."""
    idx.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    for e in entries:
        comps = [e.image] + ([e.cls] if e.cls is not None else [])
        lines.append(" ".join(" ".join(map(str, c)) for c in comps))
    meta = {**meta, "index": str(idx), "count": len(entries)}
    for path, text in ((idx, "\n".join(lines) + "\n"), (idx.with_suffix(".json"), json.dumps(meta))):
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks on one node may write the same file
        tmp.write_text(text)
        os.replace(tmp, path)
    return meta


def read_index(idx: str | Path) -> list[Entry]:
    """Entries of a v1.2 index written by write_index (image first, then .cls if present)."""
    with open(idx) as f:
        head = f.readline().split()
        if head[:1] != [INDEX_VERSION]:
            raise ValueError(f"{idx} is not a {INDEX_VERSION} WebDataset index")
        out = []
        for line in f:
            t = line.split()
            comps = [(t[i], int(t[i + 1]), int(t[i + 2]), t[i + 3]) for i in range(0, len(t), 4)]
            name = comps[0][3]
            out.append(Entry(name[: len(name) - len(comps[0][0]) - 1], comps[0], comps[1] if len(comps) > 1 else None))
    return out


def drop_samples(shards: ShardList, bad: dict[str, dict[str, str]]) -> int:
    """Rewrite the indexes of `shards` without the keys in bad[tar] ({key: reason}); returns how many."""
    dropped, labels = 0, []
    offsets = [sum(shards.counts[:i]) for i in range(len(shards.tars))]
    for i, (tar, idx) in enumerate(zip(shards.tars, shards.indexes)):
        entries = read_index(idx)
        own = ([-1] * len(entries) if shards.labels is None
               else shards.labels[offsets[i] : offsets[i] + len(entries)])
        gone = bad.get(tar, {})
        keep = [j for j, e in enumerate(entries) if e.key not in gone]
        if len(keep) < len(entries):
            if not keep:
                raise RuntimeError(f"every sample of {tar} failed to decode; rebuild the shard")
            meta = json.loads(Path(idx).with_suffix(".json").read_text())
            new_skips = [(f"{tar}:{k}", r) for k, r in gone.items()]
            meta.update(labels=[own[j] for j in keep], skipped=meta["skipped"] + new_skips)
            write_index(Path(idx), [entries[j] for j in keep], meta)
            shards.skipped += new_skips
            dropped += len(entries) - len(keep)
            shards.counts[i] = len(keep)
        labels += [own[j] for j in keep]
    if shards.labels is not None:
        shards.labels = labels
    return dropped


def find_undecodable(shards: ShardList) -> dict[str, dict[str, str]]:
    """{tar: {key: reason}} for every indexed image that PIL cannot decode (threads over shards)."""

    def one(i: int) -> tuple[str, dict[str, str]]:
        out = {}
        with open(shards.tars[i], "rb") as f:
            for e in read_index(shards.indexes[i]):
                reason = check_member(f, e.image[1], e.image[2], decode=True)
                if reason is not None:
                    out[e.key] = reason
        return shards.tars[i], out

    with ThreadPoolExecutor(max_workers=min(8, len(shards.tars))) as pool:
        return {t: bad for t, bad in pool.map(one, range(len(shards.tars))) if bad}


class ShardEpoch:
    """Rank's samples of one epoch over tar shards, by position: the shards in the epoch's order
    (seed + epoch, the same on every rank), rank's contiguous 1/world_size slice of their samples,
    shuffled inside consecutive windows of `window` samples (seeded by seed, epoch, rank and the
    window). The samples at any positions come from index arithmetic and one window's permutation:
    no sample before them is read. Samples are numbered in index order (as ShardList.labels)."""

    def __init__(self, counts: Sequence[int], rank: int, world_size: int, seed: int, epoch: int,
                 window: int) -> None:
        if window < 1:
            raise ValueError(f"shuffle window of {window} samples; it must be at least 1")
        counts = np.asarray(counts, dtype=np.int64)
        order = epoch_permutation(len(counts), seed, epoch).numpy()
        self.first = (np.cumsum(counts) - counts)[order]  # index of each shard's first sample, in epoch order
        self.ends = np.cumsum(counts[order])  # where each shard ends in the epoch's sequence
        self.begins = self.ends - counts[order]  # and where it begins
        n = int(self.ends[-1]) if len(counts) else 0
        self.lo, self.hi = n * rank // world_size, n * (rank + 1) // world_size
        self.window, self.seed, self.epoch, self.rank = window, seed, epoch, rank
        self.perm = lru_cache(maxsize=4)(self._perm)

    def __len__(self) -> int:
        return self.hi - self.lo

    def _perm(self, k: int) -> np.ndarray:
        size = min(self.window, len(self) - k * self.window)
        return window_permutation(size, self.seed, self.epoch, self.rank, k).numpy()

    def samples(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at positions start..stop-1 of the rank's shuffled slice; positions past its
        end wrap around (a slice that lost samples mid-epoch, to bad data, still fills the epoch)."""
        pos = np.arange(start, stop) % len(self)
        k = pos // self.window
        seq = np.empty_like(pos)  # position in the epoch's sequence of all samples
        for w in np.unique(k):
            at = k == w
            seq[at] = self.lo + w * self.window + self.perm(int(w))[pos[at] - w * self.window]
        shard = np.searchsorted(self.ends, seq, side="right")
        return self.first[shard] + seq - self.begins[shard]


class MemberIndex:
    """(tar, offset, size) of each sample's image by sample index (index order); a shard's index
    is read when one of its samples is first asked for (a few shards kept)."""

    def __init__(self, shards: ShardList) -> None:
        self.tars, self.indexes = list(shards.tars), list(shards.indexes)
        self.starts = np.cumsum([0] + list(shards.counts))
        self.entries = lru_cache(maxsize=64)(self._entries)

    def _entries(self, shard: int) -> np.ndarray:
        return np.array([e.image[1:3] for e in read_index(self.indexes[shard])], dtype=np.int64).reshape(-1, 2)

    def __call__(self, index: int) -> tuple[str, int, int]:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        offset, size = self.entries(shard)[index - self.starts[shard]]
        return self.tars[shard], int(offset), int(size)


class MemberReader:
    """Reads members by (tar, offset, size) with one open handle per tar and process (for workers)."""

    def __init__(self) -> None:
        self.handles: dict[str, object] = {}
        self.pid = os.getpid()

    def __call__(self, tar: str, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():  # forked into a DataLoader worker: do not share file offsets
            self.handles, self.pid = {}, os.getpid()
        f = self.handles.get(tar)
        if f is None:
            f = self.handles[tar] = open(tar, "rb")
        f.seek(offset)
        return f.read(size)

    def __getstate__(self) -> dict:
        return {"handles": {}, "pid": -1}


class TarImageLoader:
    """Member -> RGB PIL image, for the torchvision loaders (one handle per tar and worker)."""

    def __init__(self) -> None:
        self.read = MemberReader()

    def __call__(self, m: Member):
        from PIL import Image

        with Image.open(io.BytesIO(self.read(m.tar, m.offset, m.size))) as img:
            return img.convert("RGB")
