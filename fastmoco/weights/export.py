"""`fastmoco export`: a run's pretrained backbone in the format downstream code reads.

    fastmoco export checkpoint=runs/r50 format=timm out=exports/r50          # any timm backbone
    fastmoco export checkpoint=runs/r50 format=torchvision out=exports/r50-tv
    fastmoco export checkpoint=runs/r50 format=detectron2 out=exports/r50-d2
    fastmoco export checkpoint=runs/r50 format=timm out=exports/r50-key encoder=key

Every format writes one folder `out`: the weights (model.safetensors | model.pth | model.pkl)
and config.json (architecture, num_features, input size, mean and std, where the weights came
from). The folder appears whole or not at all: everything is written into a temporary folder
beside it, then renamed into place. Each check runs before anything is written, and each
message names the fix. docs/export.md shows how to load each format.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from fastmoco.weights.load import (
    ENCODERS,
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    BackboneInfo,
    build_backbone,
    crop_pct,
    is_export_dir,
    read_checkpoint,
    read_export,
)

FORMATS = ("timm", "torchvision", "detectron2")
WEIGHTS_FILE = {"timm": EXPORT_WEIGHTS, "torchvision": "model.pth", "detectron2": "model.pkl"}
# timm ResNets whose modules and key names are torchvision's: name -> (depth, groups, width per
# group), the last two as detectron2 counts them (NUM_GROUPS, WIDTH_PER_GROUP).
TORCHVISION_RESNETS: dict[str, tuple[int, int, int]] = {
    "resnet18": (18, 1, 64), "resnet34": (34, 1, 64), "resnet50": (50, 1, 64),
    "resnet101": (101, 1, 64), "resnet152": (152, 1, 64),
    "resnext50_32x4d": (50, 32, 4), "resnext101_32x8d": (101, 32, 8),
    "resnext101_64x4d": (101, 64, 4),
    "wide_resnet50_2": (50, 1, 128), "wide_resnet101_2": (101, 1, 128),
}
# backbone.kwargs that leave the weights and the eval-mode forward as torchvision's.
NEUTRAL_KWARGS = frozenset({"drop_rate", "drop_path_rate", "drop_block_rate", "zero_init_last"})
ARGS = ("checkpoint", "format", "out", "encoder", "name")
USAGE = """usage: fastmoco export checkpoint=RUN|FILE format=timm|torchvision|detectron2 out=DIR
                       [encoder=query|key] [name=TIMM_NAME]

  checkpoint  a run directory (its newest checkpoint), a checkpoint_<step>.pt, or a format=timm
              export folder (to convert it further)
  format      timm (default): DIR/model.safetensors + config.json, any timm backbone
              torchvision: DIR/model.pth for torchvision.models.<resnet>() (ResNets, standard stem)
              detectron2: DIR/model.pkl renamed as the MoCo authors' converter does (ResNets)
  out         the folder to write (created whole, or replaced if it is an earlier export)
  encoder     query (default: the trained encoder) or key (its momentum copy; SimSiam has none)
  name        the timm backbone you expect: a checkpoint of another backbone is refused
"""


# ---------------------------------------------------------------------------------- checks


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: choose timm (any timm backbone), torchvision or "
                         f"detectron2 (ResNets)")


def check_out(out: Path) -> None:
    """`out` must be new, empty, or an earlier export (which is then replaced whole)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file: out names the folder to write, e.g. "
                         f"out={out.with_suffix('')}-export")
    if out.is_dir() and any(out.iterdir()) and not _is_export(out):
        raise ValueError(f"out={out} exists and holds other files: choose a new folder (an "
                         f"earlier export there would be replaced), or empty it")


def _is_export(d: Path) -> bool:
    known = {EXPORT_CONFIG, *WEIGHTS_FILE.values()}
    if any(p.name not in known or not p.is_file() for p in d.iterdir()):
        return False
    try:
        return "fastmoco" in json.loads((d / EXPORT_CONFIG).read_text())
    except (OSError, ValueError):
        return False


