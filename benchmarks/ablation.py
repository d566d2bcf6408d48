"""Why GABFusion did not pay off, and which configuration does best: the ablations behind the defaults.

On the shapes detector (the accuracy grid's sizes), at W4A4 and W3A3, for LSQ and N2UQ, on seeds
100-102 (the grid reports seeds 0-2, so the choice is not tuned on the reported runs), every
variant below runs QAT from the same FP32 checkpoint and is compared with the QAT baseline:

- the paper's check first: per-branch gradient norms at the neck Concats in FP32 and after
  baseline QAT at 4 and 3 bits (is there an imbalance for GABFusion to correct?);
- initialisation: the paper's ``LN(fuse(α·x))`` vs the function-preserving rewrite;
- normalization axis: channels at each position, per sample over (C, H, W), none (α only);
- α: learned from 0.5 (v1) at the QAT learning rate or 30 times it (α has no weight decay: a 1-D
  parameter), vs balanced by gradient energy (v2);
- the LayerNorm at deploy time: frozen after training vs tapered to its affine at the end of QAT;
- placement: the neck Concats vs every cat site;
- ADA on top of the best;
- QAT length: 250 vs 1,000 steps.

Variants run one after another over all cells (``variant_major``), so an interrupted run leaves
complete rows; the log (``ablation_runs.jsonl``) resumes across sessions like the grid's.

    python benchmarks/ablation.py            # everything (several hours on 2 cores; resumable)
    python benchmarks/ablation.py --render   # tables and plot from the runs file only
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
from qat_runs import Setup, Variant, load, run  # noqa: E402

from fxfusion.demo.pipeline import DemoConfig  # noqa: E402
from fxfusion.demo.recipe import PAPER_RECIPE, Recipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOG = "ablation_runs.jsonl"
BASE = Recipe(ada=False)  # function-preserving, channel LN, learned α, gate ramp 0.25 / taper 0.25, neck


def variants() -> tuple[Variant, ...]:
    """In the order they run: the most telling first."""
    return (
        Variant("baseline"),
        Variant("preserve, LN, taper", BASE, profile=True),
        Variant("paper init (today)", PAPER_RECIPE.with_(ada=False), profile=True),
        Variant("preserve, no norm (α only)", BASE.with_(norm="none")),
        Variant("preserve, LN, frozen at deploy", BASE.with_(taper=0.0)),
        Variant("preserve, sample norm, taper", BASE.with_(norm="samplenorm")),
        Variant("preserve, LN, taper, + ADA", BASE.with_(ada=True)),
        Variant("preserve, LN, taper, balanced α", BASE.with_(alpha="balanced")),
        Variant("preserve, LN, taper, all cat sites", BASE.with_(placement="all")),
        Variant("preserve, LN, taper, α lr x30", BASE.with_(alpha_lr=30.0)),
        Variant("baseline, 1000 steps", qat_steps=1000),
        Variant("preserve, LN, taper, 1000 steps", BASE, qat_steps=1000),
    )


def default_setup() -> Setup:
    return Setup(train=DemoConfig(img_size=64, fp_steps=2000, qat_steps=250, finetune_steps=0),
                 variants=variants(), seeds=(100, 101, 102), datasets=("shapes",), bits=(4, 3),
                 methods=("lsq", "n2uq"), variant_major=True)


# --- tables ---------------------------------------------------------------------------------------

def summarize(records: list[dict[str, Any]], setup: Setup) -> dict[str, Any]:
    """Per variant: mean mAP per cell, its gain over the same cell's baseline, wins, mean gain."""
    runs: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["kind"] == "qat":
            runs[(r["variant"], r["bits"], r["method"], r["seed"])] = r["map50"]
    cells = sorted({(b, m) for (_, b, m, _) in runs}, key=lambda c: (-c[0], c[1]))
    rows, per_cell = [], []
    for v in setup.variants:
        base_name = "baseline, 1000 steps" if v.qat_steps == 1000 and v.recipe is not None else "baseline"
        gains, cell_means, before, deployed, n = [], [], [], [], 0
        for b, m in cells:
            seeds = [s for (name, bb, mm, s) in runs if name == v.name and (bb, mm) == (b, m)]
            paired = [s for s in seeds if (base_name, b, m, s) in runs]
            if not seeds:
                continue
            n += len(seeds)
            mean = statistics.fmean(runs[(v.name, b, m, s)]["QAT"] for s in seeds)
            cell_means.append(mean)
            row = {"variant": v.name, "cell": f"W{b}A{b} {m.upper()}", "n": len(seeds),
                   "mAP@0.5": mean_std([runs[(v.name, b, m, s)]["QAT"] for s in seeds])}
            if v.recipe is not None and paired:
                gain = statistics.fmean(runs[(v.name, b, m, s)]["QAT"] - runs[(base_name, b, m, s)]["QAT"]
                                        for s in paired)
                gains.append(gain)
                row["gain vs " + ("baseline" if base_name == "baseline" else "1000-step baseline")] = f"{gain:+.3f}"
            if v.recipe is not None:
                before += [runs[(v.name, b, m, s)]["before QAT"] for s in seeds]
                deployed += [runs[(v.name, b, m, s)]["deployed, no fine-tune"] - runs[(v.name, b, m, s)]["QAT"]
                             for s in seeds]
            per_cell.append(row)
        if not n:
            continue
        rows.append({"variant": v.name, "runs": n, "cells": len(cell_means),
                     "mean mAP@0.5": f"{statistics.fmean(cell_means):.3f}",
                     "mean gain": f"{statistics.fmean(gains):+.4f}" if gains else "",
                     "wins": f"{sum(g > 0 for g in gains)}/{len(gains)}" if gains else "",
                     "min / max gain": f"{min(gains):+.3f} / {max(gains):+.3f}" if gains else "",
                     "before QAT": mean_std(before) if before else "",
                     "deploy Δ (no fine-tune)": f"{statistics.fmean(deployed):+.3f}" if deployed else ""})
    return {"rows": rows, "per_cell": per_cell, "gradients": _gradients(records),
            "fp": _fp(records)}


