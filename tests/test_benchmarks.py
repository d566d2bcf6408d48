"""Smoke tests of the benchmark scripts: quick runs write their JSON, markdown and plots (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "passes.py"


def test_passes_benchmark_quick_writes_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    data = json.loads((out / "passes.json").read_text())
    assert data["meta"]["quick"] is True
    models = [r["model"] for r in data["rows"]]
    assert {"resnet", "yolov5"} <= set(models)
    generated = [r for r in data["rows"] if r["kind"] == "generated"]
    assert len(generated) == 2 and all(r["nodes"] > 0 for r in generated)
    for row in data["rows"]:
        # every step has a time or says why not
        for step in ("symbolic_trace", "deepcopy", "forward", "find", "rewrite", "quantize", "deploy", "torch.onnx",
                     "export_onnx", "prepare_qat_fx"):
            assert isinstance(row[step], (float, str)), (row["model"], step, row[step])
        assert isinstance(row["rewrite"], float), row  # the pass under test must run on every model
        # the floor the 2x target is judged against: trace + copy + one forward, and rewrite above it
        assert row["floor/trace"] > 1 and row["rewrite/floor"] > 0, row
    assert data["rows"][models.index("yolov5")]["symbolic_trace"].startswith("fails")
    assert "rewrite" in data["slopes"]

    md = (out / "passes.md").read_text()
    assert "| model |" in md and "rewrite/trace" in md and "chain-" in md and "floor of rewrite" in md
    assert "Seconds per pass" in proc.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "passes_scaling.png").stat().st_size > 0

    # re-rendering from the JSON measures nothing and writes the same files
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(out / "passes.json"), "--out", str(again)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((again / "passes.json").read_text())["rows"] == data["rows"]
    assert "Rendered from" in (again / "passes.md").read_text()


ACCURACY = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


def test_accuracy_benchmark_quick_runs_every_variant_and_resumes(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ACCURACY), "--quick", "--no-progress", "--workers", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    data = json.loads((out / "accuracy.json").read_text())
    assert data["quick"] is True
    records = data["records"]
    assert {(r["kind"], r["dataset"]) for r in records} == {(k, d) for k in ("fp", "qat") for d in ("shapes", "digits")}
    runs = [r for r in records if r["kind"] == "qat"]
    # every variant of every cell ran once; both GABFusion variants were scored before QAT and deployed
    cells = {(r["dataset"], r["bits"], r["method"]) for r in runs}
    assert sorted(r["variant"] for r in runs) == sorted(["baseline", "gab", "gab+ada"] * len(cells))
    for r in runs:
        expected = {"QAT"} if r["variant"] == "baseline" else {"QAT", "before QAT", "deployed, no fine-tune",
                                                                "deployed"}
        assert set(r["map50"]) == expected
        assert all(0.0 <= v <= 1.0 for v in r["map50"].values())
        assert ("gradients" in r) == (r["variant"] == "baseline")
    for r in (r for r in records if r["kind"] == "fp"):
        assert set(r["map50_rewritten"]) == {"default", "paper"} and r["gradients"]
    summary = data["summary"]
    assert {row["variant"] for row in summary["rows"]} == {"QAT baseline", "+ GABFusion", "+ GABFusion + ADA"}
    assert len(summary["overall"]) == 4
    assert all(" ± " in row["FP32 + GABFusion (before QAT) mAP@0.5"] or row["n"] == 1 for row in summary["fp"])
    md = (out / "accuracy.md").read_text()
    assert "| dataset | bits | method | variant |" in md and "gap closed" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "accuracy.png").stat().st_size > 0

    # a rerun finds every cell in the runs file and trains nothing
    lines = (out / "accuracy_runs.jsonl").read_text().splitlines()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "accuracy_runs.jsonl").read_text().splitlines() == lines
    assert json.loads((out / "accuracy.json").read_text())["summary"]["rows"] == summary["rows"]


def test_run_logs_of_other_settings_or_the_old_format_are_ignored(tmp_path, capsys):
    sys.path.insert(0, str(ACCURACY.parent))
    from qat_runs import Setup, Variant, fingerprint, load

    from fxfusion.demo.pipeline import DemoConfig

    setup = Setup(train=DemoConfig(img_size=64), variants=(Variant("baseline"),), seeds=(0,), datasets=("shapes",))
    good = {"kind": "qat", "dataset": "shapes", "seed": 0, "bits": 4, "method": "lsq", "variant": "baseline",
            "map50": {"QAT": 0.5}}
    good["config"] = fingerprint(setup, ("qat", "shapes", 0, 4, "lsq", "baseline"))
    other = dict(good, seed=1, config={**good["config"], "train": {**good["config"]["train"], "qat_steps": 7}})
    old = {"kind": "qat", "dataset": "shapes", "seed": 0, "bits": 4, "method": "lsq", "map50": {"baseline": 0.4},
           "config": {"img_size": 64}}  # a whole cell per record, a flat fingerprint
    log = tmp_path / "runs.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in (old, good, other)) + "\n")
    assert load(log, setup) == [good]
    assert "ignoring 2 record(s)" in capsys.readouterr().out
