"""GABFusion QAT inside Ultralytics' own trainer, and a deployed model that Ultralytics runs.

Two steps, as Python calls or as ``fxfusion yolo train|deploy key=value ...``::

    last = train("yolov8n.pt", data="coco8.yaml", method="lsq", bits=4, ada=True, epochs=10)
    result = deploy(last)                      # next to the weights: *-deployed.pt and .onnx
    YOLO(result.onnx).predict("bus.jpg")       # Ultralytics' own tools, on a QDQ model

**train** runs :class:`GABFusionTrainer`, a ``DetectionTrainer`` whose ``get_model`` rewrites
the float network (GABFusion at every fusion site that deploy folds exactly: the neck Concats and
the C2f/C3k2 cats) and quantizes it. Everything else is Ultralytics' own: dataloader, loss, EMA,
checkpoints, resume and per-epoch validation. The callbacks drive :class:`~fxfusion.NormSchedule`
(whose gate the EMA copy follows exactly), :class:`~fxfusion.AlphaBalancer` after every optimizer
step, and ADA against the float network, its term added to Ultralytics' loss (``ada`` in the
progress bar). Frozen layers (DFL) stay float. ``last.pt``/``best.pt`` are ordinary Ultralytics
checkpoints that hold the sites and quantizers: ``YOLO(path).val()`` and ``.predict()`` work.

**deploy** freezes and folds on calibration images from the dataset's train split, optionally
fine-tunes with Ultralytics' loss, and writes a deployed checkpoint and a QDQ ONNX with
Ultralytics' metadata (names, stride, imgsz, task) and a dynamic batch.

Ultralytics imports torchvision, and PyPI's torchvision does not import beside the CPU build of
torch 2.13.0; install a matching pair first (on this project's CI: torch 2.14.1, torchvision 0.29.1).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fxfusion
from fxfusion.gabfusion import GABFusion, preserving_sites, set_gate
from fxfusion.passes.runtime import is_framework_wrapper, unwrap
from fxfusion.quant import QUANTIZERS, check_bits
from fxfusion.quant.layers import is_quantized

try:
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg, smart_value
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.modules import Detect
    from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT, IterableSimpleNamespace
    from ultralytics.utils import __version__ as ULTRALYTICS_VERSION
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("fxfusion.integrations.ultralytics needs Ultralytics (and a torchvision that imports beside "
                      "your torch): pip install 'fxfusion[ultralytics]'") from e

__all__ = ["Deployment", "FusionOptions", "GABFusionTrainer", "calibration_images", "deploy", "load",
           "parse_options", "prepare", "train"]


@dataclasses.dataclass
class FusionOptions:
    """What :func:`train` does to the network before Ultralytics trains it.

    Attributes:
        method: the QAT technique (``"lsq"``, ``"pact"``, ``"dsq"``, ``"n2uq"``, ``"minmax"``).
        bits: weight and activation bits of every quantized layer but the first and last.
        first_last_bits: bits of the first and last layers (8, the common choice).
        ada: add ADA (attention distillation from the float network) to Ultralytics' loss.
        ada_weight: ADA's factor (the paper's 0.01), on Ultralytics' per-image loss scale.
        balanced: α by gradient balancing (:class:`~fxfusion.AlphaBalancer`) instead of learned.
        ramp, taper: :class:`~fxfusion.NormSchedule`'s shares of the run (gate opens, closes).
        calib: images from the train split that rewrite and the quantizers' initialization see.
        rewrite: place GABFusion (False: the same QAT without it, the baseline to compare with).
        pow2: power-of-two quantizer scales (``fxfusion.quantize(..., pow2=True)``): the deployed
            ONNX then reproduces the PyTorch model bit for bit where the float ops between
            quantizers are exact (not through SiLU, which the two runtimes approximate differently).
    """

    method: str = "lsq"
    bits: int = 4
    first_last_bits: int = 8
    ada: bool = False
    ada_weight: float = 0.01
    balanced: bool = False
    ramp: float = 0.25
    taper: float = 0.25
    calib: int = 16
    rewrite: bool = True
    pow2: bool = False

    def check(self) -> None:
        """Refuse bad options by name (ValueError)."""
        if not isinstance(self.method, str) or self.method.lower() not in QUANTIZERS:
            raise ValueError(f"method={self.method!r} is not one of {sorted(QUANTIZERS)}")
        check_bits(self.bits, "bits")
        check_bits(self.first_last_bits, "first_last_bits")
        for name in ("ada", "balanced", "rewrite", "pow2"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not 0 <= self.ramp <= 1 or not 0 <= self.taper <= 1 or self.ramp + self.taper > 1:
            raise ValueError(f"ramp={self.ramp}, taper={self.taper}: each in [0, 1], their sum at most 1")
        if (self.ada or self.balanced) and not self.rewrite:
            raise ValueError("ada=True and balanced=True act on GABFusion sites: they need rewrite=True")
        if not isinstance(self.calib, int) or self.calib < 1:
            raise ValueError(f"calib={self.calib!r} must be a positive number of images")


_FUSION_KEYS = {f.name for f in dataclasses.fields(FusionOptions)} | {"teacher"}
_DEPLOY_KEYS = {"model", "data", "imgsz", "calib", "finetune", "lr", "batch", "out"}


def parse_options(action: str, raw: Mapping[str, str]) -> dict[str, Any]:
    """``key=value`` strings of ``fxfusion yolo train|deploy`` as keyword arguments, checked.

    Values are read as Ultralytics reads its own (``True``, ``4``, ``0.5``, ``None``, paths).
    ``train`` takes :class:`FusionOptions` keys and any Ultralytics train argument; ``deploy``
    takes :func:`deploy`'s. Raises ValueError naming a missing or unknown key, or a bad value.
    """
    options = {k: smart_value(v) for k, v in raw.items()}
    required = ("model", "data") if action == "train" else ("model",)
    missing = [k for k in required if options.get(k) in (None, "")]
    if missing:
        raise ValueError(f"missing {', '.join(f'{k}=...' for k in missing)}")
    known = (_FUSION_KEYS | set(DEFAULT_CFG_DICT)) if action == "train" else _DEPLOY_KEYS
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}"
                         + ("" if action == "train" else f"; deploy takes {', '.join(sorted(_DEPLOY_KEYS))}"))
    if action == "train":
        FusionOptions(**{k: v for k, v in options.items() if k in _FUSION_KEYS - {"teacher"}}).check()
    return options


def load(model: Any) -> YOLO:
    """A ``YOLO`` object from itself or a path (``.pt`` checkpoint or ``.yaml``)."""
    if is_framework_wrapper(model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return YOLO(model)
    raise TypeError(f"expected an Ultralytics YOLO object or a path to a .pt/.yaml, got {type(model).__name__}")


def is_prepared(net: nn.Module) -> bool:
    """Has fxfusion already rewritten or quantized this network (an fxfusion checkpoint)?"""
    return any(isinstance(m, GABFusion) or is_quantized(m) for m in net.modules())


# --- data ------------------------------------------------------------------------------------------

def _dataset(data: str | Mapping, imgsz: int, split: str, batch: int, stride: int = 32) -> Any:
    """Ultralytics' own detection dataset of one split, letterboxed to ``imgsz``, no augmentation."""
    info = check_det_dataset(data) if not isinstance(data, Mapping) else data
    if split not in info:
        raise ValueError(f"the dataset {data!r} has no {split!r} split")
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": imgsz, "task": "detect"})
    return build_yolo_dataset(cfg, info[split], batch, info, mode="val", stride=stride)


