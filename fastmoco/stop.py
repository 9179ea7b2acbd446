"""Stop requests: SIGTERM/SIGUSR1 (SLURM preemption, torchrun elastic restarts) → every process
checkpoints at the same step and exits, to be resumed by running the same command."""
from __future__ import annotations

import signal

from fastmoco.distributed import AnyProcess


class StopFlag:
    def __init__(self) -> None:
        self.requested = False  # agreed by all processes (poll), so that all stop at one step
        self.signalled = False  # this process got the signal
        self._agree = AnyProcess()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def poll(self) -> bool:
        """Call once per step on every process: True from the step all agree to stop at."""
        self.requested = self.requested or self._agree(self.signalled)
        return self.requested
