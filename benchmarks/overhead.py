"""What GABFusion costs: training-step time, and the deployed model in onnxruntime.

In one run, on the YOLOv5-style zoo model (nc=3) and the demo's synthetic shapes:

1. training-step time (forward, YOLO loss, backward, SGD step) of QAT (LSQ W4A4), QAT+GABFusion
   (the Concat/C3/SPPF cats, as in the paper) and QAT+GABFusion+ADA, as ratios to QAT;
2. the deployed GABFusion model against the same model quantized without rewrite: ONNX node
   count, export time and onnxruntime latency (CPU provider, all graph optimizations);
3. the deviation deploy reports before and after a 100-step fine-tune (Adam, lr 2e-5).

Prints tables and saves ``benchmarks/results/overhead.{json,md}``. ``--quick`` shrinks
everything for a CI smoke run. It never asserts timings.

    python benchmarks/overhead.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, print_table, write_results  # noqa: E402

import fxfusion  # noqa: E402
from fxfusion.demo import ShapesDataset, YoloLoss, make_loader  # noqa: E402
from fxfusion.zoo import build  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.quick else 2)
    warnings.simplefilter("ignore")
    size, batch = (64, 4) if args.quick else (128, 8)
    reps, fine_tune = (3, 5) if args.quick else (15, 100)

    torch.manual_seed(0)
    fp = build("yolov5", nc=3)
    data = ShapesDataset("train", n=64 if args.quick else 256, img_size=size, seed=0)
    loader = make_loader(data, batch_size=batch, seed=0)
    images, targets = next(iter(loader))
    x = (images,)

    def qat(rewrite: bool) -> torch.nn.Module:
        model = fp
        if rewrite:
            model = fxfusion.rewrite(model, sites=fxfusion.find_fusions(model, x, ops=["cat"]))
        model = fxfusion.quantize(model, x, method="lsq", w_bits=4, a_bits=4)
        model.train()
        model(images)
        return model

    variants = {"QAT": qat(False), "QAT+GABFusion": qat(True)}
    variants["QAT+GABFusion+ADA"] = qat(True)
    # the FP teacher with identity GABFusion (α = 1, no norm): same outputs, same site names
    teacher = fxfusion.rewrite(fp, sites=fxfusion.find_fusions(fp, x, ops=["cat"]), alpha="fixed", alpha_init=1.0,
                               norm="none")
    ada = fxfusion.ADALoss(variants["QAT+GABFusion+ADA"], teacher)
    steps = {name: _stepper(m, YoloLoss(m), ada if name.endswith("ADA") else None, images, targets)
             for name, m in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(reps):  # interleaved rounds, so load hits every variant alike
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["QAT"])
    train_rows = [{"variant": n, "ms/step": 1000 * statistics.median(t), "vs QAT": statistics.median(t) / base}
                  for n, t in times.items()]
    print_table(train_rows, title=f"Training step, batch {batch}, {size}px, LSQ W4A4, median of {reps}")

    calib = [(b[0],) for b, _ in zip(loader, range(4))]
    deployed = fxfusion.deploy(variants["QAT+GABFusion"], calib, progress=False)
    report = deployed.fxfusion_reports["deploy"]
    before = dict(report.output_deviation)
    after = _fine_tune_deviation(deployed, variants["QAT+GABFusion"], loader, calib, fine_tune)

    one = (images[:1],)
    ort_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("quantized, no rewrite", variants["QAT"]), ("GABFusion, deployed", deployed)):
            model.eval()
            path = str(Path(tmp) / "m.onnx")
            t = time.perf_counter()
            fxfusion.export_onnx(model, one, path)
            export_s = time.perf_counter() - t
            nodes = len(onnx.load(path).graph.node)
            ort_rows.append({"model": name, "onnx nodes": nodes, "export s": export_s,
                             "ort ms": _latency(path, one[0], reps * 4)})
    base_ms = ort_rows[0]["ort ms"]
    for r in ort_rows:
        r["latency vs no rewrite"] = r["ort ms"] / base_ms
    print_table(ort_rows, title="onnxruntime (CPU, ORT_ENABLE_ALL), batch 1")
    dev_rows = [{"when": "after deploy", "max": before["max_vs_undeployed"], "mean": before["mean_vs_undeployed"]},
                {"when": f"after {fine_tune}-step fine-tune", "max": after["max"], "mean": after["mean"]}]
    print_table(dev_rows, title="Deployed vs un-deployed QAT model outputs (calibration batches)")

    payload = {"environment": environment(), "quick": args.quick, "training": train_rows, "onnxruntime": ort_rows,
               "deviation": dev_rows, "deploy_report": report.to_dict()}
    md = "\n\n".join([
        "# Overhead of GABFusion (YOLOv5-style zoo model)",
        markdown_table(train_rows), markdown_table(ort_rows), markdown_table(dev_rows)])
    write_results(args.out, "overhead", payload, md)
    return payload


def _stepper(model, loss_fn, ada, images, targets):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        model.train()
        out = model(images)
        loss, _ = loss_fn(out, targets)
        if ada is not None:
            loss = loss + ada(images)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _fine_tune_deviation(deployed, reference, loader, calib, steps: int) -> dict:
    loss_fn = YoloLoss(deployed)
    opt = torch.optim.Adam(deployed.parameters(), lr=2e-5)
    deployed.train()
    it = iter(loader)
    for _ in range(steps):
        try:
            images, targets = next(it)
        except StopIteration:
            it = iter(loader)
            images, targets = next(it)
        loss, _ = loss_fn(deployed(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    deployed.eval()
    reference.eval()
    diffs = []
    with torch.no_grad():
        for (b,) in calib:
            diffs.append((deployed(b)[0] - reference(b)[0]).abs())
    d = torch.cat([t.flatten() for t in diffs])
    return {"max": float(d.max()), "mean": float(d.mean())}


def _latency(path: str, x: torch.Tensor, runs: int) -> float:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