def check_resnet(info: BackboneInfo, fmt: str) -> tuple[str, tuple[int, int, int]]:
    """The torchvision builder name for a backbone torchvision and detectron2 can run, or a
    ValueError saying why not and what to export instead."""
    target = "torchvision's ResNet" if fmt == "torchvision" else "detectron2's ResNet"
    base = info.name.split(".")[0]
    if base not in TORCHVISION_RESNETS:
        raise ValueError(
            f"format={fmt} writes weights for {target}, and the backbone {info.name} is not one "
            f"(supported: {', '.join(TORCHVISION_RESNETS)}): export format=timm, which writes "
            f"any timm backbone")
    if info.cifar_stem:
        raise ValueError(
            f"the backbone {info.name} was trained with backbone.cifar_stem=true: its stem (a 3×3 "
            f"stride-1 conv1, no max-pool) differs from {target}'s (7×7 stride-2 conv1 and a "
            f"max-pool), so {target} cannot run these weights. Export format=timm and load it "
            f"with fastmoco.load_backbone(DIR), which rebuilds the CIFAR stem")
    odd = sorted(set(info.kwargs) - NEUTRAL_KWARGS)
    if odd:
        raise ValueError(
            f"backbone.kwargs {', '.join(f'{k}={info.kwargs[k]!r}' for k in odd)} make this "
            f"{info.name} differ from {target}: export format=timm (load it with "
            f"fastmoco.load_backbone(DIR) or timm)")
    return base, TORCHVISION_RESNETS[base]


def _check_torchvision_keys(state: dict[str, torch.Tensor], builder: str) -> None:
    """Same keys and shapes as torchvision.models.<builder>() less its fc (built on the meta
    device: no memory, no init cost)."""
    import torchvision

    with torch.device("meta"):
        tv = getattr(torchvision.models, builder)()
    want = {k: tuple(v.shape) for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        missing = sorted(set(want) - set(have))[:3]
        extra = sorted(set(have) - set(want))[:3]
        shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:3]
        raise ValueError(
            f"the backbone's state dict does not match torchvision.models.{builder}() (missing "
            f"{missing}, extra {extra}, other shapes {shapes}): export format=timm")


# ---------------------------------------------------------------------------------- writers


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(obj: dict[str, Any], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})
    _fsync(path)


def _write_torch(state: dict[str, torch.Tensor], path: Path) -> None:
    from fastmoco.weights.checkpoint import save_atomic

    save_atomic(state, path)
    os.chmod(path, 0o644)  # a file to share, not mkstemp's owner-only 0600


def _write_pickle(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write into; on success it becomes `out` (an earlier
    export there is replaced), on any error it is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # an ordinary folder once in place, not mkdtemp's 0700
        yield tmp
        _fsync(tmp)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _fsync(out.parent)
    except OSError:  # some filesystems cannot fsync a folder: the rename is done either way
        pass


def _install(tmp: Path, out: Path) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)  # onto nothing, or onto an empty folder (POSIX rename)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}.tmp"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the earlier export back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------- formats


def detectron2_key(key: str) -> str:
    """A torchvision/timm ResNet key as detectron2's ResNet names it: the renaming of the MoCo
    authors' detection/convert-pretrain-to-detectron2.py, rule for rule."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    return key.replace("downsample.1", "shortcut.norm")


def detectron2_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The pickled object the authors' converter writes: numpy values, matching heuristics on
    (detectron2 then finds each key under backbone.*/roi_heads.* by its suffix)."""
    model = {detectron2_key(k): v.detach().cpu().contiguous().numpy() for k, v in state.items()}
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def detectron2_settings(info: BackboneInfo, arch: tuple[int, int, int], weights: Path
                        ) -> dict[str, Any]:
    """The detectron2 config options these weights need (as the MoCo detection configs set)."""
    depth, groups, width = arch
    return {
        "MODEL.WEIGHTS": str(weights),
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.NUM_GROUPS": groups,
        "MODEL.RESNETS.WIDTH_PER_GROUP": width,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth < 50 else 256,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,  # torchvision's: the stride sits in the 3×3 conv
        "MODEL.PIXEL_MEAN": [round(255 * m, 3) for m in info.mean],
        "MODEL.PIXEL_STD": [round(255 * s, 3) for s in info.std],
        "INPUT.FORMAT": "RGB",
    }


