"""Benchmark results as JSON (fastmoco.bench.results) and docs/results.md made from them."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from fastmoco.bench import results

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["arm", "img/s", "× ref"]


def make_results():
    """benchmarks/make_results.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_results",
                                                  ROOT / "benchmarks" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_machine(device_type: str = "cpu") -> dict:
    """What machine() says on a GPU machine."""
    return {"device": "NVIDIA H100 80GB HBM3", "cpu_model": "AMD EPYC 9654",
            "cpu_kind": "AVX512-BF16", "cores": 16, "torch": "2.14.1", "isa_caps": {}}


def test_same_case_replaces_other_case_adds(tmp_path):
    first = results.write_result("bench", "r18_cifar", COLUMNS, [["fastmoco", 35.0, 1.5]],
                                 command="fastmoco bench", out_dir=tmp_path)
    second = results.write_result("bench", "r18_cifar", COLUMNS, [["fastmoco", 38.123456, 1.8549]],
                                  command="fastmoco bench again", notes=["quiet"], out_dir=tmp_path,
                                  extra={"ceiling_gflops": 184.4444})
    other = results.write_result("bench", "r18_cifar_v3", COLUMNS, [["fastmoco", 16.4, 2.41]],
                                 command="fastmoco bench", out_dir=tmp_path)
    assert first == second != other
    assert sorted(p.name for p in tmp_path.iterdir()) == [second.name, other.name]
    kind = results.machine()["cpu_kind"].lower()
    assert second.name == f"bench--r18_cifar--{kind}.json"
    record = json.loads(second.read_text())
    assert list(record) == ["name", "case", "machine", "commit", "command", "columns", "rows",
                            "notes", "extra"]
    assert (record["name"], record["case"], record["command"]) == ("bench", "r18_cifar",
                                                                   "fastmoco bench again")
    assert record["rows"] == [["fastmoco", 38.12, 1.855]] and record["columns"] == COLUMNS
    assert record["notes"] == ["quiet"] and record["extra"] == {"ceiling_gflops": 184.4}
    assert set(record["machine"]) == {"device", "cpu_model", "cpu_kind", "cores", "torch",
                                      "isa_caps"}
    assert record["machine"]["device"] == "cpu"
    assert record["commit"] == results.commit()
    assert re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?|unknown", record["commit"])


def test_row_width_must_match_columns(tmp_path):
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        results.write_result("bench", "c", COLUMNS, [["fastmoco", 1.0]], command="x",
                             out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_gpu_kind_is_the_device_name(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "machine", gpu_machine)
    path = results.write_result("bench", "r50", COLUMNS, [], command="x", device_type="cuda",
                                out_dir=tmp_path)
    assert path.name == "bench--r50--nvidia-h100-80gb-hbm3.json"


def test_machine_keeps_the_isa_caps(monkeypatch):
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    info = results.machine()
    assert info["isa_caps"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    assert info["cpu_kind"] in {"AMX", "AVX512-BF16", "AVX512", "AVX2", "DEFAULT"}


@pytest.mark.parametrize("argv, command", [
    (["/work/.venv/bin/fastmoco", "bench", "bench.cases=[r18_cifar]"],
     "fastmoco bench 'bench.cases=[r18_cifar]'"),
    # fastmoco.cli.main names the subcommand in argv[0] before hydra parses the rest
    (["fastmoco bench", "bench.cases=[r18_cifar]"], "fastmoco bench 'bench.cases=[r18_cifar]'"),
    (["benchmarks/kernels.py", "--only", "infonce"], "python benchmarks/kernels.py --only infonce"),
])
def test_default_command(monkeypatch, argv, command):
    monkeypatch.setattr(sys, "argv", argv)
    assert results.default_command() == command


def test_document_from_results(tmp_path, monkeypatch, capsys):
    gen = make_results()
    res, doc = tmp_path / "results", tmp_path / "results.md"
    results.write_result("bench", "r18_cifar", COLUMNS,
                         [["reference", 18.7, 1.0], ["fastmoco", 35.5, 1.85]],
                         command="fastmoco bench 'bench.cases=[r18_cifar]'", notes=["in turns"],
                         out_dir=res)
    results.write_result("bench", "r50", COLUMNS, [["fastmoco", 14.5, 4.7]],
                         command="fastmoco bench r50", out_dir=res)
    results.write_result("kernels", "infonce", ["K", "eager s"], [[1048576, 10.63]],
                         command="python benchmarks/kernels.py", out_dir=res)
    cpu_kind = results.machine()["cpu_kind"]
    monkeypatch.setattr(results, "machine", gpu_machine)
    results.write_result("bench", "r18_cifar", COLUMNS, [["fastmoco", 900.0, 6.0]],
                         command="fastmoco bench gpu", device_type="cuda", out_dir=res)
    args = ["--results-dir", str(res), "--out", str(doc)]
    assert gen.main(args) == 0
    text = doc.read_text()
    assert text.startswith("# Results") and "do not edit" in text and gen.COMMAND in text
    assert re.findall(r"^### .*$", text, re.M) == ["### r18_cifar", "### r50", "### infonce"]
    assert text.index("## bench") < text.index("## kernels")
    assert len(re.findall(r"^\|---", text, re.M)) == 4  # one table per case and machine kind
    commit = results.commit()
    assert text.count(f"commit `{commit}`") == 4
    assert "`fastmoco bench 'bench.cases=[r18_cifar]'`" in text and "- in turns" in text
    assert "**NVIDIA H100 80GB HBM3**" in text and "| fastmoco | 35.5 | 1.85 |" in text
    assert "| 1,048,576 | 10.63 |" in text
    assert text.index(f"**{cpu_kind}**") < text.index("**NVIDIA")  # kinds sorted by name
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text)  # no dates

    assert gen.main(["--check", *args]) == 0
    doc.write_text(text.replace("35.5", "36.0"))  # a hand edit
    assert gen.main(["--check", *args]) == 1
    assert "is not what" in capsys.readouterr().err
    assert gen.main(args) == 0 and gen.main(["--check", *args]) == 0


def test_committed_document_is_current():
    assert make_results().main(["--check"]) == 0, "run: python benchmarks/make_results.py"


def test_demo_result_reads_a_runs_log_and_summary(tmp_path):
    """benchmarks/demo_result.py takes the size the autosizer took, its predicted steps, the steps
    run and the probe and kNN gains from a make-train run directory."""
    spec = importlib.util.spec_from_file_location("demo_result", ROOT / "benchmarks" / "demo_result.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    run = tmp_path / "run"
    run.mkdir()
    (run / "cli.log").write_text(
        "[2026-01-01 10:00:00,000][fastmoco.training.autosize][INFO] - size 1/2 (a=1): 0.300 s a "
        "step with its data -> about 1500 steps in 7.5 min (takes it from 1724)\n"
        "[2026-01-01 10:00:05,000][fastmoco.training.autosize][INFO] - size 2/2 (a=2): 0.150 s a "
        "step with its data -> about 3000 steps in 7.5 min (takes it from 1724)\n"
        "[2026-01-01 10:00:05,000][fastmoco.training.autosize][INFO] - sized by measurement: a=2\n"
        "[2026-01-01 10:09:00,000][fastmoco][INFO] - checkpoint done\n")
    summary = {"step": 2900, "probe_init": 30.0, "probe_final": 45.5, "knn_init": 28.0,
               "knn_final": 40.0}
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n"
                                       + json.dumps({"summary": summary}) + "\n")
    assert demo.run_row(run) == ["a=2", 3000, 2900, 30.0, 45.5, 15.5, 28.0, 40.0, 12.0, 9.0]
