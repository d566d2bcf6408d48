"""Tests of the ``fxfusion`` command line: inspect, demo --quick, and one-line argument errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch

import fxfusion
from fxfusion import zoo
from fxfusion.cli import main

_REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}


# --- inspect -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["yolov5", "fxfusion.zoo:yolov5", "fxfusion.zoo.yolov5:yolov5_tiny"])
def test_inspect_prints_sites_untraceable_and_plan(spec, capsys):
    assert main(["inspect", spec, "--input-shape", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    expected = zoo.ZOO["yolov5"].expected_sites
    assert f"Fusion sites ({expected})" in out
    assert "Untraceable modules (2)" in out and "model.24  Detect" in out
    # the plan is what the default rewrite does on the same input (only sites deploy folds exactly)
    model = zoo.build("yolov5")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placed = len(fxfusion.rewrite(model, x).fxfusion_reports["rewrite"].placed)
    assert 0 < placed < expected  # the bottleneck adds after SiLU do not fold exactly
    assert f"would place {placed} GABFusion module(s)" in out
    assert re.search(r"^model\.12\.gabfusion0 +cat #0 in model\.12 \(Concat\) +2 +1 +64 +placed$", out, re.M)


def test_inspect_json_ops_filter(capsys):
    assert main(["inspect", "yolov5", "--ops", "cat", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_shape"] == list(zoo.ZOO["yolov5"].input_shape)
    assert {s["kind"] for s in report["sites"]} == {"cat"}
    assert len(report["sites"]) == 13  # 8 C3 cats, the SPPF cat, 4 neck Concats (adds filtered out)
    assert [p["gabfusion module"] for p in report["plan"]] == [s["name"] for s in report["sites"]]
    assert all(p["status"] == "placed" for p in report["plan"])
    assert sum("filtered out by ops=" in r["reason"] for r in report["refused"]) == 7


def test_inspect_model_without_sites(capsys, tmp_path, monkeypatch):
    (tmp_path / "plain_models.py").write_text(
        "import torch\n"
        "def mlp():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "plain_models:mlp", "--input-shape", "2,8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sites"] == [] and report["plan"] == []


def test_python_m_fxfusion_inspect_json():
    proc = subprocess.run([sys.executable, "-m", "fxfusion", "--threads", "1", "inspect", "yolov5", "--json"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["class"] == "YOLOv5"
    assert len(report["sites"]) == zoo.ZOO["yolov5"].expected_sites
    assert {u["path"] for u in report["untraceable"]} == {"<root>", "model.24"}


# --- bad arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["demo", "--method", "xnor"], "invalid choice: 'xnor'"),
    (["demo", "--bits", "9"], "9 is outside 2..8"),
    (["demo", "--bits", "four"], "bits must be an int"),
    (["inspect", "no_such_module_xyz:build"], "cannot import 'no_such_module_xyz'"),
    (["inspect", "fxfusion.zoo:no_such_factory"], "has no attribute 'no_such_factory'"),
    (["inspect", "fxfusion.zoo:ZOO"], "not a callable"),
    (["inspect", "fxfusion.report:to_jsonable"], "calling fxfusion.report:to_jsonable() failed"),
    (["inspect", "fxfusion.cli:_default_threads"], "returned int, not a torch.nn.Module"),
    (["inspect", "not-a-zoo-name"], "neither a zoo name"),
    (["inspect", "yolov5", "--input-shape", "1,3,x"], "not a comma-separated list of ints"),
    (["inspect", "yolov5", "--input-shape", "1,3,64"], "failed on the example inputs"),
    (["inspect", "yolov5", "--ops", "mul"], "choose from"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        status = main(argv)
        raise SystemExit(status)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fxfusion: error: ") and says in lines[0], lines[0]
    assert captured.out == ""


def test_demo_out_that_is_a_file_is_an_argument_error(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["demo", "--quick", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxfusion: error: ") and "not a directory" in err


def test_bad_argument_in_a_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fxfusion", "demo", "--bits", "9"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fxfusion: error: ")
    assert "Traceback" not in proc.stderr


# --- demo --quick ------------------------------------------------------------------------------

def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--threads", "1", "demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for phase in range(1, 7):
        assert f"[{phase}/6]" in printed
    assert "QAT + GABFusion + ADA (lsq W4A4)" in printed and "deployed (ONNX Runtime)" in printed

    for name in ("model.onnx", "report.json", "gradient_balance.png", "detections.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    assert not [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "LayerNormalization"]

    report = json.loads((out / "report.json").read_text())
    assert report["verify"]["passed"] is True
    expected = {"FP32", "QAT baseline (lsq W4A4)", "QAT + GABFusion + ADA (lsq W4A4)", "deployed (PyTorch)",
                "deployed (ONNX Runtime)"}
    assert expected <= set(report["map50"])
    for value in [*report["map50"].values(), *report["map50_95"].values()]:
        assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0
    assert report["deploy"] and report["export"]["opset"] == 21
    assert {r["model"] for r in report["gradient_balance"]} == {"QAT baseline", "GABFusion"}
    assert len(report["placement"]["ada"]["sites"]) == 4
    assert report["timings_s"]["total"] > 0