def calibration_images(data: str | Mapping, imgsz: int, n: int = 16, split: str = "train") -> Tensor:
    """Up to ``n`` images of ``split`` as one float batch in [0, 1], shaped ``(n, 3, imgsz, imgsz)``."""
    ds = _dataset(data, imgsz, split, batch=n)
    if len(ds) == 0:
        raise ValueError(f"the {split!r} split of {data!r} has no images")
    return torch.stack([ds[i]["img"] for i in range(min(n, len(ds)))]).float() / 255


# --- the QAT network -------------------------------------------------------------------------------

def prepare(net: nn.Module, images: Tensor, options: FusionOptions) -> nn.Module:
    """Rewrite and quantize a float detection network; its quantizers initialized on ``images``.

    The quantizers initialize here, before Ultralytics copies the network for its EMA: the EMA
    averages floating-point state only, so a copy taken earlier would never initialize its own.
    """
    net = copy.deepcopy(net).float().eval()
    net.criterion = None  # training-only state (RT-DETR's is a module): rebuilt by the trainer
    if options.rewrite:
        net = fxfusion.rewrite(net, images, alpha="balanced" if options.balanced else "learned")
    qat = fxfusion.quantize(net, images, method=options.method, w_bits=options.bits,
                            a_bits=options.bits, first_last_bits=options.first_last_bits, pow2=options.pow2)
    with torch.no_grad():
        qat(images)
    return qat


