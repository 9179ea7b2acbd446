"""docs/results.md from benchmarks/results/*.json: one table per benchmark, case and machine kind.

    python benchmarks/make_results.py            # write docs/results.md
    python benchmarks/make_results.py --check    # exit 1 if docs/results.md differs (CI)

The JSON files are written by the benchmarks (fastmoco.bench.results.write_result); this script
only reads them, so the document never holds a figure that no file holds.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "results.md"
COMMAND = "python benchmarks/make_results.py"
FIELDS = ("name", "case", "machine", "commit", "command", "columns", "rows", "notes")

HEADER = f"""# Results

Generated from `benchmarks/results/*.json` by `{COMMAND}`: do not edit it by
hand; run that command after a benchmark writes its JSON (`--check` fails while they differ).

One section per benchmark, one subsection per case, one table per kind of machine (its CPU kind,
or its GPU): the newest figures for each, with the machine, the commit they were measured at and
the command that measures them again. Each table lives in
`benchmarks/results/<benchmark>--<case>--<kind>.json`; older figures are in that file's git
history. A figure called **predicted** was derived, not measured.
"""


def load(results_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(machine kind from the file name, record) for every result file, checked."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        parts = path.stem.split("--")
        if len(parts) != 3:
            raise SystemExit(f"{path}: a result file is named <benchmark>--<case>--<kind>.json")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: not readable as JSON ({e})")
        missing = [k for k in FIELDS if k not in record]
        if missing:
            raise SystemExit(f"{path}: missing {', '.join(missing)}")
        found.append((parts[2], record))
    return found


def cell(value: Any) -> str:
    """A table cell: whole numbers with thousands separators, text with its pipes escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def code(text: str) -> str:
    """Inline code that survives backticks inside it."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def table(record: dict[str, Any]) -> list[str]:
    """The markdown table, numeric columns right-aligned."""
    columns, rows = record["columns"], record["rows"]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and bool(rows)
               for i in range(len(columns))]
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def machine_line(record: dict[str, Any]) -> str:
    """Machine kind, model, cores, device, torch, ISA caps; commit; command."""
    m = record["machine"]
    label = m.get("cpu_kind") if m.get("device") == "cpu" else m.get("device")
    caps = " ".join(f"{k}={v}" for k, v in sorted((m.get("isa_caps") or {}).items()))
    where = (f"{m.get('cpu_model', 'unknown')}, kind {m.get('cpu_kind', 'unknown')}, "
             f"{m.get('cores', '?')} cores, device {m.get('device', '?')}, "
             f"torch {m.get('torch', '?')}" + (f", capped by {caps}" if caps else ""))
    return f"**{label}**: {where}; commit {code(record['commit'])}; {code(record['command'])}"


def render(results_dir: Path) -> str:
    """The whole document, sorted by benchmark, case and machine kind."""
    grouped: dict[str, dict[str, list[tuple[str, dict]]]] = defaultdict(lambda: defaultdict(list))
    for kind, record in load(results_dir):
        grouped[record["name"]][record["case"]].append((kind, record))
    lines = [HEADER]
    if not grouped:
        lines += ["No results yet.", ""]
    for name in sorted(grouped):
        lines += [f"## {name}", ""]
        for case in sorted(grouped[name]):
            lines += [f"### {case}", ""]
            for _, record in sorted(grouped[name][case], key=lambda kr: kr[0]):
                lines += [machine_line(record), ""] + table(record) + [""]
                if record["notes"]:
                    lines += [f"- {note}" for note in record["notes"]] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the document, or with --check say whether it is current (exit 1 if not)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the document is not current")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=DOC)
    args = ap.parse_args(argv)
    text = render(args.results_dir)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(args.out),
                                    "generated", lineterm="", n=1)
        print(f"{args.out} is not what {args.results_dir}/*.json generate; run {COMMAND}",
              *list(diff)[:40], sep="\n", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} from {len(list(args.results_dir.glob('*.json')))} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
