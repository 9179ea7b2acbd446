"""WebDataset tar shards: indexing, bad entries, DALI (CPU) and torchvision loaders, rank sharding."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastmoco.pipelines import (
    TwoViewRecipe,
    ViewRecipe,
    build_eval_loader,
    build_train_loader,
    get_recipe,
    is_webdataset,
    scan_webdataset,
)
from fastmoco.pipelines.cache import cache_dir
from fastmoco.pipelines.recipes import CIFAR_MEAN, CIFAR_STD
from fastmoco.pipelines.webdataset import find_tars, read_index
from PIL import Image

CPU = torch.device("cpu")
KINDS = ["dali", "torchvision"]
NONE = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0, mean=(0.0,) * 3, std=(1.0,) * 3)


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (value, 255 - value, 7), np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def cifar_jpegs(cifar_root) -> list[tuple[bytes, int]]:
    """16 CIFAR-10 JPEGs (bytes, class) from 4 classes."""
    classes = sorted(p.name for p in (cifar_root / "train").iterdir())[:4]
    return [(f.read_bytes(), c) for c, name in enumerate(classes)
            for f in sorted((cifar_root / "train" / name).iterdir())[:4]]


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory, cifar_jpegs) -> Path:
    """Three shards of CIFAR JPEGs with .cls labels: 6 + 5 + 5 samples."""
    d = tmp_path_factory.mktemp("cifar_wds")
    for s, part in enumerate((cifar_jpegs[:6], cifar_jpegs[6:11], cifar_jpegs[11:])):
        members = []
        for i, (data, c) in enumerate(part):
            members += [(f"s{s}/{i:04d}.jpg", data), (f"s{s}/{i:04d}.cls", f"{c}\n".encode())]
        _write_tar(d / f"train-{s:03d}.tar", members)
    return d


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("FASTMOCO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fastmoco" / "wds"


def _numbered_shards(root: Path, sizes: tuple[int, ...]) -> list[str]:
    """Shards of 8-px PNGs whose red channel is the sample's global number."""
    root.mkdir(parents=True, exist_ok=True)
    tars, n = [], 0
    for s, size in enumerate(sizes):
        tars.append(_write_tar(root / f"{s:02d}.tar", [(f"{n + i:05d}.png", _png(n + i)) for i in range(size)]))
        n += size
    return tars


