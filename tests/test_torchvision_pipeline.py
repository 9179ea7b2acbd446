"""Folder scanning, epoch sharding and the torchvision loaders (CPU, small batches)."""
import pytest
import torch
from fastmoco.pipelines import (
    build_eval_loader,
    build_labelled_train_loader,
    build_train_loader,
    get_linear_recipe,
    get_recipe,
    scan_image_folder,
    shard_indices,
)
from fastmoco.pipelines.recipes import CIFAR_MEAN, CIFAR_STD

CPU = torch.device("cpu")


def test_scan_imagefolder_and_flat(tiny_cifar, imagenet_samples):
    train = scan_image_folder(tiny_cifar / "train")
    assert len(train) == 200 and len(train.classes) == 10 and train.classes[0] == "airplane"
    assert train.labels == sorted(train.labels) and train.files == sorted(train.files) and not train.skipped
    flat = scan_image_folder(imagenet_samples)
    assert flat.classes == [""] and len(flat) == 1000 and set(flat.labels) == {0}


def test_scan_max_images_is_a_seeded_sorted_subset(tiny_cifar):
    a = scan_image_folder(tiny_cifar / "train", max_images=37, seed=1)
    b = scan_image_folder(tiny_cifar / "train", max_images=37, seed=1)
    c = scan_image_folder(tiny_cifar / "train", max_images=37, seed=2)
    assert a.files == b.files and a.files != c.files and len(a) == 37 and a.files == sorted(a.files)
    assert len(set(a.labels)) > 3  # a random subset, not the first class


def test_scan_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="FASTMOCO_DATA"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=str(tmp_path)):
        scan_image_folder(tmp_path)


@pytest.mark.parametrize("world", [1, 3])
def test_shards_are_disjoint_cover_and_reshuffle(world):
    n, batch = 103, 4
    shards = [shard_indices(n, batch, r, world, seed=0, epoch=0) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == (n // (batch * world)) * batch * world
    assert all(len(s) == len(shards[0]) and len(s) % batch == 0 for s in shards)
    assert shard_indices(n, batch, 0, world, 0, 1) != shards[0]
    assert shard_indices(n, batch, 0, world, 0, 0) == shards[0]
    with pytest.raises(ValueError, match="batch_size"):
        shard_indices(3, 4, 0, 1, 0, 0)


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False)])
def test_train_loader_batches(tiny_cifar, dtype, channels_last):
    files = scan_image_folder(tiny_cifar / "train")
    recipe = get_recipe("cifar")
    loader = build_train_loader("torchvision", files, recipe, 64, device=CPU, dtype=dtype,
                                channels_last=channels_last, num_workers=0)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3 and loader.skipped == 0
    q, k = batches[0]
    assert q.shape == k.shape == (64, 3, 32, 32) and q.dtype == dtype and q.device == CPU
    assert q.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    lo = (0 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    hi = (1 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    x = q.float().transpose(0, 1).reshape(3, -1)
    tol = 0.03 if dtype == torch.bfloat16 else 1e-5
    assert (x.min(1).values >= lo - tol).all() and (x.max(1).values <= hi + tol).all()
    assert x.std() > 0.5  # normalised, not raw [0, 1]
    assert (q.float() - k.float()).abs().mean() > 0.1  # two independent views


def test_eval_loader_covers_split_in_order(tiny_cifar):
    files = scan_image_folder(tiny_cifar / "test")
    seen = []
    for rank in range(2):
        loader = build_eval_loader("torchvision", files, 32, CIFAR_MEAN, CIFAR_STD, 16, device=CPU,
                                   num_workers=0, rank=rank, world_size=2)
        labels = torch.cat([y for _, y in loader])
        assert labels.tolist() == files.labels[rank::2]
        seen += labels.tolist()
    assert sorted(seen) == sorted(files.labels)
    x, _ = next(iter(build_eval_loader("torchvision", files, 32, CIFAR_MEAN, CIFAR_STD, 16, device=CPU,
                                       num_workers=0)))
    assert x.shape == (16, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)


def test_eval_is_identity_on_32px(tiny_cifar):
    """32-px CIFAR: resize + center crop is the identity, so eval equals plain normalisation."""
    import numpy as np
    from PIL import Image

    files = scan_image_folder(tiny_cifar / "test", max_images=4)
    x, _ = next(iter(build_eval_loader("torchvision", files, 32, (0, 0, 0), (1, 1, 1), 4, device=CPU,
                                       num_workers=0)))
    ref = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))) for f in files.files])
    torch.testing.assert_close(x, ref.permute(0, 3, 1, 2).float() / 255, rtol=0, atol=1e-6)


