"""Extra training-step time of ADA / Q-ADA over plain QAT, as a ratio, measured in one run.

One training step = student forward + task loss [+ ADALoss: teacher forward under no_grad,
attention, divergence] + backward + SGD step. Every variant trains its own copy of the same
rewritten, 4-bit LSQ-quantized zoo model (the teacher is the rewritten float model). The
variants are timed in interleaved rounds, so machine noise hits them alike; the table shows the
median step time and the ratio to QAT alone. The task loss is the demo's YOLOv5 loss on fixed
synthetic boxes (any model with a Detect head), else the mean square of the outputs.

Usage::

    python benchmarks/ada_overhead.py                      # yolov5 zoo model, 128 px, batch 8
    python benchmarks/ada_overhead.py --model unet --out /tmp/ada_overhead.json

This script prints and saves a table; it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import fxfusion
from fxfusion import zoo
from fxfusion.ada import ADALoss

VARIANTS: dict[str, dict | None] = {
    "QAT": None,
    "QAT + ADA (SimAM, KL)": {"attention": "simam", "divergence": "kl"},
    "QAT + ADA (SimAM, JS)": {"attention": "simam", "divergence": "js"},
    "QAT + Q-ADA (auto quantizers, KL)": {"attention": "q-ada", "divergence": "kl", "quantizers": "auto"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="yolov5", choices=sorted(zoo.ZOO))
    p.add_argument("--size", type=int, default=128, help="input height and width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results/ada_overhead.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shape = list(zoo.ZOO[args.model].input_shape)
    shape[0] = args.batch
    if len(shape) == 4:
        shape[2:] = [args.size, args.size]
    x = torch.randn(shape)
    float_model = fxfusion.rewrite(zoo.build(args.model), x)
    qat = fxfusion.quantize(float_model, x, method="lsq", w_bits=4, a_bits=4)
    task = _task_loss(qat, x)

    runs = {}
    for name, cfg in VARIANTS.items():
        student = copy.deepcopy(qat).train()
        ada = None
        if cfg is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Q-ADA lists the sites without a quantizer
                ada = ADALoss(student, copy.deepcopy(float_model), weight=0.01, **cfg)
        opt = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)
        runs[name] = _stepper(student, ada, opt, task, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs[name]()  # warm-up (allocator, Q-ADA quantizer discovery)
            runs[name]()

    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, step in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps)

    base = statistics.median(times["QAT"])
    rows = [{"variant": n, "median_step_ms": 1e3 * statistics.median(t), "ratio": statistics.median(t) / base,
             "min_step_ms": 1e3 * min(t)} for n, t in times.items()]
    sites = len(ADALoss(copy.deepcopy(qat), copy.deepcopy(float_model)).sites)
    meta = {"model": args.model, "input": list(x.shape), "sites": sites, "quantizer": "lsq W4A4",
            "steps": args.steps, "rounds": args.rounds, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    print(_table(rows, meta))  # noqa: T201 - a benchmark prints its table
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def _stepper(student: nn.Module, ada: ADALoss | None, opt: torch.optim.Optimizer,
             task: Callable[[nn.Module, object], Tensor], x: Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = student(x)
        loss = task(student, out)
        if ada is not None:
            loss = loss + ada(x)
        loss.backward()
        opt.step()

    return step


def _task_loss(model: nn.Module, x: Tensor) -> Callable[[nn.Module, object], Tensor]:
    try:
        from fxfusion.demo.loss import YoloLoss

        yolo = YoloLoss(model)
    except (ImportError, ValueError, AttributeError, TypeError):
        return lambda m, out: sum(o.float().pow(2).mean() for o in _tensors(out))
    g = torch.Generator().manual_seed(1)
    n = 4 * x.shape[0]
    boxes = torch.rand(n, 4, generator=g) * torch.tensor([0.6, 0.6, 0.3, 0.3]) + torch.tensor([0.2, 0.2, 0.05, 0.05])
    targets = torch.cat([torch.arange(n).remainder(x.shape[0])[:, None].float(),
                         torch.randint(0, yolo.nc, (n, 1), generator=g).float(), boxes], 1)
    return lambda m, out: yolo(out, targets)[0]


def _tensors(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _table(rows: list[dict], meta: dict) -> str:
    head = f"ADA overhead: {meta['model']} {meta['input']}, {meta['sites']} sites, {meta['quantizer']}, " \
           f"{meta['threads']} threads, median of {meta['rounds']} rounds x {meta['steps']} steps"
    w = max(len(r["variant"]) for r in rows)
    lines = [head, f"{'variant'.ljust(w)}  {'step ms':>9}  {'vs QAT':>7}"]
    lines += [f"{r['variant'].ljust(w)}  {r['median_step_ms']:9.1f}  {r['ratio']:6.2f}x" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
