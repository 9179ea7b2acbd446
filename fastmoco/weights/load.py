"""Finding and loading a pretrained backbone: from a run, a checkpoint, an export or a timm name.

`load_backbone(source)` is the one way in for everything that uses pretrained weights after
training (`fastmoco export`, the evaluation commands, user code):

    from fastmoco.weights.load import load_backbone
    model, info = load_backbone("runs/cifar")          # the run's newest checkpoint, query encoder
    model, info = load_backbone("runs/cifar", encoder="key")
    model, info = load_backbone("exports/r18")         # written by `fastmoco export format=timm`
    model, info = load_backbone("resnet18")            # a timm name: random init (a baseline)

It returns the plain timm module (num_classes=0: forward gives pooled features of
`info.num_features`), in eval mode, with what it was trained on in `info` (input size, the
normalisation of the training recipe). The weights are loaded strictly: every key, every shape.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fastmoco.evaluation.config import ENCODERS

_PREFIX = {"query": "query_encoder.0.", "key": "key_encoder.0."}
# Prefixes a wrapped model adds to every key (DDP, torch.compile's module wrapper).
_WRAPPERS = ("module.", "_orig_mod.")
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneInfo:
    """What a backbone is and how its inputs were prepared in pretraining."""

    name: str  # timm model name
    cifar_stem: bool
    kwargs: dict[str, Any]  # extra timm.create_model arguments (backbone.kwargs)
    num_features: int  # width of the pooled features
    image_size: int  # the pretraining crop size (data.image_size)
    mean: tuple[float, float, float]  # normalisation of the training recipe (RGB in [0, 1])
    std: tuple[float, float, float]
    source: str  # the checkpoint file, export folder or "timm:<name>" the weights came from
    encoder: str  # "query" | "key" | "random" (a timm name: no pretraining)
    step: Optional[int] = None  # optimizer steps of the checkpoint, when known
    recipe: Optional[str] = None  # the augmentation recipe (pipelines.recipes), when known
    checkpoint: Optional[str] = None  # the training checkpoint behind an export
    extra: dict[str, Any] = field(default_factory=dict)  # anything else recorded with the weights


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run directory's newest checkpoint.

    Raises FileNotFoundError naming the fix when there is nothing to load."""
    from fastmoco.weights.checkpoint import checkpoint_dir, latest_checkpoint

    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise FileNotFoundError(
                f"no checkpoints in {checkpoint_dir(p)}: train first (fastmoco train "
                f"run.dir={p}), or pass checkpoint=<file.pt> (a checkpoint_<step>.pt)")
        return found
    raise FileNotFoundError(
        f"{p} does not exist: pass a run directory (run.dir of `fastmoco train`), one of its "
        f"checkpoints/checkpoint_<step>.pt files, or a folder written by `fastmoco export "
        f"format=timm`")


