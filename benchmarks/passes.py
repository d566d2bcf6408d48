"""Wall time of every fxfusion pass, against torch.fx.symbolic_trace and torch.ao's prepare_qat_fx.

Measured in one run, one torch thread, in interleaved rounds (a round runs every step once, in
flow order, each step on what the previous one returned), median over the rounds:

- ``symbolic_trace``: ``torch.fx.symbolic_trace(model)``, the lower bound for any fx pass. When the
  whole model does not trace (the YOLO zoo models), it is reported as failing and
  ``trace_units`` (fxfusion's front end: the largest traceable submodules) is the trace reference;
  the ``trace ref`` column says which one a row uses.
- ``find``: ``fxfusion.find_fusions(model, x)``.
- ``rewrite``: ``fxfusion.rewrite(model, x)`` (runs its own find); ``rewrite(sites)`` is
  ``fxfusion.rewrite(model, sites=<find's report>)``, the editing part alone.
- ``quantize``: ``fxfusion.quantize(rewritten, x)`` (LSQ W4A4).
- ``deploy``: ``fxfusion.deploy(quantized, 2 calibration batches, progress=False)`` after one
  untimed training-mode forward that initialises the quantizers.
- ``export_onnx``: ``fxfusion.export_onnx(deployed, x, <temp file>)``; ``torch.onnx``: the
  TorchScript exporter that it calls, alone, on the float model (same topology).
- ``deepcopy``, ``forward``: ``copy.deepcopy(model)`` and one no-grad eval forward, the least that
  ``rewrite(model, x)`` must do (it returns a copy and calibrates its sites on the example input);
  with the trace they make the ``floor`` that the 2x target is judged against.
- ``prepare_qat_fx``: ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` on (an untimed deep
  copy of) the float model with ``get_default_qat_qconfig_mapping("x86")``, the peer pass.

Models: every zoo model, and generated chain-and-branch models of about 100, 1,000, 5,000 and
10,000 fx nodes (blocks of two 1x1-conv branches joined by cat + 1x1 conv, or by add, alternating,
then ReLU). On the generated models a step that fails, or whose time projected linearly to the
next size exceeds ``--max-pass-seconds``, is not run on the larger ones (the table says so). The target
(rewrite <= 2x trace, growing linearly with the node count) is checked and printed; when it does
not hold, the rewrite of the ~5,000-node model is profiled with cProfile and the hotspots saved.

Usage::

    python benchmarks/passes.py                    # full run (10-15 min), writes benchmarks/results/passes.*
    python benchmarks/passes.py --quick --out /tmp/bench   # CI smoke: 2 zoo models, 100/1,000 nodes, 1 round

Writes ``passes.json``, ``passes.md`` and ``passes_scaling.png`` under ``--out``. This script
prints and saves tables; it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import importlib.util
import io
import json
import os
import pstats
import re
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from common import (  # a sibling file: run this script as ``python benchmarks/passes.py``
    Stopwatch,
    Timing,
    build_model,
    environment,
    fit_loglog_slope,
    markdown_table,
    print_table,
    run_rounds,
    write_results,
)
from torch import Tensor, nn

import fxfusion
from fxfusion import zoo
from fxfusion.passes.export import _LEGACY_MAX_OPSET
from fxfusion.passes.trace import trace_units
from fxfusion.report import write_atomic

try:  # torch.ao.quantization is deprecated upstream (torchao); the peer column is skipped without it
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
except ImportError:  # pragma: no cover - depends on the torch build
    get_default_qat_qconfig_mapping = prepare_qat_fx = None

STEPS = ("symbolic_trace", "trace_units", "deepcopy", "forward", "find", "rewrite", "rewrite(sites)", "quantize",
         "deploy", "torch.onnx", "export_onnx", "prepare_qat_fx")
PLOTTED = ("symbolic_trace", "find", "rewrite", "quantize", "prepare_qat_fx")
SIZES = (100, 1_000, 5_000, 10_000)
QUICK_ZOO = ("resnet", "yolov5")  # one model that traces whole, one that does not
# torchvision models (random weights, eval mode, batch 2) at the input size they accept, when installed
TORCHVISION = {"resnet18": 64, "mobilenet_v2": 64, "densenet121": 64, "googlenet": 64, "inception_v3": 96,
               "regnet_x_400mf": 64}
TARGET_RATIO = 2.0  # rewrite <= 2x trace (the target)
LINEAR_SLOPE = 1.15  # a log-log slope up to this counts as roughly linear
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"CI smoke: zoo {', '.join(QUICK_ZOO)}, "
                   "the 100- and 1,000-node models, 1 round, no warm-up")
    p.add_argument("--out", default=str(RESULTS), help="directory for passes.json/.md/_scaling.png")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds for models under 1,000 nodes (at most 3 up to 8,000 nodes, 1 above)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 for stable numbers)")
    p.add_argument("--max-pass-seconds", type=float, default=None,
                   help="on generated models, a step whose time, projected linearly to the next size, exceeds "
                   "this is not run there (default 120; 5 with --quick)")
    p.add_argument("--repeat-under", type=float, default=60.0,
                   help="a step whose output nothing else uses is not repeated once one round took longer")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="cProfile the rewrite of the ~5,000-node model (auto: when the target fails)")
    p.add_argument("--profile-nodes", type=int, default=5_000)
    p.add_argument("--no-torchvision", action="store_true",
                   help=f"leave out the torchvision models ({', '.join(TORCHVISION)}); they run when "
                   "torchvision is installed, and never with --quick")
    p.add_argument("--from-json", metavar="PATH",
                   help="measure nothing: re-render the tables, verdict and plot from a passes.json")
    args = p.parse_args(argv)
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        timings = {m: {k: Timing(**{f: t[f] for f in ("seconds", "cpu_seconds", "error", "skipped")})
                       for k, t in steps.items()} for m, steps in payload["timings"].items()}
        meta = {**payload["meta"], "rendered_from": str(args.from_json)}
        _report(payload["rows"], timings, payload.get("hotspots"), meta, Path(args.out), payload.get("exporters"))
        return
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_pass_seconds is None:
        args.max_pass_seconds = 5.0 if args.quick else 120.0
    torch.set_num_threads(args.threads)
    load_before = _load_average()

    zoo_names = QUICK_ZOO if args.quick else tuple(zoo.ZOO)
    sizes = SIZES[:2] if args.quick else SIZES
    rows, timings = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the passes' warnings are not part of the measured work
        benches = [lambda name=name: _zoo_bench(name) for name in zoo_names]
        if not (args.quick or args.no_torchvision) and importlib.util.find_spec("torchvision") is not None:
            benches += [lambda name=name: _torchvision_bench(name) for name in TORCHVISION]
        for make in benches:
            bench = make()
            timings[bench.name] = _measure(bench, args, skips={})
            rows.append(_row(bench, timings[bench.name]))
            _progress(rows[-1])
        skips: dict[str, str] = {}
        for i, target in enumerate(sizes):
            bench = _generated_bench(target)
            timings[bench.name] = _measure(bench, args, skips)
            rows.append(_row(bench, timings[bench.name]))
            _progress(rows[-1])
            if i + 1 < len(sizes):
                growth = sizes[i + 1] / target
                skips.update(_skips_for_larger(bench, timings[bench.name], args.max_pass_seconds, growth, skips))

    verdict = _verdict(rows, _slopes(rows, timings))
    hotspots = None
    if args.profile == "always" or (args.profile == "auto" and not args.quick and not verdict["holds"]):
        profile_nodes = max((t for t in sizes if t <= args.profile_nodes), default=sizes[0])
        gc.collect()  # free the benchmarked models (and their rewritten classes) first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hotspots = _profile_rewrite(_generated_bench(profile_nodes))

    exporters = None
    if not args.quick:
        target = max((t for t in sizes if t <= 5_000), default=sizes[0])
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exporters = _exporters(_generated_bench(target))

    meta = {**environment(), "load_average_1min": {"start": load_before, "end": _load_average()},
            "quick": args.quick, "warm_up": "1 round for models under 1,000 nodes (not --quick)",
            "max_pass_seconds": args.max_pass_seconds, "quantize": "lsq W4A4",
            "prepare_qat_fx": "get_default_qat_qconfig_mapping('x86')" if prepare_qat_fx else "unavailable"}
    _report(rows, timings, hotspots, meta, Path(args.out), exporters)


def _report(rows: list[dict], timings: dict[str, dict[str, Timing]], hotspots: dict | None, meta: dict,
            out: Path, exporters: dict | None = None) -> None:
    """Print the tables and verdict; write passes.json, passes.md and passes_scaling.png under ``out``."""
    slopes = _slopes(rows, timings)
    verdict = _verdict(rows, slopes)
    payload = {"meta": meta, "rows": rows, "timings": timings, "slopes": slopes, "target": verdict,
               "hotspots": hotspots, "exporters": exporters}

    print_table([_display(r) for r in rows], title="Seconds per pass (median); ratios use the trace reference")
    print_table(_slope_rows(slopes), title="Scaling on the generated models: slope of log(time) vs log(nodes)")
    for line in verdict["lines"]:
        print(line)  # noqa: T201 - a benchmark prints its findings
    print()  # noqa: T201
    if exporters:
        print_table(exporters["rows"], title=f"Ways out of PyTorch on {exporters['model']} (float, one run each)")
    if hotspots:
        print_table(hotspots["cumulative"], title=f"cProfile of rewrite, {hotspots['nodes']} nodes: "
                    f"top by cumulative time ({hotspots['total_s']:.2f} s under the profiler)")
        print_table(hotspots["own"], title="top by own time")
        print_table(hotspots["fxfusion"], title="fxfusion functions by cumulative time")

    written = write_results(out, "passes", payload, _markdown(rows, timings, slopes, verdict, hotspots, meta,
                                                           exporters))
    png = out / "passes_scaling.png"
    note = _plot([r for r in rows if r["kind"] == "generated"], png)
    if note:
        print(note)  # noqa: T201
    else:
        written.append(png)
    print("wrote " + ", ".join(str(w) for w in written))  # noqa: T201


# --- models ------------------------------------------------------------------------------------

@dataclass
class _Bench:
    name: str
    kind: str  # "zoo" | "torchvision" | "generated"
    model: nn.Module
    inputs: tuple[Tensor, ...]
    calib: list[tuple[Tensor, ...]]
    nodes: int
    trace_ref: str  # "symbolic_trace" or "trace_units (...)"


class CatBlock(nn.Module):
    """Two 1x1-conv branches joined by cat, a 1x1 conv back to ``channels``, ReLU (5 fx nodes)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 1)
        self.b = nn.Conv2d(channels, channels, 1)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fuse(torch.cat([self.a(x), self.b(x)], 1)))


