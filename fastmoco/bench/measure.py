"""Measuring: the timed windows and the profile pass of one arm in one mode, peak memory, and the
hardware ceilings (torch.mm rate, copy bandwidth, the step's FLOPs) measured in the same run."""
from __future__ import annotations

import gc
import logging
import math
import resource
import statistics
import time
from typing import Any, Callable, Generator, Iterator

import torch

from fastmoco.bench.config import BenchConfig, CeilingConfig
from fastmoco.bench.phases import phase_us, profiler
from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.device import cpu_supports_bf16
from fastmoco.trace import PHASES as STEP_PHASES

log = logging.getLogger("fastmoco.bench")
PHASES = ("data", *STEP_PHASES)  # the table's columns


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def no_step(x_q: torch.Tensor, x_k: torch.Tensor) -> None:
    """The data mode's step: the pipeline alone."""


def drain(batches: Iterator, limit: int = 64, ready_s: float = 0.005) -> int:
    """Take the batches a loader has prefetched (they arrive at once) until one has to be made:
    a prefetch queue filled during compile or warm-up would otherwise inflate images/s."""
    for n in range(limit):
        start = time.perf_counter()
        next(batches)
        if time.perf_counter() - start > ready_s:
            return n
    return limit


def _window(step: Callable, batches: Iterator, device: torch.device, steps: int) -> float:
    """Seconds of `steps` steps, with nothing but the steps inside."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    synchronize(device)
    return time.perf_counter() - start


def profile_pass(step: Callable, batches: Iterator, device: torch.device,
                 steps: int) -> dict[str, float]:
    """ms/step per phase: data from timing next(batches), the rest from the profiler's ranges;
    "step": the wall time of the steps under the profiler, for comparison."""
    data_s = step_s = 0.0
    with profiler(device) as prof:
        for _ in range(steps):
            synchronize(device)
            start = time.perf_counter()
            x_q, x_k = next(batches)
            synchronize(device)
            middle = time.perf_counter()
            step(x_q, x_k)
            synchronize(device)
            data_s, step_s = data_s + middle - start, step_s + time.perf_counter() - middle
    us = phase_us(prof.events(), device)
    return {"data": 1000 * data_s / steps, **{p: us.get(p, 0.0) / 1000 / steps for p in STEP_PHASES},
            "step": 1000 * step_s / steps}


def measure_stages(step: Callable, batches: Iterator, device: torch.device, batch_size: int,
                   bench: BenchConfig, from_loader: bool,
                   ceiling: Callable[[], dict[str, float]] | None = None,
                   bracket: bool = False, label: str = "") -> Generator[None, None, dict[str, Any]]:
    """`measure`, pausing (yield) after the warm-up and after each window, so that windows of
    several arms can run in turns. `ceiling` is sampled before the first window and after each
    one; with `bracket` also just before each window (another arm's window ran since the last
    sample). `window_ceilings`: the [before, after] samples of each window. `label`: logs each
    window's images/s under that name."""
    warmup_s = _window(step, batches, device, bench.warmup)
    drained = drain(batches) if from_loader else 0
    steps = bench.steps_per_window if step is not no_step else bench.data_steps_per_window
    last = ceiling() if ceiling and not bracket else None
    yield
    rates, pairs = [], []
    for _ in range(bench.windows):
        before = ceiling() if ceiling and bracket else last
        rates.append(steps * batch_size / _window(step, batches, device, steps))
        if label:
            log.info("bench %s: window %d of %d, %.1f images/s", label, len(rates), bench.windows,
                     rates[-1])
        if ceiling:
            last = ceiling()
            pairs.append([before, last])
        yield
    phases = profile_pass(step, batches, device, bench.profile_steps) if bench.profile_steps else {}
    profiled = {"profiled_step_ms": phases.pop("step")} if phases else {}
    around = {"window_ceilings": pairs} if pairs and pairs[0][0] else {}
    return {"img_s": statistics.median(rates), "img_s_min": min(rates), "img_s_max": max(rates),
            "windows": rates, "warmup_s": warmup_s, "phases_ms": phases, "drained": drained,
            **around, **profiled}


