"""The end-to-end demo as library code: ``fxfusion demo`` runs :func:`run_demo`, benchmarks reuse the steps.

Six phases, all on the seeded synthetic :class:`~fxfusion.demo.data.ShapesDataset` and the zoo's
YOLOv5 (P3-P5, anchor-based Detect)::

    [1/6] FP32          train from scratch (Adam)                                   -> the teacher
    [2/6] QAT baseline  quantize(fp)                 W{b}A{b}, first/last 8-bit, task loss (SGD)
    [3/6] QAT + GABF    quantize(rewrite(fp))        same steps, seed and lr, + ADA vs the FP32 teacher
    [4/6] deploy        deploy(gabf, calibration batches), fine-tune (Adam, lr 2e-5, task loss only)
    [5/6] ONNX          export_onnx (QDQ, opset 21), verify_onnx on val images, mAP in onnxruntime
    [6/6] figures       per-branch gradient norms at the neck Concats, detections, report.json

GABFusion is applied by :data:`~fxfusion.demo.recipe.DEFAULT_RECIPE` (``DemoConfig.recipe``): the
``cat`` sites of the four neck Concats (the paper's placement in YOLO), rewritten so that the
model still computes what the FP32 model computed, with the normalization gate opened and closed
again during QAT by :class:`~fxfusion.NormSchedule`. ADA distils at the same four sites: the
student's GABFusion output against the FP32 model's Concat output (SimAM attention; KL for the
uniform quantizers, JS for N2UQ, as the paper found best; weight 0.01).

Every model is scored with :func:`~fxfusion.demo.evaluate.evaluate_map` (COCO mAP@0.5 and
mAP@0.5:0.95) after NMS at ``conf_thres=0.001``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import fxfusion
from fxfusion import zoo
from fxfusion.demo.data import ShapesDataset, make_loader
from fxfusion.demo.evaluate import evaluate_map
from fxfusion.demo.loss import YoloLoss
from fxfusion.demo.plots import plot_bars, plot_detections
from fxfusion.demo.postprocess import non_max_suppression
from fxfusion.demo.recipe import (
    DEFAULT_RECIPE,
    ADAHook,
    Recipe,
    gabfusion_student,
    neck_ada,
    neck_concats,
    recipe_hooks,
    recipe_lr_scale,
    reestimate_batchnorm,
)
from fxfusion.demo.train import train
from fxfusion.report import dumps, format_table, write_atomic

__all__ = [
    "DEMO_METHODS",
    "ADAHook",
    "DemoConfig",
    "check_demo_args",
    "gabfusion_student",
    "neck_ada",
    "neck_concats",
    "onnx_predictor",
    "recipe_hooks",
    "reestimate_batchnorm",
    "run_demo",
    "score",
    "torch_predictor",
]

DEMO_METHODS = ("lsq", "pact", "dsq", "n2uq")
PHASES = 6


@dataclass(frozen=True)
class DemoConfig:
    """Sizes, steps and learning rates of one demo run (see :meth:`preset`)."""

    method: str = "lsq"
    bits: int = 4
    seed: int = 0
    img_size: int = 96
    width_multiple: float = 0.125
    num_classes: int = 3
    n_train: int = 2000
    n_val: int = 200
    batch_size: int = 16
    fp_steps: int = 1200
    fp_lr: float = 2e-3
    qat_steps: int = 800
    qat_lr: float = 3e-3
    bn_batches: int = 8
    ada_weight: float = 0.01
    finetune_steps: int = 200
    finetune_lr: float = 2e-5
    calib_batches: int = 4
    profile_batches: int = 4
    verify_images: int = 16
    recipe: Recipe = DEFAULT_RECIPE
    pow2: bool = False  # power-of-two quantizer scales: a bit-exact ONNX (quantize(..., pow2=True))

    def __post_init__(self) -> None:
        check_demo_args(self.method, self.bits)
        for name in ("img_size", "n_train", "n_val", "batch_size", "fp_steps", "bn_batches", "calib_batches",
                     "profile_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)} must be >= 1")
        if self.img_size % 32:
            raise ValueError(f"DemoConfig.img_size={self.img_size} must be a multiple of 32 (the P5 stride)")

    @classmethod
    def preset(cls, method: str = "lsq", bits: int = 4, quick: bool = False, seed: int = 0,
               pow2: bool = False) -> DemoConfig:
        """The settings of ``fxfusion demo`` (about 10 min on 2 cores) or ``--quick`` (about 1 min)."""
        config = cls(method=method, bits=bits, seed=seed, pow2=pow2)
        if quick:
            config = replace(config, img_size=64, width_multiple=0.0625, n_train=512, n_val=64, fp_steps=300,
                             qat_steps=60, finetune_steps=20, bn_batches=4, calib_batches=2, profile_batches=2,
                             verify_images=8)
        return config

    @property
    def divergence(self) -> str:
        # The paper: KL works best for uniform quantizers (LSQ, PACT), JS for non-uniform N2UQ.
        return "js" if self.method == "n2uq" else "kl"

    @property
    def tag(self) -> str:
        return f"{self.method} W{self.bits}A{self.bits}{', pow2' if self.pow2 else ''}"


def check_demo_args(method: str, bits: int, out: str | os.PathLike | None = None) -> None:
    """Validate the demo's options before any work; ValueError says what is accepted.

    Example:
        >>> from fxfusion.demo.pipeline import check_demo_args
        >>> check_demo_args("lsq", 4)
        >>> check_demo_args("lsq", 1)
        Traceback (most recent call last):
        ...
        ValueError: bits=1 is outside ...; pass e.g. bits=4
    """
    from fxfusion.quant import MAX_BITS, MIN_BITS

    if method not in DEMO_METHODS:
        raise ValueError(f"method={method!r} is not a demo QAT method; choose one of {', '.join(DEMO_METHODS)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is outside {MIN_BITS}..{MAX_BITS}; pass e.g. bits=4")
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ValueError(f"out={os.fspath(out)!r} exists and is not a directory; pass a folder")
        parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        if not os.access(parent, os.W_OK):
            raise ValueError(f"out={os.fspath(out)!r}: {os.fspath(parent)!r} is not writable; pass another folder")


def run_demo(
    method: str = "lsq",
    bits: int = 4,
    quick: bool = False,
    out: str | os.PathLike = "fxfusion-demo",
    seed: int = 0,
    progress: bool = True,
    *,
    pow2: bool = False,
    config: DemoConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole demo and write ``model.onnx``, ``report.json``, ``gradient_balance.png``, ``detections.png``.

    Args:
        method: QAT quantizer: ``"lsq"``, ``"pact"``, ``"dsq"`` or ``"n2uq"``.
        bits: weight and activation bits of the inner layers (first and last layers use 8).
        quick: the small preset (about a minute), to check the pipeline rather than the method.
        out: output folder (created).
        seed: seed of the data, the model init and every training run.
        progress: show tqdm bars for the training phases.
        pow2: power-of-two quantizer scales (see :func:`fxfusion.quantize`).
        config: explicit settings (overrides ``method``/``bits``/``quick``/``seed``/``pow2``).
        log: receives the one-line phase logs and the summary (default: stdout).

    Returns:
        The report written to ``report.json`` (plain JSON values).

    Example:
        The settings of ``quick=True``:

        >>> from fxfusion.demo.pipeline import DemoConfig, run_demo
        >>> config = DemoConfig.preset("lsq", 4, quick=True)
        >>> config.tag, config.img_size, config.n_train, config.fp_steps, config.qat_steps
        ('lsq W4A4', 64, 512, 300, 60)

        The run itself takes about a minute:

        >>> import tempfile
        >>> report = run_demo(config=config, out=tempfile.mkdtemp())  # doctest: +SKIP
        >>> report["map50"]["QAT + GABFusion + ADA (lsq W4A4)"]  # doctest: +SKIP
    """
    config = config or DemoConfig.preset(method, bits, quick, seed, pow2)
    check_demo_args(config.method, config.bits, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch's own deprecation notice, raised when pytree specs are copied (deepcopy of a rewritten model).
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return _run(config, out, progress, log or _stdout)


def _run(config: DemoConfig, out: Path, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    timings: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    steps: dict[str, int] = {}

    # [1/6] data and the FP32 model ------------------------------------------------------------
    t0 = time.perf_counter()
    data = _Data(config)
    say(f"[1/{PHASES}] FP32 YOLOv5 (width x{config.width_multiple}, {config.img_size} px) on {config.n_train} "
        f"synthetic images: {config.fp_steps} steps, Adam lr {config.fp_lr:g}, batch {config.batch_size}")
    torch.manual_seed(config.seed)
    fp = zoo.build("yolov5", nc=config.num_classes, width_multiple=config.width_multiple, img_size=config.img_size)
    train(fp, data.train_loader, config.fp_steps, lr=config.fp_lr, optimizer="adam", loss_fn=YoloLoss(fp),
          desc="[1/6] fp32", progress=progress, warmup_steps=min(100, config.fp_steps // 10), schedule="linear",
          final_lr_ratio=0.05, weight_decay=0.0, seed=config.seed)
    scores["FP32"] = score(fp, data.val)
    steps["FP32"] = config.fp_steps
    timings["fp32"] = time.perf_counter() - t0
    say(f"      FP32 mAP@0.5 {scores['FP32']['map50']:.3f}  ({timings['fp32']:.0f} s)")

    x = data.example(2)
    qat_kwargs = dict(method=config.method, w_bits=config.bits, a_bits=config.bits, first_last_bits=8,
                      pow2=config.pow2)
    train_kwargs = dict(lr=config.qat_lr, progress=progress, seed=config.seed, schedule="linear",
                        final_lr_ratio=0.05, weight_decay=0.0)

    # [2/6] QAT baseline ------------------------------------------------------------------------
    t0 = time.perf_counter()
    name_base = f"QAT baseline ({config.tag})"
    say(f"[2/{PHASES}] {name_base}: {config.qat_steps} steps, SGD lr {config.qat_lr:g}, from the FP32 weights")
    baseline = fxfusion.quantize(fp, x, **qat_kwargs)
    train(baseline, data.train_loader, config.qat_steps, loss_fn=YoloLoss(baseline), desc="[2/6] qat baseline",
          **train_kwargs)
    scores[name_base] = score(baseline, data.val)
    steps[name_base] = config.qat_steps
    timings["qat_baseline"] = time.perf_counter() - t0
    say(f"      {name_base} mAP@0.5 {scores[name_base]['map50']:.3f}  ({timings['qat_baseline']:.0f} s)")

    # [3/6] QAT with GABFusion (+ ADA) ----------------------------------------------------------
    t0 = time.perf_counter()
    recipe = config.recipe
    name_gabf = f"QAT + GABFusion{' + ADA' if recipe.ada else ''} ({config.tag})"
    rewritten = gabfusion_student(fp, x, recipe, _take(data.calib_loader, config.bn_batches))
    rewrite_report = rewritten.fxfusion_reports["rewrite"]
    ada_text = (f", ADA (SimAM, {config.divergence.upper()}, weight {config.ada_weight:g}) vs the FP32 teacher"
                if recipe.ada else "")
    say(f"[3/{PHASES}] {name_gabf}: GABFusion at {len(rewrite_report.placed)} sites ({recipe.describe()})"
        f"{ada_text}; {config.qat_steps} steps, SGD lr {config.qat_lr:g}")
    scores["FP32 + GABFusion (before QAT)"] = score(rewritten, data.val)
    student = fxfusion.quantize(rewritten, x, **qat_kwargs)
    hooks, ada = recipe_hooks(student, fp, recipe, config.qat_steps, config.divergence, config.ada_weight)
    train(student, data.train_loader, config.qat_steps, loss_fn=YoloLoss(student), hooks=hooks,
          lr_scale=recipe_lr_scale(recipe), desc="[3/6] qat gabfusion", **train_kwargs)
    if ada is not None:
        ada.remove()
    scores[name_gabf] = score(student, data.val)
    steps[name_gabf] = config.qat_steps
    timings["qat_gabfusion_ada"] = time.perf_counter() - t0
    say(f"      {name_gabf} mAP@0.5 {scores[name_gabf]['map50']:.3f}  ({timings['qat_gabfusion_ada']:.0f} s)")

    # [4/6] deploy and fine-tune ----------------------------------------------------------------
    t0 = time.perf_counter()
    say(f"[4/{PHASES}] deploy on {config.calib_batches} calibration batches (a site whose gate is closed is the "
        f"original op again; an open one has its LayerNorm frozen and folded with α), then, if that changed the "
        f"model, fine-tune {config.finetune_steps} steps, Adam lr {config.finetune_lr:g}")
    calib = _take(data.calib_loader, config.calib_batches)
    deployed = fxfusion.deploy(student, calib, progress=progress)
    deploy_report = deployed.fxfusion_reports["deploy"]
    say(f"      {_deploy_summary(deploy_report)}")
    changed = deploy_report.output_deviation.get("max_vs_undeployed", math.inf) > 0
    finetune = config.finetune_steps if changed else 0  # the paper's fine-tune repairs an approximation
    if changed:
        scores["deployed, before fine-tune (PyTorch)"] = score(deployed, data.val)
    if finetune:
        train(deployed, data.train_loader, finetune, lr=config.finetune_lr, optimizer="adam",
              loss_fn=YoloLoss(deployed), desc="[4/6] fine-tune", progress=progress, seed=config.seed,
              weight_decay=0.0, schedule="linear", final_lr_ratio=1.0)
    scores["deployed (PyTorch)"] = score(deployed, data.val)
    steps["deployed (PyTorch)"] = finetune
    timings["deploy_finetune"] = time.perf_counter() - t0
    if changed:
        say(f"      deployed mAP@0.5 {scores['deployed, before fine-tune (PyTorch)']['map50']:.3f} before, "
            f"{scores['deployed (PyTorch)']['map50']:.3f} after fine-tune  ({timings['deploy_finetune']:.0f} s)")
    else:
        say(f"      deployed mAP@0.5 {scores['deployed (PyTorch)']['map50']:.3f}: the deployed model computes what "
            f"the QAT model computed, no fine-tune needed  ({timings['deploy_finetune']:.0f} s)")

    # [5/6] ONNX export, verification, onnxruntime mAP ------------------------------------------
    t0 = time.perf_counter()
    onnx_path = out / "model.onnx"
    say(f"[5/{PHASES}] export {onnx_path} (QDQ, opset 21) and verify it with onnxruntime on "
        f"{config.verify_images} val images")
    export_report = fxfusion.export_onnx(deployed, data.example(1), onnx_path)
    verify_report = fxfusion.verify_onnx(deployed, onnx_path, data.example(config.verify_images))
    scores["deployed (ONNX Runtime)"] = evaluate_map(onnx_predictor(onnx_path), data.val)
    timings["export_verify_onnx"] = time.perf_counter() - t0
    say(f"      ONNX {'verified' if verify_report.passed else 'FAILED verification'} (max abs err "
        f"{verify_report.max_abs_error:.2g}), onnxruntime mAP@0.5 {scores['deployed (ONNX Runtime)']['map50']:.3f}"
        f"  ({timings['export_verify_onnx']:.0f} s)")

    # [6/6] gradient balance, detections, report ------------------------------------------------
    t0 = time.perf_counter()
    say(f"[6/{PHASES}] gradient balance at the neck Concats ({config.profile_batches} batches), figures, report")
    balance = gradient_balance(baseline, student, _take(data.calib_loader, config.profile_batches))
    plot_bars(balance["plot"], out / "gradient_balance.png",
              f"Per-branch gradient norm at the neck Concats ({config.tag})", ylabel="mean ||dL/dx_i||",
              log_scale=True)
    images, targets = next(iter(data.show_loader))
    deployed.eval()
    with torch.no_grad():
        preds = non_max_suppression(deployed(images), conf_thres=0.25, iou_thres=0.45)  # YOLOv5's detect.py
    plot_detections(images, preds, targets, data.val.class_names, out / "detections.png")
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    rows = _summary_rows(scores, steps, name_base, name_gabf)
    table = format_table(rows, title=f"fxfusion demo: YOLOv5 on synthetic shapes, {config.tag} "
                                     f"(val: {config.n_val} images)")
    report = {
        "config": asdict(config),
        "map50": {k: v["map50"] for k, v in scores.items()},
        "map50_95": {k: v["map50_95"] for k, v in scores.items()},
        "scores": scores,
        "gain_map50": scores[name_gabf]["map50"] - scores[name_base]["map50"],
        "summary": rows,
        "timings_s": timings,
        "placement": {
            "recipe": recipe.to_dict(),
            "description": recipe.describe(),
            "ada": ({"sites": dict(ada.sites), "attention": "simam", "divergence": config.divergence,
                     "weight": config.ada_weight} if ada is not None else None),
            "rewrite": rewrite_report.to_dict(),
        },
        "alpha": _alphas(student),
        "gradient_balance": balance["rows"],
        "deploy": deploy_report.to_dict(),
        "export": export_report.to_dict(),
        "verify": verify_report.to_dict(),
        "files": {name: str(out / name) for name in
                  ("model.onnx", "report.json", "gradient_balance.png", "detections.png")},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": sys.version.split()[0]},
    }
    report = json.loads(dumps(report))
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    say("")
    say(table)
    say(f"\nwrote {', '.join(report['files'].values())}  (total {timings['total']:.0f} s)")
    return report


# --- the pieces, reusable by benchmarks ----------------------------------------------------------

def torch_predictor(model: nn.Module, conf_thres: float = 0.001, iou_thres: float = 0.6
                    ) -> Callable[[Tensor], list[Tensor]]:
    """``images -> boxes``: the model in eval mode, then NMS (for :func:`evaluate_map`)."""

    def predict(images: Tensor) -> list[Tensor]:
        model.eval()
        return non_max_suppression(model(images), conf_thres, iou_thres)

    return predict


def onnx_predictor(path: str | os.PathLike, conf_thres: float = 0.001, iou_thres: float = 0.6
                   ) -> Callable[[Tensor], list[Tensor]]:
    """``images -> boxes`` through an onnxruntime CPU session (first output: decoded predictions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(images: Tensor) -> list[Tensor]:
        decoded = session.run(None, {name: images.detach().cpu().numpy()})[0]
        return non_max_suppression(torch.from_numpy(decoded), conf_thres, iou_thres)

    return predict


def score(model: nn.Module, dataset: ShapesDataset) -> dict[str, float]:
    """mAP of ``model`` (eval mode, NMS) on ``dataset``; the model's mode is restored."""
    was_training = model.training
    try:
        return evaluate_map(torch_predictor(model), dataset)
    finally:
        model.train(was_training)


def gradient_balance(baseline: nn.Module, gabfusion: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]
                     ) -> dict[str, Any]:
    """Per-branch ||∂L/∂x_i|| at the neck Concats of the QAT baseline and of the GABFusion model.

    Returns ``{"rows": [...], "plot": {site: {series: mean}}}``; the GABFusion sites are the
    GABFusion modules inside the same Concats, so both measure the gradient of the unscaled branch.
    """
    from fxfusion.profile import profile_gradients

    concats = neck_concats(baseline)
    gab_sites = [f"{p}.gabfusion0" for p in concats]
    rows, plot = [], {}
    for label, model, sites in (("QAT baseline", baseline, concats), ("GABFusion", gabfusion, gab_sites)):
        loss = YoloLoss(model)
        prof = profile_gradients(model, lambda m, b, loss=loss: loss(m(b[0]), b[1])[0], batches, sites=sites)
        for row in prof.rows:
            concat = row["site"].removesuffix(".gabfusion0")
            rows.append({"model": label, "concat": concat, **row})
            group = _concat_label(baseline, concat)
            plot.setdefault(group, {})[f"{label}: branch {row['branch']}"] = row["mean"]
    return {"rows": rows, "plot": plot}


# --- helpers ---------------------------------------------------------------------------------

class _Data:
    """The demo's seeded train/val splits and their loaders."""

    def __init__(self, config: DemoConfig) -> None:
        kwargs = dict(img_size=config.img_size, seed=config.seed, num_classes=config.num_classes)
        self.train = ShapesDataset("train", n=config.n_train, **kwargs)
        self.val = ShapesDataset("val", n=config.n_val, **kwargs)
        self.train_loader = make_loader(self.train, config.batch_size, seed=config.seed, drop_last=True)
        # Fixed batches (no shuffling) for calibration and gradient profiling, and val images to show.
        self.calib_loader = make_loader(self.train, config.batch_size, shuffle=False)
        self.show_loader = make_loader(self.val, 8, shuffle=False)

    def example(self, n: int) -> Tensor:
        return torch.stack([self.val[i][0] for i in range(min(n, len(self.val)))])


def _take(loader: DataLoader, n: int) -> list[tuple[Tensor, Tensor]]:
    batches = []
    for batch in loader:
        if len(batches) == n:
            break
        batches.append(batch)
    return batches


def _concat_label(model: nn.Module, path: str) -> str:
    sources = getattr(model.get_submodule(path), "f", None)
    if isinstance(sources, Iterable):
        index = int(path.rsplit(".", 1)[-1]) if path.rsplit(".", 1)[-1].isdigit() else None
        names = [str(index + f) if f < 0 and index is not None else str(f) for f in sources]
        return f"{path} (cat {' + '.join(names)})"
    return path


def _deploy_summary(report: Any) -> str:
    exact = sum(bool(site.get("exact")) for site in report.sites)
    targets = sorted({str(site.get("target", "")).split(" (")[0] for site in report.sites})
    deviation = report.output_deviation.get("mean_vs_undeployed", math.nan)
    where = ("the original ops are back, nothing to fold" if targets == ["nothing to fold"]
             else f"into {', '.join(targets)}")
    return (f"{len(report.sites)} site(s) deployed, {exact} exactly ({where}); "
            f"{len(report.recalibrated)} quantizers re-calibrated; mean |output - QAT model| {deviation:.3g}")


def _alphas(model: nn.Module) -> dict[str, list[float]]:
    from fxfusion.gabfusion import GABFusion

    return {n: [round(float(a), 4) for a in m.alpha().detach()] for n, m in model.named_modules()
            if isinstance(m, GABFusion)}


def _summary_rows(scores: dict[str, dict[str, float]], steps: dict[str, int], base: str, gabf: str
                  ) -> list[dict[str, Any]]:
    rows = []
    for name, s in scores.items():
        compare = name not in ("FP32", base) and "before" not in name
        rows.append({"model": name, "mAP@0.5": s["map50"], "mAP@0.5:0.95": s["map50_95"],
                     "vs QAT baseline": f"{round(s['map50'] - scores[base]['map50'], 3) + 0.0:+.3f}" if compare else "",
                     "train steps": steps.get(name, "")})
    return rows


def _stdout(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
