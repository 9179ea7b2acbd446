"""Augmentation recipes: one dataclass per view, shared by the DALI and torchvision pipelines."""
from __future__ import annotations

from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
SOLARIZE_THRESHOLD = 128  # PIL ImageOps.solarize default, as MoCo v3 / BYOL
CROP_PCT = 0.875  # eval: center crop / resized shorter side (224 / 256), the ImageNet convention
EVAL_RESIZE_MIN = 128  # eval crops from this size up resize to size / CROP_PCT; smaller ones (CIFAR 32) do not


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
    # MoCo v3's ResNet-50 commands (CONFIG.md: --crop-min=.2); its ViTs keep the 0.08 default.
    "v3_resnet": TwoViewRecipe(replace(_V3, crop_scale=(0.2, 1.0)),
                               replace(_V3, crop_scale=(0.2, 1.0), blur_p=0.1, solarize_p=0.2)),
    "cifar": TwoViewRecipe(_CIFAR, _CIFAR),
}


def eval_resize(size: int, resize: int | None = None) -> int:
    """Shorter side the eval transform resizes to before its center crop of `size`.

    `resize` given: that (>= size). None: round(size / CROP_PCT) for size >= EVAL_RESIZE_MIN (the
    standard Resize(256) + CenterCrop(224) at 224; 146 at 128, 183 at 160), else `size` itself:
    small datasets (CIFAR's 32 px, STL's 96 px) are stored at the crop size, so their eval reads
    the image's own pixels (the resize to the size it already has and the full-size crop are
    identities). Pass `resize` for other cases (e.g. ImageNet evaluated at 96 px: resize=110).
    """
    if resize is None:
        return round(size / CROP_PCT) if size >= EVAL_RESIZE_MIN else size
    if resize < size:
        raise ValueError(f"eval resize={resize} is smaller than the crop size {size}")
    return resize


LINEAR_KINDS = ("rrc", "pad_crop")


@dataclass(frozen=True)
class LinearRecipe:
    """The labelled training view of the linear classifier (torchvision semantics; DALI follows).

    kind "rrc": RandomResizedCrop(size, crop_scale, crop_ratio) + flip (ImageNet protocol, scale
    (0.08, 1) as torchvision's default and MoCo's main_lincls.py); "pad_crop": RandomCrop(size,
    padding) with zero fill + flip (CIFAR protocol: 32 px, padding 4). Then normalise with mean/std.
    """

    kind: str = "rrc"
    size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    padding: int = 4
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.kind not in LINEAR_KINDS:
            raise ValueError(f"LinearRecipe.kind={self.kind!r}; choose one of {LINEAR_KINDS}")
        if self.padding < 0:
            raise ValueError(f"LinearRecipe.padding={self.padding} must be >= 0")
        self.view()  # the shared checks (size, flip_p, crop_scale, crop_ratio)

    def view(self) -> ViewRecipe:
        """The "rrc" view as a ViewRecipe without colour, blur or solarize: the two-view
        pipelines' own crop + flip + normalise code runs it."""
        return ViewRecipe(size=self.size, crop_scale=self.crop_scale, crop_ratio=self.crop_ratio, jitter_p=0.0,
                          grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip_p=self.flip_p, mean=self.mean,
                          std=self.std)


_LINEAR_IMAGENET = LinearRecipe()
LINEAR_RECIPES: dict[str, LinearRecipe] = {
    "imagenet": _LINEAR_IMAGENET,
    "v1": _LINEAR_IMAGENET,
    "v2": _LINEAR_IMAGENET,
    "v3": _LINEAR_IMAGENET,
    "v3_resnet": _LINEAR_IMAGENET,
    "cifar": LinearRecipe(kind="pad_crop", size=32, padding=4, mean=CIFAR_MEAN, std=CIFAR_STD),
}


def get_linear_recipe(name: str, size: int | None = None) -> LinearRecipe:
    """Labelled training view for the linear probe of a pretraining recipe name ("v1", "v2", "v3"
    or "imagenet": RandomResizedCrop 224 + flip; "cifar": RandomCrop 32 padding 4 + flip);
    `size` overrides the crop size."""
    if name not in LINEAR_RECIPES:
        raise ValueError(f"unknown linear recipe {name!r}; choose one of {sorted(LINEAR_RECIPES)}")
    recipe = LINEAR_RECIPES[name]
    return recipe if size is None or size == recipe.size else replace(recipe, size=size)


def get_recipe(name: str, size: int | None = None) -> TwoViewRecipe:
    """The named recipe ("v1", "v2", "v3", "cifar"); `size` overrides the crop size of both views."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[name]
    if size is None or size == recipe.size:
        return recipe
    return TwoViewRecipe(replace(recipe.query, size=size), replace(recipe.key, size=size))
