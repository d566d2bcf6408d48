"""The shared engine of the accuracy grid and the ablation: resumable QAT runs from FP32 checkpoints.

A *run* is one (dataset, seed, bits, method, variant): QAT of the seed's FP32 checkpoint, either
plain (the baseline) or with GABFusion applied by the variant's :class:`Recipe`, then scored,
and for GABFusion variants deployed (LayerNorm frozen and folded) and optionally fine-tuned. Runs
execute in ``workers`` processes of one thread each. Every finished run (and every FP32 training)
is appended to a JSONL log as one record, fingerprinted with the settings it depends on; a rerun
skips what is there, so an interrupted benchmark resumes where it stopped, across sessions.
FP32 checkpoints are cached in ``<out>/accuracy_cache`` (shared by the grid and the ablation; not
committed). FP32 training on one thread is deterministic: a later session that retrains a missing
checkpoint gets the same tensors (checked: shapes seed 102, retrained in another process, equal
bit for bit), so the QAT runs already logged for that seed stay valid.

The FP32 record also holds the score of the FP32 model right after the default rewrite (no
training), and the per-branch gradient norms at the neck Concats; a baseline run holds the same
gradient profile after QAT (the paper's imbalance check).
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxfusion.demo.pipeline import DemoConfig
from fxfusion.demo.recipe import DEFAULT_RECIPE, Recipe

DATASETS = ("shapes", "digits")
PROFILE_BATCHES = 4
# Slow methods first, so that a pool ends with short runs.
_COST = {"n2uq": 0, "dsq": 1, "pact": 2, "lsq": 3}


@dataclass(frozen=True)
class Variant:
    """One row of a benchmark: the QAT baseline (``recipe=None``) or GABFusion applied by ``recipe``.

    ``qat_steps`` overrides the setup's QAT length; ``divergence`` the ADA divergence (default:
    JS for N2UQ, KL otherwise, as the paper found); ``profile`` records the gradient profile
    after QAT (baselines always do).
    """

    name: str
    recipe: Recipe | None = None
    qat_steps: int | None = None
    divergence: str | None = None
    profile: bool = False


@dataclass(frozen=True)
class Setup:
    """What to run: training sizes (``train``; its method/bits/seed unused), cells and variants."""

    train: DemoConfig
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    datasets: tuple[str, ...] = DATASETS
    bits: tuple[int, ...] = (4, 3)
    methods: tuple[str, ...] = ("lsq", "pact", "dsq", "n2uq")
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)  # DemoConfig overrides per dataset
    variant_major: bool = False  # run variant by variant (complete rows first) instead of seed by seed

    def config(self, dataset: str) -> DemoConfig:
        from dataclasses import replace

        return replace(self.train, **self.per_dataset.get(dataset, {}))


# --- work done in a worker process ----------------------------------------------------------------

def _setup_worker() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"fxfusion\..*")


def _data(hp: DemoConfig, dataset: str, seed: int):
    import itertools

    from fxfusion.demo.data import ShapesDataset, make_loader
    from fxfusion.demo.digits import DigitScenesDataset

    cls = ShapesDataset if dataset == "shapes" else DigitScenesDataset
    train_set = cls("train", n=hp.n_train, img_size=hp.img_size, seed=seed)
    val_set = cls("val", n=hp.n_val, img_size=hp.img_size, seed=seed)
    loader = make_loader(train_set, hp.batch_size, seed=seed, drop_last=True)
    fixed = list(itertools.islice(make_loader(train_set, hp.batch_size, shuffle=False),
                                  max(hp.bn_batches, hp.calib_batches, PROFILE_BATCHES)))
    return train_set, val_set, loader, fixed


def _build(hp: DemoConfig, num_classes: int):
    from fxfusion import zoo

    return zoo.build("yolov5", nc=num_classes, width_multiple=hp.width_multiple, img_size=hp.img_size)


def _neck_profile(model, batches, gabfusion: bool) -> dict[str, Any]:
    """Per-branch mean ||∂L/∂x_i|| at the neck Concats, and max/min per site."""
    from fxfusion.demo.loss import YoloLoss
    from fxfusion.demo.recipe import neck_concats
    from fxfusion.profile import profile_gradients

    concats = neck_concats(model)
    sites = [f"{p}.gabfusion0" for p in concats] if gabfusion else concats
    loss = YoloLoss(model)
    prof = profile_gradients(model, lambda m, b: loss(m(b[0]), b[1])[0], batches, sites=sites)
    out: dict[str, Any] = {}
    for row in prof.rows:
        site = row["site"].removesuffix(".gabfusion0")
        entry = out.setdefault(site, {"means": [], "ratio": row["ratio"]})
        entry["means"].append(row["mean"])
    return out


def fp_run(setup: Setup, dataset: str, seed: int, cache: str) -> dict[str, Any]:
    """Train (or load) the FP32 model of (dataset, seed); score it, its default rewrite, its gradients."""
    import fxfusion.demo.recipe as recipes
    from fxfusion.demo.loss import YoloLoss
    from fxfusion.demo.pipeline import score
    from fxfusion.demo.train import train

    _setup_worker()
    hp = setup.config(dataset)
    t0 = time.perf_counter()
    train_set, val_set, loader, fixed = _data(hp, dataset, seed)
    torch.manual_seed(seed)
    fp = _build(hp, train_set.num_classes)
    path = _checkpoint(cache, hp, dataset, seed)
    if path.exists():
        fp.load_state_dict(torch.load(path, weights_only=True))
    else:
        train(fp, loader, hp.fp_steps, lr=hp.fp_lr, optimizer="adam", loss_fn=YoloLoss(fp), progress=False,
              warmup_steps=min(100, hp.fp_steps // 10), schedule="linear", final_lr_ratio=0.05, weight_decay=0.0,
              seed=seed)
        tmp = path.with_suffix(".tmp")
        torch.save(fp.state_dict(), tmp)
        os.replace(tmp, path)
    seconds = time.perf_counter() - t0
    example = torch.stack([val_set[i][0] for i in range(2)])
    rewritten = {}
    for name, recipe in (("default", DEFAULT_RECIPE), ("paper", recipes.PAPER_RECIPE)):
        model = recipes.gabfusion_student(fp, example, recipe, fixed[:hp.bn_batches])
        rewritten[name] = score(model, val_set)["map50"]
    return {"kind": "fp", "dataset": dataset, "seed": seed, "map50": score(fp, val_set)["map50"],
            "map50_rewritten": rewritten, "gradients": _neck_profile(fp, fixed[:PROFILE_BATCHES], False),
            "seconds": seconds}


def qat_run(setup: Setup, dataset: str, seed: int, bits: int, method: str, variant: Variant,
            cache: str) -> dict[str, Any]:
    """One QAT run from the seed's FP32 checkpoint; GABFusion variants are also deployed."""
    import fxfusion
    from fxfusion.demo.loss import YoloLoss
    from fxfusion.demo.pipeline import score
    from fxfusion.demo.recipe import gabfusion_student, recipe_hooks, recipe_lr_scale
    from fxfusion.demo.train import train
    from fxfusion.passes.rewrite import gabfusion_modules

    _setup_worker()
    hp = setup.config(dataset)
    t0 = time.perf_counter()
    train_set, val_set, loader, fixed = _data(hp, dataset, seed)
    fp = _build(hp, train_set.num_classes)
    fp.load_state_dict(torch.load(_checkpoint(cache, hp, dataset, seed), weights_only=True))
    example = torch.stack([val_set[i][0] for i in range(2)])
    steps = variant.qat_steps or hp.qat_steps
    qat = dict(method=method, w_bits=bits, a_bits=bits, first_last_bits=8)
    schedule = dict(lr=hp.qat_lr, progress=False, seed=seed, schedule="linear", final_lr_ratio=0.05,
                    weight_decay=0.0)
    scores: dict[str, float] = {}
    record: dict[str, Any] = {"kind": "qat", "dataset": dataset, "seed": seed, "bits": bits, "method": method,
                              "variant": variant.name}
    recipe = variant.recipe
    if recipe is None:
        student, hooks, ada = fxfusion.quantize(fp, example, **qat), [], None
    else:
        rewritten = gabfusion_student(fp, example, recipe, fixed[:hp.bn_batches])
        scores["before QAT"] = score(rewritten, val_set)["map50"]
        student = fxfusion.quantize(rewritten, example, **qat)
        divergence = variant.divergence or ("js" if method == "n2uq" else "kl")
        hooks, ada = recipe_hooks(student, fp, recipe, steps, divergence, hp.ada_weight)
    train(student, loader, steps, loss_fn=YoloLoss(student), hooks=hooks, lr_scale=recipe_lr_scale(recipe),
          **schedule)
    if ada is not None:
        ada.remove()
    scores["QAT"] = score(student, val_set)["map50"]
    if recipe is None or variant.profile:
        record["gradients"] = _neck_profile(student, fixed[:PROFILE_BATCHES], recipe is not None)
    if recipe is not None:
        record["alpha"] = {n: [round(float(a), 4) for a in m.alpha().detach()]
                           for n, m in gabfusion_modules(student).items()}
        deployed = fxfusion.deploy(student, fixed[:hp.calib_batches], progress=False)
        scores["deployed, no fine-tune"] = score(deployed, val_set)["map50"]
        # the paper's short fine-tune repairs what dropping the LayerNorm changed; an exact deploy skips it
        if hp.finetune_steps and deployed.fxfusion_reports["deploy"].output_deviation["max_vs_undeployed"] > 0:
            train(deployed, loader, hp.finetune_steps, lr=hp.finetune_lr, optimizer="adam",
                  loss_fn=YoloLoss(deployed), progress=False, seed=seed, weight_decay=0.0,
                  schedule="linear", final_lr_ratio=1.0)
            scores["deployed"] = score(deployed, val_set)["map50"]
        elif hp.finetune_steps:
            scores["deployed"] = scores["deployed, no fine-tune"]
    record.update(map50=scores, seconds=time.perf_counter() - t0)
    return record


