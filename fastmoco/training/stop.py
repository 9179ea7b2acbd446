"""Stop requests: SIGTERM/SIGUSR1 (SLURM preemption, torchrun elastic restarts) or
schedule.stop_at_step → every process checkpoints at the same step and exits, to be resumed by
running the same command (with a later stop_at_step, or none)."""
from __future__ import annotations

import signal
from typing import Optional

from fastmoco.distributed import AnyProcess


class StopFlag:
    def __init__(self, stop_at_step: Optional[int] = None) -> None:
        self.stop_at = stop_at_step
        self.requested = False  # agreed by all processes (poll), so that all stop at one step
        self.reason = ""
        self.signalled = False  # this process got the signal
        self._agree = AnyProcess()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def poll(self, step: Optional[int] = None) -> bool:
        """Call once per step on every process (a collective): True from the step all agree to
        stop at, a signal's or `stop_at_step`."""
        if self.requested:
            return True
        if self._agree(self.signalled):
            self.requested, self.reason = True, "stop requested"
        elif self.stop_at is not None and step is not None and step >= self.stop_at:
            self.requested, self.reason = True, f"schedule.stop_at_step={self.stop_at} reached"
        return self.requested
