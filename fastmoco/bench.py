"""`fastmoco bench`: images/s of the real training step, arm beside arm, against hardware ceilings.

For each case (a config), each arm (fastmoco's defaults, one feature turned off at a time, the
authors' reference, lightly) and each mode (model: synthetic tensors on the device; data: the
pipeline alone; full: the loop from files) it runs warm-up steps, then timed windows
(images/s: median, min, max over windows), then a separate profile pass whose synchronising
timers split a step into data / forward / backward / optimizer / ema / loss / queue.
Ceilings in the same run: torch.mm rate at n³ (bf16, fp32), the step's FLOPs
(torch.utils.flop_counter), copy bandwidth. Output: a table, JSON and a bar chart.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from fastmoco.bench_reference import ReferenceArm
from fastmoco.config import TrainConfig, apply_overrides, from_hydra
from fastmoco.data import SyntheticTwoViewLoader, build_pretrain_loader, num_workers, split_files
from fastmoco.data import resolve_pipeline
from fastmoco.device import (
    cpu_bf16_speedup, cpu_kind, cpu_prefers_bf16, cpu_supports_bf16, describe_cpu, grad_scaler,
    resolve_device, resolve_precision,
)
from fastmoco.optim import build_optimizer
from fastmoco.pipelines.recipes import get_recipe
from fastmoco.train import _decide_compile, build_model, train_step

log = logging.getLogger("fastmoco.bench")
ROOT = Path(__file__).resolve().parent.parent
MODES = ("model", "data", "full")
PHASES = ("data", "forward", "backward", "optimizer", "ema", "loss", "queue")


@dataclass
class ArmDef:
    """kind: fastmoco (the config plus `overrides`), reference, lightly or lightly_bf16."""

    kind: str = "fastmoco"
    overrides: list[str] = field(default_factory=list)
    modes: Optional[list[str]] = None  # None: every mode of the case
    note: str = ""
    # An arm that only differs from fastmoco by bf16 (no_amp, lightly_bf16): on a CPU without
    # native bf16 it is skipped with a note (emulated bf16 would time the emulation).
    needs_bf16: bool = False


@dataclass
class CaseDef:
    """A config: dotted overrides on top of the composed one ([] = as composed)."""

    overrides: list[str] = field(default_factory=list)
    modes: Optional[list[str]] = None  # None: bench.modes
    arms: Optional[list[str]] = None  # None: bench.arms


@dataclass
class Target:
    """`arm` in `mode` must reach `min` times: the bf16/fp32 mm ceiling (metric=ceiling_bf16 or
    ceiling), `other` arm's images/s (metric=vs_arm), or its own images/s in mode `other`."""

    name: str = ""
    arm: str = "fastmoco"
    mode: str = "model"
    metric: str = "vs_arm"  # ceiling_bf16 | ceiling | vs_arm | vs_mode
    other: str = "reference"
    min: float = 1.0
    case: Optional[str] = None  # None: every case where both numbers exist
    cpu: Optional[str] = None  # bf16 | no_bf16: only where bf16 is / is not the CPU's fast path


@dataclass
class CeilingConfig:
    enabled: bool = True
    mm_size: int = 2048
    mm_reps: int = 3
    copy_mb: int = 256
    flops: bool = True  # count one step's FLOPs per case


