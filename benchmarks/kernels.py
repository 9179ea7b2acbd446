"""Benchmark the two kernels against their references: `python benchmarks/kernels.py [--quick]`.

InfoNCE fwd+bwd: eager reference, torch.compile of it, and fastmoco (chunked on CPU, Triton on
CUDA): median time, peak extra memory, and a floor = max(FLOPs / measured matmul rate,
bytes / measured copy bandwidth) on this machine. EMA over timm parameter sets (ResNet-18/50,
ViT-B/16): per-tensor loop, _foreach_lerp_, one lerp over flat buffers, and a plain copy.

Peak extra memory: CUDA from torch.cuda.max_memory_allocated; CPU from the kernel's peak RSS
(VmHWM, reset through /proc/self/clear_refs) minus RSS before the call, after malloc_trim(0)
returned freed heap pages to the OS so reused pages are not hidden.
Writes benchmarks/out/kernels.json and benchmarks/out/kernels.png.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastmoco.bench.results import default_command, write_result
from fastmoco.device import cpu_kind
from fastmoco.kernels import ema_update_, flatten_parameters_, infonce_loss
from fastmoco.kernels.reference import ema_update_reference_, infonce_loss_reference

OUT = Path(__file__).resolve().parent / "out"
RESULTS = Path(__file__).resolve().parent / "results"
_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_extra_mib(fn, device: torch.device) -> float:
    """Peak memory fn() needs beyond what is allocated before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if _LIBC is None:
        return float("nan")
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - base) / 1024


