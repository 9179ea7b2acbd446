"""Named ranges of the training step for torch.profiler: `fastmoco bench` splits a step by them.

A range costs a few microseconds when no profiler listens, so the ranges stay in the code the
training loop runs; nothing is patched in to measure it."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

from torch.profiler import record_function

PREFIX = "fastmoco."
# The step's parts, outermost first: ema and loss run inside forward, queue after backward.
PHASES = ("forward", "backward", "optimizer", "ema", "loss", "queue")

F = TypeVar("F", bound=Callable)


def phase(name: str) -> record_function:
    """`with phase("backward"): ...` marks a part of the step."""
    return record_function(PREFIX + name)


def traced(name: str) -> Callable[[F], F]:
    """Decorator form of `phase`: every call of the function is one range."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with record_function(PREFIX + name):
                return fn(*args, **kwargs)
        return run  # type: ignore[return-value]
    return wrap
