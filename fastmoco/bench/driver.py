"""`fastmoco bench`: every case × arm × mode, each arm in a fresh process; JSON and the chart
under bench.out_dir (the run directory), a copy of the chart at bench.docs_chart when set."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Generator

import hydra
import torch
from omegaconf import DictConfig

from fastmoco.bench.arms import build_arm, synthetic_batches
from fastmoco.bench.config import ArmDef, BenchConfig, CaseDef, split_config
from fastmoco.bench.measure import (
    ArmCeilings,
    PeakMemory,
    ceilings,
    finish,
    measure_stages,
    no_step,
    step_flops,
)
from fastmoco.bench.report import (
    RESULT_COLUMNS,
    add_ratios,
    check_targets,
    format_table,
    plot,
    result_table,
    setting,
)
from fastmoco.bench.results import default_command, write_result
from fastmoco.bench.turns import ArmFailed, child_setup, in_turns
from fastmoco.config import LABELS, TrainConfig, apply_overrides
from fastmoco.data import split_files
from fastmoco.device import (
    cpu_bf16_speedup,
    cpu_kind,
    cpu_prefers_bf16,
    precision_name,
    resolve_device,
    resolve_precision,
)
from fastmoco.training.schedules import planned_steps

log = logging.getLogger("fastmoco.bench")
KERNELS_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
DATA_KEYS = ("img_s", "img_s_min", "img_s_max", "windows", "warmup_s", "phases_ms")


def arm_stages(name: str, adef: ArmDef, base: TrainConfig, modes: list[str],
               device: torch.device, files, total_steps: int, bench: BenchConfig,
               data_cache: dict, bracket: bool = False) -> Generator[None, None, list[dict]]:
    """Every requested mode of one arm, pausing (yield) after its warm-up and after each timed
    window so that arms can run in turns; one model build (and compile) serves every mode.
    `bracket`: sample the ceiling just before each model window too (other arms ran since)."""
    cfg = apply_overrides(base, adef.overrides)
    arm_ceilings = ArmCeilings(device, bench.ceilings)
    arm_ceilings.sample()  # before the arm: the machine as this arm finds it
    memory = PeakMemory(device)
    memory.reset()
    arm = build_arm(name, adef.kind, cfg, device, files, total_steps)
    own = adef.kind == "fastmoco"
    rows = []
    for mode in modes:
        row = {"arm": name, "mode": mode, "dtype": str(arm.dtype).removeprefix("torch."),
               "channels_last": arm.channels_last, "compile": arm.compile,
               "pipeline": arm.pipeline if mode != "model" else "synthetic",
               "loss_backend": cfg.run.loss_backend if own else adef.kind,
               "ema_backend": cfg.run.ema_backend if own else adef.kind, "note": adef.note}
        key = (arm.pipeline, row["dtype"], arm.channels_last, adef.kind)
        if mode == "data" and key in data_cache:
            row.update(data_cache[key], shared_with=data_cache[key]["arm"])
            rows.append(row)
            continue
        batches = synthetic_batches(arm, cfg, device) if mode == "model" else arm.batches()
        log.info("bench %s / %s ...", name, mode)
        # model mode: the ceiling sampled around every window; with a loader (full, data) only
        # after the windows, since a loader refills its prefetch while a sample runs
        synthetic = mode == "model"
        row.update((yield from measure_stages(
            no_step if mode == "data" else arm.step, batches, device, cfg.schedule.batch_size,
            bench, not synthetic, ceiling=arm_ceilings.sample if synthetic else None,
            bracket=bracket, label=f"{name} / {mode}")))
        batches.close()
        if not synthetic:
            arm_ceilings.sample()  # after the mode's windows
        row["peak_mem_mb"] = memory.peak_mb()
        if mode == "data":
            data_cache[key] = {k: row[k] for k in DATA_KEYS} | {"arm": name}
        log.info("bench %s / %s: %.1f images/s", name, mode, row["img_s"])
        rows.append(row)
    for row in rows:
        row.setdefault("peak_mem_mb", memory.peak_mb())
        row["peak_mem_kind"] = memory.kind
        if arm_ceilings.best:
            row["arm_ceilings"] = arm_ceilings.report()
    del arm
    gc.collect()
    return rows


def run_arm(*args) -> list[dict]:
    """arm_stages from start to end: the arm alone."""
    return finish(arm_stages(*args))


def _run_arm_in_child(*args) -> tuple[list[dict], dict]:
    child_setup()
    data_cache = args[-1]
    return run_arm(*args), data_cache


def run_isolated(*args) -> tuple[list[dict], dict]:
    """run_arm in a fresh (spawned) process; returns its rows and the data-mode cache it filled."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run_arm_in_child, *args).result()


def _skipped(name: str, modes: list[str], why: str) -> list[dict]:
    return [{"arm": name, "mode": m, "skipped": why} for m in modes]


