"""The bench's report: the machine and commit it ran on, the ratios between rows (× reference,
fraction of the ceiling, full ÷ model), the targets, the table printed on stdout and the chart."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

from fastmoco.bench.config import MODES, Target
from fastmoco.bench.measure import PHASES
from fastmoco.bench.results import commit
from fastmoco.device import describe_cpu


def setting(device: torch.device) -> dict[str, Any]:
    """Device, CPU kind, torch, threads, commit (+"+dirty"; "unknown" outside a checkout), time."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    return {"device": f"{device} ({name})", "cpu": describe_cpu(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "commit": commit(),
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def add_ratios(case: dict[str, Any], ceil: dict[str, float]) -> None:
    """× reference, fraction of the mm ceiling of the arm's dtype, full vs model of the same arm."""
    rows = case["rows"]
    by = {(r["arm"], r["mode"]): r for r in rows if "img_s" in r}
    flops = case.get("flops_per_step")
    for r in rows:
        if "img_s" not in r:
            continue
        ref = by.get(("reference", r["mode"]))
        if ref and r["mode"] != "data":
            r["x_reference"] = speed_ratio(r, ref)
        if flops and r["mode"] != "data":
            r["flops_s"] = flops * r["img_s"] / case["batch"]
            r.update(_fractions(r, flops / case["batch"], r.get("arm_ceilings") or ceil))
        model = by.get((r["arm"], "model"))
        if model and r["mode"] in ("full", "data"):
            r["frac_model"] = r["img_s"] / model["img_s"]
        ema = r.get("phases_ms", {}).get("ema")
        if ema and ceil.get("copy_bytes_s") and case.get("param_bytes"):
            # an EMA reads both encoders and writes one: 3× the parameter bytes
            r["ema_frac_copy_bw"] = 3 * case["param_bytes"] / (ema / 1000) / ceil["copy_bytes_s"]


def speed_ratio(row: dict[str, Any], other: dict[str, Any]) -> float:
    """row's images/s ÷ other's: the median of the per-round ratios where the two ran their
    windows in turns (the same minutes of the machine), else the ratio of their medians."""
    turns = row.get("in_turns")
    if turns is not None and turns == other.get("in_turns") \
            and len(row["windows"]) == len(other["windows"]):
        return statistics.median(a / b for a, b in zip(row["windows"], other["windows"]))
    return row["img_s"] / other["img_s"]


def _fractions(row: dict[str, Any], flop_per_image: float, here: dict[str, float]
               ) -> dict[str, float]:
    """Fraction of the mm ceiling of the row's dtype (and of the bf16 one where measured): the
    median over the windows of each window's rate against the better of the two ceilings sampled
    just before and just after it (`window_ceilings`: a shared machine's pace moves within a
    minute); without
    those samples, the median rate against the arm's best (or the bench's start) ceiling."""
    low = row.get("dtype") in ("bfloat16", "float16")
    around = row.get("window_ceilings") or []
    out = {}
    for name, key in (("frac_ceiling", None), ("frac_bf16_ceiling", "mm_bf16_flops")):
        key = key or ("mm_bf16_flops" if low and "mm_bf16_flops" in here else "mm_fp32_flops")
        if key not in here:
            continue
        if len(around) == len(row["windows"]) and all(key in c for p in around for c in p):
            ceilings = [max(c[key] for c in pair) for pair in around]
            out[name] = statistics.median(flop_per_image * rate / c
                                          for rate, c in zip(row["windows"], ceilings))
            if name == "frac_ceiling":
                out["window_ceiling"] = statistics.median(ceilings)
        else:
            out[name] = flop_per_image * row["img_s"] / here[key]
    return out