def test_index_matches_dalis_wds2idx(cifar_shards, cache, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    shards = scan_webdataset(cifar_shards)
    assert len(shards) == 16 and shards.counts == [6, 5, 5] and shards.skipped == []
    assert shards.labels == [c for _, c in sorted((i, i // 4) for i in range(16))]
    assert shards.classes == ["0", "1", "2", "3"] and is_webdataset(cifar_shards)
    ref = tmp_path / "ref.idx"
    with wds2idx.IndexCreator(shards.tars[1], str(ref), verbose=False) as ic:
        ic.create_index()
    assert Path(shards.indexes[1]).read_text() == ref.read_text()


def test_bad_entries_skipped_counted_and_cached(cifar_jpegs, cache, tmp_path, monkeypatch):
    good = cifar_jpegs[0][0]
    (tmp_path / "d").mkdir()
    tar = _write_tar(tmp_path / "d" / "x.tar", [
        ("a.jpg", good), ("a.cls", b"1"),
        ("b.jpg", good[: len(good) // 2]), ("b.cls", b"1"),  # truncated
        ("c.jpg", b"<html>not found</html>"),  # not an image
        ("d.txt", b"caption only"),  # no image member
        ("e.JPEG", good), ("e.cls", b"cat"),  # label is not an integer
        ("f.JPEG", good), ("f.cls", b" 2 \n"),  # any case; whitespace around the label
        ("g.jpg", good[:600] + bytes(100) + good[700:]), ("g.cls", b"0"),  # corrupt inside: only a decode sees it
    ])
    shards = scan_webdataset(tmp_path / "d")
    reasons = {s.rsplit(":", 1)[1]: r for s, r in shards.skipped}
    assert sorted(reasons) == ["b", "c", "d", "e"] and "truncated" in reasons["b"] and "magic" in reasons["c"]
    assert "no .jpg" in reasons["d"] and "integer" in reasons["e"]
    assert [e.key for e in read_index(shards.indexes[0])] == ["a", "f", "g"] and shards.labels == [1, 2, 0]
    verified = scan_webdataset([tar], verify=True)
    assert len(verified) == 2 and "decode failed" in dict(verified.skipped)[f"{tar}:g"]
    monkeypatch.setattr("fastmoco.pipelines.webdataset._build_index", lambda *a: pytest.fail("not cached"))
    assert len(scan_webdataset([tar])) == 2  # the verified index serves a plain scan too


def test_one_cache_root_for_every_kind(cifar_shards, cache, tmp_path, monkeypatch):
    assert cache_dir("wds") == cache and cache_dir("verify") == cache.parent / "verify"
    monkeypatch.setenv("FASTMOCO_CACHE", str(tmp_path / "fm"))  # overrides XDG_CACHE_HOME, as for CIFAR-10
    assert cache_dir() == tmp_path / "fm" and cache_dir("verify") == tmp_path / "fm" / "verify"
    assert all(Path(i).parent == tmp_path / "fm" / "wds" for i in scan_webdataset(cifar_shards).indexes)
    monkeypatch.delenv("FASTMOCO_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir("wds") == Path.home() / ".cache" / "fastmoco" / "wds"


def test_missing_shards_name_the_fix(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", str(tmp_path / "none-*.tar"), [str(tmp_path / "gone.tar")]):
        with pytest.raises(FileNotFoundError, match=r"\*\.tar"):
            find_tars(root)
    assert not is_webdataset(tmp_path / "empty")


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False)])
def test_dali_two_view_batches(cifar_shards, cache, dtype, channels_last):
    shards = scan_webdataset(cifar_shards)
    loader = build_train_loader("dali", shards, get_recipe("cifar"), 4, device=CPU, dtype=dtype,
                                channels_last=channels_last, num_workers=1, rank=1, world_size=2)
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and loader.skipped == 0
    q, k = batches[-1]
    assert q.shape == k.shape == (4, 3, 32, 32) and q.dtype == k.dtype == dtype
    assert q.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.isfinite(q.float()).all() and (q.float() - k.float()).abs().mean() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_disjoint_cover_and_reshuffle(tmp_path, cache, kind):
    """Every output pixel names its sample: two ranks read disjoint halves that cover all 48."""
    shards = scan_webdataset(_numbered_shards(tmp_path / "n", (17, 15, 16)))
    view = ViewRecipe(size=8, **NONE)
    orders = []
    for epoch in (0, 1):
        got = []
        for rank in (0, 1):
            loader = build_train_loader(kind, shards, TwoViewRecipe(view, view), 4, device=CPU, num_workers=1,
                                        rank=rank, world_size=2, seed=3)
            loader.set_epoch(epoch)
            ids = torch.cat([(q[:, 0, 0, 0] * 255).round().long() for q, _ in loader]).tolist()
            assert len(ids) == len(loader) * 4 == 24
            got.append(ids)
        assert not set(got[0]) & set(got[1]) and sorted(got[0] + got[1]) == list(range(48))
        assert got[0] != sorted(got[0])  # shuffled inside the rank's slice
        orders.append(got)
    assert orders[0][0] != orders[1][0]  # reshuffled per epoch


@pytest.mark.parametrize("kind", KINDS)
def test_eval_reads_cls_labels(cifar_shards, cache, kind):
    shards = scan_webdataset(cifar_shards)
    out = list(build_eval_loader(kind, shards, 32, CIFAR_MEAN, CIFAR_STD, 6, device=CPU, num_workers=1))
    assert [len(x) for x, _ in out] == [6, 6, 4] and out[0][0].shape[1:] == (3, 32, 32)
    assert torch.cat([y for _, y in out]).tolist() == shards.labels


def test_dali_and_torchvision_eval_agree(cifar_shards, cache):
    shards = scan_webdataset(cifar_shards)
    x = [torch.cat([x for x, _ in build_eval_loader(kind, shards, 32, CIFAR_MEAN, CIFAR_STD, 8, device=CPU,
                                                    num_workers=1)]) for kind in KINDS]
    assert (x[0] - x[1]).abs().mean() < 0.1  # both libjpeg(-turbo); IDCT details differ by a level or two


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_jpeg_at_run_time_is_dropped_and_counted(cifar_jpegs, tmp_path, cache, kind):
    """A JPEG corrupt inside (passes the cheap scan) fails DALI's decoder: found, dropped, counted."""
    good = [d for d, _ in cifar_jpegs]
    bad = good[0][:600] + bytes(100) + good[0][700:]
    members = [(f"{i:03d}.jpg", d) for i, d in enumerate(good[1:9])] + [("999.jpg", bad)]
    tar = _write_tar(tmp_path / "bad.tar", members + [(f"{i:03d}.jpg", d) for i, d in enumerate(good[9:16], 9)])
    shards = scan_webdataset([tar])
    assert len(shards) == 16 and shards.skipped == []
    loader = build_train_loader(kind, shards, get_recipe("cifar"), 4, device=CPU, num_workers=int(kind == "dali"))
    batches = list(loader)
    assert len(batches) == 4 and all(q.shape[0] == 4 for q, _ in batches)
    assert loader.skipped == 1
    if kind == "dali":  # dropped from the index: the next epoch and the next run never see it
        assert len(shards) == 15 and "999" not in [e.key for e in read_index(shards.indexes[0])]
        assert f"{tar}:999" in dict(scan_webdataset([tar]).skipped)


def test_dali_error_pil_cannot_explain_names_the_fix(cifar_jpegs, tmp_path, cache):
    """Bytes PIL decodes but DALI's decoder rejects: a clear error, never a hang or a silent skip."""
    good = [d for d, _ in cifar_jpegs]
    odd = good[0][:300] + bytes(200) + good[0][500:]
    tar = _write_tar(tmp_path / "odd.tar", [(f"{i:03d}.jpg", d) for i, d in enumerate([odd] + good[1:8])])
    loader = build_train_loader("dali", scan_webdataset([tar]), get_recipe("cifar"), 4, device=CPU, num_workers=1)
    with pytest.raises(RuntimeError, match="re-encode"):
        list(loader)


def test_max_images_keeps_whole_shards_and_cuts_the_last(tmp_path, cache):
    tars = _numbered_shards(tmp_path / "m", (10, 10, 10))
    a, b = scan_webdataset(tars, max_images=15, seed=1), scan_webdataset(tars, max_images=15, seed=1)
    assert len(a) == 15 and sorted(a.counts) == [5, 10] and a.tars == b.tars and a.indexes == b.indexes
    assert len(scan_webdataset(tars, max_images=100)) == 30