def _fp(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fp = [r for r in records if r["kind"] == "fp"]
    if not fp:
        return []
    return [{"FP32 mAP@0.5": mean_std([r["map50"] for r in fp]),
             "after the default rewrite": mean_std([r["map50_rewritten"]["default"] for r in fp]),
             "after the paper's rewrite (BN re-estimated)": mean_std([r["map50_rewritten"]["paper"] for r in fp]),
             "seeds": len(fp)}]


def _gradients(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per neck Concat, the mean ratio ||dL/dx_0|| / ||dL/dx_1|| (branch 0 the upsampled or downsampled path
    from deeper in the neck, branch 1 the lateral one): FP32, then the QAT baselines and GABFusion runs."""
    groups: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if "gradients" not in r:
            continue
        if r["kind"] == "fp":
            label = "FP32"
        else:
            kind = {"baseline": "QAT baseline", "baseline, 1000 steps": "QAT baseline, 1000 steps",
                    "preserve, LN, taper": "GABFusion (preserve)", "paper init (today)": "GABFusion (paper)"}
            if r["variant"] not in kind:
                continue
            label = f"{kind[r['variant']]} W{r['bits']}A{r['bits']} {r['method'].upper()}"
        entry = groups.setdefault(label, {})
        for site, g in r["gradients"].items():
            means = g["means"]
            if len(means) == 2 and all(m is not None and math.isfinite(m) and m > 0 for m in means):
                entry.setdefault(site, []).append(means[0] / means[1])
    rows = []
    for label, sites in groups.items():
        row = {"model": label, "runs": max((len(v) for v in sites.values()), default=0)}
        row.update({f"{site} b0/b1": f"{statistics.fmean(v):.2f}" for site, v in sorted(sites.items())})
        rows.append(row)
    return rows


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Gain over the baseline per variant: one dot per cell, a bar for the mean."""
    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in summary["rows"] if r["mean gain"]]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    names = [r["variant"] for r in rows]
    ax.barh(range(len(rows)), [float(r["mean gain"]) for r in rows], color="#8fb3d9", label="mean over cells")
    for i, name in enumerate(names):
        gains = [float(v) for c in summary["per_cell"] if c["variant"] == name
                 for k, v in c.items() if k.startswith("gain vs")]
        ax.scatter(gains, [i] * len(gains), color="black", s=12, zorder=3, label="one cell" if i == 0 else None)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mAP@0.5 gain over the QAT baseline (mean of seeds per cell)")
    ax.set_title("GABFusion ablation, shapes, W4A4/W3A3 x LSQ/N2UQ, seeds 100-102")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def report(records: list[dict[str, Any]], setup: Setup, out: Path) -> dict[str, Any]:
    summary = summarize(records, setup)
    print_table(summary["fp"], title="FP32 and the rewrite before any training")
    print_table(summary["gradients"], title="Gradient balance at the neck Concats: ||dL/dx_0|| / ||dL/dx_1||, "
                                            "mean over seeds")
    print_table(summary["rows"], title="Ablation: gain of each variant over the QAT baseline (mean over cells)")
    print_table(summary["per_cell"], title="Per cell (mean ± std over seeds)")
    hp = setup.train
    md = "\n\n".join([
        "# GABFusion ablation (shapes, YOLOv5-style, first/last layers 8-bit; seeds 100-102)",
        f"{hp.img_size} px, width x{hp.width_multiple}, FP32 {hp.fp_steps} Adam steps, QAT {hp.qat_steps} SGD steps "
        f"(lr {hp.qat_lr:g}) unless the variant says otherwise; deploy without fine-tune. Gains are paired: each "
        "run against the baseline of the same seed and cell, averaged over seeds, then over cells.",
        "## FP32 and the rewrite before QAT", markdown_table(summary["fp"]),
        "## Gradient balance at the neck Concats",
        "Mean over seeds of ||dL/dx_0|| / ||dL/dx_1|| per Concat (branch 0: the path from deeper in the neck, "
        "branch 1: the lateral one), on 4 fixed training batches. The paper's premise is that this ratio "
        "moves away from its FP32 value at 4 bits and below.",
        markdown_table(summary["gradients"]),
        "## Variants", markdown_table(summary["rows"]),
        "## Per cell", markdown_table(summary["per_cell"])])
    payload = {"environment": environment(), "config": asdict(setup), "summary": summary, "records": records}
    write_results(out, "ablation", payload, md)
    if plot(summary, out / "ablation.png"):
        print(f"wrote {out / 'ablation.png'}")  # noqa: T201
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--variants", type=int, default=None, help="run only the first N variants")
    parser.add_argument("--render", action="store_true", help="only rebuild tables and plot from the runs file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    setup = default_setup()
    if args.variants:
        setup = replace(setup, variants=setup.variants[:args.variants])
    if args.render:
        records = load(args.out / LOG, setup)
    else:
        t0 = time.perf_counter()
        records = run(setup, args.out, LOG, args.workers, progress=not args.no_progress)
        print(f"ablation done in {time.perf_counter() - t0:.0f} s wall")  # noqa: T201
    return report(records, setup, args.out)


if __name__ == "__main__":
    main()
