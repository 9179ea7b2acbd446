"""DALI CPU graph (device_id=None): batch contract, sharding, and agreement with torchvision.

Statistics are measured on synthetic PNGs with known structure, so a few thousand draws cost
seconds: a coordinate image (R = 2x, G = 2y) reveals crop area, aspect and flip; constant
colours reveal jitter factors, grayscale and solarize; a checkerboard reveals blur.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from fastmoco.pipelines import (  # noqa: E402
    ImageList,
    build_eval_loader,
    build_labelled_train_loader,
    build_train_loader,
    get_linear_recipe,
    get_recipe,
    scan_image_folder,
    shard_indices,
)
from fastmoco.pipelines.recipes import (  # noqa: E402
    CIFAR_MEAN,
    CIFAR_STD,
    LinearRecipe,
    TwoViewRecipe,
    ViewRecipe,
)

CPU = torch.device("cpu")
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # outputs in [0, 1]: pixel / 255
NONE = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0, **RAW)
DRAWS = 2048


def _png(path, array) -> str:
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path)
    return str(path)


def _draw(kind: str, path: str, view: ViewRecipe, n: int = DRAWS, batch: int = 256) -> torch.Tensor:
    """n query views of the one image at `path`, as float32 N×H×W×3 in pixel units."""
    files = ImageList([path] * n, [0] * n, [""])
    loader = build_train_loader(kind, files, TwoViewRecipe(view, view), batch, device=CPU, num_workers=0)
    return torch.cat([q.float() for q, _ in loader]).permute(0, 2, 3, 1) * 255


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    y, x = np.mgrid[0:128, 0:128]
    coords = np.stack([2 * x, 2 * y, np.full_like(x, 128)], -1)
    checker = ((x // 8 + y // 8) % 2 * 255)[..., None].repeat(3, -1)
    return {"coords": _png(d / "coords.png", coords), "color": _png(d / "color.png", np.full((32, 32, 3), (180, 90, 60))),
            "bright": _png(d / "bright.png", np.full((32, 32, 3), 200)), "checker": _png(d / "checker.png", checker)}


# --- batch contract -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.float16, False), (torch.bfloat16, True)])
def test_cifar_batches(tiny_cifar, dtype, channels_last):
    files = scan_image_folder(tiny_cifar / "train")
    loader = build_train_loader("dali", files, get_recipe("cifar"), 64, device=CPU, dtype=dtype,
                                channels_last=channels_last, num_workers=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and loader.skipped == 0
    q, k = batches[-1]
    assert q.shape == k.shape == (64, 3, 32, 32) and q.dtype == k.dtype == dtype
    assert q.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    lo = (0 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    hi = (1 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    x = q.float().transpose(0, 1).reshape(3, -1)
    assert (x.min(1).values >= lo - 0.02).all() and (x.max(1).values <= hi + 0.02).all() and x.std() > 0.5
    assert (q.float() - k.float()).abs().mean() > 0.1


@pytest.mark.parametrize("name", ["v1", "v2", "v3"])
def test_imagenet_recipes_run(imagenet_samples, name):
    files = scan_image_folder(imagenet_samples, max_images=8, seed=3)  # sizes from 68 px up
    loader = build_train_loader("dali", files, get_recipe(name, size=64), 4, device=CPU, num_workers=2)
    out = list(loader)
    assert len(out) == 2 and out[0][0].shape == (4, 3, 64, 64) and torch.isfinite(out[0][0]).all()


def test_eval_matches_torchvision(tiny_cifar):
    files = scan_image_folder(tiny_cifar / "test", max_images=40)
    kw = dict(device=CPU, num_workers=1, rank=1, world_size=2)
    dali = list(build_eval_loader("dali", files, 32, CIFAR_MEAN, CIFAR_STD, 8, **kw))
    tv = list(build_eval_loader("torchvision", files, 32, CIFAR_MEAN, CIFAR_STD, 8, **kw))
    assert [len(x) for x, _ in dali] == [8, 8, 4]
    torch.testing.assert_close(torch.cat([y for _, y in dali]), torch.cat([y for _, y in tv]))
    # both decode with libjpeg(-turbo); IDCT/upsampling details may differ by a level or two
    assert (torch.cat([x for x, _ in dali]) - torch.cat([x for x, _ in tv])).abs().mean() < 0.02 / 0.2


@pytest.mark.parametrize("world", [1, 2])
def test_shards_disjoint_cover_and_read_in_order(tmp_path, world):
    """Constant images whose colour is their index: every output pixel names the file it came from."""
    n, batch = 50, 4
    files = [_png(tmp_path / f"{i:03d}.png", np.full((8, 8, 3), (i, 255 - i, 7))) for i in range(n)]
    view = ViewRecipe(size=8, **NONE)
    seen = {}
    for kind in ("dali", "torchvision"):
        for epoch in (0, 1):
            got = []
            for rank in range(world):
                loader = build_train_loader(kind, ImageList(files, [0] * n, [""]), TwoViewRecipe(view, view), batch,
                                            device=CPU, num_workers=1, rank=rank, world_size=world, seed=5)
                loader.set_epoch(epoch)
                ids = torch.cat([(q[:, 0, 0, 0] * 255).round().long() for q, _ in loader]).tolist()
                assert len(ids) == len(loader) * batch
                if kind == "dali":
                    assert ids == [int(p[-7:-4]) for p in loader.epoch_files()]
                got.append(ids)
            flat = [i for ids in got for i in ids]
            assert len(flat) == len(set(flat)) == (n // (batch * world)) * batch * world
            seen[kind, epoch] = got
        assert seen[kind, 0] != seen[kind, 1]
    assert seen["dali", 0] == seen["torchvision", 0]  # the same order in both backends


# --- statistical agreement with torchvision --------------------------------------------------

def _binom_ok(a: float, b: float, p: float, n: int = DRAWS) -> bool:
    """Two rates of n draws each agree with each other and with p within 5 sigma."""
    s = 5 * math.sqrt(max(p * (1 - p), 1e-4) / n)
    return abs(a - p) < s and abs(b - p) < s


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True).double() / len(x)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


KS_CRIT = 1.95 * math.sqrt(2 / DRAWS)  # alpha = 0.001


def _geometry(x: torch.Tensor):
    """Crop area fraction, log aspect and flip from views of the coordinate image (R = 2x, G = 2y)."""
    size = x.shape[1]
    r, g = x[..., 0].mean(1), x[..., 1].mean(2)  # R across columns, G down rows
    w = (r[:, -1] - r[:, 0]).abs() / 2 / (1 - 1 / size)
    h = (g[:, -1] - g[:, 0]) / 2 / (1 - 1 / size)
    return w * h / 128**2, (w / h).log(), r[:, -1] < r[:, 0]


def test_crop_area_aspect_and_flip_match_torchvision(images):
    view = ViewRecipe(size=32, crop_scale=(0.08, 1.0), **{**NONE, "flip_p": 0.5})
    (a_d, r_d, f_d), (a_t, r_t, f_t) = (_geometry(_draw(kind, images["coords"], view)) for kind in ("dali", "torchvision"))
    assert _ks(a_d, a_t) < KS_CRIT, "crop area distributions differ"
    assert _ks(r_d, r_t) < KS_CRIT, "crop aspect distributions differ"
    assert a_d.min() > 0.06 and a_d.max() < 1.02 and r_d.abs().max() < math.log(4 / 3) + 0.05
    assert _binom_ok(f_d.float().mean().item(), f_t.float().mean().item(), 0.5)


def test_grayscale_and_jitter_rates_match(images):
    view = ViewRecipe(size=8, crop_scale=(0.5, 1.0), jitter=(0.4, 0.0, 0.4, 0.0), **{**NONE, "jitter_p": 0.8, "grayscale_p": 0.2})
    rates = []
    for kind in ("dali", "torchvision"):
        px = _draw(kind, images["color"], view)[:, 4, 4]  # N×3
        gray = (px.max(1).values - px.min(1).values) < 1.5
        same = (px - torch.tensor([180.0, 90.0, 60.0])).abs().max(1).values < 1.5
        rates.append((gray.float().mean().item(), same.float().mean().item()))
    (g_d, s_d), (g_t, s_t) = rates
    assert _binom_ok(g_d, g_t, 0.2), rates  # jitter saturation >= 0.6 never reaches gray
    assert _binom_ok(s_d, s_t, 0.2 * 0.8), rates  # untouched: no jitter and no gray


@pytest.mark.parametrize("which", ["brightness", "saturation"])
def test_jitter_factor_distributions_match(images, which):
    jitter = (0.4, 0.0, 0.0, 0.0) if which == "brightness" else (0.0, 0.0, 0.4, 0.0)
    view = ViewRecipe(size=8, jitter=jitter, **{**NONE, "jitter_p": 1.0})
    ref = torch.tensor([180.0, 90.0, 60.0])
    stats = []
    for kind in ("dali", "torchvision"):
        px = _draw(kind, images["color"], view, n=1024)[:, 4, 4]
        if which == "brightness":  # factor = out / in on the green channel (no clipping up to 1.4)
            stats.append(px[:, 1] / ref[1])
        else:  # factor = chroma spread relative to the original, about the luma
            stats.append((px[:, 0] - px[:, 2]) / (ref[0] - ref[2]))
    d, t = stats
    assert abs(d.min() - 0.6) < 0.03 and abs(d.max() - 1.4) < 0.03 and abs(t.min() - 0.6) < 0.03
    assert _ks(d, t) < 1.95 * math.sqrt(2 / 1024) + 0.03  # + quantisation of 8-bit pixels


def test_hue_shift_matches_torchvision_in_degrees(images):
    """torchvision hue 0.1 shifts HSV hue by up to ±36°; DALI's YIQ rotation agrees on average."""
    import colorsys

    view = ViewRecipe(size=8, jitter=(0.0, 0.0, 0.0, 0.1), **{**NONE, "jitter_p": 1.0})
    h0 = colorsys.rgb_to_hsv(180 / 255, 90 / 255, 60 / 255)[0]
    spreads = []
    for kind in ("dali", "torchvision"):
        px = _draw(kind, images["color"], view, n=512)[:, 4, 4] / 255
        dh = torch.tensor([((colorsys.rgb_to_hsv(*p.tolist())[0] - h0 + 0.5) % 1 - 0.5) * 360 for p in px])
        assert abs(dh.mean()) < 4, kind
        spreads.append(dh.abs().mean().item())
    # torchvision: |U(-36, 36)| has mean 18; YIQ rotation shifts this colour's HSV hue ~1.2x the angle,
    # and a ±18° (half-turn-per-unit) mapping would give a ratio near 0.65
    assert 16 < spreads[1] < 20 and 0.9 < spreads[0] / spreads[1] < 1.6, spreads


