"""The paper's Table 1 at CPU scale: does GABFusion (+ADA) close the low-bit QAT gap to float?

Grid, on two detection datasets (the demo's synthetic shapes, and scenes of scikit-learn's real
handwritten digits, 10 classes), with the zoo's YOLOv5-style detector:

    W4A4, W3A3  x  LSQ, PACT, DSQ, N2UQ  x  QAT baseline | + GABFusion | + GABFusion + ADA  x  seeds

Every QAT run of a seed starts from the same FP32 checkpoint of that seed, with the same data
order, steps and learning rate; first/last layers stay 8-bit (as in the paper). GABFusion sits at
the neck Concats (the paper's placement; the demo's ``gabfusion_demo_model``). ADA uses KL for the
uniform quantizers and JS for N2UQ (the paper's finding); the ablation runs the other divergence
for LSQ and N2UQ at W4A4. Both GABFusion variants are then deployed (LayerNorm frozen and folded,
α folded) and fine-tuned briefly, so the table shows the deployable result next to the
with-LayerNorm one. Score: COCO mAP@0.5 on held-out scenes.

Work is split into cells (dataset, seed, bits, method) that run in ``--workers`` processes of one
thread each. Every finished cell is appended to ``accuracy_runs.jsonl`` in ``--out``; a rerun
skips what is there (resume after an interruption; delete the file to start over). FP32
checkpoints are kept in ``--out/accuracy_cache``.

    python benchmarks/accuracy.py              # the full grid, about two hours on 2 cores
    python benchmarks/accuracy.py --quick      # a minute-long smoke run of every code path
    python benchmarks/accuracy.py --render     # tables and plot from accuracy_runs.jsonl only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, print_table, write_results  # noqa: E402

from fxfusion.demo.pipeline import DemoConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ("shapes", "digits")
METHODS = ("lsq", "pact", "dsq", "n2uq")
BITS = (4, 3)
VARIANTS = ("baseline", "gab", "gab+ada")
LABELS = {"baseline": "QAT baseline", "gab": "+ GABFusion", "gab+ada": "+ GABFusion + ADA"}
ROW_COLUMNS = ("dataset", "bits", "method", "variant", "n", "mAP@0.5", "gain", "gap closed", "deployed (no LN)",
               "deployed gain")
ABLATION = {(4, "lsq"), (4, "n2uq")}  # cells that also run ADA with the other divergence


@dataclass(frozen=True)
class Config:
    """The grid, and the sizes, steps and learning rates of every run (``train``; its method/bits/seed unused)."""

    train: DemoConfig = DemoConfig(img_size=64, fp_steps=2000, qat_steps=250, finetune_steps=60)
    seeds: tuple[int, ...] = (0, 1, 2)
    datasets: tuple[str, ...] = DATASETS
    bits: tuple[int, ...] = BITS
    methods: tuple[str, ...] = METHODS

    @classmethod
    def quick(cls) -> Config:
        train = DemoConfig(img_size=64, width_multiple=0.0625, n_train=64, n_val=16, batch_size=8, fp_steps=8,
                           qat_steps=3, bn_batches=2, calib_batches=1, finetune_steps=2)
        return cls(train=train, seeds=(0,), bits=(4,), methods=("lsq", "n2uq"))


# --- one cell, in a worker process -------------------------------------------------------------

def _data(config: Config, dataset: str, seed: int):
    hp = config.train
    from fxfusion.demo.data import ShapesDataset, make_loader
    from fxfusion.demo.digits import DigitScenesDataset

    if dataset == "shapes":
        make = lambda split, n: ShapesDataset(split, n=n, img_size=hp.img_size, seed=seed)  # noqa: E731
    else:
        make = lambda split, n: DigitScenesDataset(split, n=n, img_size=hp.img_size, seed=seed)  # noqa: E731
    train_set, val_set = make("train", hp.n_train), make("val", hp.n_val)
    train_loader = make_loader(train_set, hp.batch_size, seed=seed, drop_last=True)
    fixed = list(itertools.islice(make_loader(train_set, hp.batch_size, shuffle=False),
                                  max(hp.bn_batches, hp.calib_batches)))
    return train_set, val_set, train_loader, fixed


def _build(config: Config, num_classes: int):
    hp = config.train
    from fxfusion import zoo

    return zoo.build("yolov5", nc=num_classes, width_multiple=hp.width_multiple, img_size=hp.img_size)


def _setup_worker() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"fxfusion\..*")


def fp_cell(config: Config, dataset: str, seed: int, cache: str) -> dict[str, Any]:
    """Train the FP32 teacher of (dataset, seed), save it, score it."""
    hp = config.train
    from fxfusion.demo.loss import YoloLoss
    from fxfusion.demo.pipeline import score
    from fxfusion.demo.train import train

    _setup_worker()
    t0 = time.perf_counter()
    train_set, val_set, loader, _ = _data(config, dataset, seed)
    torch.manual_seed(seed)
    fp = _build(config, train_set.num_classes)
    train(fp, loader, hp.fp_steps, lr=hp.fp_lr, optimizer="adam", loss_fn=YoloLoss(fp), progress=False,
          warmup_steps=min(100, hp.fp_steps // 10), schedule="linear", final_lr_ratio=0.05, weight_decay=0.0,
          seed=seed)
    path = Path(cache) / f"fp_{dataset}_{seed}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(fp.state_dict(), tmp)
    os.replace(tmp, path)
    return {"kind": "fp", "dataset": dataset, "seed": seed, "map50": score(fp, val_set)["map50"],
            "seconds": time.perf_counter() - t0}


def qat_cell(config: Config, dataset: str, seed: int, bits: int, method: str, cache: str) -> dict[str, Any]:
    """All variants of one (dataset, seed, bits, method) cell from the seed's FP32 checkpoint."""
    hp = config.train
    import fxfusion
    from fxfusion.demo.loss import YoloLoss
    from fxfusion.demo.pipeline import ADAHook, gabfusion_demo_model, neck_ada, reestimate_batchnorm, score
    from fxfusion.demo.train import train

    _setup_worker()
    train_set, val_set, loader, fixed = _data(config, dataset, seed)
    fp = _build(config, train_set.num_classes)
    fp.load_state_dict(torch.load(Path(cache) / f"fp_{dataset}_{seed}.pt", weights_only=True))
    example = torch.stack([val_set[i][0] for i in range(2)])
    qat = dict(method=method, w_bits=bits, a_bits=bits, first_last_bits=8)
    schedule = dict(lr=hp.qat_lr, progress=False, seed=seed, schedule="linear", final_lr_ratio=0.05,
                    weight_decay=0.0)
    default_div = "js" if method == "n2uq" else "kl"
    runs: list[tuple[str, str | None]] = [("baseline", None), ("gab", None), ("gab+ada", default_div)]
    if (bits, method) in ABLATION:
        runs.append((f"gab+ada[{'kl' if default_div == 'js' else 'js'}]", "kl" if default_div == "js" else "js"))

    scores: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for variant, divergence in runs:
        t0 = time.perf_counter()
        if variant == "baseline":
            student = fxfusion.quantize(fp, example, **qat)
        else:
            rewritten = gabfusion_demo_model(fp, example)
            reestimate_batchnorm(rewritten, fixed[:hp.bn_batches])
            student = fxfusion.quantize(rewritten, example, **qat)
        hooks, ada = [], None
        if divergence is not None:
            ada = neck_ada(student, fp, divergence, hp.ada_weight)
            hooks.append(ADAHook(ada))
        train(student, loader, hp.qat_steps, loss_fn=YoloLoss(student), hooks=hooks, **schedule)
        if ada is not None:
            ada.remove()
        scores[variant] = score(student, val_set)["map50"]
        if variant in ("gab", "gab+ada"):
            deployed = fxfusion.deploy(student, fixed[:hp.calib_batches], progress=False)
            scores[f"{variant} deployed, no fine-tune"] = score(deployed, val_set)["map50"]
            if hp.finetune_steps:
                train(deployed, loader, hp.finetune_steps, lr=hp.finetune_lr, optimizer="adam",
                      loss_fn=YoloLoss(deployed), progress=False, seed=seed, weight_decay=0.0,
                      schedule="linear", final_lr_ratio=1.0)
            scores[f"{variant} deployed"] = score(deployed, val_set)["map50"]
        seconds[variant] = time.perf_counter() - t0
    return {"kind": "qat", "dataset": dataset, "seed": seed, "bits": bits, "method": method, "map50": scores,
            "seconds": seconds}