def backbone_state(state: dict[str, Any], encoder: str = "query") -> dict[str, torch.Tensor]:
    """The backbone's own state dict (timm's key names) out of a MoCo state dict.

    `state` is a checkpoint's "model" entry (or the whole checkpoint dict). The tensors are fresh
    contiguous copies: a MoCo model keeps its parameters as views into one flat buffer."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder={encoder!r}: choose query (the trained encoder, default) or key "
                         f"(its momentum copy)")
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    prefix = _PREFIX[encoder]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for w in _WRAPPERS:
            key = key.removeprefix(w)
        if key.startswith(prefix):
            out[key[len(prefix):]] = value.detach().clone(memory_format=torch.contiguous_format)
    if not out:
        sample = ", ".join(list(state)[:3]) or "none"
        raise ValueError(f"no {encoder} encoder backbone in this state dict (keys starting with "
                         f"{prefix!r}; found e.g. {sample}): is it a fastmoco MoCo checkpoint?")
    return out


def _recipe_norm(recipe: Optional[str], size: int) -> tuple[tuple, tuple]:
    if recipe:
        try:
            from fastmoco.pipelines.recipes import get_recipe

            view = get_recipe(recipe, size).query
            return tuple(view.mean), tuple(view.std)
        except (ImportError, ValueError):
            pass
    return IMAGENET_MEAN, IMAGENET_STD


def _check_name(name: Optional[str], found: str, where: str) -> None:
    """`name` (what the caller asked for) against the backbone the weights are of."""
    if name is not None and name != found and name.split(".")[0] != found.split(".")[0]:
        raise ValueError(
            f"{where} holds a {found} backbone, not {name}: pass name={found} (or drop name=), "
            f"or point at a run trained with backbone.name={name}")


def is_export_dir(path: str | Path) -> bool:
    """A folder written by `fastmoco export format=timm` (or timm's own save_for_hf)."""
    p = Path(path)
    return (p / EXPORT_CONFIG).is_file() and (p / EXPORT_WEIGHTS).is_file()


def _export_format(path: Path) -> str:
    try:
        return str((json.loads((path / EXPORT_CONFIG).read_text()).get("fastmoco") or {})
                   .get("format", "unknown"))
    except (OSError, ValueError):
        return "unknown"


def linear_preset_for(source: str | Path) -> Optional[str]:
    """The conf/linear preset of the method that pretrained `source` (a fastmoco run directory or
    checkpoint): moco_v3, byol or simsiam; None for MoCo v1/v2 (whose main_lincls is the default)
    and for anything that is not a readable fastmoco checkpoint (a timm name, an export)."""
    from fastmoco.weights.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(resolve_checkpoint(source), mmap=True)  # the eval reads it whole
    except Exception:  # noqa: BLE001 - not a checkpoint: the default preset, and the load
        return None  # itself reports what is wrong with it
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    method = (config or {}).get("method") or {}
    if method.get("name") in ("byol", "simsiam"):
        return method["name"]
    return "moco_v3" if method.get("name") == "moco" and method.get("version") == "v3" else None


def read_checkpoint(source: str | Path, encoder: str = "query", name: Optional[str] = None,
                    map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], BackboneInfo]:
    """The backbone state dict of one encoder of a run or checkpoint, and what it is.

    Checks `encoder` and `name` against the checkpoint's config before any model is built."""
    from fastmoco.weights.checkpoint import load_checkpoint

    if encoder not in ENCODERS:
        raise ValueError(f"encoder={encoder!r}: choose query (the trained encoder, default) or key "
                         f"(its momentum copy)")
    path = resolve_checkpoint(source)
    try:
        ckpt = load_checkpoint(path, map_location=map_location)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which and why
        raise ValueError(f"{path} is not a readable fastmoco checkpoint ({type(e).__name__}: {e}); "
                         f"pass another checkpoint_<step>.pt or the run directory") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a fastmoco checkpoint (it needs 'model' and 'config' "
                         f"entries, as `fastmoco train` writes them)")
    cfg = ckpt["config"]
    bb = cfg.get("backbone", {})
    found = bb.get("name")
    if not found:
        raise ValueError(f"{path}: its config names no backbone (config['backbone']['name'])")
    _check_name(name, found, str(path))
    data = cfg.get("data", {})
    size = int(data.get("image_size") or 224)
    recipe = data.get("recipe")
    mean, std = _recipe_norm(recipe, size)
    method = dict(cfg.get("method") or {})
    if encoder == "key" and method.get("name") == "simsiam":
        raise ValueError(f"encoder=key: {path} is a SimSiam checkpoint, and SimSiam has no "
                         f"momentum (key) encoder (its target branch is the encoder itself under "
                         f"stop-gradient): use encoder=query, the trained encoder")
    state = backbone_state(ckpt["model"], encoder)
    progress = ckpt.get("progress") or {}
    info = BackboneInfo(
        name=found, cifar_stem=bool(bb.get("cifar_stem", False)),
        kwargs=dict(bb.get("kwargs") or {}), num_features=0, image_size=size,
        mean=mean, std=std, source=str(path), encoder=encoder,
        step=progress.get("step"), recipe=recipe, checkpoint=str(path.resolve()),
        extra={"method": method},
    )
    return state, info


def read_export(source: str | Path, encoder: Optional[str] = None, name: Optional[str] = None,
                map_location: str | torch.device = "cpu"
                ) -> tuple[dict[str, torch.Tensor], BackboneInfo]:
    """The state dict and description of a `fastmoco export format=timm` folder."""
    from safetensors.torch import load_file

    d = Path(source).expanduser()
    cfg = json.loads((d / EXPORT_CONFIG).read_text())
    found = cfg.get("architecture")
    if not found:
        raise ValueError(f"{d / EXPORT_CONFIG} names no architecture: is {d} a timm export?")
    _check_name(name, found, str(d))
    ours = cfg.get("fastmoco") or {}
    held = ours.get("encoder", "query")
    if encoder is not None and encoder != held:
        raise ValueError(f"{d} holds the {held} encoder, not the {encoder} encoder: export again "
                         f"with encoder={encoder}, or load the run's checkpoint with "
                         f"encoder={encoder}")
    pre = cfg.get("pretrained_cfg") or {}
    size = int((pre.get("input_size") or (3, 224, 224))[-1])
    device = str(map_location) if not isinstance(map_location, str) else map_location
    state = load_file(str(d / EXPORT_WEIGHTS), device=device)
    info = BackboneInfo(
        name=found, cifar_stem=bool(ours.get("cifar_stem", False)),
        kwargs=dict(cfg.get("model_args") or {}), num_features=int(cfg.get("num_features") or 0),
        image_size=size, mean=tuple(pre.get("mean", IMAGENET_MEAN)),
        std=tuple(pre.get("std", IMAGENET_STD)), source=str(d), encoder=held,
        step=ours.get("step"), recipe=ours.get("recipe"), checkpoint=ours.get("checkpoint"),
    )
    return state, info