def finish(stages: Generator[None, None, Any]) -> Any:
    """Run a generator of stages to its end; its return value."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


def measure(step: Callable, batches: Iterator, device: torch.device, batch_size: int,
            bench: BenchConfig, from_loader: bool,
            ceiling: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    """Warm-up, timed windows (images/s: median, min, max over windows), then the profile pass.
    `ceiling`: sampled before the first window and after each one (`window_ceilings`), so that
    each window's fraction of the ceiling uses the machine's pace around that window."""
    return finish(measure_stages(step, batches, device, batch_size, bench, from_loader, ceiling))


def proc_kib(path: str, key: str) -> int | None:
    """The kB figure of `key:` in a /proc file (None where there is no such file or line)."""
    try:
        for line in open(path):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), 0 where /proc does not say."""
    return 1024 * (proc_kib("/proc/self/status", "VmHWM") or 0)


def memory_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    return None if kib is None else 1024 * kib


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
        kib = proc_kib("/proc/self/status", key)
        if kib is None:
            raise KeyError(key)
        return float(kib)

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


def _best_seconds(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Best FLOP/s of torch.mm at n×n×n."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), device, reps)


def copy_bandwidth(device: torch.device, megabytes: int, reps: int = 3) -> float:
    """Best bytes/s (read + write) of a plain tensor copy."""
    x = torch.empty(megabytes * 2**20 // 4, device=device).fill_(1.0)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / _best_seconds(lambda: y.copy_(x), device, reps)


def mm_dtypes(device: torch.device) -> list[tuple[str, torch.dtype]]:
    """The matmul dtypes with a ceiling here: fp32, and bf16 where the hardware runs it natively."""
    out = [("mm_fp32_flops", torch.float32)]
    if device.type == "cuda" or cpu_supports_bf16():
        out.append(("mm_bf16_flops", torch.bfloat16))
    return out


def ceilings(device: torch.device, cc: CeilingConfig) -> dict[str, float]:
    """The mm rates and the copy bandwidth, measured once at the bench's start."""
    if not cc.enabled:
        return {}
    out: dict[str, float] = {"mm_n": cc.mm_size}
    for key, dtype in mm_dtypes(device):
        out[key] = matmul_rate(device, dtype, cc.mm_size, cc.mm_reps)
    out["copy_bytes_s"] = copy_bandwidth(device, cc.copy_mb)
    return out


class ArmCeilings:
    """The mm ceilings measured beside one arm, in its own process, before and after its windows:
    the best is what this machine could do while the arm ran (a shared machine's ceiling moves
    by 15 % within an hour, so one measurement at the bench's start is not the arm's)."""

    def __init__(self, device: torch.device, cc: CeilingConfig) -> None:
        self.device, self.cc = device, cc
        self.samples: dict[str, list[float]] = {}

    def sample(self) -> dict[str, float]:
        """One measurement of each mm ceiling, kept and returned ({} when disabled)."""
        if not self.cc.enabled:
            return {}
        out = {}
        for key, dtype in mm_dtypes(self.device):
            out[key] = matmul_rate(self.device, dtype, self.cc.mm_size, self.cc.mm_reps)
            self.samples.setdefault(key, []).append(out[key])
        return out

    @property
    def best(self) -> dict[str, float]:
        return {k: max(v) for k, v in self.samples.items()}

    def report(self) -> dict[str, Any]:
        return {**self.best, "samples": self.samples}


def step_flops(cfg: TrainConfig, device: torch.device) -> int:
    """FLOPs of one fastmoco training step (eager fp32: FlopCounterMode counts forward + backward
    of the direct convolutions, the work every arm does)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastmoco.bench.arm_fastmoco import FastMocoArm

    arm = FastMocoArm("flops", apply_overrides(cfg, ["run.compile=off", "run.precision=fp32"]),
                      device, 0)
    b, s = cfg.schedule.batch_size, cfg.data.image_size
    x = torch.randn(b, 3, s, s, device=device)
    arm.step(x, x.clone())  # first step outside: lazy state (optimizer buffers) is not the work
    counter = FlopCounterMode(display=False)
    with counter:
        arm.step(x, x.clone())
    return int(counter.get_total_flops())
