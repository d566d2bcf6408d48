"""The ``fxfusion`` command line: a thin layer over the library's passes.

Usage::

    fxfusion inspect MODEL [--input-shape 1,3,256,256] [--ops cat,add] [--json]
    fxfusion yolo train|deploy key=value ...   (extra [ultralytics]; see fxfusion.integrations.ultralytics)
    fxfusion demo [--method lsq|pact|dsq|n2uq] [--bits 4] [--quick] [--out DIR] [--seed 0]

``MODEL`` is a zoo name (``yolov5``, see ``fxfusion.zoo.ZOO``), an Ultralytics model file
(``yolov8n.yaml``, ``best.pt``) or ``package.module:callable``,
a callable that takes no argument and returns an ``nn.Module`` (``fxfusion.zoo:yolov5`` is the
zoo entry again). ``python -m fxfusion`` is the same program.

Bad arguments print one line ``fxfusion: error: ...`` on stderr and exit with status 2, like
argparse's own errors; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from torch import nn

from fxfusion import zoo
from fxfusion.demo.pipeline import DEMO_METHODS, check_demo_args, run_demo
from fxfusion.passes.find import OP_NAMES, FusionReport, find_fusions
from fxfusion.passes.rewrite import rewrite
from fxfusion.quant import MAX_BITS, MIN_BITS
from fxfusion.report import dumps, format_table

__all__ = ["DEMO_METHODS", "CliError", "load_model", "main"]

_DEFAULT_SHAPE = (1, 3, 224, 224)
_EXIT_USAGE = 2  # argparse's status for bad arguments; every argument error here uses it too


class CliError(ValueError):
    """A user's mistake on the command line; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (usage stays available through --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(_EXIT_USAGE, f"fxfusion: error: {message} (see '{self.prog} --help')\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["inspect", "yolov5", "--json"])  # doctest: +SKIP
        0
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return _EXIT_USAGE
    torch.set_num_threads(args.threads or _default_threads())
    try:
        return args.run(args)
    except CliError as e:
        message = " ".join(str(e).split())  # one line, whatever the cause's message held
        sys.stderr.write(f"fxfusion: error: {message}\n")
        return _EXIT_USAGE


def _build_parser() -> _Parser:
    parser = _Parser(prog="fxfusion", description="GABFusion for low-bit QAT of multi-branch networks.")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: one per idle core, at most 8)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = sub.add_parser("inspect", help="list the fusion sites of a model and what rewrite would do",
                             description="Find the fusion sites of a model and show what rewrite would place.")
    inspect.add_argument("model", metavar="MODEL",
                         help="a zoo name (e.g. yolov5) or module.path:callable returning an nn.Module")
    inspect.add_argument("--input-shape", type=_shape, default=None, metavar="N,C,H,W",
                         help="shape of the random example input (default: the zoo entry's, else 1,3,224,224)")
    inspect.add_argument("--ops", type=_ops, default=None, metavar="OPS",
                         help="keep only these fusion ops, comma-separated: cat, add (default: both)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON only")
    inspect.set_defaults(run=_run_inspect)

    yolo = sub.add_parser("yolo", help="GABFusion QAT in Ultralytics' own trainer, then deploy (extra [ultralytics])",
                          description="QAT with GABFusion inside Ultralytics' trainer, and a deployed checkpoint and "
                                      "QDQ ONNX that Ultralytics predicts with and validates. Arguments follow "
                                      "Ultralytics' key=value style; any Ultralytics train argument is passed on.",
                          epilog="fxfusion yolo train model=yolov8n.pt data=coco8.yaml method=lsq bits=4 ada=True "
                                 "epochs=10 imgsz=640  |  fxfusion yolo deploy model=runs/detect/train/weights/last.pt "
                                 "data=coco8.yaml [imgsz=640] [finetune=200]")
    yolo.add_argument("action", choices=("train", "deploy"))
    yolo.add_argument("options", nargs="*", metavar="KEY=VALUE", type=_key_value)
    yolo.set_defaults(run=_run_yolo)

    demo = sub.add_parser("demo", help="the end-to-end demo: FP, QAT, GABFusion+ADA, deploy, ONNX, mAP",
                          description="Train a small YOLOv5 on synthetic shapes, compare QAT with and without "
                                      "GABFusion+ADA, deploy, export ONNX and score every stage.")
    demo.add_argument("--method", choices=DEMO_METHODS, default="lsq", help="QAT quantizer (default: lsq)")
    demo.add_argument("--bits", type=_bits, default=4,
                      help=f"weight and activation bits, {MIN_BITS}..{MAX_BITS} (default: 4)")
    demo.add_argument("--quick", action="store_true", help="a small run (about a minute) to check the pipeline")
    demo.add_argument("--out", default="fxfusion-demo", help="output folder (default: ./fxfusion-demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and of every training run")
    demo.add_argument("--pow2", action="store_true",
                      help="power-of-two quantizer scales: the ONNX reproduces the model bit for bit")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    demo.set_defaults(run=_run_demo)
    return parser