def test_blur_and_solarize_rates_match(images):
    blur = ViewRecipe(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), blur_sigma=(1.0, 2.0),
                      **{**NONE, "blur_p": 0.3})
    sol = ViewRecipe(size=8, **{**NONE, "solarize_p": 0.3})
    rates = []
    for kind in ("dali", "torchvision"):
        x = _draw(kind, images["checker"], blur, n=1024)
        # 2-px squares after the 128 -> 32 resize: a blur with sigma >= 1 flattens them
        sharp = x[..., 0].std((1, 2))
        blurred = (sharp < 0.5 * sharp.max()).float().mean().item()
        s = (_draw(kind, images["bright"], sol, n=1024)[:, 4, 4, 0] < 128).float().mean().item()
        rates.append((blurred, s))
    (b_d, s_d), (b_t, s_t) = rates
    assert _binom_ok(b_d, b_t, 0.3, 1024) and _binom_ok(s_d, s_t, 0.3, 1024), rates


# --- eval resize rule (256 -> 224; 32 px untouched) ---------------------------------------------

KINDS = ("dali", "torchvision")


@pytest.mark.parametrize("kind", KINDS)
def test_eval_leaves_32px_pixels_untouched(tmp_path, kind):
    """Noise PNGs at 32 px: any resampling would show; eval must hand back the pixels themselves."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    files = ImageList([_png(tmp_path / f"{i}.png", a) for i, a in enumerate(arrays)], [0, 1, 2, 3], ["a", "b", "c", "d"])
    x, y = next(iter(build_eval_loader(kind, files, 32, RAW["mean"], RAW["std"], 4, device=CPU, num_workers=1)))
    ref = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    assert y.tolist() == [0, 1, 2, 3]


def test_eval_224_resizes_to_256_in_both(tmp_path):
    """400×300 gradient: both backends resize the shorter side to 256 and cut the center 224."""
    y, x = np.mgrid[0:300, 0:400]
    img = np.stack([x * 255 / 399, y * 255 / 299, np.full_like(x, 128.0)], -1).round()
    files = ImageList([_png(tmp_path / "g.png", img)], [0], [""])
    out = {kind: next(iter(build_eval_loader(kind, files, 224, RAW["mean"], RAW["std"], 1, device=CPU,
                                             num_workers=1)))[0][0] * 255 for kind in KINDS}
    for kind, o in out.items():
        assert o.shape == (3, 224, 224), kind
        assert abs(o[1, 0, 112] - 16) < 2 and abs(o[1, -1, 112] - 239) < 2, kind  # rows 1/16 .. 15/16
        assert abs(o[0, 112, 0] - 255 * (58.5 * 400 / 341.33 - 0.5) / 399) < 2, kind
    assert (out["dali"] - out["torchvision"]).abs().mean() < 0.5  # pixel levels


def test_eval_224_matches_torchvision_on_imagenet_samples(imagenet_samples):
    files = scan_image_folder(imagenet_samples, max_images=16, seed=1)
    x = [torch.cat([x for x, _ in build_eval_loader(kind, files, 224, RAW["mean"], RAW["std"], 8, device=CPU,
                                                    num_workers=1)]) for kind in KINDS]
    assert x[0].shape == x[1].shape == (16, 3, 224, 224)
    # the same output size and window (torchvision's integers); decoders and filters differ a little
    assert (x[0] - x[1]).abs().mean() * 255 < 0.5


# --- labelled (linear probe) training loader -----------------------------------------------------

@pytest.mark.parametrize("name,dtype,channels_last", [("cifar", torch.float32, True), ("v2", torch.float16, False),
                                                      ("cifar", torch.bfloat16, True)])
def test_labelled_batches(tiny_cifar, name, dtype, channels_last):
    files = scan_image_folder(tiny_cifar / "train")
    recipe = get_linear_recipe(name, size=32)
    loader = build_labelled_train_loader("dali", files, recipe, 64, device=CPU, dtype=dtype,
                                         channels_last=channels_last, num_workers=1, seed=2)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and loader.skipped == 0
    x, y = batches[-1]
    assert x.shape == (64, 3, 32, 32) and x.dtype == dtype and y.shape == (64,) and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    order = shard_indices(len(files), 64, 0, 1, 2, 0)  # the same order as torchvision's
    assert torch.cat([y for _, y in batches]).tolist() == [files.labels[i] for i in order]
    c = torch.cat([x for x, _ in batches]).float().transpose(0, 1).reshape(3, -1)
    assert c.mean(1).abs().max() < 0.5 and 0.6 < c.std() < 1.5
    lo = (0 - torch.tensor(recipe.mean)) / torch.tensor(recipe.std)
    hi = (1 - torch.tensor(recipe.mean)) / torch.tensor(recipe.std)
    assert (c.min(1).values >= lo - 0.03).all() and (c.max(1).values <= hi + 0.03).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("crop", ["pad_crop", "rrc"])
def test_labelled_pairs_shards_and_reshuffles(tmp_path, kind, crop):
    """Constant images whose colour is their index, labelled with the index: every batch's labels
    name the images in it; ranks are disjoint and cover the kept part; epochs reshuffle."""
    n, batch, world = 50, 4, 2
    files = ImageList([_png(tmp_path / f"{i:03d}.png", np.full((12, 10, 3), (i, 255 - i, 7))) for i in range(n)],
                      list(range(n)), [str(i) for i in range(n)])
    recipe = LinearRecipe(kind=crop, size=8, padding=4, **RAW)
    seen = {}
    for epoch in (0, 1):
        got = []
        for rank in range(world):
            loader = build_labelled_train_loader(kind, files, recipe, batch, device=CPU, num_workers=1, rank=rank,
                                                 world_size=world, seed=5)
            loader.set_epoch(epoch)
            ys = []
            for x, y in loader:
                # G = 255 - index; the zero padding of pad_crop never exceeds it
                assert ((255 - x[:, 1].amax((1, 2)) * 255).round().long() == y).all()
                ys += y.tolist()
            assert ys == shard_indices(n, batch, rank, world, 5, epoch) and len(ys) == len(loader) * batch
            got.append(ys)
        flat = got[0] + got[1]
        assert len(flat) == len(set(flat)) == (n // (batch * world)) * batch * world
        seen[epoch] = got
    assert seen[0] != seen[1]


def _pad_crop_offsets(x: torch.Tensor, padding: int):
    """(ky, kx, flipped) of pad_crop views of the gradient image (R = 8x + 7, G = 8y + 7, 0 = padding)."""
    size = x.shape[-1]
    mid = size // 2
    r, g = (x[:, 0, mid] * 255).round(), (x[:, 1, :, mid] * 255).round()  # a row of R, a column of G
    flipped = r[:, mid - 1] > r[:, mid]  # columns padding..size-padding hold image pixels at any offset
    r = torch.where(flipped[:, None], r.flip(1), r)

    def offset(line):  # first valid pixel at index c holds source coordinate (v - 7) / 8 = c + k - padding
        c = (line > 0).float().argmax(1)
        v = line.gather(1, c[:, None])[:, 0]
        return ((v - 7) / 8 - c + padding).long()
    return offset(g), offset(r), flipped


def test_pad_crop_offsets_and_flip_match_torchvision(tmp_path):
    """RandomCrop(32, padding=4): offsets uniform over 0..8 in both axes, flip at 1/2, in both backends."""
    y, x = np.mgrid[0:32, 0:32]
    path = _png(tmp_path / "coords.png", np.stack([8 * x + 7, 8 * y + 7, np.full_like(x, 128)], -1))
    recipe = LinearRecipe(kind="pad_crop", size=32, padding=4, **RAW)  # get_linear_recipe("cifar") unnormalised
    n = 1024
    stats = {}
    for kind in KINDS:
        loader = build_labelled_train_loader(kind, ImageList([path] * n, [0] * n, [""]), recipe, 256, device=CPU,
                                             num_workers=1)
        ky, kx, flipped = _pad_crop_offsets(torch.cat([x for x, _ in loader]), 4)
        for k in (ky, kx):
            counts = torch.bincount(k, minlength=9)
            assert len(counts) == 9, counts  # no offset outside 0..8
            assert (counts - n / 9).abs().max() < 5 * math.sqrt(n / 9 * 8 / 9), counts
        stats[kind] = flipped.float().mean().item()
    assert _binom_ok(stats["dali"], stats["torchvision"], 0.5, n), stats


def test_linear_rrc_matches_torchvision(images):
    """The ImageNet protocol's RandomResizedCrop (scale 0.08-1) + flip, through the labelled loaders."""
    recipe = LinearRecipe(kind="rrc", size=32, **RAW)
    geo = []
    for kind in KINDS:
        loader = build_labelled_train_loader(kind, ImageList([images["coords"]] * DRAWS, [0] * DRAWS, [""]), recipe,
                                             256, device=CPU, num_workers=1)
        geo.append(_geometry(torch.cat([x for x, _ in loader]).permute(0, 2, 3, 1) * 255))
    (a_d, r_d, f_d), (a_t, r_t, f_t) = geo
    assert _ks(a_d, a_t) < KS_CRIT and _ks(r_d, r_t) < KS_CRIT
    assert a_d.min() > 0.06 and _binom_ok(f_d.float().mean().item(), f_t.float().mean().item(), 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_labelled_bad_files_are_replaced_with_their_labels(imagenet_samples, tmp_path, kind):
    """A file that slips past the scan is replaced by a good one, which brings its own label; counted."""
    good = sorted(str(p) for p in imagenet_samples.iterdir())[:7]
    data = open(good[0], "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    files = ImageList(good + [str(tmp_path / "truncated.jpg")], list(range(7)) + [99], [""])
    loader = build_labelled_train_loader(kind, files, get_linear_recipe("v2", size=32), 4, device=CPU,
                                         num_workers=1)
    ys = torch.cat([y for _, y in loader]).tolist()
    assert len(ys) == 8 and 99 not in ys and loader.skipped == 1


def test_labelled_shards(tmp_path, monkeypatch):
    """WebDataset shards with .cls: labels come with their images (shuffled in the buffer); none: an error."""
    import io
    import tarfile

    from fastmoco.pipelines import scan_webdataset

    monkeypatch.delenv("FASTMOCO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def write(path, n0, n, cls=True):
        with tarfile.open(path, "w") as tf:
            for i in range(n0, n0 + n):
                out = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), (i, 255 - i, 7), np.uint8)).save(out, "PNG")
                for name, data in [(f"{i:05d}.png", out.getvalue())] + ([(f"{i:05d}.cls", f"{i}\n".encode())] if cls else []):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (tmp_path / "l").mkdir()
    (tmp_path / "u").mkdir()
    for s, (n0, n) in enumerate(((0, 12), (12, 12))):
        write(tmp_path / "l" / f"{s}.tar", n0, n)
        write(tmp_path / "u" / f"{s}.tar", n0, n, cls=False)
    shards = scan_webdataset(tmp_path / "l")
    recipe = LinearRecipe(kind="pad_crop", size=8, padding=2, **RAW)
    for kind in KINDS:
        loader = build_labelled_train_loader(kind, shards, recipe, 4, device=CPU, num_workers=1, seed=1)
        ys = []
        for x, y in loader:
            assert ((255 - x[:, 1].amax((1, 2)) * 255).round().long() == y).all(), kind
            ys += y.tolist()
        assert len(ys) == 24 and sorted(ys) == list(range(24)), kind
        with pytest.raises(ValueError, match=".cls"):
            build_labelled_train_loader(kind, scan_webdataset(tmp_path / "u"), recipe, 4, device=CPU)