def export_config(info: BackboneInfo, model: nn.Module, fmt: str) -> dict[str, Any]:
    """config.json: timm's pretrained-config shape (what `timm.create_model("local-dir:DIR")`
    reads) plus a "fastmoco" block saying where the weights came from."""
    s = info.image_size
    pretrained_cfg: dict[str, Any] = {
        "input_size": [3, s, s], "interpolation": "bilinear", "crop_pct": crop_pct(info),
        "crop_mode": "center", "mean": list(info.mean), "std": list(info.std), "num_classes": 0,
    }
    source_cfg = getattr(model, "pretrained_cfg", None) or {}
    for key in ("first_conv", "classifier", "fixed_input_size"):
        if key in source_cfg:
            pretrained_cfg[key] = source_cfg[key]
    from fastmoco import __version__

    cfg: dict[str, Any] = {
        "architecture": info.name.split(".")[0],
        "num_classes": 0,
        "num_features": info.num_features,
        "pretrained_cfg": pretrained_cfg,
        "fastmoco": {
            "format": fmt, "encoder": info.encoder, "step": info.step,
            "checkpoint": info.checkpoint, "source": info.source,
            "cifar_stem": info.cifar_stem, "recipe": info.recipe, "image_size": s,
            "version": __version__,
        },
    }
    if info.kwargs:  # timm.create_model arguments; cifar_stem is not one (kept under fastmoco)
        cfg["model_args"] = info.kwargs
    return cfg


def read_source(source: str | Path, encoder: Optional[str] = None, name: Optional[str] = None
                ) -> tuple[dict[str, torch.Tensor], BackboneInfo]:
    """A checkpoint's (or a format=timm export's) backbone weights and description."""
    if is_export_dir(source):
        return read_export(source, encoder, name)
    return read_checkpoint(source, encoder or "query", name)


def export(source: str | Path, fmt: str, out: str | Path, encoder: Optional[str] = None,
           name: Optional[str] = None) -> list[Path]:
    """Write the backbone of `source` (a run, a checkpoint, a format=timm export) in `fmt` to the
    folder `out`; returns the files written. `encoder`: query (default) or key. `name`: the timm
    backbone expected (another is refused). Nothing is written unless every check passes."""
    check_format(fmt)
    if encoder is not None and encoder not in ENCODERS:
        raise ValueError(f"encoder={encoder!r}: choose query (the trained encoder, default) or "
                         f"key (its momentum copy)")
    out = Path(out).expanduser()
    check_out(out)
    state, info = read_source(source, encoder, name)
    arch = check_resnet(info, fmt) if fmt != "timm" else None
    model = build_backbone(info, state)  # strict: the weights fit the backbone they claim to be
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if arch is not None:
        _check_torchvision_keys(state, arch[0])
    cfg = export_config(info, model, fmt)
    weights = out / WEIGHTS_FILE[fmt]
    if fmt == "torchvision":
        cfg["fastmoco"]["torchvision"] = {"builder": f"torchvision.models.{arch[0]}",
                                          "fc": "nn.Identity()"}
    elif fmt == "detectron2":
        cfg["fastmoco"]["detectron2"] = detectron2_settings(info, arch[1], weights)
    with staged(out) as tmp:
        if fmt == "timm":
            _write_safetensors(state, tmp / weights.name)
        elif fmt == "torchvision":
            _write_torch(state, tmp / weights.name)
        else:
            _write_pickle(detectron2_state(state), tmp / weights.name)
        _write_json(cfg, tmp / EXPORT_CONFIG)
    return [weights, out / EXPORT_CONFIG]


