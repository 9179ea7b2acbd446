"""Device and precision decisions, made once from the config: the device decides, not the code."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: this process's CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name} but CUDA is not available: set run.device=cpu or auto")
    return device


def cpu_supports_bf16() -> bool:
    """oneDNN's fast bf16 path (AVX512-BF16 or AMX); without it bf16 on a CPU is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the hardware runs it natively, fp16 on older GPUs, fp32 otherwise."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"run.precision={name!r}: choose auto, bf16, fp16 or fp32")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