def _teacher(net: nn.Module, images: Tensor) -> nn.Module:
    """The float network with the student's site paths (α = 1, no norm: it computes the original)."""
    return fxfusion.rewrite(copy.deepcopy(net).float().eval(), images, alpha="fixed", alpha_init=1.0,
                            norm="none", fold="any")


class _LossWithADA:
    """Ultralytics' criterion plus ADA's term, reported as ``ada`` among the loss items.

    Ultralytics' detection losses are per-image means times the batch size; ADA's term gets the
    same batch-size factor so that ``ada_weight`` keeps its meaning per image.
    """

    def __init__(self, base: Any, ada: fxfusion.ADALoss) -> None:
        self.base, self.ada = base, ada

    def __call__(self, preds: Any, batch: dict) -> tuple[Tensor, dict]:
        loss, items = self.base(preds, batch)
        term = self.ada(batch["img"])
        return loss.sum() + term * batch["img"].shape[0], {**items, "ada": term.detach()}


class GABFusionTrainer(DetectionTrainer):
    """Ultralytics' ``DetectionTrainer`` training a GABFusion-rewritten, quantized network.

    Args:
        cfg, overrides, _callbacks: as for ``DetectionTrainer``.
        fxfusion: the :class:`FusionOptions`.

    A checkpoint that fxfusion already prepared (``model=.../last.pt``, ``resume=True``) is
    trained as it is. ADA then needs the float network: ``teacher=`` (a path or ``YOLO``).
    """

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict | None = None, _callbacks: Any = None, *,
                 fxfusion: FusionOptions | None = None, teacher: Any = None) -> None:
        super().__init__(cfg, overrides, _callbacks)
        if self.world_size > 1:  # its DDP launcher rebuilds the trainer from the class name: options lost
            raise ValueError(f"device={self.args.device!r}: multi-GPU training through Ultralytics' DDP launcher "
                             "is not supported (it would drop the fxfusion options); train on one device, or use "
                             "torchrun with the library API (README: Distributed QAT)")
        self.fx = fxfusion or FusionOptions()
        self.teacher = None if teacher is None else load(teacher).model
        self.schedule = self.balancer = self.ada = None
        self._updates = 0
        self.add_callback("on_train_start", GABFusionTrainer._start)
        self.add_callback("on_train_batch_end", GABFusionTrainer._after_batch)
        self.add_callback("on_train_end", GABFusionTrainer._end)

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        """The float model Ultralytics would train, rewritten and quantized (or an fxfusion checkpoint)."""
        prepared = isinstance(weights, nn.Module) and is_prepared(weights)
        net = weights if prepared else super().get_model(cfg, weights, verbose)
        needs_teacher = self.fx.ada and (self.teacher is not None or not prepared)
        if prepared and not needs_teacher:
            return net  # trained on as it is: no images to read
        images = calibration_images(self.data, self.args.imgsz, self.fx.calib)
        if needs_teacher:
            self.teacher = _teacher(net if self.teacher is None else self.teacher, images)
        return net if prepared else prepare(net, images, self.fx)

    def _start(self) -> None:
        model = unwrap(self.model)
        self._updates = self.ema.updates if self.ema else 0
        if preserving_sites(model):
            steps = max(1, self.epochs * math.ceil(len(self.train_loader) / self.accumulate))
            self.schedule = fxfusion.NormSchedule(model, steps, ramp=self.fx.ramp, taper=self.fx.taper)
            self.schedule.load_state_dict({"steps_done": self._updates})  # a resumed run continues its schedule
            self._sync_ema_gate()
        if self.fx.balanced:
            self.balancer = fxfusion.AlphaBalancer(self.model)
        if self.fx.ada:
            if self.teacher is None:
                raise ValueError("ada=True on an fxfusion checkpoint needs the float network: pass teacher=<.pt>")
            self.teacher.to(self.device)
            self.ada = fxfusion.ADALoss(self.model, self.teacher, weight=self.fx.ada_weight)
            model.criterion = _LossWithADA(model.init_criterion(), self.ada)

    def _after_batch(self) -> None:
        updates = self.ema.updates if self.ema else self._updates + 1
        if updates == self._updates:  # gradient accumulation: no optimizer step after this batch
            return
        self._updates = updates
        if self.balancer is not None:
            self.balancer.step()
        if self.schedule is not None:
            self.schedule.step()
            self._sync_ema_gate()

    def _sync_ema_gate(self) -> None:
        """The EMA averages the gate buffer like a weight; it must follow the schedule exactly."""
        if self.ema is not None:
            set_gate(self.ema.ema, self.schedule.value(self.schedule.steps_done))

    def _end(self) -> None:
        if self.ada is not None:
            self.ada.remove()
            unwrap(self.model).criterion = None


