"""A step's time by phase, read from the `fastmoco.<phase>` profiler ranges (fastmoco.trace).

Every range counts exclusively of the fastmoco ranges nested in it (ema and loss run inside
forward, so forward is the encoders alone). On a CPU a range's time is its wall time. On CUDA it
is the device time of the kernels launched while the range was open, from any thread (backward's
kernels are launched by the autograd engine's own thread), or the wall time where none were."""
from __future__ import annotations

import bisect
import itertools
from typing import Iterable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fastmoco.trace import PHASES, PREFIX


def profiler(device: torch.device) -> profile:
    """The profiler of the profile pass: CPU activity, and CUDA on a GPU."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities)


def _kernel_us(e) -> float:
    """Device µs of the kernels an op launched; a range's own GPU span (gpu_user_annotation,
    named as the range) is not a kernel."""
    return sum(k.duration for k in e.kernels if not (e.is_user_annotation and k.name == e.name))


class _KernelTime:
    """Device µs of the kernels launched in a time window (CPU clock), by prefix sums."""

    def __init__(self, events: Iterable) -> None:
        launches = sorted((e.time_range.start, _kernel_us(e))
                          for e in events if e.device_type == DeviceType.CPU and e.kernels)
        self.starts = [s for s, _ in launches]
        self.cum = [0.0, *itertools.accumulate(d for _, d in launches)]

    def __call__(self, start: float, end: float) -> float:
        return (self.cum[bisect.bisect_right(self.starts, end)]
                - self.cum[bisect.bisect_left(self.starts, start)])


def phase_us(events: Iterable, device: torch.device) -> dict[str, float]:
    """Total exclusive µs per phase over every `fastmoco.<phase>` range in `events`."""
    events = list(events)
    ranges = [e for e in events if e.name.startswith(PREFIX) and e.device_type == DeviceType.CPU]
    kernels = _KernelTime(events) if device.type == "cuda" else None

    def spent(e) -> float:
        start, end = e.time_range.start, e.time_range.end
        device_us = kernels(start, end) if kernels else 0.0
        return device_us or (end - start)

    own = {id(e): spent(e) for e in ranges}
    for e in ranges:  # take each range out of the nearest fastmoco range around it
        around = [p for p in ranges if p is not e and p.thread == e.thread
                  and p.time_range.start <= e.time_range.start
                  and e.time_range.end <= p.time_range.end]
        if around:
            parent = max(around, key=lambda p: (p.time_range.start, -p.time_range.end))
            own[id(parent)] -= spent(e)
    out = {p: 0.0 for p in PHASES}
    for e in ranges:
        name = e.name[len(PREFIX):]
        out[name] = out.get(name, 0.0) + max(0.0, own[id(e)])
    return out
