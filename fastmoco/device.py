"""Device and precision decisions, made once from the config: the device decides, not the code."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: this process's CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name} but CUDA is not available: set run.device=cpu or auto")
    return device


def cpu_supports_bf16() -> bool:
    """oneDNN's fast bf16 path (AVX512-BF16 or AMX); without it bf16 on a CPU is emulated and slow.

    oneDNN answers for the ISA it may use, so ONEDNN_MAX_CPU_ISA=AVX2 (how the test suite stands
    in for an AVX2-only machine) makes this False on any CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# auto picks bf16 on a CPU only when it measures at least this much faster than fp32.
BF16_MIN_SPEEDUP = 1.2


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a small conv + matmul on this CPU (0.0 without native bf16).

    Native bf16 is not always the fast path: some CPUs that report AVX512-BF16 without AMX run
    bf16 matmuls and convolutions slower than fp32. So auto decides from a
    measurement (~0.2 s, once per process; a process group and the bench take one process's
    decision, see runtime.init_runtime and bench.driver.decide_precision)."""
    if not cpu_supports_bf16():
        return 0.0
    return _time_bf16_against_fp32()


def _time_bf16_against_fp32() -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(512, 1024, generator=g), torch.randn(1024, 1024, generator=g)

    def best(dtype: torch.dtype) -> float:
        xs, ws, as_, bs = (t.to(dtype) for t in (x, w, a, b))
        times = []
        for _ in range(4):  # the first is the warm-up
            start = time.perf_counter()
            torch.nn.functional.conv2d(xs, ws, padding=1)
            torch.mm(as_, bs)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    with torch.no_grad():
        return best(torch.float32) / best(torch.bfloat16)


def cpu_prefers_bf16() -> bool:
    """bf16 is this CPU's fast path: native, and measured faster than fp32 (BF16_MIN_SPEEDUP)."""
    return cpu_supports_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def _cpuinfo(key: str) -> str:
    """The first `key` line's value in Linux /proc/cpuinfo ("" elsewhere, or without one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    return set(_cpuinfo("flags").split())


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; "unknown" elsewhere)."""
    return _cpuinfo("model name") or "unknown"


def cpu_kind() -> str:
    """The kind of CPU a figure comes from, as torch and oneDNN will use it: AMX, AVX512-BF16,
    AVX512, AVX2 (no native bf16: fp32 is the fast path) or DEFAULT. ATEN_CPU_CAPABILITY and
    ONEDNN_MAX_CPU_ISA lower it, as they lower what the kernels run."""
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. AVX512, AVX2, DEFAULT
    if not capability.startswith("AVX512"):
        return capability
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()  # oneDNN's own ISA ceiling
    uncapped = cap in ("ALL", "DEFAULT")
    if cpu_supports_bf16():
        return "AMX" if "amx_bf16" in cpu_flags() and (uncapped or "AMX" in cap) else "AVX512-BF16"
    return "AVX512" if uncapped or "AVX512" in cap or "AMX" in cap else "AVX2"


def describe_cpu() -> dict[str, object]:
    """What the bench and the results files record beside each CPU figure."""
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    return {"kind": cpu_kind(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_bf16": cpu_supports_bf16(),
            "bf16_speedup": round(cpu_bf16_speedup(), 2), "auto_dtype":
                "bfloat16" if cpu_prefers_bf16() else "float32",
            "flags": " ".join(f for f in wanted if f in flags),
            "isa_caps": " ".join(f"{k}={os.environ[k]}" for k in ISA_CAP_VARS if k in os.environ)}


# How the suite and the benchmarks make an AVX-512 machine compute as an AVX2-only one
# (ATen's vector kernels, oneDNN's convolutions, MKL's GEMM); `make test-avx2` sets them.
ISA_CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # run.precision


def precision_name(dtype: torch.dtype) -> str:
    """The run.precision value of a dtype: bf16, fp16 or fp32."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def resolve_precision(name: str, device: torch.device,
                      allow_emulated_bf16: bool = False) -> torch.dtype:
    """auto: bf16 on GPUs that have it and on CPUs where it measures faster than fp32, fp16 on
    older GPUs, fp32 otherwise.

    An explicit bf16 on a CPU without native bf16 stops with the fix, unless
    `allow_emulated_bf16` (run.allow_emulated_bf16=true): there it runs ~7x slower than fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if cpu_prefers_bf16():
            return torch.bfloat16
        if cpu_supports_bf16():
            log.info("precision auto: fp32, as bf16 measured %.2fx fp32 on this CPU (%s)",
                     cpu_bf16_speedup(), cpu_kind())
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"run.precision={name!r}: choose auto, bf16, fp16 or fp32")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_supports_bf16():
        message = (f"run.precision=bf16 but this CPU ({cpu_kind()}) has no native bf16 "
                   f"(AVX512-BF16 or AMX): bf16 is emulated here, about 7x slower than fp32")
        if not allow_emulated_bf16:
            raise ValueError(f"{message}. Use run.precision=fp32 (or auto, which picks fp32 on "
                             f"this CPU); to run emulated bf16 anyway set run.allow_emulated_bf16=true")
        log.warning("%s; going on because run.allow_emulated_bf16=true", message)
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