def train(model: Any, data: str, *, method: str = "lsq", bits: int = 4, first_last_bits: int = 8,
          ada: bool = False, ada_weight: float = 0.01, balanced: bool = False, ramp: float = 0.25,
          taper: float = 0.25, calib: int = 16, rewrite: bool = True, pow2: bool = False,
          teacher: Any = None, **train_args: Any) -> Path:
    """QAT with GABFusion in Ultralytics' trainer; returns the path of ``last.pt``.

    Args:
        model: a float ``.pt`` (or ``.yaml``, or a ``YOLO`` object), or an fxfusion checkpoint
            to continue (``resume=True`` resumes it as Ultralytics does).
        data: the dataset yaml.
        method, bits, first_last_bits, ada, ada_weight, balanced, ramp, taper, calib, rewrite,
            pow2: see :class:`FusionOptions`.
        teacher: the float network for ADA when ``model`` is already an fxfusion checkpoint.
        **train_args: any Ultralytics train argument (``epochs``, ``imgsz``, ``batch``,
            ``project``, ``name``, ``device``, ...).

    Example:
        >>> last = train("yolov8n.pt", "coco8.yaml", bits=4, ada=True, epochs=1)  # doctest: +SKIP
        >>> YOLO(last).val(data="coco8.yaml")                                    # doctest: +SKIP
    """
    options = FusionOptions(method=method, bits=bits, first_last_bits=first_last_bits, ada=ada,
                            ada_weight=ada_weight, balanced=balanced, ramp=ramp, taper=taper, calib=calib,
                            rewrite=rewrite, pow2=pow2)
    options.check()  # here, not inside the trainer after the data is loaded
    yolo = load(model)
    source = yolo.ckpt_path or yolo.cfg
    if source is None:
        raise ValueError("the YOLO object has no checkpoint or yaml to train from; pass a .pt or .yaml path")
    overrides = {**yolo.overrides, **train_args, "model": str(source), "data": data, "mode": "train"}
    if overrides.get("resume"):
        overrides["resume"] = str(source)
    trainer = GABFusionTrainer(overrides=overrides, fxfusion=options, teacher=teacher)
    trainer.train()
    return Path(trainer.last)


# --- deploy ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Deployment:
    """What :func:`deploy` wrote and measured."""

    pt: Path
    onnx: Path
    report: Any  # the DeployReport
    export: Any  # the ExportReport
    verify: Any  # the VerifyReport (onnxruntime vs PyTorch on calibration images)

    def __str__(self) -> str:
        return (f"deployed checkpoint: {self.pt}\nONNX (QDQ): {self.onnx}\n\n{self.report}\n\n{self.verify}")