def _checkpoint(cache: str, hp: DemoConfig, dataset: str, seed: int) -> Path:
    """The FP32 checkpoint path; its name carries the settings the FP32 training depends on."""
    keys = ("img_size", "width_multiple", "n_train", "batch_size", "fp_steps", "fp_lr")
    tag = "_".join(f"{getattr(hp, k):g}" for k in keys)
    return Path(cache) / f"fp_{dataset}_{seed}_{tag}.pt"


# --- orchestration -------------------------------------------------------------------------------

def fingerprint(setup: Setup, record_key: tuple) -> dict[str, Any]:
    """The settings a record depends on: its dataset's training settings, and its variant."""
    hp = asdict(setup.config(record_key[1]))
    if record_key[0] == "fp":
        return _normalized({"train": hp})
    variant = next(v for v in setup.variants if v.name == record_key[-1])
    return _normalized({"train": hp, "variant": asdict(variant)})


def _normalized(fp: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint without what a record does not depend on, and without options at their defaults.

    So an option added later (at a default that reproduces the old behaviour) leaves old records
    valid, and the demo's default recipe (``DemoConfig.recipe``) is no setting of any run: each
    variant carries its own recipe.
    """
    fp = json.loads(json.dumps(fp))
    train = {k: v for k, v in fp["train"].items() if k not in ("method", "bits", "seed", "recipe")}
    out: dict[str, Any] = {"train": train}
    if "variant" in fp:
        variant = _drop_defaults(fp["variant"], Variant)
        if isinstance(variant.get("recipe"), dict):
            variant["recipe"] = _drop_defaults(variant["recipe"], Recipe)
        out["variant"] = variant
    return out


def _drop_defaults(values: dict[str, Any], cls: type) -> dict[str, Any]:
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    return {k: v for k, v in values.items() if k not in defaults or json.loads(json.dumps(defaults[k])) != v
            or k == "name"}


def record_key(r: dict[str, Any]) -> tuple:
    if r["kind"] == "fp":
        return ("fp", r["dataset"], r["seed"])
    return ("qat", r["dataset"], r["seed"], r["bits"], r["method"], r["variant"])


def load(log: Path, setup: Setup) -> list[dict[str, Any]]:
    """The records of ``log`` that were made with the current settings of their key."""
    if not log.exists():
        return []
    names = {v.name for v in setup.variants}
    records, stale = {}, 0
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if (r["kind"] == "qat" and "variant" not in r) or "train" not in r.get("config", {}):
            stale += 1  # the format before per-run logs: a whole cell per record, a flat fingerprint
            continue
        key = record_key(r)
        if key[0] == "qat" and key[-1] not in names:
            continue
        if "config" in r and _normalized(r["config"]) == fingerprint(setup, key):
            records[key] = r  # the last one wins
        else:
            stale += 1
    if stale:
        print(f"ignoring {stale} record(s) of {log} made with other settings")  # noqa: T201
    return list(records.values())


def todo(setup: Setup, done: set) -> tuple[list[tuple], list[tuple]]:
    fp = [("fp", d, s) for d in setup.datasets for s in setup.seeds if ("fp", d, s) not in done]
    qat = [("qat", d, s, b, m, v.name) for d in setup.datasets for s in setup.seeds for b in setup.bits
           for m in setup.methods for v in setup.variants if ("qat", d, s, b, m, v.name) not in done]
    rank = {v.name: i for i, v in enumerate(setup.variants)}
    qat.sort(key=lambda k: (rank[k[5]] if setup.variant_major else 0, k[2], _COST.get(k[4], 9)))
    return fp, qat


def run(setup: Setup, out: Path, log_name: str, workers: int, progress: bool = True,
        describe=lambda r: "") -> list[dict[str, Any]]:
    """Run every FP32 training and QAT run not yet in ``out/log_name``; return all current records."""
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "accuracy_cache"
    cache.mkdir(exist_ok=True)
    log = out / log_name
    records = load(log, setup)
    done = {record_key(r) for r in records}
    missing = {("fp", d, s) for d in setup.datasets for s in setup.seeds
               if not _checkpoint(str(cache), setup.config(d), d, s).exists()}
    done -= missing
    fp_todo, qat_todo = todo(setup, done)
    fp_todo = sorted(set(fp_todo) | missing)
    variants = {v.name: v for v in setup.variants}
    from tqdm import tqdm

    bar = tqdm(total=len(fp_todo) + len(qat_todo), desc=log_name.split("_")[0], disable=not progress,
               dynamic_ncols=True)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_spawn())
    # SIGTERM (kill, a CI timeout) becomes SystemExit, so the workers stop with this process.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        pending = {pool.submit(fp_run, setup, d, s, str(cache)): k for k in fp_todo for _, d, s in [k]}
        waiting = list(qat_todo)
        fp_ready = {(d, s) for d in setup.datasets for s in setup.seeds} - {k[1:] for k in fp_todo}

        def submit_ready() -> None:
            # Keep only ``workers`` runs in flight, so that they start in the order of ``todo``.
            for key in [k for k in waiting if (k[1], k[2]) in fp_ready]:
                if sum(k[0] == "qat" for k in pending.values()) >= workers:
                    return
                waiting.remove(key)
                _, d, s, b, m, name = key
                pending[pool.submit(qat_run, setup, d, s, b, m, variants[name], str(cache))] = key

        submit_ready()
        while pending:
            future = next(as_completed(pending))
            key = pending.pop(future)
            record = future.result()  # a failing run stops the benchmark; finished runs stay in the log
            record["config"] = fingerprint(setup, key)
            records = [r for r in records if record_key(r) != key] + [record]
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            if key[0] == "fp":
                fp_ready.add(key[1:])
            submit_ready()
            bar.update(1)
            bar.write(describe(record) or _one_line(record))
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


def _one_line(r: dict[str, Any]) -> str:
    if r["kind"] == "fp":
        return (f"FP32 {r['dataset']} seed {r['seed']}: mAP@0.5 {r['map50']:.3f}, after rewrite "
                f"{r['map50_rewritten']['default']:.3f} ({r['seconds']:.0f} s)")
    scores = "  ".join(f"{k} {v:.3f}" for k, v in r["map50"].items())
    return (f"{r['dataset']} seed {r['seed']} W{r['bits']}A{r['bits']} {r['method']} {r['variant']}: {scores} "
            f"({r['seconds']:.0f} s)")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")
