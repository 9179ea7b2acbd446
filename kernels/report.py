"""`python -m fastmoco.kernels.report`: what each kernel config compiles to, and PREDICTED floors.

Part 1 compiles every launchable config for sm_80 and sm_90 (kernels/compile_check.py) and prints
registers, shared memory, spills and tensor-core instructions. Part 2 prints, per benchmark case,
the fused InfoNCE's FLOPs and minimum HBM bytes and the floor they imply on an H100 SXM. These are
PREDICTED figures from datasheet peaks, not measurements.
"""
from __future__ import annotations

import argparse
import sys

H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak, H100 SXM
H100_HBM_BYTES = 3.35e12  # HBM3
CASES_N = (256, 1024, 4096)
CASES_K = (4096, 65536, 262144, 1048576)
CASES_C = (128, 256)


def infonce_cost(n: int, k_rows: int, c: int, elem: int = 2) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of fused InfoNCE fwd+bwd: q·queueᵀ and P·queue, queue read once."""
    flops = 2 * (2.0 * n * k_rows * c)  # both matmuls run in the forward kernel; backward scales
    bytes_min = k_rows * c * elem + n * c * (3 * elem + 4 * 2)  # queue; q, k, dq; G write+read
    return flops, bytes_min


def floor_table() -> list[str]:
    """Rows of the PREDICTED H100 floor table for the benchmark grid."""
    lines = ["PREDICTED H100 SXM floor, fused InfoNCE fwd+bwd, bf16 "
             f"({H100_BF16_FLOPS / 1e12:.0f} TFLOP/s dense, {H100_HBM_BYTES / 1e12:.2f} TB/s)",
             f"{'N':>5} {'K':>8} {'C':>4} {'GFLOP':>9} {'MB min':>8} {'floor ms':>9} {'bound':>7}"
             f" {'eager logits MB':>16}"]
    for c in CASES_C:
        for n in CASES_N:
            for k_rows in CASES_K:
                flops, nbytes = infonce_cost(n, k_rows, c)
                t_flop, t_mem = flops / H100_BF16_FLOPS, nbytes / H100_HBM_BYTES
                bound = "compute" if t_flop >= t_mem else "memory"
                eager_mb = n * (k_rows + 1) * 4 / 2**20
                lines.append(f"{n:5d} {k_rows:8d} {c:4d} {flops / 1e9:9.1f} {nbytes / 2**20:8.1f} "
                             f"{1e3 * max(t_flop, t_mem):9.3f} {bound:>7} {eager_mb:16.0f}")
    return lines


def compile_table(full: bool, workers: int) -> tuple[list[str], bool]:
    """Rows of the compile table and whether every check passed."""
    from . import compile_check as cc

    results = cc.compile_all(cc.all_configs(full=full), workers=workers)
    lines = [f"{'kernel[config]':72} {'arch':>5} {'regs':>5} {'smem KB':>8} {'spill':>6} "
             f"{'tensor cores':>14}"]
    for r in results:
        tc = (f"HGMMA×{r.hgmma}" if r.hgmma else f"HMMA×{r.hmma}" if r.hmma else "-")
        c = r.config
        name = f"{c.kernel}[{c.label},w{c.num_warps},s{c.num_stages}]"
        lines.append(f"{name:72} {'sm_' + str(r.arch):>5} {r.regs:5d} {r.shared / 1024:8.1f} "
                     f"{'yes' if r.spills else 'no':>6} {tc:>14}")
    problems = [p for r in results for p in r.problems]
    lines += ["", f"{len(results)} compiles, {len(problems)} problems"] + problems
    return lines, not problems


def main(argv: list[str] | None = None) -> int:
    """Print both tables; exit 1 if any compile check failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset of configs only")
    ap.add_argument("--no-compile", action="store_true", help="only the PREDICTED floor table")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    ok = True
    if not args.no_compile:
        lines, ok = compile_table(not args.quick, args.workers)
        print("\n".join(lines), end="\n\n")
    print("\n".join(floor_table()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
