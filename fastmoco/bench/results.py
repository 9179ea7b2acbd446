"""A benchmark's figures as one JSON file under benchmarks/results/, with the machine, commit and
command that produced them; benchmarks/make_results.py turns those files into docs/results.md.

    write_result("kernels", "infonce", ["N", "C", "K", "eager s", "chunked s"], rows,
                 command=default_command())

The file is named <name>--<case>--<machine kind>.json, without a date: the newest figures for a
benchmark, case and kind of machine replace the old ones, and git keeps the history.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from fastmoco.device import ISA_CAP_VARS, cpu_kind, cpu_model

FIELDS = ("name", "case", "machine", "commit", "command", "columns", "rows", "notes", "extra")
SIGNIFICANT = 4  # digits kept in a float, and at least its first decimal


def machine(device_type: str = "cpu") -> dict[str, Any]:
    """The device, CPU model and kind, cores, torch and ISA caps a figure was measured with."""
    device = "cpu"
    if device_type.startswith("cuda"):
        device = torch.cuda.get_device_name(torch.device(device_type))
    return {"device": device, "cpu_model": cpu_model(), "cpu_kind": cpu_kind(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "isa_caps": {k: os.environ[k] for k in ISA_CAP_VARS if k in os.environ}}


def _slug(text: str) -> str:
    """Lower case, runs of anything but [a-z0-9_.] as one "-": safe in a file name, never "--"."""
    return re.sub(r"[^a-z0-9_.]+", "-", str(text).lower()).strip("-") or "none"


def _machine_kind(info: dict[str, Any]) -> str:
    """The kind of machine in a result's file name: the CPU kind, or the GPU's name."""
    return _slug(info["cpu_kind"] if info["device"] == "cpu" else info["device"])


def _git(*args: str) -> Optional[str]:
    """git's output in the checkout this package sits in; None outside one or without git."""
    package = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", *args], cwd=package, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    """Short hash of the checkout the package sits in, "+dirty" if tracked files differ."""
    top = _git("rev-parse", "--show-toplevel")
    # An installed copy inside some other repository (a venv in a checkout) is not that commit.
    if not top or Path(top).resolve() != Path(__file__).resolve().parents[2]:
        return "unknown"
    short = _git("rev-parse", "--short", "HEAD")
    if not short:
        return "unknown"
    return short + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def default_command() -> str:
    """This process's command line as a user would type it (console scripts by base name)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.endswith("__main__.py"):
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        package = spec.name.rsplit(".", 1)[0] if spec else Path(argv0).parent.name
        head = ["python", "-m", package]
    elif argv0 == "-c":
        head = ["python", "-c"]
    elif argv0.endswith(".py"):
        path = Path(argv0)
        if path.is_absolute() and path.is_relative_to(Path.cwd()):
            path = path.relative_to(Path.cwd())
        head = ["python", str(path)]
    elif argv0.startswith("fastmoco "):  # the CLI names its subcommand in argv[0]: `fastmoco bench`
        head = argv0.split()
    else:
        head = [Path(argv0).name]
    return shlex.join(head + sys.argv[1:])


def _round(value: Any) -> Any:
    """Floats to SIGNIFICANT digits, never fewer than one decimal, through lists and dicts."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None  # JSON has no NaN or infinity
        if value == 0:
            return 0.0
        return round(value, max(1, SIGNIFICANT - 1 - math.floor(math.log10(abs(value)))))
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def _dumps(record: dict[str, Any]) -> str:
    """JSON with one table row a line, so that a diff shows the figures that moved."""
    def one(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    parts = []
    for key in FIELDS:
        value = record[key]
        if key in ("rows", "notes") and value:
            text = "[\n" + ",\n".join("  " + one(v) for v in value) + "\n ]"
        elif key == "columns":
            text = one(value)
        else:
            text = json.dumps(value, ensure_ascii=False, indent=1).replace("\n", "\n ")
        parts.append(f" {one(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _result_path(out_dir: str | Path, name: str, case: str, kind: str) -> Path:
    """Where the figures of a benchmark, case and machine kind live."""
    return Path(out_dir) / f"{_slug(name)}--{_slug(case)}--{_slug(kind)}.json"


def _save(record: dict[str, Any], out_dir: str | Path) -> Path:
    """Write a whole record atomically (a temporary file, then os.replace); return its path."""
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise ValueError(f"a result needs {', '.join(missing)}")
    width = len(record["columns"])
    for row in record["rows"]:
        if len(row) != width:
            raise ValueError(f"row {row!r} has {len(row)} cells for {width} columns")
    record = {**record, "rows": _round(record["rows"]), "extra": _round(record["extra"])}
    path = _result_path(out_dir, record["name"], record["case"], _machine_kind(record["machine"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(_dumps(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_result(name: str, case: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
                 command: str, notes: Iterable[str] = (), device_type: str = "cpu",
                 out_dir: str | Path = "benchmarks/results",
                 extra: Optional[dict[str, Any]] = None) -> Path:
    """Write a benchmark's table for this machine, replacing the one it had for the same case."""
    record = {"name": name, "case": case, "machine": machine(device_type), "commit": commit(),
              "command": command, "columns": list(columns), "rows": [list(r) for r in rows],
              "notes": list(notes), "extra": dict(extra or {})}
    return _save(record, out_dir)