# --- orchestration -------------------------------------------------------------------------------

def run(config: Config, out: Path, workers: int, progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out/accuracy_runs.jsonl``; return all records."""
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "accuracy_cache"
    cache.mkdir(exist_ok=True)
    log = out / "accuracy_runs.jsonl"
    fingerprint = _fingerprint(config)
    records = _load(log, fingerprint)
    done = {_key(r) for r in records}

    fp_todo = [(d, s) for d in config.datasets for s in config.seeds
               if ("fp", d, s) not in done or not (cache / f"fp_{d}_{s}.pt").exists()]
    # Slow methods first, so the pool ends with short cells.
    cost = {"n2uq": 0, "dsq": 1, "pact": 2, "lsq": 3}
    qat_todo = sorted(((d, s, b, m) for d in config.datasets for s in config.seeds for b in config.bits
                       for m in config.methods if ("qat", d, s, b, m) not in done),
                      key=lambda c: (c[1], cost.get(c[3], 9)))
    total = len(fp_todo) + len(qat_todo)
    bar = _bar(total, progress)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_spawn())
    # SIGTERM (kill, a CI timeout) becomes SystemExit, so the workers are stopped with this process
    # instead of finishing their cells as orphans.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        pending = {pool.submit(fp_cell, config, d, s, str(cache)): ("fp", d, s) for d, s in fp_todo}
        waiting = list(qat_todo)
        fp_ready = {(d, s) for d in config.datasets for s in config.seeds} - set(fp_todo)

        def submit_ready() -> None:
            for cell in [c for c in waiting if (c[0], c[1]) in fp_ready]:
                waiting.remove(cell)
                pending[pool.submit(qat_cell, config, *cell, str(cache))] = ("qat", *cell)

        submit_ready()
        while pending:
            future = next(as_completed(pending))
            key = pending.pop(future)
            record = future.result()  # a failing cell stops the run; finished cells stay in the log
            record["config"] = fingerprint
            records.append(record)
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            if key[0] == "fp":
                fp_ready.add(key[1:])
                submit_ready()
            bar.update(1)
            bar.write(_one_line(record))
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown()
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    return records


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _one_line(r: dict[str, Any]) -> str:
    if r["kind"] == "fp":
        return f"FP32 {r['dataset']} seed {r['seed']}: mAP@0.5 {r['map50']:.3f} ({r['seconds']:.0f} s)"
    scores = "  ".join(f"{k} {v:.3f}" for k, v in r["map50"].items() if "no fine-tune" not in k)
    return (f"{r['dataset']} seed {r['seed']} W{r['bits']}A{r['bits']} {r['method']}: {scores} "
            f"({sum(r['seconds'].values()):.0f} s)")


# --- tables ----------------------------------------------------------------------------------------

def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds, gains and gap closed, per dataset, bits and method."""
    fp = {}
    for r in records:
        if r["kind"] == "fp":
            fp.setdefault(r["dataset"], []).append(r["map50"])
    cells: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        if r["kind"] == "qat":
            entry = cells.setdefault((r["dataset"], r["bits"], r["method"]), {})
            for variant, value in r["map50"].items():
                entry.setdefault(variant, []).append(value)
    rows, ablation = [], []
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
                   "variant": LABELS[variant], "n": len(scores[variant]), "mAP@0.5": _pm(scores[variant])}
            if variant != "baseline":
                gain = mean - base
                row["gain"] = f"{gain:+.3f}"
                row["gap closed"] = _share(gain, fp_mean - base)
                deployed = scores.get(f"{variant} deployed")
                row["deployed (no LN)"] = _pm(deployed) if deployed else ""
                row["deployed gain"] = f"{_mean(deployed) - base:+.3f}" if deployed else ""
            rows.append(row)
        for variant in [v for v in scores if v.startswith("gab+ada[")]:
            divergence = variant[len("gab+ada["):-1]
            default = "JS" if method == "n2uq" else "KL"
            ablation.append({"dataset": dataset, "bits": f"W{bits}A{bits}", "method": method.upper(),
                             "default": default, "mAP@0.5 default": _pm(scores["gab+ada"]),
                             "other": divergence.upper(), "mAP@0.5 other": _pm(scores[variant]),
                             "other - default": f"{_mean(scores[variant]) - _mean(scores['gab+ada']):+.3f}"})
    fp_rows = [{"dataset": d, "n": len(v), "FP32 mAP@0.5": _pm(v)} for d, v in fp.items()]
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
    return {"fp": fp_rows, "table1": table1, "rows": rows, "ablation": ablation, "overall": overall,
            "cells": {"/".join(map(str, k)): v for k, v in cells.items()}}


