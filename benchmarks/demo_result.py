"""Record CPU-demo runs (`make train` without a GPU) in benchmarks/results/: the size the autosizer
took and the steps it predicted, the steps the run took, the linear probe and kNN against the
same network at random init, and the wall time; one row per run directory given.

    make train                                        # then, on the same machine:
    python benchmarks/demo_result.py runs/make-train-cpu_demo-*

Run it under the same ISA caps as the runs (e.g. `make test-avx2`'s) so that the file is named
for the kind of CPU the runs had.
"""
from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

from fastmoco.bench.results import write_result

COLUMNS = ["run", "size taken", "steps predicted", "steps run", "probe init %", "probe final %",
           "probe gain", "kNN init %", "kNN final %", "kNN gain", "wall min"]
SIZE = re.compile(r"size (\d+)/\d+ \((.*?)\): ([\d.]+) s a step with its data -> about (\d+) steps")
TAKEN = re.compile(r"sized by measurement: (.*)")
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")


def run_row(run: Path) -> list:
    """One demo run's row, from its cli.log (the autosizer's lines, the times) and metrics.jsonl."""
    log = (run / "cli.log").read_text().splitlines()
    predicted = {m.group(2): int(m.group(4)) for m in map(SIZE.search, log) if m}
    taken = next(m.group(1) for m in map(TAKEN.search, log) if m)
    stamps = [datetime.fromisoformat(m.group(1)) for m in map(STAMP.match, log) if m]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    s = next(r["summary"] for r in reversed(records) if "summary" in r)
    return [taken, predicted[taken], s["step"], s["probe_init"], s["probe_final"],
            s["probe_final"] - s["probe_init"], s["knn_init"], s["knn_final"],
            s["knn_final"] - s["knn_init"], (stamps[-1] - stamps[0]).total_seconds() / 60]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of make train")
    ap.add_argument("--command", default="make train", help="the command that made the runs")
    ap.add_argument("--note", action="append", default=[], help="a note to keep with the figures")
    args = ap.parse_args()
    rows = [[i + 1, *run_row(run)] for i, run in enumerate(args.runs)]
    notes = ["MoCo v2, CIFAR-10, ResNet-18 with the CIFAR stem at the width taken, batch 64, a "
             "7.5-minute training budget; probe: the cached linear probe (10,000 train / 5,000 "
             "test features), kNN: k 200 on backbone features; random init: the same network, its "
             "BN statistics re-estimated on 2,560 train images",
             "wall min: from the first log line (after the install check) to the last",
             *args.note]
    print(write_result("make_train", "cpu_demo", COLUMNS, rows, command=args.command, notes=notes,
                       out_dir=Path(__file__).resolve().parent / "results"))


if __name__ == "__main__":
    main()