def median_ms(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms (triton.testing.do_bench on CUDA)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def interleaved_ms(fns: dict, device: torch.device, reps: int) -> dict[str, float]:
    """Median ms of each fn, timed in turns (A B A B ...) so that a load that comes and goes on a
    shared machine falls on every provider alike; on CUDA each is timed on its own by do_bench."""
    if device.type == "cuda":
        return {name: median_ms(fn, device, reps) for name, fn in fns.items()}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def machine_rates(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s at InfoNCE-like shapes, copy bytes/s) measured on this device."""
    a = torch.randn(1024, 128, device=device, dtype=dtype)
    b = torch.randn(16384, 128, device=device, dtype=dtype)
    mm_ms = median_ms(lambda: a @ b.t(), device, reps=5)
    x = torch.empty(64 * 2**20, device=device, dtype=torch.uint8)
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x), device, reps=5)
    return 2 * 1024 * 16384 * 128 / (mm_ms / 1e3), 2 * x.numel() / (copy_ms / 1e3)


def infonce_case(n, c, k_rows, dtype, device, reps, providers, rates) -> list[dict]:
    """Time and memory of each provider's fwd+bwd at one shape."""
    g = torch.Generator().manual_seed(0)
    q0 = F.normalize(torch.randn(n, c, generator=g), dim=1).to(device, dtype)
    k = F.normalize(torch.randn(n, c, generator=g), dim=1).to(device, dtype)
    queue = F.normalize(torch.randn(k_rows, c, generator=g), dim=1).to(device, dtype)
    q = q0.clone().requires_grad_()
    elem = q.element_size()
    flops = 4.0 * n * k_rows * c
    nbytes = k_rows * c * elem + 3 * n * c * elem
    floor_ms = 1e3 * max(flops / rates[0], nbytes / rates[1])
    def step_of(loss_fn):
        def step():
            q.grad = None
            loss, _ = loss_fn(q, k, queue, 0.2)
            loss.backward()
        return step

    steps = {name: step_of(fn) for name, fn in providers.items()}
    times = interleaved_ms(steps, device, reps)
    rows = []
    for name, step in steps.items():
        ms = times[name]
        mem = peak_extra_mib(step, device)
        rows.append(dict(bench="infonce", provider=name, N=n, C=c, K=k_rows,
                         dtype=str(dtype).split(".")[-1], ms=ms, peak_extra_mib=mem,
                         floor_ms=floor_ms, gflop=flops / 1e9))
        print(f"infonce N={n:5d} C={c:4d} K={k_rows:8d} {rows[-1]['dtype']:9s} {name:14s} "
              f"{ms:10.2f} ms {mem:9.1f} MiB  floor {floor_ms:8.2f} ms  "
              f"eager/this {rows[0]['ms'] / ms:5.2f}×", flush=True)
    return rows


def ema_case(model_name: str, device: torch.device, reps: int) -> list[dict]:
    """EMA of a timm model's parameter set: loop, foreach, flat, and a copy of the flat buffer."""
    import timm

    src = timm.create_model(model_name, pretrained=False, num_classes=0).to(device)
    tgt = timm.create_model(model_name, pretrained=False, num_classes=0).to(device)
    t_list, s_list = list(tgt.parameters()), list(src.parameters())
    numel = sum(p.numel() for p in t_list)

    @torch.no_grad()
    def authors_loop() -> None:  # facebookresearch/moco builder.py: a new tensor per parameter
        for param_k, param_q in zip(t_list, s_list):
            param_k.data = param_k.data * 0.99 + param_q.data * (1.0 - 0.99)

    times = {
        "authors_loop": median_ms(authors_loop, device, reps),
        "loop": median_ms(lambda: ema_update_reference_(t_list, s_list, 0.99), device, reps),
        "foreach": median_ms(lambda: ema_update_(t_list, s_list, 0.99, backend="foreach"),
                             device, reps),
    }
    flat_t, flat_s = flatten_parameters_(tgt)[0], flatten_parameters_(src)[0]
    times["flat"] = median_ms(lambda: ema_update_(tgt, src, 0.99), device, reps)
    times["copy"] = median_ms(lambda: flat_t.copy_(flat_s), device, reps)
    rows = []
    for name, ms in times.items():
        passes = {"copy": 2, "authors_loop": 6, "loop": 5}.get(name, 3)  # tensor reads + writes
        moved = flat_t.element_size() * numel * passes
        rows.append(dict(bench="ema", provider=name, model=model_name, params=numel, ms=ms,
                         gbps=moved / (ms / 1e3) / 1e9))
    summary = "  ".join(f"{r['provider']} {r['ms']:.2f} ms ({r['gbps']:.1f} GB/s)" for r in rows)
    print(f"ema {model_name:22s} {numel / 1e6:6.1f}M params  {summary}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inf = [r for r in rows if r["bench"] == "infonce" and r["N"] == 256 and r["dtype"] == "float32"]
    ema = [r for r in rows if r["bench"] == "ema"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for prov in sorted({r["provider"] for r in inf}):
        pts = sorted((r["K"], r["ms"]) for r in inf if r["provider"] == prov)
        axes[0].plot(*zip(*pts), marker="o", label=prov)
    floor = sorted({(r["K"], r["floor_ms"]) for r in inf})
    if floor:
        axes[0].plot(*zip(*floor), "k--", label="floor (this machine)")
    axes[0].set(xscale="log", yscale="log", xlabel="queue size K", ylabel="fwd+bwd ms",
                title="InfoNCE, N=256, C=128, fp32")
    axes[0].legend()
    models = sorted({r["model"] for r in ema})
    provs = ["authors_loop", "loop", "foreach", "flat", "copy"]
    for i, prov in enumerate(provs):
        vals = [next(r["ms"] for r in ema if r["model"] == m and r["provider"] == prov)
                for m in models]
        axes[1].bar([j + 0.16 * i for j in range(len(models))], vals, width=0.16, label=prov)
    axes[1].set_xticks([j + 0.32 for j in range(len(models))], models)
    axes[1].set(ylabel="ms per update", title="EMA over all parameters")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--only", choices=["infonce", "ema"], help="run one of the two benchmarks")
    ap.add_argument("--case", action="append", metavar="N,C,K",
                    help="InfoNCE shape(s) to run instead of the default list, e.g. 256,128,1048576")
    ap.add_argument("--reps", type=int, help="timed repetitions per provider (CPU default 3)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = args.reps if args.reps is not None else 3 if device.type == "cpu" else 0
    rates = machine_rates(device, torch.float32)
    print(f"device {device} ({cpu_kind() if device.type == 'cpu' else torch.cuda.get_device_name()}), "
          f"{torch.get_num_threads()} threads; measured matmul "
          f"{rates[0] / 1e9:.0f} GFLOP/s, copy {rates[1] / 1e9:.1f} GB/s", flush=True)
    fused = "chunked" if device.type == "cpu" else "triton"
    providers = {"eager": infonce_loss_reference,
                 f"fastmoco-{fused}": lambda q, k, qu, t: infonce_loss(q, k, qu, t, backend=fused)}
    compiled = {"torch.compile": torch.compile(infonce_loss_reference)}
    if device.type == "cpu":
        cases = [(256, 128, 4096), (256, 128, 65536)] if args.quick else [
            (32, 128, 4096), (256, 128, 4096), (256, 128, 16384), (256, 128, 65536),
            (1024, 128, 65536), (256, 256, 65536), (256, 128, 262144), (256, 128, 1048576)]
        compile_at = {(256, 128, 65536)}
        dtypes = [torch.float32]
    else:
        cases = [(n, c, k) for c in (128, 256) for n in (256, 1024, 4096)
                 for k in (4096, 65536, 262144, 1048576)]
        compile_at = set(cases)
        dtypes = [torch.float32, torch.bfloat16]
    if args.case:
        cases = [tuple(int(v) for v in spec.split(",")) for spec in args.case]
    rows = []
    for dtype in dtypes if args.only != "ema" else []:
        for case in cases:
            provs = dict(providers)
            if case in compile_at and not args.no_compile:
                provs.update(compiled)
            rows += infonce_case(*case, dtype, device, reps, provs, rates)
    models = [] if args.only == "infonce" else ["resnet18"] if args.quick else [
        "resnet18", "resnet50", "vit_base_patch16_224"]
    for model in models:
        rows += ema_case(model, device, reps=5 if device.type == "cpu" else 0)
    if args.case:  # a spot check: the full run's json and chart stay as they are
        return
    OUT.mkdir(exist_ok=True)
    meta = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                matmul_gflops=rates[0] / 1e9, copy_gbps=rates[1] / 1e9)
    (OUT / "kernels.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    plot(rows, OUT / "kernels.png")
    print(f"wrote {OUT / 'kernels.json'} and {OUT / 'kernels.png'}")
    record(rows, device, args.quick)


def record(rows: list[dict], device: torch.device, quick: bool) -> None:
    """The figures as benchmarks/results/ keeps them: one table for the loss, one for the EMA."""
    note = f"median of timed repetitions in turns; {torch.get_num_threads()} threads" + (
        "; --quick sizes" if quick else "")
    loss = [r for r in rows if r["bench"] == "infonce"]
    if loss:
        eager = {(r["N"], r["C"], r["K"], r["dtype"]): r["ms"] for r in loss if r["provider"] == "eager"}
        table = [[r["N"], r["C"], r["K"], r["dtype"], r["provider"], r["ms"],
                  eager[r["N"], r["C"], r["K"], r["dtype"]] / r["ms"], r["peak_extra_mib"], r["floor_ms"]]
                 for r in loss]
        print("results:", write_result(
            "kernels", "infonce_fwd_bwd", ["N", "C", "K", "dtype", "provider", "ms", "eager / this",
                                          "peak extra MiB", "floor ms"], table,
            command=default_command(), notes=[note, "floor: the larger of FLOPs at the measured "
                                              "matmul rate and bytes at the measured copy rate"],
            device_type=device.type, out_dir=RESULTS))
    ema = [r for r in rows if r["bench"] == "ema"]
    if ema:
        table = [[r["model"], r["params"], r["provider"], r["ms"], r["gbps"]] for r in ema]
        print("results:", write_result(
            "kernels", "ema", ["model", "params", "provider", "ms", "GB/s"], table,
            command=default_command(), notes=[note, "copy: one copy of the flat buffer, the floor"],
            device_type=device.type, out_dir=RESULTS))


if __name__ == "__main__":
    main()