@dataclass
class BenchConfig:
    warmup: int = 2
    windows: int = 5
    steps_per_window: int = 3
    data_steps_per_window: int = 10  # data mode: batches per window (no model: cheap)
    profile_steps: int = 2
    modes: list[str] = field(default_factory=lambda: list(MODES))
    arms: list[str] = field(default_factory=lambda: ["reference", "fastmoco"])
    cases: list[str] = field(default_factory=lambda: ["current"])
    arm_defs: dict[str, ArmDef] = field(default_factory=dict)
    case_defs: dict[str, CaseDef] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    ceilings: CeilingConfig = field(default_factory=CeilingConfig)
    out_dir: str = "benchmarks/out"
    docs_chart: Optional[str] = "docs/bench_latest.png"
    micro_kernels: bool = False  # also run benchmarks/kernels.py --quick (loss alone, EMA alone)
    # Each arm in a fresh process: none inherits another's allocator state, threads or caches
    # (in one process the arm that runs later measured up to 25 % faster on the CPU).
    isolate: bool = True

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"bench.modes has {mode!r}: choose from {MODES}")
        for arm in self.arms:
            if arm not in self.arm_defs and arm not in ("fastmoco", "reference", "lightly",
                                                         "lightly_bf16"):
                raise ValueError(f"bench.arms has {arm!r} but bench.arm_defs does not define it")
        for case in self.cases:
            if case != "current" and case not in self.case_defs:
                raise ValueError(f"bench.cases has {case!r}: define it under bench.case_defs "
                                 f"(known: {sorted(self.case_defs)})")
        if self.windows < 1 or self.steps_per_window < 1:
            raise ValueError("bench.windows and bench.steps_per_window must be at least 1")


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Synchronising timers; nested phases count exclusively (ema inside forward is ema only)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, time spent in children]

    @contextlib.contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            synchronize(self.device)
            _, start, children = self._stack.pop()
            spent = time.perf_counter() - start
            self.total[name] = self.total.get(name, 0.0) + spent - children
            if self._stack:
                self._stack[-1][2] += spent


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class PeakMemory:
    """CUDA: max_memory_allocated. CPU: peak RSS growth of this process (VmHWM after resetting
    it through /proc/self/clear_refs; DataLoader worker processes are not counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0.0
        self.kind = "cuda max_memory_allocated"
        if device.type != "cuda":
            self.kind = ("cpu peak RSS growth (VmHWM reset via /proc/self/clear_refs; "
                         "loader workers not counted)" if self._can_reset()
                         else "cpu peak RSS growth (ru_maxrss, process lifetime)")

    @staticmethod
    def _status_kb(key: str) -> float:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return float(line.split()[1])
        raise KeyError(key)

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._can_reset():
            _malloc_trim()  # freed heap pages go back to the OS, so reusing them shows as growth
            self._can_reset()
            self.base = self._status_kb("VmRSS")
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if "clear_refs" in self.kind:
            return (self._status_kb("VmHWM") - self.base) / 1024
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- arms


class FastMocoArm:
    """The real thing: build_model + train_step, exactly as `fastmoco train` runs them."""

    def __init__(self, name: str, cfg: TrainConfig, device: torch.device, total_steps: int) -> None:
        self.name, self.cfg, self.device = name, cfg, device
        self.dtype = resolve_precision(cfg.run.precision, device, cfg.run.allow_emulated_bf16)
        self.input_dtype = self.dtype  # the pipelines deliver the compute dtype
        self.channels_last = cfg.run.channels_last
        torch.manual_seed(cfg.run.seed)
        self.moco = build_model(cfg, device, cfg.run.channels_last, self.dtype)
        self.lr = cfg.optim.lr_for(cfg.schedule.batch_size)
        self.optimizer = build_optimizer(self.moco.parameters(), cfg.optim, self.lr, device)
        self.scaler = grad_scaler(device, self.dtype)
        self.compile = _decide_compile(cfg, total_steps, device)
        if self.compile:  # as train() does
            self.moco.compile_encoders()
        self.pipeline = resolve_pipeline(cfg.pipeline) if cfg.data.name != "synthetic" else "-"

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = build_pretrain_loader(
            self.cfg.data, self.cfg.pipeline, self.cfg.schedule.batch_size, device=self.device,
            dtype=self.dtype, channels_last=self.channels_last, rank=0, world_size=1,
            seed=self.cfg.run.seed)
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    def step(self, x_q: torch.Tensor, x_k: torch.Tensor, phase=_no_phase) -> None:
        with phase("backward"), self._instrumented(phase):  # backward = what the others leave
            train_step(self.moco, self.moco, self.optimizer, self.scaler, x_q, x_k, self.lr,
                       self.cfg.method.momentum, self.device, self.dtype)

    @contextlib.contextmanager
    def _instrumented(self, phase):
        """Profile pass only: wrap the step's parts in phase timers, then unwrap."""
        if phase is _no_phase:
            yield
            return
        moco, opt = self.moco, self.optimizer
        wrap = {(moco, "forward"): "forward", (moco, "momentum_update"): "ema",
                (moco, "_contrast"): "loss", (moco, "enqueue"): "queue", (opt, "step"): "optimizer"}
        for (obj, attr), name in wrap.items():
            fn = getattr(obj, attr)
            obj.__dict__[attr] = _timed(fn, phase, name)
        try:
            yield
        finally:
            for obj, attr in wrap:
                del obj.__dict__[attr]


