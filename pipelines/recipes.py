"""Augmentation recipes: one dataclass per view, shared by the DALI and torchvision pipelines."""
from __future__ import annotations

from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
SOLARIZE_THRESHOLD = 128  # PIL ImageOps.solarize default, as MoCo v3 / BYOL


@dataclass(frozen=True)
class ViewRecipe:
    """Parameters of one augmented view (torchvision semantics; DALI follows them)."""

    size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "flip_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewRecipe.{name}={p} must be a probability in [0, 1]")
        if self.size < 1:
            raise ValueError(f"ViewRecipe.size={self.size} must be positive")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"ViewRecipe.crop_scale={self.crop_scale} must satisfy 0 < lo <= hi <= 1")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"ViewRecipe.crop_ratio={self.crop_ratio} must satisfy 0 < lo <= hi")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ViewRecipe.blur_sigma={self.blur_sigma} must satisfy 0 < lo <= hi")
        if not 0.0 <= self.jitter[3] <= 0.5 or min(self.jitter) < 0:
            raise ValueError(f"ViewRecipe.jitter={self.jitter}: factors must be >= 0 and hue <= 0.5")


@dataclass(frozen=True)
class TwoViewRecipe:
    """The query and key views; they differ only in the fields that differ."""

    query: ViewRecipe
    key: ViewRecipe

    @property
    def size(self) -> int:
        """Crop size shared by both views."""
        return self.query.size


_V1 = ViewRecipe(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, blur_p=0.0)
_V2 = ViewRecipe()
_V3 = ViewRecipe(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0)
_CIFAR = ViewRecipe(size=32, crop_scale=(0.08, 1.0), blur_p=0.0, mean=CIFAR_MEAN, std=CIFAR_STD)

RECIPES: dict[str, TwoViewRecipe] = {
    "v1": TwoViewRecipe(_V1, _V1),
    "v2": TwoViewRecipe(_V2, _V2),
    "v3": TwoViewRecipe(_V3, replace(_V3, blur_p=0.1, solarize_p=0.2)),
    "cifar": TwoViewRecipe(_CIFAR, _CIFAR),
}


def get_recipe(name: str, size: int | None = None) -> TwoViewRecipe:
    """The named recipe ("v1", "v2", "v3", "cifar"); `size` overrides the crop size of both views."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[name]
    if size is None or size == recipe.size:
        return recipe
    return TwoViewRecipe(replace(recipe.query, size=size), replace(recipe.key, size=size))