def check_targets(cases: dict[str, dict], targets: list[Target],
                  native_bf16: Optional[bool] = None) -> list[dict]:
    """Each target where its numbers exist; `cpu`-kind targets only on that kind (None: all)."""
    out = []
    for t in targets:
        if t.cpu not in (None, "bf16", "no_bf16"):
            raise ValueError(f"target {t.name!r}: cpu={t.cpu!r}, choose bf16 or no_bf16")
        if t.cpu is not None and native_bf16 is not None and (t.cpu == "bf16") != native_bf16:
            continue
        for cname, case in cases.items():
            if t.case not in (None, cname):
                continue
            by = {(r["arm"], r["mode"]): r for r in case["rows"] if "img_s" in r}
            row = by.get((t.arm, t.mode))
            if row is None:
                continue
            if t.metric == "ceiling_bf16":
                value = row.get("frac_bf16_ceiling")
            elif t.metric == "ceiling":
                value = row.get("frac_ceiling")
            elif t.metric == "vs_arm":
                other = by.get((t.other, t.mode))
                value = speed_ratio(row, other) if other else None
            elif t.metric == "vs_mode":
                other = by.get((t.arm, t.other))
                value = row["img_s"] / other["img_s"] if other else None
            else:
                raise ValueError(f"target metric {t.metric!r}: ceiling_bf16, ceiling, vs_arm, vs_mode")
            if value is None:
                continue
            out.append({"name": t.name, "case": cname, "arm": t.arm, "mode": t.mode,
                        "metric": t.metric, "other": t.other, "min": t.min, "value": value,
                        "met": value >= t.min})
    return out


def format_table(result: dict[str, Any]) -> str:
    """The run as printed: setting, ceilings, one line per case × arm × mode, the targets."""
    lines = []
    s, ceil = result["setting"], result["ceilings"]
    lines.append(f"fastmoco bench  {s['device']}  torch {s['torch']}  {s['threads']} threads  "
                 f"commit {s['commit']}  {s['time']}  load {s.get('load_avg_1m') or 0:.1f} at start")
    cpu = s.get("cpu")
    if cpu and s["device"].startswith("cpu"):
        lines.append(f"cpu kind {cpu['kind']} (ATen {cpu['aten_capability']}, oneDNN bf16 "
                     f"{'yes' if cpu['onednn_bf16'] else 'no'}, measured {cpu['bf16_speedup']}x fp32, "
                     f"auto runs {cpu['auto_dtype']}; flags: {cpu['flags'] or '-'}"
                     + (f"; capped by {cpu['isa_caps']}" if cpu.get("isa_caps") else "") + ")")
    if ceil:
        bf = ceil.get("mm_bf16_flops")
        lines.append(f"ceilings at start: mm {ceil['mm_n']}³ fp32 {ceil['mm_fp32_flops'] / 1e9:.1f} GFLOP/s"
                     + (f", bf16 {bf / 1e9:.1f} GFLOP/s" if bf else "")
                     + f"; copy {ceil['copy_bytes_s'] / 1e9:.1f} GB/s  (%ceil: median over windows of "
                     f"each against the mm rate measured just before and after it, so not img/s × "
                     f"FLOP ÷ ceilGF, the median of those rates; FLOPs of direct convolutions)")
    head = (f"{'mode':5} {'arm':16} {'img/s':>8} {'min-max':>13} {'×ref':>5} {'%ceil':>6} "
            f"{'%bf16':>6} {'÷model':>6} " + " ".join(f"{p[:5]:>6}" for p in PHASES)
            + f" {'ceilGF':>6} {'memMB':>7} {'dtype':8} {'CL':2} {'cmp':3} {'warm s':>6}  pipeline")
    for cname, case in result["cases"].items():
        lines.append("")
        fl = case.get("flops_per_step")
        method = case.get("method") or f"MoCo {case['version']}"
        queue = f", K {case['queue_size']}" if case["queue_size"] else ""
        lines.append(f"case {cname}: {case['backbone']} {case['image_size']} px, batch {case['batch']}, "
                     f"{method}{queue}"
                     + (f", {fl / 1e9:.1f} GFLOP/step" if fl else "")
                     + "  (phases: ms/step, the profile pass's fastmoco.* ranges)")
        for number, group in enumerate(case.get("turn_groups") or []):
            lines.append(f"model mode in turns{f' (group {number + 1})' if number else ''}: "
                         f"{', '.join(group)}: one window of each a round; ×ref and targets "
                         f"between them: the median of the per-round ratios")
        lines.append(head)
        for r in case["rows"]:
            if "img_s" not in r:
                lines.append(f"{r['mode']:5} {r['arm']:16} skipped: {r.get('skipped', '')}")
                continue
            pct = lambda key: f"{100 * r[key]:5.1f}%" if key in r else f"{'-':>6}"
            ph = r.get("phases_ms", {})
            lines.append(
                f"{r['mode']:5} {r['arm']:16} {r['img_s']:8.1f} "
                f"{r['img_s_min']:6.1f}-{r['img_s_max']:<6.1f} "
                + (f"{r['x_reference']:5.2f}" if "x_reference" in r else f"{'-':>5}")
                + f" {pct('frac_ceiling')} {pct('frac_bf16_ceiling')} {pct('frac_model')} "
                + " ".join(f"{ph.get(p, 0.0):6.0f}" for p in PHASES)
                + f" {_own_ceiling(r) / 1e9:6.0f}"
                + f" {r['peak_mem_mb']:7.0f} {r['dtype'][:8]:8} {'y' if r['channels_last'] else 'n':2} "
                f"{'y' if r['compile'] else 'n':3} {r['warmup_s']:6.1f}  {r['pipeline']}")
    if result.get("targets"):
        lines.append("")
        lines.append("targets:")
        for t in result["targets"]:
            lines.append(f"  {'MET   ' if t['met'] else 'MISSED'} {t['case']}: {t['name'] or t['metric']}"
                         f" = {t['value']:.3f} (need ≥ {t['min']})")
    lines.append("")
    lines.append(f"memory: {result.get('memory_kind', '')}")
    return "\n".join(lines)


