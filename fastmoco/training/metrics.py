"""What a run reports (rank 0): metrics.jsonl, TensorBoard scalars, a tqdm bar, images/s."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("fastmoco")


class MetricsWriter:
    """Metrics as JSON lines and TensorBoard scalars; on ranks other than 0 it writes nothing."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.jsonl = self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")

    def log(self, record: dict[str, Any]) -> None:
        """One JSON line; None values (a measurement that was not made) are left out."""
        record = {k: v for k, v in record.items() if v is not None}
        if self.jsonl is None or not set(record) - {"step"}:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Images/s over the steps since the last reading, and over the whole invocation."""

    def __init__(self, images_per_step: int, step: int) -> None:
        self.images_per_step = images_per_step
        self.start = self.window_start = time.perf_counter()
        self.start_step = self.window_step = step

    def window(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.window_step) * self.images_per_step / max(now - self.window_start, 1e-9)
        self.window_start, self.window_step = now, step
        return rate

    def overall(self, step: int) -> float:
        """The mean over this invocation (nan if it made no step)."""
        if step <= self.start_step:
            return float("nan")
        return (step - self.start_step) * self.images_per_step / (time.perf_counter() - self.start)


class ProgressBar:
    """A tqdm bar over the run's steps (rank 0, run.progress), else silent."""

    def __init__(self, enabled: bool, total: int, done: int, desc: str = "pretrain") -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="step",
                            dynamic_ncols=True)

    def update(self, total: Optional[int] = None, **postfix: str) -> None:
        if self.bar is None:
            return
        if total is not None:
            self.bar.total = total
        if postfix:
            self.bar.set_postfix(refresh=False, **postfix)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
