"""The paper's Table 1 at CPU scale: does GABFusion (+ADA) close the low-bit QAT gap to float?

Grid, on two detection datasets (the demo's synthetic shapes, and scenes of scikit-learn's real
handwritten digits, 10 classes), with the zoo's YOLOv5-style detector:

    W4A4, W3A3  x  LSQ, PACT, DSQ, N2UQ  x  QAT baseline | + GABFusion | + GABFusion + ADA  x  seeds

Every QAT run of a seed starts from the same FP32 checkpoint of that seed, with the same data
order, steps and learning rate; first/last layers stay 8-bit (as in the paper). GABFusion is
applied by the demo's default recipe (``fxfusion.demo.recipe.DEFAULT_RECIPE``: the neck Concats,
function-preserving rewrite, normalization gate opened and closed by ``NormSchedule``; the
configuration ``benchmarks/ablation.py`` chose). ADA uses KL for the uniform quantizers and JS
for N2UQ (the paper's finding). Both GABFusion variants are then deployed (LayerNorm frozen and
folded, α folded) and fine-tuned briefly, so the table shows the deployable result next to the
with-LayerNorm one. Score: COCO mAP@0.5 on held-out scenes.

Every run (one variant of one dataset, seed, bits and method) runs in one of ``--workers``
processes of one thread each and is appended to ``accuracy_runs.jsonl`` in ``--out``; a rerun
skips what is there (resume after an interruption, also in a later session; records made with
other settings are ignored). FP32 checkpoints are kept in ``--out/accuracy_cache``.

    python benchmarks/accuracy.py              # the full grid, about three hours on 2 cores
    python benchmarks/accuracy.py --quick      # a minute-long smoke run of every code path
    python benchmarks/accuracy.py --render     # tables and plot from accuracy_runs.jsonl only
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, mean_std, print_table, pyplot, save_figure, write_results  # noqa: E402
from qat_runs import DATASETS, Setup, Variant, load, run  # noqa: E402

from fxfusion.demo.pipeline import DemoConfig  # noqa: E402
from fxfusion.demo.recipe import DEFAULT_RECIPE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lsq", "pact", "dsq", "n2uq")
BITS = (4, 3)
VARIANTS = ("baseline", "gab", "gab+ada")
LABELS = {"baseline": "QAT baseline", "gab": "+ GABFusion", "gab+ada": "+ GABFusion + ADA"}
ROW_COLUMNS = ("dataset", "bits", "method", "variant", "n", "mAP@0.5", "gain", "gap closed", "deployed (no LN)",
               "deployed gain")
# DemoConfig settings that differ per dataset (the digits detector needs them to reach 0.6 mAP@0.5 in float)
PER_DATASET: dict[str, dict[str, Any]] = {}


def grid_variants() -> tuple[Variant, ...]:
    return (Variant("baseline"), Variant("gab", DEFAULT_RECIPE.with_(ada=False)), Variant("gab+ada", DEFAULT_RECIPE))


def default_setup() -> Setup:
    """The grid: sizes, steps and learning rates of every run, and its cells."""
    return Setup(train=DemoConfig(img_size=64, fp_steps=2000, qat_steps=250, finetune_steps=60),
                 variants=grid_variants(), per_dataset=PER_DATASET)


def quick_setup() -> Setup:
    train = DemoConfig(img_size=64, width_multiple=0.0625, n_train=64, n_val=16, batch_size=8, fp_steps=8,
                       qat_steps=3, bn_batches=2, calib_batches=1, finetune_steps=2)
    return Setup(train=train, variants=grid_variants(), seeds=(0,), bits=(4,), methods=("lsq", "n2uq"))


# --- tables ----------------------------------------------------------------------------------------

def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds, gains and gap closed, per dataset, bits and method."""
    fp: dict[str, list[float]] = {}
    fp_rewritten: dict[str, list[float]] = {}
    for r in records:
        if r["kind"] == "fp":
            fp.setdefault(r["dataset"], []).append(r["map50"])
            fp_rewritten.setdefault(r["dataset"], []).append(r["map50_rewritten"]["default"])
    cells: dict[tuple, dict[str, list[float]]] = {}
    for r in sorted((r for r in records if r["kind"] == "qat"), key=lambda r: r["seed"]):
        entry = cells.setdefault((r["dataset"], r["bits"], r["method"]), {})
        for what, value in r["map50"].items():
            name = r["variant"] if what == "QAT" else f"{r['variant']} {what}"
            entry.setdefault(name, []).append(value)
    rows = []
    order = {m: i for i, m in enumerate(METHODS)}
    for (dataset, bits, method), scores in sorted(cells.items(), key=lambda kv: (
            DATASETS.index(kv[0][0]) if kv[0][0] in DATASETS else 9, -kv[0][1], order.get(kv[0][2], 9))):
        fp_mean = _mean(fp.get(dataset, []))
        base = _mean(scores.get("baseline", []))
        for variant in VARIANTS:
            if variant not in scores:
                continue
            mean = _mean(scores[variant])
            row = {"dataset": dataset, "bits": f"W{bits}A{bits}", "method": method.upper(),
                   "variant": LABELS[variant], "n": len(scores[variant]), "mAP@0.5": mean_std(scores[variant])}
            if variant != "baseline":
                gain = mean - base
                row["gain"] = f"{gain:+.3f}"
                row["gap closed"] = _share(gain, fp_mean - base)
                deployed = scores.get(f"{variant} deployed")
                row["deployed (no LN)"] = mean_std(deployed) if deployed else ""
                row["deployed gain"] = f"{_mean(deployed) - base:+.3f}" if deployed else ""
            rows.append(row)
    fp_rows = [{"dataset": d, "n": len(v), "FP32 mAP@0.5": mean_std(v),
                "FP32 + GABFusion (before QAT) mAP@0.5": mean_std(fp_rewritten[d])} for d, v in fp.items()]
    # Over all cells: how often each variant beats the baseline, and the mean gain.
    overall = []
    for variant in ("gab", "gab+ada", "gab deployed", "gab+ada deployed"):
        gains = [_mean(s[variant]) - _mean(s["baseline"]) for s in cells.values() if variant in s and "baseline" in s]
        if gains:
            overall.append({"variant": variant.replace("gab", "GABFusion").replace("+ada", " + ADA"),
                            "cells": len(gains), "wins": sum(g > 0 for g in gains),
                            "mean gain": f"{statistics.fmean(gains):+.4f}",
                            "min gain": f"{min(gains):+.3f}", "max gain": f"{max(gains):+.3f}"})
    table1 = [_table1_row(key, scores, fp.get(key[0], [])) for key, scores in sorted(cells.items(), key=lambda kv: (
        DATASETS.index(kv[0][0]) if kv[0][0] in DATASETS else 9, -kv[0][1], order.get(kv[0][2], 9)))]
    return {"fp": fp_rows, "table1": table1, "rows": rows, "overall": overall,
            "cells": {"/".join(map(str, k)): v for k, v in cells.items()}}


