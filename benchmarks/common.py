"""Small shared helpers for the benchmark scripts: timing, tables and result files.

Timing is done in *rounds*: a round calls every timed step once, in order, so that one step can
consume what the previous one returned (rewrite -> quantize -> deploy) and machine noise hits all
steps alike. Repeat the rounds and take the median of each step::

    def one_round(sw: Stopwatch) -> None:
        gm = sw.time("trace", torch.fx.symbolic_trace, model)
        sw.time("recompile", gm.recompile) if gm is not None else sw.skip("recompile", "trace failed")

    timings = run_rounds(one_round, repeats=5, warmup=1)
    print(timings["trace"].median)

Each step records its wall time and, as a check on a busy machine, the process's CPU time
(with one torch thread, CPU time well below wall time means other processes took the cores).
A step that raises is recorded as failed (with its exception class and message) and is not run
again in later rounds. Benchmarks print and save tables; they never assert timings.
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxfusion.report import dumps, format_table, write_atomic

__all__ = [
    "Stopwatch",
    "Timing",
    "environment",
    "fit_loglog_slope",
    "markdown_table",
    "mean_std",
    "pyplot",
    "save_figure",
    "print_table",
    "run_rounds",
    "write_results",
]


@dataclass
class Timing:
    """Wall times of one step over the rounds, or why it has none."""

    seconds: list[float] = field(default_factory=list)  # wall time per timed round
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time, same rounds
    error: str | None = None  # "ErrorClass: first line of the message" when the step raised
    skipped: str | None = None  # why the step was not run

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds and self.error is None else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds and self.error is None else None

    @property
    def status(self) -> str:
        if self.error is not None:
            return f"fails ({self.error.split(':', 1)[0]})"
        if self.skipped is not None:
            return "skipped"
        return "ok" if self.seconds else "not run"

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "seconds": self.seconds, "cpu_median_s": self.cpu_median,
                "cpu_seconds": self.cpu_seconds, "status": self.status,
                "error": self.error, "skipped": self.skipped}


class Stopwatch:
    """Times named steps; ``time`` returns the step's result, or None when it failed or was skipped."""

    def __init__(self, timings: dict[str, Timing] | None = None, record: bool = True) -> None:
        self.timings = timings if timings is not None else {}
        self.record = record  # False during warm-up rounds: run everything, keep nothing

    def time(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        timing = self.timings.setdefault(name, Timing())
        if timing.error is not None or timing.skipped is not None:
            return None  # failures are deterministic here: do not pay for them again
        gc.collect()  # garbage of the previous step is not this step's cost
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a failing step is a result: recorded, then skipped
            timing.error = _describe(e)
            return None
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if self.record:
            timing.seconds.append(elapsed)
            timing.cpu_seconds.append(cpu)
        return result

    def spent(self, name: str) -> float:
        """Wall seconds recorded so far for ``name``."""
        timing = self.timings.get(name)
        return sum(timing.seconds) if timing else 0.0

    def skip(self, name: str, reason: str) -> None:
        timing = self.timings.setdefault(name, Timing())
        if timing.error is None and not timing.seconds:
            timing.skipped = reason


def run_rounds(one_round: Callable[[Stopwatch], None], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Run ``warmup`` untimed rounds, then ``repeats`` timed ones; return the timings by step name.

    Failures seen during warm-up are kept (the step is not retried in the timed rounds).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timings: dict[str, Timing] = {}
    for _ in range(warmup):
        one_round(Stopwatch(timings, record=False))
    for _ in range(repeats):
        one_round(Stopwatch(timings))
    return timings


def build_third_party(source: str, name: str, px: int) -> torch.nn.Module:
    """A torchvision (``"tv"``), timm or ultralytics model by name, random weights (seed 0), no download.

    ``px`` is the input size (ViT is built for it). The one way benchmarks build models nobody here wrote.
    """
    torch.manual_seed(0)
    if source == "tv":
        import torchvision.models as tvm

        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        if name.startswith("vit"):
            kwargs = {"image_size": px}
        if name.startswith("deeplab"):
            import torchvision.models.segmentation as seg

            return seg.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False, num_classes=4)
        model = getattr(tvm, name)(**kwargs)
        if hasattr(model, "heads"):  # ViT's classifier starts at zero, which would hide every difference
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)
    if source == "ultralytics":  # built from the yaml: no download
        from ultralytics import YOLO

        return YOLO(f"{name}.yaml").model
    raise ValueError(source)


def build_model(spec: str, size: int) -> torch.nn.Module:
    """A zoo model by name, or a torchvision model as ``tv_<name>`` built for ``size`` px inputs."""
    if spec.startswith("tv_"):
        return build_third_party("tv", spec[3:], size)
    from fxfusion import zoo

    if spec not in zoo.ZOO:
        raise ValueError(f"model {spec!r}: not a zoo model ({', '.join(zoo.ZOO)}) and not tv_<torchvision name>")
    return zoo.build(spec)


def fit_loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): 1 is linear growth, 2 quadratic."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def environment() -> dict[str, Any]:
    """Where the numbers come from."""
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": _git_revision(),
    }


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render dict rows as a GitHub markdown table (floats with 4 significant digits)."""
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [_md_cell(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, title: str = "") -> None:
    """Print dict rows as an aligned text table (``fxfusion.report.format_table``)."""
    print(format_table(rows, columns, title))  # noqa: T201 - a benchmark prints its table
    print()  # noqa: T201


def write_results(out_dir: str | Path, stem: str, payload: Any, markdown: str) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir`` atomically; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    text = dumps(payload)
    json.loads(text)  # the file must be valid JSON before it replaces the old one
    write_atomic(json_path, text + "\n")
    write_atomic(md_path, markdown.rstrip() + "\n")
    return [json_path, md_path]


def mean_std(values: Sequence[float]) -> str:
    """``"0.750 ± 0.030"`` (mean ± sample std) for several values, the value alone for one, "" for none."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None without matplotlib (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` through a temporary file (an interrupted run leaves no half PNG), then close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)


def _git_revision() -> str | None:
    """The measured code: commit of the repository holding this file, ``+dirty`` with local edits."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _md_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        text = f"{v:.4g}"
    else:
        text = str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _describe(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