def _finetune(net: nn.Module, args: dict, data: Any, imgsz: int, steps: int, lr: float, batch: int) -> list[float]:
    """A few Adam steps of the deployed network on Ultralytics' detection loss (train split)."""
    loader = build_dataloader(_dataset(data, imgsz, "train", batch), batch, workers=0, shuffle=True)
    saved_args = net.args
    net.args, net.criterion = IterableSimpleNamespace(**args), None
    # a loaded checkpoint has every gradient off; train all but DFL, as Ultralytics' trainer does
    params = [p for n, p in net.named_parameters() if ".dfl" not in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    net.train()
    while len(losses) < steps:
        for b in loader:
            b["img"] = b["img"].float() / 255
            loss, _ = net.loss(b)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            losses.append(float(loss.detach().sum()))
            if len(losses) == steps:
                break
    net.eval().requires_grad_(False)
    net.args, net.criterion = saved_args, None
    return losses


def _metadata(net: nn.Module, args: dict, imgsz: int, source: Path) -> dict[str, Any]:
    """The keys Ultralytics' exporter writes and its AutoBackend reads back."""
    return {
        "description": f"Ultralytics {source.stem} deployed by fxfusion (GABFusion QAT, QDQ)",
        "author": "fxfusion", "date": datetime.now().astimezone().isoformat(),
        "version": ULTRALYTICS_VERSION, "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com", "stride": int(max(net.stride)), "task": "detect",
        "batch": 1, "imgsz": [imgsz, imgsz], "names": dict(net.names),
        "args": {"batch": 1, "dynamic": True, "half": False, "int8": False, "nms": False,
                 "imgsz": [imgsz, imgsz], "data": args.get("data")},
        "channels": 3, "end2end": False,
    }


def deploy(model: Any, data: str | None = None, *, imgsz: int | None = None, calib: int = 32,
           finetune: int = 0, lr: float = 2e-5, batch: int = 8, out: str | os.PathLike | None = None) -> Deployment:
    """Freeze, fold and export an fxfusion checkpoint; write ``<name>-deployed.pt`` and ``.onnx``.

    Args:
        model: the trained checkpoint (``last.pt``/``best.pt``) or its ``YOLO`` object.
        data: the dataset yaml (default: the one it was trained on).
        imgsz: the export size (default: the training size).
        calib: train-split images that deploy measures the sites on.
        finetune: Adam steps on Ultralytics' loss after the fold (0: none; worth it when the
            deploy report shows a deviation, i.e. a gate that was still open).
        lr, batch: the fine-tune's learning rate and batch size.
        out: the output stem (default: next to the weights, ``<name>-deployed``).

    Example:
        >>> result = deploy("runs/detect/train/weights/last.pt")   # doctest: +SKIP
        >>> YOLO(result.onnx).predict("bus.jpg")                    # doctest: +SKIP
    """
    yolo = load(model)
    net, source = yolo.model, Path(yolo.ckpt_path or "model.pt")
    if not is_prepared(net):
        raise ValueError(f"{source} has no GABFusion site or quantizer: train it with fxfusion yolo train first")
    if yolo.task != "detect":
        raise ValueError(f"only detection models are supported, {source} is a {yolo.task!r} model")
    args = {**DEFAULT_CFG_DICT, **(yolo.ckpt or {}).get("train_args", {})}  # the loss gains live here
    data = data or args.get("data")
    if not data:
        raise ValueError("pass data=<dataset yaml>: the checkpoint does not name its dataset")
    imgsz = int(imgsz or args.get("imgsz") or 640)
    images = calibration_images(data, imgsz, calib)
    net = copy.deepcopy(net).float().eval()
    net.criterion = None
    deployed = fxfusion.deploy(net, list(images.split(batch)))
    if finetune:
        _finetune(deployed, args, data, imgsz, finetune, lr, batch)

    stem = Path(out) if out is not None else source.with_name(f"{source.stem}-deployed")
    pt, onnx_path = stem.with_suffix(".pt"), stem.with_suffix(".onnx")
    torch.save({"model": deployed, "train_args": {**args, "data": data, "imgsz": imgsz},
                "date": datetime.now().astimezone().isoformat(), "version": ULTRALYTICS_VERSION,
                "fxfusion": {"deploy": deployed.fxfusion_reports["deploy"].to_dict()}}, pt)

    exported = copy.deepcopy(deployed)
    for m in exported.modules():
        if isinstance(m, Detect):  # as Ultralytics' exporter sets it: one decoded output, anchors in the graph
            m.export, m.format, m.dynamic, m.shape = True, "onnx", True, None
    # Ultralytics reads a symbolic batch as "every axis is dynamic" (its validator then feeds
    # rectangular batches), so height and width are symbolic too, as in its own dynamic export
    report = fxfusion.export_onnx(exported, images[:1], onnx_path, input_names=["images"], output_names=["output0"],
                                  dynamic_axes={"images": {2: "height", 3: "width"}, "output0": {2: "anchors"}},
                                  metadata=_metadata(deployed, args, imgsz, source))
    verify = fxfusion.verify_onnx(exported, onnx_path, images[: min(4, len(images))])
    return Deployment(pt=pt, onnx=onnx_path, report=deployed.fxfusion_reports["deploy"], export=report,
                      verify=verify)