# --- inspect ---------------------------------------------------------------------------------

def _run_inspect(args: argparse.Namespace) -> int:
    model, default_shape, label = load_model(args.model)
    shape = args.input_shape or default_shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        report = find_fusions(model, x, ops=args.ops)
    except (ValueError, TypeError) as e:
        raise CliError(f"{label}: {e}") from e
    plan = _plan(model, report, x)
    if args.json:
        _emit(dumps({"model": label, "class": type(model).__name__, "input_shape": list(shape),
                     "sites": report.sites, "refused": report.refused, "untraceable": report.untraceable,
                     "plan": plan}))
        return 0
    _emit(f"{label}: {type(model).__name__}, input {'x'.join(map(str, shape))}\n\n{report}\n\n"
          + format_table(plan, title=f"Rewrite plan: fxfusion.rewrite(model, x) would place "
                                     f"{sum(r['status'] == 'placed' for r in plan)} GABFusion module(s)"))
    return 0


def _plan(model: nn.Module, report: FusionReport, x: torch.Tensor) -> list[dict]:
    """What rewrite does with the found sites, from a dry run on a copy of the model (on ``x``, so
    that rewrite checks how deploy would fold each site, as it does by default)."""
    refused: dict[str, str] = {}
    error = ""
    if report.sites:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                done = rewrite(copy.deepcopy(model), x, sites=report)
            refused = {r.where: r.reason for r in done.fxfusion_reports["rewrite"].refused}
        except Exception as e:  # noqa: BLE001 - shown in the plan; inspect itself must not fail on it
            error = f"rewrite failed: {type(e).__name__}: {e}"
    return [{"gabfusion module": s.name, "replaces": f"{s.kind} #{s.index} in {s.owner or '<root>'} ({s.owner_class})",
             "branches": s.num_branches, "axis": s.axis, "channels": s.channels,
             "status": error or (f"refused: {refused[s.name]}" if s.name in refused else "placed")}
            for s in report.sites]