def _own_ceiling(row: dict[str, Any]) -> float:
    """The mm ceiling of the row's dtype measured beside its arm (0: none): the median of the
    per-window ceilings where the windows had their own."""
    if "window_ceiling" in row:
        return row["window_ceiling"]
    here = row.get("arm_ceilings") or {}
    if row.get("dtype") in ("bfloat16", "float16") and "mm_bf16_flops" in here:
        return here["mm_bf16_flops"]
    return here.get("mm_fp32_flops", 0.0)


def plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of images/s per arm, one panel per case and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, m, [r for r in case["rows"] if r["mode"] == m and "img_s" in r])
              for c, case in result["cases"].items() for m in MODES]
    panels = [p for p in panels if p[2]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 0.9 + sum(0.28 * len(p[2]) + 0.6 for p in panels)),
                             squeeze=False)
    for ax, (cname, mode, rows) in zip(axes[:, 0], panels):
        names = [r["arm"] for r in rows]
        vals = [r["img_s"] for r in rows]
        err = [[r["img_s"] - r["img_s_min"] for r in rows], [r["img_s_max"] - r["img_s"] for r in rows]]
        colors = ["#d62728" if n == "fastmoco" else "#7f7f7f" if n == "reference"
                  else "#2ca02c" if n.startswith("lightly") else "#1f77b4" for n in names]
        ax.barh(names, vals, xerr=err, color=colors, capsize=2)
        ax.invert_yaxis()
        ax.set_title(f"{cname} — {mode}", fontsize=9)
        ax.tick_params(labelsize=8)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=7)
    axes[-1, 0].set_xlabel(f"images/s  ({result['setting']['device']}, {result['setting']['commit']})",
                           fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


RESULT_COLUMNS = ["mode", "arm", "images/s", "min-max", "× reference", "% of mm ceiling", "dtype",
                  "peak MB"]


def result_table(case: dict[str, Any], targets: list[dict]) -> tuple[list[list], list[str]]:
    """One case as benchmarks/results/ keeps it: a row per arm and mode, the targets as notes."""
    rows = []
    for r in case["rows"]:
        if "img_s" not in r:
            rows.append([r["mode"], r["arm"], None, "skipped", None, None, None, None])
            continue
        ceiling = r.get("frac_bf16_ceiling" if r["dtype"] in ("bfloat16", "float16") else
                        "frac_ceiling", r.get("frac_ceiling"))
        rows.append([r["mode"], r["arm"], r["img_s"], f"{r['img_s_min']:.1f}-{r['img_s_max']:.1f}",
                     r.get("x_reference"), None if ceiling is None else 100 * ceiling,
                     r["dtype"], r.get("peak_mem_mb")])
    method = case.get("method") or f"MoCo {case['version']}"
    notes = [f"{case['backbone']}, {case['image_size']} px, batch {case['batch']}, {method}"
             + (f", K {case['queue_size']}" if case["queue_size"] else "")
             + ("; model mode in turns: × reference is the median of per-round ratios"
                if case.get("turn_groups") else "")]
    notes += [f"{'met' if t['met'] else 'MISSED'}: {t['name'] or t['metric']} = {t['value']:.3f} "
              f"(need ≥ {t['min']})" for t in targets]
    notes += [f"{r['arm']} ({r['mode']}) skipped: {r['skipped']}" for r in case["rows"]
              if "img_s" not in r]
    return rows, notes
