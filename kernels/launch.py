"""Whether a Triton kernel can launch on a device in this process (shared by infonce.py and ema.py)."""
from __future__ import annotations

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def interpreter_active() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1 (kernels then run on CPU tensors).

    Triton 3.8's interpreter multiplies the raw bits of bf16 operands in tl.dot; the launcher then
    sets DOT_UPCAST so the kernel widens them to fp32 first (exact: bf16 products fit in fp32).
    """
    return isinstance(tl.sum, InterpretedFunction)


def check_launchable(device: torch.device, name: str) -> None:
    """Raise naming the fix when Triton cannot run on this device in this process."""
    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"{name}: backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 in the "
            "environment before triton is first imported; on CPU use backend='auto' or 'chunked'"
        )
