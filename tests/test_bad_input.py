"""Bad input: every broken file is decoded correctly or skipped and counted; an epoch completes."""
import os
import random
import shutil

import pytest
import torch
from fastmoco.pipelines import ImageList, build_train_loader, get_recipe, scan_image_folder
from PIL import Image

CPU = torch.device("cpu")
RECIPE = get_recipe("v2", size=32)


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory, imagenet_samples):
    """root/good (6 real images) + root/bad (one file per failure mode) + root/empty."""
    root = tmp_path_factory.mktemp("bad")
    good, bad = root / "good", root / "bad"
    good.mkdir(), bad.mkdir(), (root / "empty").mkdir()
    sources = sorted(imagenet_samples.iterdir())
    for f in sources[:6]:
        shutil.copy(f, good / f.name)
    data = sources[0].read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "garbage.jpg").write_bytes(random.Random(0).randbytes(4000))
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.txt").write_text("not an image")
    (bad / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    smallest = min(sources, key=lambda p: min(Image.open(p).size))  # 56-75 px, below the crop
    shutil.copy(smallest, bad / "small.JPEG")
    gray = next(p for p in sources if Image.open(p).mode == "L")
    shutil.copy(gray, bad / "gray.jpg")
    Image.open(sources[1]).convert("CMYK").save(bad / "cmyk.jpg")
    Image.open(sources[2]).save(bad / "png_named.jpg", format="PNG")
    shutil.copy(sources[3], bad / "unreadable.jpg")
    os.chmod(bad / "unreadable.jpg", 0)
    yield root
    os.chmod(bad / "unreadable.jpg", 0o644)


def test_scan_skips_with_reasons(bad_tree, caplog):
    files = scan_image_folder(bad_tree)
    reasons = {os.path.basename(p): r for p, r in files.skipped}
    assert reasons["truncated.jpg"].startswith("truncated JPEG")
    assert "magic" in reasons["garbage.jpg"] and reasons["empty.jpg"] == "empty file"
    assert "extension" in reasons["notes.txt"] and reasons["dangling.jpg"].startswith("unreadable")
    names = {os.path.basename(p) for p in files.files}
    assert {"small.JPEG", "gray.jpg", "cmyk.jpg", "png_named.jpg"} <= names
    if os.access(bad_tree / "bad" / "unreadable.jpg", os.R_OK):  # root reads through chmod 000
        assert "unreadable.jpg" in names
    else:
        assert reasons["unreadable.jpg"].startswith("unreadable")
    assert files.classes == ["bad", "empty", "good"] and 1 not in files.labels  # empty class kept
    assert "skipped 5" in caplog.text or "skipped 6" in caplog.text
    assert "'empty'" in caplog.text


def test_verify_catches_corrupt_middle_and_caches(tmp_path, imagenet_samples, monkeypatch):
    monkeypatch.delenv("FASTMOCO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = bytearray(sorted(imagenet_samples.iterdir())[0].read_bytes())
    data[len(data) // 3 : len(data) // 3 + 2000] = random.Random(0).randbytes(2000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "corrupt.jpg").write_bytes(bytes(data))
    shutil.copy(sorted(imagenet_samples.iterdir())[1], tmp_path / "d" / "ok.jpg")
    assert len(scan_image_folder(tmp_path / "d")) == 2  # head and tail look fine
    verified = scan_image_folder(tmp_path / "d", verify=True)
    assert len(verified) == 1 and "decode failed" in verified.skipped[0][1] and verified.verified
    assert list((tmp_path / "cache" / "fastmoco" / "verify").glob("*.json"))
    assert len(scan_image_folder(tmp_path / "d", verify=True)) == 1  # from the cache


@pytest.mark.parametrize("kind", ["torchvision", "dali"])
def test_epoch_completes_on_scanned_bad_tree(bad_tree, kind):
    files = scan_image_folder(bad_tree)
    loader = build_train_loader(kind, files, RECIPE, 4, device=CPU, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) == len(files) // 4
    assert all(q.shape == (4, 3, 32, 32) and torch.isfinite(q).all() for q, _ in batches)


@pytest.mark.parametrize("kind", ["torchvision", "dali"])
def test_unscanned_bad_files_are_replaced_and_counted(bad_tree, kind):
    """Files that slip past the scan (ImageList built by hand) are replaced at run time and counted."""
    good = sorted(str(p) for p in (bad_tree / "good").iterdir()) + [str(bad_tree / "bad" / "gray.jpg")]
    files = ImageList(good + [str(bad_tree / "bad" / "truncated.jpg")], [0] * 8, [""])
    loader = build_train_loader(kind, files, RECIPE, 4, device=CPU, num_workers=2 if kind == "dali" else 1)
    batches = list(loader)
    assert len(batches) == 2 and all(q.shape == (4, 3, 32, 32) for q, _ in batches)
    assert loader.skipped == 1
    loader.set_epoch(1)
    assert len(list(loader)) == 2 and loader.skipped == 2  # counted every epoch they are drawn
