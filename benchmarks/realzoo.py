"""Real models end to end: torchvision, timm and ultralytics (each when installed), every stage.

Per model (random weights, BatchNorm statistics from one batch, 64-96 px):

1. ``find_fusions``: sites found, candidates refused (by reason), untraceable modules;
2. ``rewrite`` with the defaults: sites placed (those deploy folds exactly), sites not placed and
   why, and the rewritten model's largest output difference from the original (gate closed);
3. ``quantize`` LSQ W4A4 and two SGD steps *with every gate open* (``set_gate(model, 1)``), so
   that deploy has to fold every placed site rather than give it back as the original op;
4. ``deploy``: sites left as explicit ops (the topology promise: none), output deviation;
5. ``export_onnx``: ONNX nodes against the same model quantized without rewrite (promise: no more);
6. ``verify_onnx``: onnxruntime against the deployed PyTorch model at both optimization levels,
   worst ``max |err| / output range`` (promise: <= 1e-2).

Stages 3-6 then run again with power-of-two scales (``quantize(..., pow2=True)``, the ``pow2:``
columns): is the export bit-exact in onnxruntime, and if not, within the bound? (Its node count
is larger by one per BatchNorm that folds into no conv: deploy writes it as a Mul and an Add.)

Each model's record is written to ``results/realzoo/<model>.json`` as soon as it is done, so a
second session continues where the first stopped (``--force`` redoes a model). The table is then
rebuilt from every record.

torchvision and timm must import beside the installed torch. On this project's CPU machine the
PyPI torchvision does not load with the pinned CPU torch 2.13.0; a separate venv with
``pip install torch==2.14.1 torchvision==0.29.1 timm`` and ``pip install -e .`` works:

    python benchmarks/realzoo.py [model ...] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_third_party, environment, markdown_table, print_table, write_results  # noqa: E402

import fxfusion  # noqa: E402
from fxfusion.deployed import DeployedFusion  # noqa: E402
from fxfusion.gabfusion import GABFusion, set_gate  # noqa: E402
from fxfusion.passes.runtime import tensors  # noqa: E402
from fxfusion.zoo.common import bn_stats_from  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECORDS = RESULTS / "realzoo"
# (source, name, pixels); small inputs keep every model within a minute or so on one core
MODELS = [
    ("tv", "resnet18", 64), ("tv", "resnet50", 64), ("tv", "resnext50_32x4d", 64), ("tv", "densenet121", 64),
    ("tv", "mobilenet_v2", 64), ("tv", "mobilenet_v3_small", 64), ("tv", "googlenet", 64),
    ("tv", "inception_v3", 96), ("tv", "regnet_x_400mf", 64), ("tv", "regnet_y_400mf", 64),
    ("tv", "shufflenet_v2_x1_0", 64), ("tv", "efficientnet_b0", 64), ("tv", "mnasnet0_5", 64),
    ("tv", "squeezenet1_1", 64), ("tv", "convnext_tiny", 64), ("tv", "swin_t", 64), ("tv", "vit_b_16", 64),
    ("tv", "deeplabv3_resnet50", 64),
    ("timm", "cspresnet50", 64), ("timm", "ese_vovnet19b_dw", 64), ("timm", "dpn68", 64), ("timm", "dla34", 64),
    ("timm", "res2net50_14w_8s", 64), ("timm", "ghostnet_100", 64), ("timm", "rexnet_100", 64),
    ("timm", "hrnet_w18_small", 64), ("timm", "convnext_atto", 64),
    ("ultralytics", "yolov8n", 64), ("ultralytics", "yolo11n", 64),
]


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return tensors(model(x))


def _steps(model: torch.nn.Module, x: torch.Tensor, n: int = 2) -> None:
    """A few SGD steps on the squared outputs, gradient norm clipped: the gate opens at once here (no
    NormSchedule), and on some models (yolo11n) that makes the unclipped loss explode to NaN."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    for _ in range(n):
        opt.zero_grad()
        loss = sum(t.float().pow(2).mean() for t in tensors(model(x)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def _nodes(model: torch.nn.Module, x: torch.Tensor, path: Path) -> int:
    fxfusion.export_onnx(model, x, path)
    return len(onnx.load(str(path)).graph.node)


def run(source: str, name: str, px: int, rec: dict) -> dict:
    """Every stage on one model; ``rec`` is filled as it goes (``rec["stage"]`` names the one running)."""
    times: dict[str, float] = {}

    def timed(stage: str, fn, *args, **kwargs):
        rec["stage"] = stage
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times[stage] = round(time.perf_counter() - t0, 2)
        return out

    model = timed("build", build_third_party, source, name, px).eval()
    x = torch.randn(2, 3, px, px)
    bn_stats_from(model, [torch.randn(4, 3, px, px)])
    found = timed("find", fxfusion.find_fusions, model, x)
    rec["found"] = len(found.sites)
    rec["refused"] = dict(Counter(r.reason.split(":")[0].split(";")[0][:60] for r in found.refused))
    rec["untraceable"] = [f"{u.path} ({u.cls}): {u.reason[:80]}" for u in found.untraceable]
    rewritten = timed("rewrite", fxfusion.rewrite, model, x, sites=found)
    report = rewritten.fxfusion_reports["rewrite"]
    rec["placed"] = len(report.placed)
    rec["not placed"] = sum(1 for r in report.refused if r.reason.startswith("not placed"))
    rec["not placed why"] = sorted({r.reason.split("(", 2)[-1][:90] for r in report.refused
                                    if r.reason.startswith("not placed")})[:4]
    ref, now = _outputs(model, x), _outputs(rewritten, x)
    rec["rewrite rel dev"] = max(float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
                                 for a, b in zip(ref, now))
    baseline = fxfusion.quantize(model, x, method="lsq", w_bits=4, a_bits=4)
    torch.manual_seed(1)
    _steps(baseline, x)
    calib = [torch.randn(2, 3, px, px) for _ in range(2)]
    x_test = torch.randn(2, 3, px, px)
    base_deployed = fxfusion.deploy(baseline, calib, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        rec["baseline nodes"] = _nodes(base_deployed, x, Path(tmp) / "b.onnx")
    _quantized_stages(rewritten, x, calib, x_test, rec, timed)
    # the same stages with power-of-two scales: the export should then be bit-exact in onnxruntime
    # wherever the float ops between quantizers are exact
    pow2: dict = {}
    _quantized_stages(rewritten, x, calib, x_test, pow2, lambda stage, fn, *a, **k: fn(*a, **k), pow2=True)
    rec["pow2"] = pow2
    rec["times"] = times
    rec.pop("stage")
    rec["ok"] = (rec["explicit after deploy"] == 0 and rec["onnx nodes"] <= rec["baseline nodes"]
                 and rec["ort err / range"] <= 1e-2 and rec["rewrite rel dev"] <= 1e-5)
    return rec


def _quantized_stages(rewritten, x, calib, x_test, rec: dict, timed, pow2: bool = False) -> None:
    """Stages 3-6 on a copy of the rewritten model: quantize (LSQ W4A4), QAT steps with every gate
    open, deploy, export, verify; fills ``rec``."""
    q = timed("quantize", fxfusion.quantize, rewritten, x, method="lsq", w_bits=4, a_bits=4, pow2=pow2)
    set_gate(q, 1.0)
    torch.manual_seed(1)
    timed("qat", _steps, q, x)
    deployed = timed("deploy", fxfusion.deploy, q, calib, progress=False)
    dep = deployed.fxfusion_reports["deploy"]
    rec["explicit after deploy"] = sum(1 for m in deployed.modules() if isinstance(m, (GABFusion, DeployedFusion))
                                       and not getattr(m, "is_bare", False))
    rec["deploy max dev"] = dep.output_deviation.get("max_vs_undeployed")
    with tempfile.TemporaryDirectory() as tmp:
        rec["onnx nodes"] = timed("export", _nodes, deployed, x, Path(tmp) / "m.onnx")
        verify = timed("verify", fxfusion.verify_onnx, deployed, Path(tmp) / "m.onnx", x_test)
    rec["ort err / range"] = max((c.max_abs_error / c.output_range if c.output_range > 0 else c.max_abs_error)
                                 for c in verify.checks)
    rec["bit exact"] = verify.max_abs_error == 0.0
    rec["verify passed"] = verify.passed
    # when the bound fails: is every op right (quantizers exact on their own inputs, float segments
    # equal once the codes are held equal), i.e. rounding ties that the two runtimes break differently?
    rec["ties only"] = verify.tie_flips_only


def _available(source: str) -> bool:
    module = {"tv": "torchvision", "timm": "timm", "ultralytics": "ultralytics"}[source]
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _row(rec: dict) -> dict:
    if "error" in rec:
        return {"model": rec["model"], "ok": "FAIL", "found": rec.get("found", ""),
                "error": f"at {rec.get('stage', '?')}: {rec['error'][:110]}"}
    return {"model": rec["model"], "ok": "yes" if rec["ok"] else "NO", "found": rec["found"], "placed": rec["placed"],
            "not placed": rec["not placed"], "rewrite dev": f"{rec['rewrite rel dev']:.1e}",
            "explicit": rec["explicit after deploy"], "onnx nodes": f"{rec['onnx nodes']} / {rec['baseline nodes']}",
            "ort err/range": f"{rec['ort err / range']:.1e}",
            "ort cause": _cause(rec),
            "pow2: onnx nodes": rec["pow2"]["onnx nodes"] if "pow2" in rec else "",
            "pow2: ort err/range": f"{rec['pow2']['ort err / range']:.1e}" if "pow2" in rec else "",
            "pow2: bit exact": ("yes" if rec["pow2"]["bit exact"] else "no") if "pow2" in rec else "",
            "pow2: cause": _cause(rec["pow2"]) if "pow2" in rec else "",
            "s": round(sum(rec["times"].values()), 1)}


def _cause(rec: dict) -> str:
    if rec["ort err / range"] <= 1e-2:
        return ""
    return "tie flips (every op exact)" if rec.get("ties only") else "NOT explained"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--force", action="store_true", help="redo models that already have a record")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    records_dir = args.out / "realzoo"
    records_dir.mkdir(parents=True, exist_ok=True)
    chosen = [m for m in MODELS if (not args.models or m[1] in args.models) and _available(m[0])]
    for source, name, px in chosen:
        path = records_dir / f"{name}.json"
        if path.exists() and not args.force:
            continue
        rec: dict = {"model": name, "source": source, "px": px}
        try:
            run(source, name, px, rec)
        except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end of the table
            rec.update({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        path.write_text(json.dumps(rec, indent=1, default=str))
        print(_row(rec), flush=True)  # noqa: T201
    records = [json.loads((records_dir / f"{n}.json").read_text()) for _, n, _ in MODELS
               if (records_dir / f"{n}.json").exists()]
    rows = [_row(r) for r in records]
    print_table(rows, title="Real models end to end")
    passed = sum(1 for r in rows if r["ok"] == "yes")
    pow2 = [r["pow2"] for r in records if "pow2" in r]
    summary = (f"{passed} of {len(rows)} models pass every stage with free float scales. With power-of-two "
               f"scales (`pow2=True`), onnxruntime is within 1e-2 of the range on "
               f"{sum(p['ort err / range'] <= 1e-2 for p in pow2)} of {len(pow2)}, and bit-exact on "
               f"{sum(p['bit exact'] for p in pow2)}.")
    md = "\n\n".join(["# Real models end to end (`benchmarks/realzoo.py`)", __doc__.split("\n\n")[1],
                      summary, markdown_table(rows)])
    write_results(args.out, "realzoo", {"environment": environment(), "records": records}, md)
    return rows


if __name__ == "__main__":
    main()
