"""Recipes: the published augmentation parameters, and views that differ only where they should."""
from dataclasses import asdict

import pytest
from fastmoco.pipelines.recipes import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, ViewRecipe, get_recipe


def _diff(a: ViewRecipe, b: ViewRecipe) -> dict:
    return {k: (v, asdict(b)[k]) for k, v in asdict(a).items() if asdict(b)[k] != v}


def test_v1_v2_match_the_moco_readme():
    v1, v2 = get_recipe("v1"), get_recipe("v2")
    assert v1.query == v1.key and v2.query == v2.key
    assert (v1.query.crop_scale, v1.query.jitter, v1.query.jitter_p) == ((0.2, 1.0), (0.4,) * 4, 1.0)
    assert (v1.query.grayscale_p, v1.query.blur_p, v1.query.flip_p) == (0.2, 0.0, 0.5)
    assert (v2.query.jitter, v2.query.jitter_p, v2.query.blur_p, v2.query.blur_sigma) == (
        (0.4, 0.4, 0.4, 0.1), 0.8, 0.5, (0.1, 2.0))
    assert v2.query.mean == IMAGENET_MEAN and v2.query.size == 224


def test_v3_views_differ_only_in_blur_and_solarize():
    v3 = get_recipe("v3")
    assert _diff(v3.query, v3.key) == {"blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2)}
    assert v3.query.crop_scale == (0.08, 1.0) and v3.query.jitter == (0.4, 0.4, 0.2, 0.1)


def test_cifar_recipe():
    c = get_recipe("cifar").query
    assert (c.size, c.crop_scale, c.blur_p, c.mean, c.std) == (32, (0.08, 1.0), 0.0, CIFAR_MEAN, CIFAR_STD)
    assert (c.jitter, c.jitter_p, c.grayscale_p, c.flip_p) == ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5)


def test_size_override():
    r = get_recipe("v3", size=96)
    assert r.query.size == r.key.size == r.size == 96
    assert _diff(r.query, r.key) == _diff(get_recipe("v3").query, get_recipe("v3").key)


@pytest.mark.parametrize("bad", [dict(blur_p=1.5), dict(flip_p=-0.1), dict(crop_scale=(0.5, 0.2)),
                                 dict(jitter=(0.4, 0.4, 0.4, 0.6)), dict(size=0), dict(blur_sigma=(0.0, 1.0))])
def test_invalid_views_raise(bad):
    with pytest.raises(ValueError):
        ViewRecipe(**bad)


def test_unknown_recipe_names_the_choices():
    with pytest.raises(ValueError, match="v1"):
        get_recipe("v4")


def test_eval_resize_rule():
    from fastmoco.pipelines.recipes import CROP_PCT, eval_resize

    assert CROP_PCT == 0.875 and eval_resize(224) == 256  # the standard Resize(256) + CenterCrop(224)
    assert (eval_resize(128), eval_resize(160), eval_resize(288)) == (146, 183, 329)
    assert eval_resize(32) == 32 and eval_resize(96) == 96  # small sets are stored at the crop size
    assert eval_resize(96, resize=110) == 110 and eval_resize(224, resize=224) == 224
    with pytest.raises(ValueError, match="smaller"):
        eval_resize(224, resize=200)


def test_linear_recipes_match_the_protocols():
    from fastmoco.pipelines.recipes import LinearRecipe, get_linear_recipe

    for name in ("v1", "v2", "v3", "imagenet"):  # main_lincls.py: RandomResizedCrop(224) + flip
        r = get_linear_recipe(name)
        assert (r.kind, r.size, r.crop_scale, r.flip_p, r.mean) == ("rrc", 224, (0.08, 1.0), 0.5, IMAGENET_MEAN)
    c = get_linear_recipe("cifar")  # RandomCrop(32, padding=4) + flip
    assert (c.kind, c.size, c.padding, c.flip_p, c.mean, c.std) == ("pad_crop", 32, 4, 0.5, CIFAR_MEAN, CIFAR_STD)
    assert get_linear_recipe("v2", size=96).size == 96 and get_linear_recipe("v2", size=96).kind == "rrc"
    v = get_linear_recipe("v2").view()  # rrc runs as a two-view ViewRecipe without colour or blur
    assert (v.size, v.crop_scale, v.flip_p, v.jitter_p, v.grayscale_p, v.blur_p, v.solarize_p) == (
        224, (0.08, 1.0), 0.5, 0.0, 0.0, 0.0, 0.0)
    for bad in (dict(kind="crop"), dict(padding=-1), dict(flip_p=2.0), dict(crop_scale=(0.0, 1.0))):
        with pytest.raises(ValueError):
            LinearRecipe(**bad)
    with pytest.raises(ValueError, match="cifar"):
        get_linear_recipe("v4")