# ---------------------------------------------------------------------------------- command


def parse_args(args: list[str]) -> dict[str, Optional[str]]:
    """`key=value` arguments of `fastmoco export` (checkpoint, format, out, encoder, name)."""
    parsed: dict[str, Optional[str]] = {"checkpoint": None, "format": "timm", "out": None,
                                        "encoder": None, "name": None}
    seen: set[str] = set()
    for arg in args:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"export takes key=value arguments, got {arg!r}: e.g. fastmoco export "
                             f"checkpoint=runs/r18 format=timm out=exports/r18")
        if key not in ARGS:
            raise ValueError(f"unknown export argument {key!r}: choose from {', '.join(ARGS)}")
        if key in seen:
            raise ValueError(f"{key}= is given twice: give it once")
        if not value:
            raise ValueError(f"{key}= is empty: give it a value (see fastmoco export --help)")
        seen.add(key)
        parsed[key] = value
    if parsed["checkpoint"] is None:
        raise ValueError("checkpoint= is missing: name the run directory or checkpoint file, "
                         "e.g. fastmoco export checkpoint=runs/r18 format=timm out=exports/r18")
    if parsed["out"] is None:
        raise ValueError(f"out= is missing: name the folder to write, e.g. out="
                         f"{Path(parsed['checkpoint']).name or 'run'}-{parsed['format']}")
    check_format(parsed["format"] or "")
    if parsed["encoder"] is not None and parsed["encoder"] not in ENCODERS:
        raise ValueError(f"encoder={parsed['encoder']!r}: choose query (default) or key")
    return parsed


def how_to_load(fmt: str, out: Path, cifar_stem: bool = False,
                builder: str = "torchvision.models.<resnet>") -> str:
    """One line of Python that loads an export (docs/export.md has the details)."""
    if fmt == "timm":
        if cifar_stem:
            return (f"fastmoco.load_backbone({str(out)!r}) (a CIFAR stem: timm.create_model "
                    f"cannot build it by name, see docs/export.md)")
        return f"timm.create_model('local-dir:{out}', pretrained=True), or fastmoco.load_backbone"
    if fmt == "torchvision":
        return (f"m = {builder}(); m.fc = torch.nn.Identity(); "
                f"m.load_state_dict(torch.load({str(out / 'model.pth')!r}, weights_only=True))")
    return (f"detectron2: MODEL.WEIGHTS {out / 'model.pkl'} with the options in "
            f"{out / EXPORT_CONFIG}")


def _d2_value(v: Any) -> str:
    """A detectron2 command-line option value (parsed there as a Python literal), one word."""
    return v if isinstance(v, str) else repr(v).replace(" ", "")


def run(args: list[str]) -> None:
    """`fastmoco export ...`: export and print what was written; bad input exits with the fix."""
    if any(a in ("-h", "--help", "help") for a in args):
        print(USAGE)
        return
    try:
        a = parse_args(args)
        files = export(a["checkpoint"], a["format"], a["out"], a["encoder"], a["name"])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"fastmoco export: {e}") from None
    cfg = json.loads(files[-1].read_text())
    ours = cfg["fastmoco"]
    print(f"exported the {ours['encoder']} encoder of {ours['checkpoint']} (step {ours['step']}, "
          f"{cfg['architecture']}, {cfg['num_features']} features) as format={a['format']}:")
    for f in files:
        print(f"  {f}")
    if a["format"] == "detectron2":
        opts = " ".join(f"{k} {_d2_value(v)}" for k, v in ours["detectron2"].items())
        print(f"detectron2 options: {opts}")
    builder = (ours.get("torchvision") or {}).get("builder", "torchvision.models.<resnet>")
    print(f"load: {how_to_load(a['format'], Path(a['out']), ours['cifar_stem'], builder)}")