def _table1_row(key: tuple, scores: dict[str, list[float]], fp: list[float]) -> dict[str, Any]:
    """One line per cell, as the paper's Table 1 reads: means over seeds, then gain and gap closed."""
    dataset, bits, method = key
    base, gab, ada = (_mean(scores.get(v, [])) for v in ("baseline", "gab", "gab+ada"))
    deployed = _mean(scores.get("gab+ada deployed", []))
    def num(v: float, fmt: str = ".3f") -> str:  # a variant not run yet (a partial grid) shows as blank
        return "" if math.isnan(v) else format(v, fmt)

    return {"dataset": dataset, "W/A": f"{bits}/{bits}", "method": method.upper(), "FP32": num(_mean(fp)),
            "baseline": num(base), "+GAB": num(gab), "+GAB+ADA": num(ada), "deployed": num(deployed),
            "gain": num(ada - base, "+.3f"),
            "gap closed": "" if math.isnan(ada - base) else _share(ada - base, _mean(fp) - base),
            "seeds": len(scores.get("baseline", []))}


def _mean(values) -> float:
    return statistics.fmean(values) if values else math.nan




def _share(gain: float, gap: float) -> str:
    if not math.isfinite(gap) or gap < 0.02:  # a smaller gap is within the seed noise
        return "n/a (no gap)"
    return f"{100 * gain / gap:+.0f} %"


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Bar chart of mean mAP@0.5 per cell and variant, one panel per dataset; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    datasets = [d for d in DATASETS if any(k.startswith(d + "/") for k in summary["cells"])]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(11, 3.6 * len(datasets)), squeeze=False)
    fp = {r["dataset"]: float(r["FP32 mAP@0.5"].split(" ")[0]) for r in summary["fp"]}
    series = ("baseline", "gab", "gab+ada", "gab+ada deployed")
    names = {"baseline": "QAT baseline", "gab": "+GABFusion", "gab+ada": "+GABFusion+ADA",
             "gab+ada deployed": "+GABFusion+ADA, deployed"}
    for ax, dataset in zip(axes[:, 0], datasets):
        keys = [k for k in summary["cells"] if k.startswith(dataset + "/")]
        keys.sort(key=lambda k: (-int(k.split("/")[1]), METHODS.index(k.split("/")[2])))
        width = 0.8 / len(series)
        for i, s in enumerate(series):
            means = [_mean(summary["cells"][k].get(s, [])) for k in keys]
            stds = [statistics.stdev(summary["cells"][k][s]) if len(summary["cells"][k].get(s, [])) > 1 else 0
                    for k in keys]
            ax.bar([j + (i - 1.5) * width for j in range(len(keys))], means, width, yerr=stds, capsize=2,
                   label=names[s])
        if dataset in fp:
            ax.axhline(fp[dataset], color="black", linestyle="--", linewidth=1, label="FP32")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"W{k.split('/')[1]}A{k.split('/')[1]} {k.split('/')[2].upper()}" for k in keys])
        ax.set_ylabel("mAP@0.5")
        ax.set_title(f"{dataset}: mean ± std over seeds")
        ax.legend(fontsize=7, ncol=5, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def report(records: list[dict[str, Any]], setup: Setup, out: Path, quick: bool) -> dict[str, Any]:
    summary = summarize(records)
    print_table(summary["fp"], title="FP32 reference")
    print_table(summary["table1"], title="Table 1 at CPU scale: mean mAP@0.5 over seeds (gain, gap closed: "
                                         "+GAB+ADA vs baseline; deployed: +GAB+ADA without LayerNorm)")
    print_table(summary["rows"], ROW_COLUMNS,
                title="mAP@0.5, mean ± std over seeds (gain and gap closed vs the QAT baseline)")
    print_table(summary["overall"], title="Over all cells: gain of the mean vs the QAT baseline")
    payload = {"environment": environment(), "quick": quick, "config": asdict(setup), "summary": summary,
               "records": records, "cpu_seconds_total": sum(r["seconds"] for r in records)}
    md = "\n\n".join([
        "# Accuracy: the paper's Table 1 at CPU scale (mAP@0.5, YOLOv5-style, first/last layers 8-bit)",
        _describe(setup), "## FP32", markdown_table(summary["fp"]),
        "## Table 1 (means over seeds; gain and gap closed of +GAB+ADA; deployed = +GAB+ADA without LayerNorm)",
        markdown_table(summary["table1"]),
        "## QAT grid", markdown_table(summary["rows"], ROW_COLUMNS),
        "## Over all cells", markdown_table(summary["overall"])])
    write_results(out, "accuracy", payload, md)
    if plot(summary, out / "accuracy.png"):
        print(f"wrote {out / 'accuracy.png'}")  # noqa: T201
    return payload


def _describe(setup: Setup) -> str:
    hp = setup.train
    extra = "".join(f"; {d}: {', '.join(f'{k} {v}' for k, v in o.items())}" for d, o in setup.per_dataset.items())
    return (f"{hp.img_size} px, width x{hp.width_multiple}, {hp.n_train} train / {hp.n_val} val "
            f"images, batch {hp.batch_size}; FP32 {hp.fp_steps} Adam steps; QAT {hp.qat_steps} SGD "
            f"steps, lr {hp.qat_lr:g}; ADA weight {hp.ada_weight:g}; deploy: {hp.calib_batches} "
            f"calibration batches + {hp.finetune_steps} Adam steps (lr {hp.finetune_lr:g}){extra}; seeds "
            f"{list(setup.seeds)}. GABFusion recipe: {DEFAULT_RECIPE.describe()}. "
            "'gap closed' = gain / (FP32 - baseline).")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every code path")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS)
    parser.add_argument("--render", action="store_true", help="only rebuild tables and plot from the runs file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers={args.workers} must be >= 1")
    setup = quick_setup() if args.quick else default_setup()
    if args.seeds:
        setup = replace(setup, seeds=tuple(args.seeds))
    if args.datasets:
        setup = replace(setup, datasets=tuple(args.datasets))
    if args.render:
        records = load(args.out / "accuracy_runs.jsonl", setup)
        if not records:
            parser.error(f"no records with these settings in {args.out / 'accuracy_runs.jsonl'}")
    else:
        t0 = time.perf_counter()
        records = run(setup, args.out, "accuracy_runs.jsonl", args.workers, progress=not args.no_progress)
        print(f"grid done in {time.perf_counter() - t0:.0f} s wall")  # noqa: T201
    return report(records, setup, args.out, args.quick)


if __name__ == "__main__":
    main()
