"""The step time a time-based checkpoint costs: the r18_cifar bench case (MoCo v2, CIFAR-stem
ResNet-18, batch 256, K 4096) on synthetic images, timed step by step without checkpoints, then
with `run.checkpoint_every_min`, then without again (so that drift in the machine's speed shows).

    python benchmarks/checkpoint_cost.py                       # 1 + 3 + 1 minutes, fp32
    python benchmarks/checkpoint_cost.py --minutes-on 2 --every-min 0.5

Lost per checkpoint = the snapshot in the step (the copy to host memory) + what the steps that
ran beside the background write took beyond the median step without checkpoints.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fastmoco.runtime import local_runtime
from fastmoco.training.trainer import build_trainer
from fastmoco.config import TrainConfig, apply_overrides
from fastmoco.data import SyntheticTwoViewLoader
from fastmoco.device import describe_cpu
from fastmoco.training.checkpointing import PeriodicCheckpoints
from fastmoco.training.position import RunPosition

BENCH_YAML = Path(__file__).resolve().parent.parent / "fastmoco" / "conf" / "bench.yaml"


def r18_cifar(run_dir: str, precision: str, every_min: float) -> TrainConfig:
    case = OmegaConf.load(BENCH_YAML).bench.case_defs.r18_cifar
    return apply_overrides(TrainConfig(), [
        *case.overrides, "data.name=synthetic", "run.device=cpu", "run.compile=off",
        f"run.precision={precision}", f"run.dir={run_dir}", f"run.checkpoint_every_min={every_min}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--every-min", type=float, default=1.0)
    p.add_argument("--minutes-off", type=float, default=1.0, help="before and after, each")
    p.add_argument("--minutes-on", type=float, default=3.0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="checkpoint_cost.") as run_dir:
        cfg = r18_cifar(run_dir, a.precision, a.every_min)
        rt = local_runtime(cfg)
        trainer = build_trainer(cfg, rt, steps=10_000)
        b = cfg.schedule.batch_size
        x_q, x_k = next(iter(SyntheticTwoViewLoader(b, b, 32, rt.device, rt.dtype, True, 0)))
        progress = RunPosition(total_steps=10**9)
        checkpoints = PeriodicCheckpoints(trainer, progress, cfg, None, steps_per_epoch=10**9)

        def steps(minutes: float, checkpointing: bool) -> list[dict]:
            out, end = [], time.perf_counter() + 60 * minutes
            while time.perf_counter() < end:
                busy_before = checkpoints.writer.busy
                t = time.perf_counter()
                trainer.step(x_q, x_k, 0.03, 0.99).loss.item()  # .item(): the step has ended
                progress.advance()
                step_s = time.perf_counter() - t
                taken = len(checkpoints.snapshot_seconds)
                if checkpointing:
                    checkpoints.after_step()
                snapshot = (checkpoints.snapshot_seconds[-1]
                            if len(checkpoints.snapshot_seconds) > taken else 0.0)
                out.append({"step_s": step_s, "snapshot_s": snapshot,
                            "beside_write": busy_before or checkpoints.writer.busy})
            return out

        for _ in range(2):  # warm-up: oneDNN primitives, optimizer state
            trainer.step(x_q, x_k, 0.03, 0.99).loss.item()
        before = steps(a.minutes_off, False)
        checkpoints._last = checkpoints.clock()
        on = steps(a.minutes_on, True)
        checkpoints.close()
        after = steps(a.minutes_off, False)
        size_mb = sum(f.stat().st_size for f in Path(run_dir).rglob("*.pt")) / 2**20
        files = len(list(Path(run_dir).rglob("*.pt")))

    base = statistics.median(s["step_s"] for s in before + after)
    snaps = [s["snapshot_s"] for s in on if s["snapshot_s"] > 0]
    beside = [s["step_s"] for s in on if s["beside_write"] and s["snapshot_s"] == 0]
    lost = sum(snaps) + sum(max(0.0, t - base) for t in beside)
    on_s = sum(s["step_s"] + s["snapshot_s"] for s in on)
    print(json.dumps({
        "cpu": describe_cpu(), "torch_threads": torch.get_num_threads(),
        "precision": a.precision, "every_min": a.every_min,
        "steps_off": len(before) + len(after), "median_step_s_off": round(base, 3),
        "mean_step_s_off_before_after": [round(statistics.mean(s["step_s"] for s in x), 3)
                                         for x in (before, after)],
        "steps_on": len(on), "mean_step_s_on": round(on_s / len(on), 3),
        "checkpoints": len(snaps), "checkpoint_mb": round(size_mb / max(1, files), 1),
        "snapshot_ms": [round(1e3 * s, 1) for s in snaps],
        "write_s_in_background": [round(s, 2) for s in checkpoints.writer.seconds],
        "steps_beside_a_write": len(beside),
        "their_step_s": [round(t, 3) for t in beside],
        "lost_s_per_checkpoint": round(lost / max(1, len(snaps)), 3),
        "lost_pct_of_step_time": round(100 * lost / on_s, 2),
        "snapshot_pct_of_one_step": round(100 * statistics.mean(snaps) / base, 2) if snaps else None,
    }, indent=1))


if __name__ == "__main__":
    main()