def _table1_row(key: tuple, scores: dict[str, list[float]], fp: list[float]) -> dict[str, Any]:
    """One line per cell, as the paper's Table 1 reads: means over seeds, then gain and gap closed."""
    dataset, bits, method = key
    base, gab, ada = (_mean(scores.get(v, [])) for v in ("baseline", "gab", "gab+ada"))
    deployed = _mean(scores.get("gab+ada deployed", []))
    return {"dataset": dataset, "W/A": f"{bits}/{bits}", "method": method.upper(), "FP32": f"{_mean(fp):.3f}",
            "baseline": f"{base:.3f}", "+GAB": f"{gab:.3f}", "+GAB+ADA": f"{ada:.3f}", "deployed": f"{deployed:.3f}",
            "gain": f"{ada - base:+.3f}", "gap closed": _share(ada - base, _mean(fp) - base),
            "seeds": len(scores.get("baseline", []))}


def _mean(values) -> float:
    return statistics.fmean(values) if values else math.nan


def _pm(values) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _share(gain: float, gap: float) -> str:
    if not math.isfinite(gap) or gap < 0.02:  # a smaller gap is within the seed noise
        return "n/a (no gap)"
    return f"{100 * gain / gap:+.0f} %"


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Bar chart of mean mAP@0.5 per cell and variant, one panel per dataset; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def report(records: list[dict[str, Any]], config: Config, out: Path, quick: bool) -> dict[str, Any]:
    summary = summarize(records)
    print_table(summary["fp"], title="FP32 reference")
    print_table(summary["table1"], title="Table 1 at CPU scale: mean mAP@0.5 over seeds (gain, gap closed: "
                                         "+GAB+ADA vs baseline; deployed: +GAB+ADA without LayerNorm)")
    print_table(summary["rows"], ROW_COLUMNS,
                title="mAP@0.5, mean ± std over seeds (gain and gap closed vs the QAT baseline)")
    if summary["ablation"]:
        print_table(summary["ablation"], title="ADA divergence ablation (+GABFusion+ADA)")
    print_table(summary["overall"], title="Over all cells: gain of the mean vs the QAT baseline")
    qat_seconds = [sum(r["seconds"].values()) for r in records if r["kind"] == "qat"]
    payload = {"environment": environment(), "quick": quick, "config": asdict(config), "summary": summary,
               "records": records, "cpu_seconds_total": sum(qat_seconds) + sum(
                   r["seconds"] for r in records if r["kind"] == "fp")}
    md = "\n\n".join([
        "# Accuracy: the paper's Table 1 at CPU scale (mAP@0.5, YOLOv5-style, first/last layers 8-bit)",
        _describe(config), "## FP32", markdown_table(summary["fp"]),
        "## Table 1 (means over seeds; gain and gap closed of +GAB+ADA; deployed = +GAB+ADA without LayerNorm)",
        markdown_table(summary["table1"]),
        "## QAT grid", markdown_table(summary["rows"], ROW_COLUMNS),
        "## ADA divergence ablation", markdown_table(summary["ablation"]),
        "## Over all cells", markdown_table(summary["overall"])])
    write_results(out, "accuracy", payload, md)
    if plot(summary, out / "accuracy.png"):
        print(f"wrote {out / 'accuracy.png'}")  # noqa: T201
    return payload