def load_model(spec: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """Build the model named by ``spec``: ``(model, default input shape, label)``.

    Args:
        spec: a zoo name (``"yolov5"``), ``"fxfusion.zoo:yolov5"``, or ``"module.path:callable"``
            where the callable (dotted attributes allowed) takes no argument.

    Raises:
        CliError: the module does not import, the attribute is missing or not callable, or the
            call fails or returns something other than an ``nn.Module``.
    """
    if spec.endswith((".yaml", ".yml", ".pt")):
        return _load_ultralytics(spec)
    module_name, sep, attr = spec.partition(":")
    if not sep:
        if spec in zoo.ZOO:
            return _build_zoo(spec)
        raise CliError(f"MODEL {spec!r} is neither a zoo name ({', '.join(zoo.ZOO)}) nor module.path:callable")
    if not module_name or not attr:
        raise CliError(f"MODEL {spec!r} must look like module.path:callable, e.g. fxfusion.zoo.yolov5:yolov5_tiny")
    if module_name == "fxfusion.zoo" and attr in zoo.ZOO:
        return _build_zoo(attr)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module, reported in one line
        raise CliError(f"cannot import {module_name!r} (from MODEL {spec!r}): {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{module_name!r} has no attribute {attr!r} (from MODEL {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec!r} is a {type(obj).__name__}, not a callable that returns an nn.Module")
    try:
        model = obj()
    except Exception as e:  # noqa: BLE001 - the factory is user code
        raise CliError(f"calling {spec}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    entry = next((e for e in zoo.ZOO.values() if e.build is obj), None)
    return model, (entry.input_shape if entry else _DEFAULT_SHAPE), spec


def _load_ultralytics(spec: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """An Ultralytics model file (``yolov8n.yaml``, ``best.pt``): its network, at 640 px."""
    try:
        from fxfusion.integrations.ultralytics import load
    except ImportError as e:  # its message names the extra to install
        raise CliError(f"MODEL {spec!r} is an Ultralytics model file: {e}") from e
    try:
        return load(spec).model, (1, 3, 640, 640), spec
    except Exception as e:  # noqa: BLE001 - a missing or foreign file, reported in one line
        raise CliError(f"Ultralytics cannot load {spec!r}: {type(e).__name__}: {e}") from e


def _build_zoo(name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    torch.manual_seed(0)
    return zoo.build(name), zoo.ZOO[name].input_shape, name


# --- yolo ------------------------------------------------------------------------------------

def _key_value(token: str) -> tuple[str, str]:
    key, sep, value = token.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{token!r} is not key=value (e.g. bits=4)")
    return key, value


def _run_yolo(args: argparse.Namespace) -> int:
    try:
        from fxfusion.integrations import ultralytics as fxu
    except ImportError as e:
        raise CliError(str(e)) from e
    try:
        options = fxu.parse_options(args.action, dict(args.options))
    except (ValueError, TypeError) as e:
        raise CliError(f"yolo {args.action}: {e}") from e
    # failures inside the run are not argument errors: they keep their traceback
    if args.action == "train":
        _emit(f"fxfusion: trained checkpoint {fxu.train(**options)}")
    else:
        _emit(str(fxu.deploy(**options)))
    return 0


# --- demo ------------------------------------------------------------------------------------

def _run_demo(args: argparse.Namespace) -> int:
    try:
        check_demo_args(args.method, args.bits, args.out)
    except ValueError as e:
        raise CliError(str(e)) from e
    # Failures inside the run are not argument errors: they keep their traceback.
    run_demo(method=args.method, bits=args.bits, quick=args.quick, out=args.out, seed=args.seed,
             progress=args.progress, pow2=args.pow2)
    return 0


# --- argument types (argparse turns their ValueError/ArgumentTypeError into a usage error) ---

def _bits(text: str) -> int:
    bits = _int(text, "bits")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"{bits} is outside {MIN_BITS}..{MAX_BITS}")
    return bits


def _shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints, e.g. 1,3,256,256") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be a positive int")
    return dims


def _ops(text: str) -> list[str]:
    ops = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in ops if o not in OP_NAMES]
    if bad or not ops:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(sorted(OP_NAMES))}")
    return ops


def _positive_int(text: str) -> int:
    value = _int(text, "value")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be an int, got {text!r}") from None


def _default_threads() -> int:
    """One thread per idle core, at most 8.

    torch's OpenMP workers spin while they wait for one another, so more threads than idle cores
    is far slower, not a little: with another process busy on this 2-core machine, a demo training
    step took 2.2 s with 2 threads and 0.12 s with 1. Idle cores = cores - the 1-minute load.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(round(cores - busy), cores, 8))


def _emit(text: str) -> None:
    with contextlib.suppress(BrokenPipeError):  # `fxfusion inspect ... | head` is fine
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