def build_backbone(info: BackboneInfo, state: Optional[dict[str, torch.Tensor]] = None,
                   map_location: str | torch.device = "cpu") -> nn.Module:
    """The timm module `info` describes, `state` loaded strictly into it, in eval mode."""
    from fastmoco.backbone import create_backbone, feature_dim

    model = create_backbone(info.name, cifar_stem=info.cifar_stem, **info.kwargs)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"the weights in {info.source} do not fit {info.name} (cifar_stem="
                f"{info.cifar_stem}, kwargs={info.kwargs}): {str(e)[:800]}") from e
    info.num_features = feature_dim(model)
    return model.to(map_location).eval()


def load_backbone(
    source: str | Path,
    *,
    encoder: Optional[str] = None,
    name: Optional[str] = None,
    map_location: str | torch.device = "cpu",
    cifar_stem: bool = False,
    kwargs: Optional[dict[str, Any]] = None,
) -> tuple[nn.Module, BackboneInfo]:
    """A pretrained backbone as a plain timm module (eval mode) and its description.

    source: a run directory (its newest checkpoint), a checkpoint file, a folder written by
        `fastmoco export format=timm`, or a timm model name (random init, e.g. a baseline).
    encoder: "query" (the trained encoder) or "key" (its momentum copy) of a checkpoint; None
        means "query" for a checkpoint and whatever an export folder holds.
    name: the timm backbone expected; a checkpoint of another backbone is refused.
    cifar_stem, kwargs: only for a timm name (a checkpoint or export records its own).
    """
    src = str(source)
    p = Path(src).expanduser()
    if p.exists():
        if cifar_stem or kwargs:
            raise ValueError(f"cifar_stem= and kwargs= apply to a timm model name only: {src} "
                             f"records its own backbone settings; drop them")
        if p.is_dir() and is_export_dir(p):
            state, info = read_export(p, encoder, name, map_location)
        elif p.is_file() and p.name == EXPORT_WEIGHTS and is_export_dir(p.parent):
            state, info = read_export(p.parent, encoder, name, map_location)
        elif p.is_dir() and (p / EXPORT_CONFIG).is_file() and not (p / "checkpoints").is_dir():
            fmt = _export_format(p)
            raise ValueError(
                f"{p} is a format={fmt} export, which load_backbone does not read: pass the run "
                f"or its checkpoint, or a folder written by `fastmoco export format=timm`")
        else:
            state, info = read_checkpoint(p, encoder or "query", name, map_location)
        return build_backbone(info, state, map_location), info

    import timm

    if not timm.is_model(src):
        raise FileNotFoundError(
            f"{src} is neither a path nor a timm model name: pass a run directory, a checkpoint "
            f"file, a `fastmoco export` folder, or a name from timm.list_models()")
    if encoder not in (None, "query"):
        raise ValueError(f"encoder={encoder} needs a checkpoint; a timm name ({src}) has no "
                         f"momentum encoder")
    _check_name(name, src, f"the timm name {src}")
    info = BackboneInfo(name=src, cifar_stem=cifar_stem, kwargs=dict(kwargs or {}),
                        num_features=0, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        source=f"timm:{src}", encoder="random")
    model = build_backbone(info, None, map_location)
    pre = getattr(model, "pretrained_cfg", None) or {}
    info.image_size = int((pre.get("input_size") or (3, 224, 224))[-1])
    info.mean = tuple(pre.get("mean", IMAGENET_MEAN))
    info.std = tuple(pre.get("std", IMAGENET_STD))
    return model, info


def crop_pct(info: BackboneInfo) -> float:
    """Evaluation centre-crop fraction for timm's data config: 0.875 (resize 256, crop 224) from
    128 px up; below, the whole image (CIFAR's 32 px, STL's 96 px are stored at the crop size).
    The same rule as the eval transform's (pipelines.recipes.eval_resize)."""
    return 0.875 if info.image_size >= 128 else 1.0