class AddBlock(nn.Module):
    """Two 1x1-conv branches joined by add, ReLU (4 fx nodes)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 1)
        self.b = nn.Conv2d(channels, channels, 1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.a(x) + self.b(x))


class ChainBranch(nn.Module):
    """A chain of ``blocks`` small branch-and-fuse blocks, cat and add alternating."""

    def __init__(self, blocks: int, channels: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CatBlock(channels) if i % 2 == 0 else AddBlock(channels) for i in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def chain_branch(target_nodes: int) -> ChainBranch:
    """A ChainBranch with about ``target_nodes`` fx nodes (placeholder + output + 4.5 per block)."""
    torch.manual_seed(0)
    return ChainBranch(max(1, round((target_nodes - 2) / 4.5)))


def _generated_bench(target_nodes: int) -> _Bench:
    model = chain_branch(target_nodes)
    g = torch.Generator().manual_seed(0)
    x, *calib = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    nodes = len(fx.symbolic_trace(model).graph.nodes)
    return _Bench(f"chain-{nodes}", "generated", model, (x,), [(c,) for c in calib], nodes, "symbolic_trace")


def _zoo_bench(name: str) -> _Bench:
    torch.manual_seed(0)
    model = zoo.build(name)
    inputs = zoo.example_inputs(name)
    calib = [zoo.example_inputs(name, seed=s) for s in (1, 2)]
    try:
        nodes, ref = len(fx.symbolic_trace(model).graph.nodes), "symbolic_trace"
    except Exception:  # noqa: BLE001 - the YOLO models: count what fxfusion's front end traces
        units = trace_units(model).units
        nodes, ref = sum(len(u.graph_module.graph.nodes) for u in units), f"trace_units ({len(units)} units)"
    return _Bench(name, "zoo", model, inputs, calib, nodes, ref)


def _torchvision_bench(name: str) -> _Bench:
    size = TORCHVISION[name]
    model = build_model(f"tv_{name}", size).eval()
    g = torch.Generator().manual_seed(0)
    x, *calib = (torch.randn(2, 3, size, size, generator=g) for _ in range(3))
    nodes = len(fx.symbolic_trace(model).graph.nodes)
    return _Bench(f"tv_{name}", "torchvision", model, (x,), [(c,) for c in calib], nodes, "symbolic_trace")


# --- timing ------------------------------------------------------------------------------------

def _measure(bench: _Bench, args: argparse.Namespace, skips: dict[str, str]) -> dict[str, Timing]:
    if args.quick:
        repeats, warmup = 1, 0
    elif bench.nodes < 1_000:
        repeats, warmup = args.repeats, 1
    elif bench.nodes < 8_000:
        repeats, warmup = min(args.repeats, 3), 0
    else:  # the 10,000-node model: one round keeps the full run under ~15 minutes
        repeats, warmup = 1, 0
    qconfig = get_default_qat_qconfig_mapping("x86") if prepare_qat_fx else None
    timings = run_rounds(lambda sw: _round(sw, bench, qconfig, skips, args.repeat_under),
                         repeats=repeats, warmup=warmup)
    return {step: timings.get(step, Timing(skipped="not reached")) for step in STEPS}


def _round(sw: Stopwatch, bench: _Bench, qconfig, skips: dict[str, str], repeat_under: float) -> None:
    """One round: every step once, in flow order, each on what the previous one returned.

    A step whose result no later step uses is not run again once a round of it took more than
    ``repeat_under`` seconds (prepare_qat_fx on the large models): one sample is its time.
    """
    model, x = bench.model, bench.inputs
    leaves = ("symbolic_trace", "trace_units", "deepcopy", "forward", "rewrite(sites)", "torch.onnx", "export_onnx",
              "prepare_qat_fx")

    def step(name: str, needs: object, needs_name: str, fn: Callable, *a, **k):
        if name in leaves and sw.spent(name) > repeat_under:
            return None
        if name in skips:
            sw.skip(name, skips[name])
            return None
        if needs is None:
            sw.skip(name, f"needs {needs_name}, which did not run")
            return None
        return sw.time(name, fn, *a, **k)

    step("symbolic_trace", model, "", fx.symbolic_trace, model)
    step("trace_units", model, "", trace_units, model)
    # the floor of rewrite(model, x) as its contract stands: it returns a copy, and its sites are
    # calibrated on the example inputs, which takes at least one forward
    step("deepcopy", model, "", copy.deepcopy, model)
    step("forward", model, "", _forward, model, x)
    found = step("find", model, "", fxfusion.find_fusions, model, x)
    # Before rewrite, whose result stays alive for quantize: every rewritten owner is a new
    # nn.Module subclass, and each live subclass makes later fx traces in the process slower.
    step("rewrite(sites)", found, "find", fxfusion.rewrite, model, sites=found)
    rewritten = step("rewrite", model, "", fxfusion.rewrite, model, x)
    quantized = step("quantize", rewritten, "rewrite", fxfusion.quantize, rewritten, x, method="lsq",
                     w_bits=4, a_bits=4)
    if quantized is not None:
        quantized.train()(*x)  # untimed: initialises the quantizers (LSQ step from the first batch)
    deployed = step("deploy", quantized, "quantize", fxfusion.deploy, quantized, bench.calib, progress=False)
    if getattr(fxfusion, "export_onnx", None) is None:
        sw.skip("export_onnx", "fxfusion.export_onnx is not available")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            # the exporter export_onnx calls, on the float model (the deployed one has its topology)
            step("torch.onnx", model, "", _torch_onnx, model, x, os.path.join(tmp, "float.onnx"))
            step("export_onnx", deployed, "deploy", fxfusion.export_onnx, deployed, x, os.path.join(tmp, "m.onnx"))
    if prepare_qat_fx is None:
        sw.skip("prepare_qat_fx", "torch.ao.quantization is not available in this torch")
    elif "prepare_qat_fx" in skips:
        sw.skip("prepare_qat_fx", skips["prepare_qat_fx"])
    elif sw.spent("prepare_qat_fx") <= repeat_under:
        float_copy = copy.deepcopy(model).train()  # untimed: prepare_qat_fx swaps modules of its input
        sw.time("prepare_qat_fx", prepare_qat_fx, float_copy, qconfig, x)


def _forward(model: nn.Module, x: tuple) -> None:
    with torch.no_grad():
        model.eval()(*x)


def _torch_onnx(model: nn.Module, x: tuple, path: str) -> None:
    # as export_trace calls it: the TorchScript exporter, no constant folding, its highest opset
    torch.onnx.export(model.eval(), x, path, dynamo=False, do_constant_folding=False,
                      opset_version=_LEGACY_MAX_OPSET)


def _exporters(bench: _Bench) -> dict:
    """Seconds of each way torch offers to leave PyTorch, once each on the float ``bench`` model: is any
    fast enough for export <= 10x symbolic_trace? (torch.export and the dynamo ONNX exporter need onnxscript.)"""
    model, x = bench.model.eval(), bench.inputs
    sw = Stopwatch()
    sw.time("symbolic_trace", fx.symbolic_trace, model)
    with tempfile.TemporaryDirectory() as tmp:
        sw.time("torch.onnx (TorchScript)", _torch_onnx, model, x, os.path.join(tmp, "a.onnx"))
        sw.time("torch.export.export", torch.export.export, model, x)
        if importlib.util.find_spec("onnxscript") is None:
            sw.skip("torch.onnx (dynamo)", "onnxscript is not installed")
        else:
            sw.time("torch.onnx (dynamo)", torch.onnx.export, model, x, os.path.join(tmp, "b.onnx"), dynamo=True,
                    optimize=False, verify=False)
    trace = sw.timings["symbolic_trace"].median
    rows = [{"way": k, "seconds": t.median if t.median is not None else t.status,
             "x symbolic_trace": _ratio(t.median, trace)} for k, t in sw.timings.items()]
    return {"model": bench.name, "nodes": bench.nodes, "rows": rows}


def _skips_for_larger(bench: _Bench, timings: dict[str, Timing], cap: float, growth: float,
                      skips: dict[str, str]) -> dict[str, str]:
    """Steps not worth running on the larger generated models: failing here, or too slow there
    (this time x ``growth``, the next model's size ratio, is over ``cap``)."""
    out = {}
    for name, t in timings.items():
        if name in skips:
            continue
        if t.error is not None:
            out[name] = f"fails at {bench.nodes} nodes ({t.error.split(':', 1)[0]})"
        elif t.median is not None and t.median * growth > cap:
            out[name] = (f"{t.median:.3g} s at {bench.nodes} nodes, projected {t.median * growth:.0f} s "
                         f"> --max-pass-seconds {cap:g}")
    return out


# --- rows, ratios, scaling ---------------------------------------------------------------------

def _row(bench: _Bench, timings: dict[str, Timing]) -> dict:
    med = {k: t.median for k, t in timings.items()}
    trace = med["symbolic_trace"] if med["symbolic_trace"] is not None else med["trace_units"]
    if med["symbolic_trace"] is None and timings["symbolic_trace"].error:
        ref = f"{bench.trace_ref}; symbolic_trace {timings['symbolic_trace'].status}"
    else:
        ref = bench.trace_ref
    rounds = len(timings["rewrite"].seconds)
    wall = sum(sum(t.seconds) for t in timings.values())
    cpu = sum(sum(t.cpu_seconds) for t in timings.values())
    row = {"model": bench.name, "kind": bench.kind, "nodes": bench.nodes, "rounds": rounds, "trace ref": ref}
    for k, t in timings.items():
        row[k] = t.median if t.median is not None else t.status
    row["rewrite/trace"] = _ratio(med["rewrite"], trace)
    cpu_trace = timings["symbolic_trace"].cpu_median or timings["trace_units"].cpu_median
    row["rewrite/trace (cpu)"] = _ratio(timings["rewrite"].cpu_median, cpu_trace)
    row["rewrite/prepare_qat_fx"] = _ratio(med["rewrite"], med["prepare_qat_fx"])
    find_rewrite = med["find"] + med["rewrite(sites)"] if None not in (med["find"], med["rewrite(sites)"]) else None
    row["(find+rewrite(sites))/trace"] = _ratio(find_rewrite, trace)
    floor = sum(med[k] for k in ("deepcopy", "forward")) + trace if None not in (
        med["deepcopy"], med["forward"], trace) else None
    row["floor/trace"] = _ratio(floor, trace)
    row["rewrite/floor"] = _ratio(med["rewrite"], floor)
    row["torch.onnx/trace"] = _ratio(med["torch.onnx"], trace)
    row["export_onnx/torch.onnx"] = _ratio(med["export_onnx"], med["torch.onnx"])
    ratio = row["rewrite/trace"]
    row[f"rewrite<={TARGET_RATIO:g}x trace"] = "" if ratio is None else ("yes" if ratio <= TARGET_RATIO else "NO")
    row["cpu/wall"] = cpu / wall if wall else None  # well below 1: other processes shared the cores
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _slopes(rows: list[dict], timings: dict[str, dict[str, Timing]]) -> dict[str, dict]:
    """Log-log slopes over the generated models, in wall time and in CPU time, over all sizes
    and between the two largest (where fixed costs no longer hide the growth)."""
    generated = sorted((r for r in rows if r["kind"] == "generated"), key=lambda r: r["nodes"])
    out = {}
    for step in STEPS:
        pts = [(r["nodes"], timings[r["model"]].get(step)) for r in generated]  # older JSON: fewer steps
        pts = [(n, t.median, t.cpu_median) for n, t in pts if t is not None and t.median is not None]
        if len(pts) < 2:
            continue
        nodes, wall, cpu = (list(c) for c in zip(*pts))
        out[step] = {"slope": fit_loglog_slope(nodes, wall),
                     "last_pair_slope": fit_loglog_slope(nodes[-2:], wall[-2:]),
                     "cpu_slope": fit_loglog_slope(nodes, cpu),
                     "cpu_last_pair_slope": fit_loglog_slope(nodes[-2:], cpu[-2:]),
                     "nodes": nodes, "seconds": wall, "cpu_seconds": cpu}
    return out


def _slope_rows(slopes: dict[str, dict]) -> list[dict]:
    return [{"pass": k, "wall: all sizes": v["slope"], "wall: two largest": v["last_pair_slope"],
             "cpu: all sizes": v["cpu_slope"], "cpu: two largest": v["cpu_last_pair_slope"],
             "sizes": ", ".join(f"{n:,}" for n in v["nodes"])} for k, v in slopes.items()]


def _verdict(rows: list[dict], slopes: dict[str, dict]) -> dict:
    ratios = {r["model"]: r["rewrite/trace"] for r in rows if r["rewrite/trace"] is not None}
    over = {m: q for m, q in ratios.items() if q > TARGET_RATIO}
    fit = slopes.get("rewrite", {})
    slope = fit.get("slope")
    # CPU time is what other processes on the machine disturb least; the pair of largest sizes
    # shows the growth once fixed costs stop hiding it.
    judged = [v for k in ("cpu_slope", "cpu_last_pair_slope") if (v := fit.get(k)) is not None] or (
        [slope] if slope is not None else [])
    linear = bool(judged) and max(judged) <= LINEAR_SLOPE
    lines = []
    if over:
        worst = max(over, key=over.get)
        lines.append(f"rewrite <= {TARGET_RATIO:g}x trace: does NOT hold on {len(over)} of {len(ratios)} models "
                     f"(worst {worst}: {over[worst]:.1f}x)")
    else:
        lines.append(f"rewrite <= {TARGET_RATIO:g}x trace: holds on all {len(ratios)} models")
    if slope is None:
        lines.append("rewrite growth: not enough generated sizes to fit a slope")
    else:
        kind = "roughly linear" if linear else "faster than linear"
        cpu = ""
        if fit.get("cpu_slope") is not None:
            cpu = f"; CPU time {fit['cpu_slope']:.2f}, two largest {fit['cpu_last_pair_slope']:.2f}"
        lines.append(f"rewrite growth: {kind} (log-log slope of time vs nodes, wall {slope:.2f}, two largest "
                     f"{fit['last_pair_slope']:.2f}{cpu}; linear means every CPU slope <= {LINEAR_SLOPE})")
    floors = {r["model"]: r["floor/trace"] for r in rows if r.get("floor/trace") is not None}
    if floors:
        above = sorted(m for m, q in floors.items() if q > TARGET_RATIO)
        lines.append(f"floor of rewrite (trace + deepcopy + one forward) > {TARGET_RATIO:g}x trace on {len(above)} of "
                     f"{len(floors)} models (median {statistics.median(floors.values()):.1f}x): there the target "
                     "is out of reach while rewrite returns a copy and calibrates on data")
        to_floor = [r["rewrite/floor"] for r in rows if r.get("rewrite/floor") is not None]
        lines.append(f"rewrite / its floor: median {statistics.median(to_floor):.1f}x, "
                     f"range {min(to_floor):.1f}-{max(to_floor):.1f}x")
    big = max((r for r in rows if r["kind"] == "generated" and r.get("torch.onnx/trace") is not None
               and r["nodes"] <= 5_100), key=lambda r: r["nodes"], default=None)
    if big is not None:
        lines.append(f"export at {big['nodes']:,} nodes: torch.onnx alone (TorchScript exporter) takes "
                     f"{big['torch.onnx/trace']:.1f}x symbolic_trace, export_onnx {big['export_onnx/torch.onnx']:.1f}x "
                     "torch.onnx (target: export <= 10x trace)")
    return {"holds": not over and linear, "ratio_ok": not over, "linear": linear, "rewrite_slope": slope,
            "over_target": over, "lines": lines}


# --- profile -----------------------------------------------------------------------------------

def _profile_rewrite(bench: _Bench, top: int = 15) -> dict:
    """cProfile one ``rewrite`` of ``bench``; the top functions by cumulative and by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    fxfusion.rewrite(bench.model, bench.inputs)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    entries = []
    for (file, line, func), (_, ncalls, own, cum, _) in stats.stats.items():
        entries.append({"function": _where(file, line, func), "calls": ncalls, "cumulative_s": cum, "own_s": own})
    total = max(e["cumulative_s"] for e in entries)
    by_cum = sorted(entries, key=lambda e: -e["cumulative_s"])
    by_own = sorted(entries, key=lambda e: -e["own_s"])
    root = str(Path(__file__).resolve().parents[1])
    ours = [e for e, (file, _, _) in zip(entries, stats.stats) if file.startswith(root)]
    ours.sort(key=lambda e: -e["cumulative_s"])
    return {"model": bench.name, "nodes": bench.nodes, "total_s": total, "cumulative": by_cum[:top],
            "own": by_own[:top], "fxfusion": ours[:top]}


def _where(file: str, line: int, func: str) -> str:
    if file == "~":
        return func  # a builtin
    file = re.sub(r"^.*?(site-packages/|lib/python3\.\d+/)", "", file)
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    if file.startswith(root):
        file = file[len(root):]
    return f"{file}:{line}({func})"


# --- output ------------------------------------------------------------------------------------

def _display(row: dict) -> dict:
    return {k: "n/a" if v is None else v for k, v in row.items() if k != "kind"}


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _progress(row: dict) -> None:
    cells = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                      if k in STEPS)
    print(f"{row['model']} ({row['nodes']} nodes, {row['rounds']} rounds): {cells}", flush=True)  # noqa: T201


def _markdown(rows: list[dict], timings: dict[str, dict[str, Timing]], slopes: dict, verdict: dict,
              hotspots: dict | None, meta: dict, exporters: dict | None = None) -> str:
    out = ["# fxfusion pass timings", "",
           f"torch {meta['torch']}, Python {meta['python']}, {meta['machine']} ({meta['platform']}), "
           f"{meta['torch_threads']} torch thread(s), {meta['date']}"
           + (f", code at {meta['git']}" if meta.get("git") else "") + "; 1-minute load average "
           f"{meta['load_average_1min']['start']} at the start, {meta['load_average_1min']['end']} at the end."
           + (" **--quick run (smoke test, 1 round): numbers are not meaningful.**" if meta["quick"] else ""),
           *([f"Rendered from {meta['rendered_from']} (no new measurement)."] if "rendered_from" in meta else []),
           "",
           "Seconds per pass, median over interleaved rounds (`rounds` column; one untimed warm-up round for "
           "models under 1,000 nodes in the full run). `rewrite` includes its own find; `rewrite(sites)` is "
           "`rewrite(model, sites=find_fusions(...))`, the editing part alone; `(find+rewrite(sites))/trace` is "
           "the two-step flow `find_fusions` then `rewrite(sites=...)` against the trace. `deepcopy` and `forward` "
           "(one eval forward on the example input, no grad) are what `rewrite(model, x)` has to do at least as "
           "its contract stands (it returns a copy, and calibrates its sites on data): `floor/trace` is "
           "(trace + deepcopy + forward) / trace, `rewrite/floor` how far rewrite is from it. `torch.onnx` is the "
           "exporter that `export_onnx` calls, alone, on the float model. The ratios divide by "
           "the `trace ref` time: `symbolic_trace` when the whole model traces, else fxfusion's `trace_units` "
           "(the largest traceable submodules). `cpu/wall` is this process's CPU time over wall time for all "
           "timed steps of the row: well below 1 means other processes shared the cores (per-step CPU times "
           "are in passes.json; `rewrite/trace (cpu)` is the ratio in CPU time). `rounds` counts the rounds of "
           "rewrite; a step whose output nothing uses (prepare_qat_fx) runs once when one round of it took over "
           "a minute. quantize is LSQ W4A4; deploy uses 2 calibration batches; "
           f"prepare_qat_fx uses {meta['prepare_qat_fx']}. A cell that is not a number says why.",
           "",
           markdown_table([_display(r) for r in rows]),
           "", "## Target", ""]
    out += [f"- {line}" for line in verdict["lines"]]
    out += ["", "## Scaling on the generated models", "",
            "Slope of log(seconds) against log(fx nodes): 1 is linear, 2 quadratic; over all sizes, and between "
            "the two largest. Wall time from the medians; CPU time (this process) is less disturbed by other "
            "processes on the machine.", "",
            markdown_table(_slope_rows(slopes)), "", "![time vs nodes](passes_scaling.png)", ""]
    if exporters:
        out += [f"## Ways out of PyTorch at {exporters['nodes']:,} nodes", "",
                f"Each once, on the float {exporters['model']} model: could any exporter torch offers write "
                "this graph within 10x `symbolic_trace`?", "", markdown_table(exporters["rows"]), ""]
    if hotspots:
        out += [f"## Hotspots: cProfile of `rewrite` on {hotspots['model']} ({hotspots['nodes']} nodes, "
                f"{hotspots['total_s']:.2f} s under the profiler)", "", "Top by cumulative time:", "",
                markdown_table(hotspots["cumulative"]), "", "Top by own time:", "",
                markdown_table(hotspots["own"]), "", "fxfusion's own functions by cumulative time:", "",
                markdown_table(hotspots["fxfusion"]), ""]
    notes = [f"- {model} / {step}: {t.error or t.skipped or t.status}"
             for model, steps in timings.items() for step, t in steps.items() if t.median is None]
    if notes:
        out += ["## Steps without a time", "", *notes, ""]
    return "\n".join(out)


def _plot(generated: list[dict], path: Path) -> str:
    """Log-log time vs nodes; returns a note instead when matplotlib is missing or there is no data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: {path.name} not written"
    fig, ax = plt.subplots(figsize=(7, 5))
    plotted = False
    for step in PLOTTED:
        pts = [(r["nodes"], r[step]) for r in generated if isinstance(r[step], float)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=step)
            plotted = True
    trace = [(r["nodes"], TARGET_RATIO * r["symbolic_trace"]) for r in generated
             if isinstance(r["symbolic_trace"], float)]
    if trace:
        ax.plot(*zip(*trace), linestyle="--", color="grey", label=f"target: {TARGET_RATIO:g}x symbolic_trace")
    if not plotted:
        plt.close(fig)
        return f"no generated-model timings: {path.name} not written"
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fx graph nodes (generated chain-and-branch models)")
    ax.set_ylabel("seconds (median, 1 thread)")
    ax.set_title("fxfusion passes vs torch.fx / torch.ao")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())
    return ""


if __name__ == "__main__":
    main()