def _timed(fn: Callable, phase, name: str) -> Callable:
    def run(*args, **kwargs):
        with phase(name):
            return fn(*args, **kwargs)
    return run


def _load_lightly_arm():
    """benchmarks/lightly_arm.py (benchmark-only; needs `pip install --no-deps lightly lightning-utilities`)."""
    path = ROOT / "benchmarks" / "lightly_arm.py"
    if importlib.util.find_spec("lightly") is None:
        raise ImportError("lightly is not installed: pip install --no-deps lightly lightning-utilities")
    if not path.is_file():
        raise ImportError(f"{path} not found: run the bench from a fastmoco checkout")
    spec = importlib.util.spec_from_file_location("fastmoco_bench_lightly_arm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LightlyArm


def build_arm(name: str, kind: str, cfg: TrainConfig, device: torch.device, files, total_steps: int):
    recipe = get_recipe(cfg.data.recipe, cfg.data.image_size) if files else None
    workers = num_workers(cfg.pipeline, 1)
    if kind == "fastmoco":
        return FastMocoArm(name, cfg, device, total_steps)
    if kind == "reference":
        return ReferenceArm(cfg, device, files, recipe, workers)
    if kind in ("lightly", "lightly_bf16"):
        arm = _load_lightly_arm()(cfg, device, files, recipe, workers, bf16=kind == "lightly_bf16")
        arm.name = name
        return arm
    raise ValueError(f"unknown arm kind {kind!r}: choose fastmoco, reference, lightly or lightly_bf16")


# ----------------------------------------------------------------------------- measuring


def _synthetic(arm, cfg: TrainConfig, device: torch.device) -> Iterator:
    b = cfg.schedule.batch_size
    loader = SyntheticTwoViewLoader(b, b, cfg.data.image_size, device, arm.input_dtype, arm.channels_last,
                                    cfg.run.seed)
    while True:
        yield from loader


def drain(batches: Iterator, limit: int = 64, ready_s: float = 0.005) -> int:
    """Take the batches a loader has prefetched (they arrive at once) until one has to be made:
    a prefetch queue filled during compile or warm-up would otherwise inflate images/s."""
    for n in range(limit):
        start = time.perf_counter()
        next(batches)
        if time.perf_counter() - start > ready_s:
            return n
    return limit


def measure(step: Callable, batches: Iterator, device: torch.device, batch_size: int,
            bench: BenchConfig, from_loader: bool) -> dict[str, Any]:
    """Warm-up, timed windows (nothing but the steps inside), then the profile pass."""
    t0 = time.perf_counter()
    for _ in range(bench.warmup):
        step(*next(batches), _no_phase)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    drained = drain(batches) if from_loader else 0
    steps = bench.steps_per_window if step is not _no_step else bench.data_steps_per_window
    rates = []
    for _ in range(bench.windows):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(*next(batches), _no_phase)
        synchronize(device)
        rates.append(steps * batch_size / (time.perf_counter() - start))
    timer = PhaseTimer(device)
    for _ in range(bench.profile_steps):
        with timer("data"):
            x_q, x_k = next(batches)
        step(x_q, x_k, timer)
    n = max(1, bench.profile_steps)
    phases = {p: 1000 * timer.total.get(p, 0.0) / n for p in PHASES} if bench.profile_steps else {}
    return {"img_s": statistics.median(rates), "img_s_min": min(rates), "img_s_max": max(rates),
            "windows": rates, "warmup_s": warmup_s, "phases_ms": phases, "drained": drained}


def _no_step(x_q, x_k, phase) -> None:
    pass


def run_arm(name: str, adef: ArmDef, base: TrainConfig, modes: list[str], device: torch.device,
            files, total_steps: int, bench: BenchConfig, data_cache: dict) -> list[dict]:
    """Every requested mode of one arm; one model build (and compile) serves them all."""
    cfg = apply_overrides(base, adef.overrides)
    arm_ceilings = ArmCeilings(device, bench.ceilings)
    arm_ceilings.sample()  # before the arm: the machine as this arm finds it
    memory = PeakMemory(device)
    memory.reset()
    arm = build_arm(name, adef.kind, cfg, device, files, total_steps)
    rows = []
    for mode in modes:
        row = {"arm": name, "mode": mode, "dtype": str(arm.dtype).removeprefix("torch."),
               "channels_last": arm.channels_last, "compile": arm.compile,
               "pipeline": arm.pipeline if mode != "model" else "synthetic",
               "loss_backend": cfg.run.loss_backend if adef.kind == "fastmoco" else adef.kind,
               "ema_backend": cfg.run.ema_backend if adef.kind == "fastmoco" else adef.kind,
               "note": adef.note}
        key = (arm.pipeline, row["dtype"], arm.channels_last, adef.kind)
        if mode == "data" and key in data_cache:
            row.update(data_cache[key], shared_with=data_cache[key]["arm"])
            rows.append(row)
            continue
        batches = _synthetic(arm, cfg, device) if mode == "model" else arm.batches()
        step = _no_step if mode == "data" else arm.step
        log.info("bench %s / %s ...", name, mode)
        row.update(measure(step, batches, device, cfg.schedule.batch_size, bench, mode != "model"))
        batches.close()
        arm_ceilings.sample()  # after each mode's windows
        row["peak_mem_mb"] = memory.peak_mb()
        if mode == "data":
            data_cache[key] = {k: v for k, v in row.items() if k in ("img_s", "img_s_min", "img_s_max",
                                                                     "windows", "warmup_s", "phases_ms")}
            data_cache[key]["arm"] = name
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


class ArmCeilings:
    """The mm ceilings measured beside one arm, in its own process, before and after its windows:
    the best is what this machine could do while the arm ran (a shared machine's ceiling moves
    by 15 % within an hour, so one measurement at the bench's start is not the arm's)."""

    def __init__(self, device: torch.device, cc: CeilingConfig) -> None:
        self.device, self.cc = device, cc
        self.samples: dict[str, list[float]] = {}

    def sample(self) -> None:
        if not self.cc.enabled:
            return
        for key, dtype in _mm_dtypes(self.device):
            rate = matmul_rate(self.device, dtype, self.cc.mm_size, self.cc.mm_reps)
            self.samples.setdefault(key, []).append(rate)

    @property
    def best(self) -> dict[str, float]:
        return {k: max(v) for k, v in self.samples.items()}

    def report(self) -> dict[str, Any]:
        return {**self.best, "samples": self.samples}


def _mm_dtypes(device: torch.device) -> list[tuple[str, torch.dtype]]:
    """The matmul dtypes with a ceiling here: fp32, and bf16 where the hardware runs it natively."""
    out = [("mm_fp32_flops", torch.float32)]
    if device.type == "cuda" or cpu_supports_bf16():
        out.append(("mm_bf16_flops", torch.bfloat16))
    return out


def _run_arm_in_child(*args) -> tuple[list[dict], dict]:
    # A spawned child inherits "spawn" as its start method; its DataLoader workers should start the
    # way they would in a normal run (the platform's default, listed first).
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    data_cache = args[-1]
    return run_arm(*args), data_cache


def run_isolated(*args) -> tuple[list[dict], dict]:
    """run_arm in a fresh (spawned) process; returns its rows and the data-mode cache it filled."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run_arm_in_child, *args).result()


# ----------------------------------------------------------------------------- ceilings


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Best FLOP/s of torch.mm at n×n×n."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def copy_bandwidth(device: torch.device, megabytes: int, reps: int = 3) -> float:
    """Best bytes/s (read + write) of a plain tensor copy."""
    x = torch.empty(megabytes * 2**20 // 4, device=device).fill_(1.0)
    y = torch.empty_like(x)
    y.copy_(x)
    best = math.inf
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        y.copy_(x)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best


def step_flops(cfg: TrainConfig, device: torch.device) -> int:
    """FLOPs of one fastmoco training step (eager fp32: FlopCounterMode counts forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = apply_overrides(cfg, ["run.compile=off", "run.precision=fp32"])
    arm = FastMocoArm("flops", cfg, device, 0)
    b, s = cfg.schedule.batch_size, cfg.data.image_size
    x = torch.randn(b, 3, s, s, device=device)
    arm.step(x, x.clone())  # first step outside: lazy state (optimizer buffers) is not the work
    counter = FlopCounterMode(display=False)
    with counter:
        arm.step(x, x.clone())
    return int(counter.get_total_flops())


def ceilings(device: torch.device, cc: CeilingConfig) -> dict[str, float]:
    if not cc.enabled:
        return {}
    out: dict[str, float] = {"mm_n": cc.mm_size}
    for key, dtype in _mm_dtypes(device):
        out[key] = matmul_rate(device, dtype, cc.mm_size, cc.mm_reps)
    out["copy_bytes_s"] = copy_bandwidth(device, cc.copy_mb)
    return out


# ----------------------------------------------------------------------------- report


def setting(device: torch.device) -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    return {"device": f"{device} ({name})", "cpu": describe_cpu(), "torch": torch.__version__,
            "threads":
            torch.get_num_threads(), "cpus": os.cpu_count(), "commit": commit,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def add_ratios(case: dict[str, Any], ceil: dict[str, float]) -> None:
    """× reference, fraction of the mm ceiling of the arm's dtype, full vs model of the same arm."""
    rows = case["rows"]
    by = {(r["arm"], r["mode"]): r for r in rows if "img_s" in r}
    flops = case.get("flops_per_step")
    for r in rows:
        if "img_s" not in r:
            continue
        ref = by.get(("reference", r["mode"]))
        if ref and r["mode"] != "data":
            r["x_reference"] = r["img_s"] / ref["img_s"]
        here = r.get("arm_ceilings") or ceil  # measured beside the arm, else at the bench's start
        if flops and r["mode"] != "data" and here:
            achieved = flops * r["img_s"] / case["batch"]
            r["flops_s"] = achieved
            own = here.get("mm_bf16_flops") if r["dtype"] in ("bfloat16", "float16") else None
            r["frac_ceiling"] = achieved / (own or here["mm_fp32_flops"])
            if "mm_bf16_flops" in here:
                r["frac_bf16_ceiling"] = achieved / here["mm_bf16_flops"]
        model = by.get((r["arm"], "model"))
        if model and r["mode"] in ("full", "data"):
            r["frac_model"] = r["img_s"] / model["img_s"]
        ema = r.get("phases_ms", {}).get("ema")
        if ema and ceil.get("copy_bytes_s") and case.get("param_bytes"):
            # an EMA reads both encoders and writes one: 3× the parameter bytes
            r["ema_frac_copy_bw"] = 3 * case["param_bytes"] / (ema / 1000) / ceil["copy_bytes_s"]


def check_targets(cases: dict[str, dict], targets: list[Target],
                  native_bf16: Optional[bool] = None) -> list[dict]:
    """Each target where its numbers exist; `cpu`-kind targets only on that kind (None: all)."""
    out = []
    for t in targets:
        if t.cpu not in (None, "bf16", "no_bf16"):
            raise ValueError(f"target {t.name!r}: cpu={t.cpu!r}, choose bf16 or no_bf16")
        if t.cpu is not None and native_bf16 is not None and (t.cpu == "bf16") != native_bf16:
            continue
        for cname, case in cases.items():
            if t.case not in (None, cname):
                continue
            by = {(r["arm"], r["mode"]): r for r in case["rows"] if "img_s" in r}
            row = by.get((t.arm, t.mode))
            if row is None:
                continue
            if t.metric == "ceiling_bf16":
                value = row.get("frac_bf16_ceiling")
            elif t.metric == "ceiling":
                value = row.get("frac_ceiling")
            elif t.metric == "vs_arm":
                other = by.get((t.other, t.mode))
                value = row["img_s"] / other["img_s"] if other else None
            elif t.metric == "vs_mode":
                other = by.get((t.arm, t.other))
                value = row["img_s"] / other["img_s"] if other else None
            else:
                raise ValueError(f"target metric {t.metric!r}: ceiling_bf16, ceiling, vs_arm, vs_mode")
            if value is None:
                continue
            out.append({"name": t.name, "case": cname, "arm": t.arm, "mode": t.mode,
                        "metric": t.metric, "other": t.other, "min": t.min, "value": value,
                        "met": value >= t.min})
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = []
    s, ceil = result["setting"], result["ceilings"]
    lines.append(f"fastmoco bench  {s['device']}  torch {s['torch']}  {s['threads']} threads  "
                 f"commit {s['commit']}  {s['time']}  load {s.get('load_avg_1m') or 0:.1f} at start")
    cpu = s.get("cpu")
    if cpu and s["device"].startswith("cpu"):
        lines.append(f"cpu kind {cpu['kind']} (ATen {cpu['aten_capability']}, oneDNN bf16 "
                     f"{'yes' if cpu['onednn_bf16'] else 'no'}, measured {cpu['bf16_speedup']}x fp32, "
                     f"auto runs {cpu['auto_dtype']}; flags: {cpu['flags'] or '-'}"
                     + (f"; capped by {cpu['isa_caps']}" if cpu.get("isa_caps") else "") + ")")
    if ceil:
        bf = ceil.get("mm_bf16_flops")
        lines.append(f"ceilings at start: mm {ceil['mm_n']}³ fp32 {ceil['mm_fp32_flops'] / 1e9:.1f} GFLOP/s"
                     + (f", bf16 {bf / 1e9:.1f} GFLOP/s" if bf else "")
                     + f"; copy {ceil['copy_bytes_s'] / 1e9:.1f} GB/s  (%ceil: the best mm rate "
                     f"measured beside each arm, column ceilGF)")
    head = (f"{'mode':5} {'arm':16} {'img/s':>8} {'min-max':>13} {'×ref':>5} {'%ceil':>6} "
            f"{'%bf16':>6} {'÷model':>6} " + " ".join(f"{p[:5]:>6}" for p in PHASES)
            + f" {'ceilGF':>6} {'memMB':>7} {'dtype':8} {'CL':2} {'cmp':3} {'warm s':>6}  pipeline")
    for cname, case in result["cases"].items():
        lines.append("")
        fl = case.get("flops_per_step")
        lines.append(f"case {cname}: {case['backbone']} {case['image_size']} px, batch {case['batch']}, "
                     f"K {case['queue_size']}, MoCo {case['version']}"
                     + (f", {fl / 1e9:.1f} GFLOP/step" if fl else "")
                     + f"  (phases: ms/step, profile pass)")
        lines.append(head)
        for r in case["rows"]:
            if "img_s" not in r:
                lines.append(f"{r['mode']:5} {r['arm']:16} skipped: {r.get('skipped', '')}")
                continue
            pct = lambda key: f"{100 * r[key]:5.1f}%" if key in r else f"{'-':>6}"
            ph = r.get("phases_ms", {})
            lines.append(
                f"{r['mode']:5} {r['arm']:16} {r['img_s']:8.1f} "
                f"{r['img_s_min']:6.1f}-{r['img_s_max']:<6.1f} "
                + (f"{r['x_reference']:5.2f}" if "x_reference" in r else f"{'-':>5}")
                + f" {pct('frac_ceiling')} {pct('frac_bf16_ceiling')} {pct('frac_model')} "
                + " ".join(f"{ph.get(p, 0.0):6.0f}" for p in PHASES)
                + f" {_own_ceiling(r) / 1e9:6.0f}"
                + f" {r['peak_mem_mb']:7.0f} {r['dtype'][:8]:8} {'y' if r['channels_last'] else 'n':2} "
                f"{'y' if r['compile'] else 'n':3} {r['warmup_s']:6.1f}  {r['pipeline']}")
    if result.get("targets"):
        lines.append("")
        lines.append("targets:")
        for t in result["targets"]:
            lines.append(f"  {'MET   ' if t['met'] else 'MISSED'} {t['case']}: {t['name'] or t['metric']}"
                         f" = {t['value']:.3f} (need ≥ {t['min']})")
    lines.append("")
    lines.append(f"memory: {result.get('memory_kind', '')}")
    return "\n".join(lines)


def _own_ceiling(row: dict[str, Any]) -> float:
    """The mm ceiling of the row's dtype measured beside its arm (0: none)."""
    here = row.get("arm_ceilings") or {}
    if row.get("dtype") in ("bfloat16", "float16") and "mm_bf16_flops" in here:
        return here["mm_bf16_flops"]
    return here.get("mm_fp32_flops", 0.0)


def plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of images/s per arm, one panel per case and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, m, [r for r in case["rows"] if r["mode"] == m and "img_s" in r])
              for c, case in result["cases"].items() for m in MODES]
    panels = [p for p in panels if p[2]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 0.9 + sum(0.28 * len(p[2]) + 0.6 for p in panels)),
                             squeeze=False)
    for ax, (cname, mode, rows) in zip(axes[:, 0], panels):
        names = [r["arm"] for r in rows]
        vals = [r["img_s"] for r in rows]
        err = [[r["img_s"] - r["img_s_min"] for r in rows], [r["img_s_max"] - r["img_s"] for r in rows]]
        colors = ["#d62728" if n == "fastmoco" else "#7f7f7f" if n == "reference"
                  else "#2ca02c" if n.startswith("lightly") else "#1f77b4" for n in names]
        ax.barh(names, vals, xerr=err, color=colors, capsize=2)
        ax.invert_yaxis()
        ax.set_title(f"{cname} — {mode}", fontsize=9)
        ax.tick_params(labelsize=8)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=7)
    axes[-1, 0].set_xlabel(f"images/s  ({result['setting']['device']}, {result['setting']['commit']})",
                           fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver


def _total_steps(cfg: TrainConfig, n_images: int) -> int:
    """The training run this config describes (compile=auto decides on it, as train() does)."""
    if cfg.schedule.max_steps is not None:
        return cfg.schedule.max_steps
    return cfg.schedule.epochs * max(1, n_images // cfg.schedule.batch_size)


def run_case(cname: str, cfg: TrainConfig, cdef: CaseDef, bench: BenchConfig,
             device: torch.device, ceil: dict[str, float],
             on_arm: Callable[[dict], None] = lambda case: None) -> dict[str, Any]:
    modes = list(cdef.modes or bench.modes)
    files = None
    if cfg.data.name == "synthetic":
        modes = [m for m in modes if m == "model"]
        n_images = cfg.data.synthetic_images
    elif set(modes) & {"data", "full"}:
        files = split_files(cfg.data, cfg.data.train_split, cfg.data.max_images, cfg.run.seed).files
        n_images = len(files)
    else:
        n_images = len(split_files(cfg.data, cfg.data.train_split, cfg.data.max_images,
                                   cfg.run.seed).files)
    case: dict[str, Any] = {
        "backbone": cfg.backbone.name + (" (CIFAR stem)" if cfg.backbone.cifar_stem else ""),
        "image_size": cfg.data.image_size, "batch": cfg.schedule.batch_size,
        "queue_size": cfg.method.queue_size, "version": cfg.method.version,
        "data": cfg.data.name, "recipe": cfg.data.recipe, "images": n_images,
        "overrides": list(cdef.overrides), "rows": []}
    if bench.ceilings.enabled and bench.ceilings.flops:
        case["flops_per_step"] = step_flops(cfg, device)
    case["param_bytes"] = _param_bytes(cfg)
    total = _total_steps(cfg, n_images)
    data_cache: dict = {}
    for name in cdef.arms or bench.arms:
        adef = bench.arm_defs.get(name) or ArmDef(kind=name)
        arm_modes = [m for m in modes if adef.modes is None or m in adef.modes]
        if not arm_modes:
            continue
        if adef.needs_bf16 and device.type == "cpu" and not cpu_prefers_bf16():
            why = (f"bf16 is not this CPU's fast path ({cpu_kind()}, bf16 measured "
                   f"{cpu_bf16_speedup():.2f}x fp32; 0 = emulated): fastmoco runs fp32 here, and "
                   f"the arm would time a slow bf16")
            log.info("arm %s skipped: %s", name, why)
            case["rows"] += [{"arm": name, "mode": m, "skipped": why} for m in arm_modes]
            continue
        try:
            args = (name, adef, cfg, arm_modes, device, files, total, bench, data_cache)
            rows, fresh = run_isolated(*args) if bench.isolate else (run_arm(*args), data_cache)
            case["rows"] += rows
            data_cache.update(fresh)
        except ImportError as e:
            log.warning("arm %s skipped: %s", name, e)
            case["rows"] += [{"arm": name, "mode": m, "skipped": str(e)} for m in arm_modes]
        except concurrent.futures.process.BrokenProcessPool as e:  # killed (out of memory, say)
            log.error("arm %s: its process died (%s); the other arms go on", name, e)
            case["rows"] += [{"arm": name, "mode": m, "skipped": f"process died: {e}"}
                             for m in arm_modes]
        add_ratios(case, ceil)
        on_arm(case)
    return case


def _param_bytes(cfg: TrainConfig) -> int:
    from fastmoco.backbone import create_backbone

    net = create_backbone(cfg.backbone.name, cifar_stem=cfg.backbone.cifar_stem, **dict(cfg.backbone.kwargs))
    return 4 * sum(p.numel() for p in net.parameters())  # fp32 master weights (heads ignored)


def run_bench(base: TrainConfig, bench: BenchConfig) -> dict[str, Any]:
    """Every case × arm × mode; writes JSON + PNG under bench.out_dir; returns the result."""
    device = resolve_device(base.run.device)
    ceil = ceilings(device, bench.ceilings)
    result: dict[str, Any] = {"setting": setting(device), "ceilings": ceil,
                              "bench": dataclasses.asdict(bench), "cases": {},
                              "memory_kind": PeakMemory(device).kind}
    out = Path(bench.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def save() -> None:  # after every case, so a long run that is stopped keeps what it measured
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
    chart = out / f"bench_{stamp}.png"
    result["chart"] = str(chart)
    save()
    plot(result, chart)
    if bench.docs_chart and chart.exists():
        Path(bench.docs_chart).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chart, bench.docs_chart)
    return result


def micro_kernels() -> dict[str, Any]:
    """Loss-alone and EMA-alone cases: benchmarks/kernels.py --quick (the kernels' own benchmark)."""
    script = ROOT / "benchmarks" / "kernels.py"
    if not script.is_file():
        return {"skipped": f"{script} not found"}
    res = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True)
    print(res.stdout)
    return {"returncode": res.returncode, "json": str(ROOT / "benchmarks" / "out" / "kernels.json"),
            "stdout_tail": res.stdout[-4000:], "stderr_tail": res.stderr[-2000:]}


def split_config(cfg: DictConfig) -> tuple[TrainConfig, BenchConfig]:
    """The composed config → (the training config every arm starts from, the bench settings)."""
    bench_node = cfg.get("bench", {})
    train_node = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in ("bench", "hydra")])
    bench = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig), bench_node))
    return from_hydra(train_node), bench


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def bench_main(cfg: DictConfig) -> None:
    base, bench = split_config(cfg)
    logging.getLogger().setLevel(logging.INFO)
    result = run_bench(base, bench)
    print(format_table(result))
    print(f"\nJSON: {Path(bench.out_dir) / 'bench_latest.json'}   chart: {result['chart']}"
          + (f" (copied to {bench.docs_chart})" if bench.docs_chart else ""))


if __name__ == "__main__":
    from fastmoco.cli import main

    main(["bench", *sys.argv[1:]])