def _case_record(cfg: TrainConfig, cdef: CaseDef, bench: BenchConfig, device: torch.device
                 ) -> tuple[dict[str, Any], list[str], Any, int]:
    """The case as reported (its rows still empty), its modes, its files (data and full modes
    only) and the length of the training run it describes (compile=auto decides on it)."""
    modes = list(cdef.modes or bench.modes)
    files = None
    if cfg.data.name == "synthetic":
        modes = [m for m in modes if m == "model"]
        n_images = cfg.data.synthetic_images
    else:
        listed = split_files(cfg.data, cfg.data.train_split, cfg.data.max_images, cfg.run.seed).files
        files = listed if set(modes) & {"data", "full"} else None
        n_images = len(listed)
    case: dict[str, Any] = {
        "backbone": cfg.backbone.name + (" (CIFAR stem)" if cfg.backbone.cifar_stem else ""),
        "image_size": cfg.data.image_size, "batch": cfg.schedule.batch_size,
        "queue_size": cfg.method.queue_size, "version": cfg.method.version,
        "method": cfg.method.label,
        "data": cfg.data.name, "recipe": cfg.data.recipe, "images": n_images,
        "overrides": list(cdef.overrides), "rows": []}
    if bench.ceilings.enabled and bench.ceilings.flops:
        case["flops_per_step"] = step_flops(cfg, device)
    case["param_bytes"] = _param_bytes(cfg)
    total = planned_steps(cfg, max(1, n_images // cfg.schedule.batch_size))
    return case, modes, files, total


def _plan_arms(cfg: TrainConfig, cdef: CaseDef, bench: BenchConfig, modes: list[str],
               device: torch.device
               ) -> tuple[dict[str, list[dict]], dict[str, tuple[ArmDef, list[str]]]]:
    """(each arm's rows so far: a skipped arm's, with why; the arms to time, with their modes),
    in the bench's order."""
    by_arm: dict[str, list[dict]] = {}
    timed: dict[str, tuple[ArmDef, list[str]]] = {}
    for name in cdef.arms or bench.arms:
        adef = bench.arm_defs.get(name) or ArmDef(kind=name)
        arm_modes = [m for m in modes if adef.modes is None or m in adef.modes]
        if not arm_modes:
            continue
        if not adef.applies_to(cfg.method.variant):
            why = not_applicable(name, adef, cfg.method.label)
        elif adef.needs_bf16 and device.type == "cpu" and not cpu_prefers_bf16():
            why = (f"bf16 is not this CPU's fast path ({cpu_kind()}, bf16 measured "
                   f"{cpu_bf16_speedup():.2f}x fp32; 0 = emulated): fastmoco runs fp32 here, and "
                   f"the arm would time a slow bf16")
        else:
            by_arm[name], timed[name] = [], (adef, arm_modes)
            continue
        log.info("arm %s skipped: %s", name, why)
        by_arm[name] = _skipped(name, arm_modes, why)
    return by_arm, timed


def run_case(cname: str, cfg: TrainConfig, cdef: CaseDef, bench: BenchConfig,
             device: torch.device, ceil: dict[str, float],
             on_arm: Callable[[dict], None] = lambda case: None) -> dict[str, Any]:
    """Every arm of one case in every mode it has; `on_arm` sees the case as each arm lands."""
    case, modes, files, total = _case_record(cfg, cdef, bench, device)
    by_arm, timed = _plan_arms(cfg, cdef, bench, modes, device)
    data_cache: dict = {}

    def landed() -> None:
        case["rows"] = [r for rows in by_arm.values() for r in rows]
        add_ratios(case, ceil)
        on_arm(case)

    turns = [n for n, (_, m) in timed.items() if "model" in m] if bench.in_turns else []
    turns = turns if len(turns) > 1 else []  # one arm alone runs as it always did
    failed: dict[str, str] = {}
    if turns:  # the model mode of every arm, in turns
        case["turn_groups"] = []

        def group_ended(group: dict[str, Any]) -> None:
            number = len(case["turn_groups"])
            case["turn_groups"].append([n for n, got in group.items()
                                        if not isinstance(got, ArmFailed)])
            for name, got in group.items():
                if isinstance(got, ArmFailed):
                    log.warning("arm %s skipped: %s", name, got)
                    failed[name] = str(got)
                    by_arm[name] += _skipped(name, ["model"], failed[name])
                else:
                    by_arm[name] += [r | {"in_turns": number} for r in got]
            landed()

        args = {n: (n, timed[n][0], cfg, ["model"], device, None, total, bench, {}, True)
                for n in turns}
        log.info("bench: model mode of %s in turns", ", ".join(turns))
        in_turns(args, arm_stages, bench.isolate, group_ended)
    for name, (adef, arm_modes) in timed.items():
        rest = [m for m in arm_modes if not (m == "model" and name in turns)]
        if not rest:
            continue
        if name in failed:  # its build failed in turns: the other modes would fail the same way
            rows = _skipped(name, rest, failed[name])
        else:
            try:
                args = (name, adef, cfg, rest, device, files, total, bench, data_cache)
                rows, fresh = run_isolated(*args) if bench.isolate else (run_arm(*args), data_cache)
                data_cache.update(fresh)
            except ImportError as e:
                log.warning("arm %s skipped: %s", name, e)
                rows = _skipped(name, rest, str(e))
            except concurrent.futures.process.BrokenProcessPool as e:  # killed (out of memory, say)
                log.error("arm %s: its process died (%s); the other arms go on", name, e)
                rows = _skipped(name, rest, f"process died: {e}")
            except Exception as e:  # noqa: BLE001 - one arm's failure is its row, not the bench's end
                log.exception("arm %s failed; the other arms go on", name)
                rows = _skipped(name, rest, f"{type(e).__name__}: {e}")
        by_arm[name] = _by_mode(by_arm[name] + rows, arm_modes)
        landed()
    if not timed:
        landed()
    return case


def _by_mode(rows: list[dict], modes: list[str]) -> list[dict]:
    return sorted(rows, key=lambda r: modes.index(r["mode"]))


def not_applicable(name: str, adef: ArmDef, label: str) -> str:
    """Why an arm has no row for this case's method."""
    what = adef.feature or name
    return (f"does not apply to {label}: {what} exists for "
            f"{', '.join(LABELS[v][0] for v in adef.methods or ())} only")


def _param_bytes(cfg: TrainConfig) -> int:
    from fastmoco.backbone import create_backbone

    net = create_backbone(cfg.backbone.name, cifar_stem=cfg.backbone.cifar_stem, **dict(cfg.backbone.kwargs))
    return 4 * sum(p.numel() for p in net.parameters())  # fp32 master weights (heads ignored)


def micro_kernels() -> dict[str, Any]:
    """Loss-alone and EMA-alone cases: benchmarks/kernels.py --quick, where the source checkout
    has it beside the package (an installed package has no benchmarks/: recorded as skipped)."""
    if not KERNELS_SCRIPT.is_file():
        return {"skipped": f"{KERNELS_SCRIPT} not found: micro_kernels needs a fastmoco checkout"}
    res = subprocess.run([sys.executable, str(KERNELS_SCRIPT), "--quick"], capture_output=True,
                         text=True)
    print(res.stdout)
    return {"returncode": res.returncode, "json": str(KERNELS_SCRIPT.parent / "out" / "kernels.json"),
            "stdout_tail": res.stdout[-4000:], "stderr_tail": res.stderr[-2000:]}


def decide_precision(base: TrainConfig, device: torch.device) -> TrainConfig:
    """run.precision=auto decided once, here: every arm process then runs what this one measured
    (a CPU's bf16 timing could come out otherwise in each); an arm's own override still wins."""
    if base.run.precision != "auto":
        return base
    chosen = precision_name(resolve_precision("auto", device))
    return apply_overrides(base, [f"run.precision={chosen}"])


def run_bench(base: TrainConfig, bench: BenchConfig) -> dict[str, Any]:
    """Every case × arm × mode; writes JSON + PNG under bench.out_dir; returns the result."""
    device = resolve_device(base.run.device)
    base = decide_precision(base, device)
    ceil = ceilings(device, bench.ceilings)
    result: dict[str, Any] = {"setting": setting(device), "ceilings": ceil,
                              "bench": dataclasses.asdict(bench), "cases": {},
                              "memory_kind": PeakMemory(device).kind}
    out = Path(bench.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def save() -> None:  # after every arm, so a long run that is stopped keeps what it measured
        native = True if device.type == "cuda" else cpu_prefers_bf16()
        result["targets"] = check_targets(result["cases"], bench.targets, native)
        for name in (f"bench_{stamp}.json", "bench_latest.json"):
            (out / name).write_text(json.dumps(result, indent=1, default=str))

    for cname in bench.cases:
        cdef = bench.case_defs.get(cname) or CaseDef()
        cfg = apply_overrides(base, cdef.overrides)
        log.info("case %s: %s", cname, " ".join(cdef.overrides) or "as composed")

        def partial(case: dict, cname: str = cname) -> None:
            result["cases"][cname] = case
            save()

        result["cases"][cname] = run_case(cname, cfg, cdef, bench, device, ceil, partial)
        save()
    if bench.micro_kernels:
        result["micro_kernels"] = micro_kernels()
    if bench.results_dir and Path(bench.results_dir).is_dir():
        for cname, case in result["cases"].items():
            rows, notes = result_table(case, [t for t in result["targets"] if t["case"] == cname])
            path = write_result("bench", cname, RESULT_COLUMNS, rows, command=default_command(),
                                notes=notes, device_type=device.type, out_dir=bench.results_dir)
            log.info("figures of case %s: %s", cname, path)
    chart = out / f"bench_{stamp}.png"
    result["chart"] = str(chart)
    save()
    plot(result, chart)
    if bench.docs_chart and chart.exists():
        Path(bench.docs_chart).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chart, bench.docs_chart)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def bench_main(cfg: DictConfig) -> None:
    base, bench = split_config(cfg)
    logging.getLogger().setLevel(logging.INFO)
    result = run_bench(base, bench)
    print(format_table(result))
    print(f"\nJSON: {Path(bench.out_dir) / 'bench_latest.json'}   chart: {result['chart']}"
          + (f" (copied to {bench.docs_chart})" if bench.docs_chart else ""))