def gradient_png(path, h: int = 300, w: int = 400) -> str:
    """R rises along x, G down y (0..255 over the image), B constant: where a crop came from."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.full_like(x, 128.0)], -1).round().astype(np.uint8)
    Image.fromarray(img).save(path)
    return str(path)


def test_eval_transform_resizes_to_256_then_crops_224(tmp_path):
    """224: the shorter side goes to 256 (not 224), then the center 224 is cut: the crop spans
    224/256 = 0.875 of the shorter side; identical to PIL's resize + crop."""
    import numpy as np
    from fastmoco.pipelines.torchvision import eval_transform
    from PIL import Image
    from torchvision.transforms import v2 as T

    resize, crop = eval_transform(224).transforms
    assert isinstance(resize, T.Resize) and resize.size == [256] and crop.size == (224, 224)
    assert eval_transform(32).transforms[0].size == [32] and eval_transform(96, resize=110).transforms[0].size == [110]
    img = Image.open(gradient_png(tmp_path / "g.png"))  # 400×300 -> 341×256 -> 224×224
    out = np.asarray(eval_transform(224)(img))
    ref = np.asarray(img.resize((341, 256), Image.BILINEAR).crop((58, 16, 58 + 224, 16 + 224)))
    assert out.shape == (224, 224, 3) and (out == ref).all()
    g = out[:, 112, 1].astype(float)  # G along the centre column: y of the source row
    assert abs(g[0] - 255 * 0.0625) < 2 and abs(g[-1] - 255 * 0.9375) < 2  # 1/16 cut at top and bottom


def test_eval_loader_uses_the_resize_rule(tmp_path):
    from fastmoco.pipelines import ImageList

    files = ImageList([gradient_png(tmp_path / "g.png")], [3], [""])
    x, y = next(iter(build_eval_loader("torchvision", files, 224, (0, 0, 0), (1, 1, 1), 1, device=CPU,
                                       num_workers=0)))
    assert x.shape == (1, 3, 224, 224) and y.tolist() == [3]
    assert abs(x[0, 1, 0, 112] * 255 - 16) < 2  # resized to 256 first: the top 1/16 is cut
    x, _ = next(iter(build_eval_loader("torchvision", files, 224, (0, 0, 0), (1, 1, 1), 1, device=CPU,
                                       num_workers=0, resize=224)))
    assert x[0, 1, 0, 112] * 255 < 2  # the old behaviour, on request
    with pytest.raises(ValueError, match="smaller"):
        build_eval_loader("torchvision", files, 224, (0, 0, 0), (1, 1, 1), 1, device=CPU, resize=200)


@pytest.mark.parametrize("name,dtype,channels_last", [("cifar", torch.float32, True), ("v2", torch.bfloat16, False)])
def test_labelled_loader_batches(tiny_cifar, name, dtype, channels_last):
    files = scan_image_folder(tiny_cifar / "train")
    recipe = get_linear_recipe(name, size=32)
    loader = build_labelled_train_loader("torchvision", files, recipe, 64, device=CPU, dtype=dtype,
                                         channels_last=channels_last, num_workers=0, seed=2)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3 and loader.skipped == 0
    x, y = batches[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == dtype and y.dtype == torch.int64 and y.shape == (64,)
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    order = shard_indices(len(files), 64, 0, 1, 2, 0)
    assert torch.cat([y for _, y in batches]).tolist() == [files.labels[i] for i in order]
    c = torch.cat([x for x, _ in batches]).float().transpose(0, 1).reshape(3, -1)
    assert c.mean(1).abs().max() < 0.5 and 0.6 < c.std() < 1.5  # normalised with the dataset's stats
    lo = (0 - torch.tensor(recipe.mean)) / torch.tensor(recipe.std)
    assert (c.min(1).values >= lo - 0.03).all()


def test_labelled_loader_reshuffles_and_shards(tiny_cifar):
    files = scan_image_folder(tiny_cifar / "train")
    recipe = get_linear_recipe("cifar")
    seen = {}
    for epoch in (0, 1):
        for rank in range(2):
            loader = build_labelled_train_loader("torchvision", files, recipe, 16, device=CPU, num_workers=0,
                                                 rank=rank, world_size=2, seed=4)
            loader.set_epoch(epoch)
            ys = [y for _, y in loader]
            assert len(ys) == len(loader) == 6
            seen[epoch, rank] = shard_indices(len(files), 16, rank, 2, 4, epoch)
            assert torch.cat(ys).tolist() == [files.labels[i] for i in seen[epoch, rank]]
        assert not set(seen[epoch, 0]) & set(seen[epoch, 1])
    assert seen[0, 0] != seen[1, 0]


def test_unknown_kind_raises(tiny_cifar):
    with pytest.raises(ValueError, match="torchvision"):
        build_train_loader("ffcv", scan_image_folder(tiny_cifar / "train"), get_recipe("cifar"), 8, device=CPU)
    with pytest.raises(ValueError, match="torchvision"):
        build_labelled_train_loader("ffcv", scan_image_folder(tiny_cifar / "train"), get_linear_recipe("cifar"), 8,
                                    device=CPU)