def _describe(config: Config) -> str:
    hp = config.train
    return (f"{hp.img_size} px, width x{hp.width_multiple}, {hp.n_train} train / {hp.n_val} val "
            f"images, batch {hp.batch_size}; FP32 {hp.fp_steps} Adam steps; QAT {hp.qat_steps} SGD "
            f"steps, lr {hp.qat_lr:g}; ADA weight {hp.ada_weight:g}; deploy: {hp.calib_batches} "
            f"calibration batches + {hp.finetune_steps} Adam steps (lr {hp.finetune_lr:g}); seeds "
            f"{list(config.seeds)}. 'gap closed' = gain / (FP32 - baseline).")


# --- plumbing --------------------------------------------------------------------------------------

def _fingerprint(config: Config) -> dict[str, Any]:
    """The settings a record depends on (not which cells are selected)."""
    return {k: v for k, v in asdict(config.train).items() if k not in ("method", "bits", "seed")}


def _load(log: Path, fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    records, stale = [], 0
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("config") == json.loads(json.dumps(fingerprint)):
            records.append(record)
        else:
            stale += 1
    if stale:
        print(f"ignoring {stale} record(s) of {log} made with other settings")  # noqa: T201
    return records


def _key(r: dict[str, Any]) -> tuple:
    if r["kind"] == "fp":
        return ("fp", r["dataset"], r["seed"])
    return ("qat", r["dataset"], r["seed"], r["bits"], r["method"])


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="accuracy cells", disable=not enabled, dynamic_ncols=True)


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
    config = Config.quick() if args.quick else Config()
    if args.seeds:
        config = replace(config, seeds=tuple(args.seeds))
    if args.datasets:
        config = replace(config, datasets=tuple(args.datasets))
    if args.render:
        records = _load(args.out / "accuracy_runs.jsonl", _fingerprint(config))
        if not records:
            parser.error(f"no records with these settings in {args.out / 'accuracy_runs.jsonl'}")
    else:
        t0 = time.perf_counter()
        records = run(config, args.out, args.workers, progress=not args.no_progress)
        print(f"grid done in {time.perf_counter() - t0:.0f} s wall")  # noqa: T201
    return report(records, config, args.out, args.quick)


if __name__ == "__main__":
    main()
