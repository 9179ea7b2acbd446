"""`fastmoco bench`: images/s of the real training step, arm beside arm, against hardware ceilings.

For each case (a config), each arm (fastmoco's defaults, one feature turned off at a time, the
authors' reference, lightly) and each mode (model: synthetic tensors on the device; data: the
pipeline alone; full: the loop from files) it runs warm-up steps, then timed windows (images/s:
median, min, max over windows), then a profile pass under torch.profiler whose `fastmoco.<phase>`
ranges split a step into forward / backward / optimizer / ema / loss / queue (data: next(batch)).

    config.py      the bench: section of conf/bench.yaml (arms, cases, targets, ceilings)
    arms.py        an arm by kind; arm_fastmoco.py (through fastmoco.build), arm_reference.py,
                   arm_lightly.py (imported only for a lightly arm)
    measure.py     timed windows, profile pass, peak memory, mm / copy / FLOP ceilings
    phases.py      the profiler's ranges → ms per phase
    report.py      ratios, targets, the table, the chart
    turns.py       arms whose windows run in turns, round by round, each in its own process
    driver.py      cases × arms × modes, each arm in its own process, the model mode in turns;
                   bench_main (hydra)
"""
from fastmoco.bench.config import ArmDef, BenchConfig, CaseDef, CeilingConfig, Target, split_config
from fastmoco.bench.driver import bench_main, run_bench
from fastmoco.bench.measure import PHASES, drain, matmul_rate
from fastmoco.bench.report import check_targets, format_table

__all__ = ["ArmDef", "BenchConfig", "CaseDef", "CeilingConfig", "PHASES", "Target", "bench_main",
           "check_targets", "drain", "format_table", "matmul_rate", "run_bench", "split_config"]
