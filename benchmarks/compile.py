"""QAT training-step time under torch.compile, against eager, with graphs and recompiles counted.

Per model (zoo models, and torchvision ones as ``tv_<name>``): the float model, and the GABFusion
QAT model (``rewrite`` + ``quantize`` LSQ W4A4) trained with ADA (float teacher), ``AlphaBalancer``
and ``NormSchedule``, each eager and through ``torch.compile`` (inductor). One step = forward +
MSE to a fixed target (+ ADA) + backward + SGD (+ balancer and schedule steps). The quantizers are
initialized by one eager step before compiling. After the compile (timed separately), the variants
run in interleaved rounds; the table gives the median step, the compiled/eager ratio, the graphs
dynamo produced, its graph breaks, and the graphs added during the timed rounds (a recompilation
would show there).

    python benchmarks/compile.py [--models tv_resnet18 resnet yolov5] [--batch 16] [--size 64] [--reps 15]

It prints and saves a table; it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, environment, markdown_table, print_table, run_rounds, write_results  # noqa: E402

import fxfusion  # noqa: E402
from fxfusion import zoo  # noqa: E402
from fxfusion.passes.runtime import tensors  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class _Trainer:
    """One model variant and what its training step touches."""

    def __init__(self, model: nn.Module, x: torch.Tensor, teacher: nn.Module | None) -> None:
        self.model, self.x = model.train(), x
        self.ada = fxfusion.ADALoss(model, teacher) if teacher is not None else None
        self.balancer = fxfusion.AlphaBalancer(model) if teacher is not None else None
        self.schedule = fxfusion.NormSchedule(model, 10_000, ramp=0.5) if teacher is not None else None
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self.run = model

    def step(self) -> None:
        self.opt.zero_grad()
        loss = sum(t.float().pow(2).mean() for t in tensors(self.run(self.x)))
        if self.ada is not None:
            loss = loss + self.ada(self.x)
        loss.backward()
        self.opt.step()
        if self.balancer is not None:
            self.balancer.step()
            self.schedule.step()


def _variants(name: str, x: torch.Tensor) -> dict[str, _Trainer]:
    torch.manual_seed(0)
    fp = build_model(name, x.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxfusion.quantize(fxfusion.rewrite(fp, x, alpha="balanced"), x, method="lsq", w_bits=4, a_bits=4)
        teacher = fxfusion.rewrite(fp, x, alpha="fixed", alpha_init=1.0, norm="none", fold="any")
    out = {}
    for label, model, t in (("float", fp, None), ("GABFusion QAT", qat, teacher)):
        for mode in ("eager", "compiled"):
            out[f"{label} {mode}"] = _Trainer(copy.deepcopy(model), x, copy.deepcopy(t) if t is not None else None)
    return out


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def measure(name: str, batch: int, size: int, reps: int) -> list[dict]:
    x = torch.randn(batch, 3, size, size)
    trainers = _variants(name, x)
    rows = []
    for label, tr in trainers.items():
        tr.step()  # eager warm-up: quantizers initialize, lazy state is created
        if label.endswith("compiled"):
            graphs, breaks = _graphs(), _breaks()
            tr.run = torch.compile(tr.model)
            start = time.perf_counter()
            tr.step()
            tr.step()  # a recompilation after the first compiled step would happen here
            rows.append({"model": name, "variant": label, "compile s": round(time.perf_counter() - start, 1),
                         "graphs": _graphs() - graphs, "graph breaks": _breaks() - breaks})
        else:
            rows.append({"model": name, "variant": label})

    def one_round(watch) -> None:
        for label, tr in trainers.items():
            watch.time(label, tr.step)

    graphs_before = _graphs()
    timings = run_rounds(one_round, reps, warmup=1)
    for row in rows:
        t = timings[row["variant"]]
        row["step ms"] = round(1000 * t.median, 1) if t.median else t.status
        if "graphs" in row:  # by all the variants' rounds together: a recompilation of either
            row["graphs added while timed"] = _graphs() - graphs_before
    for row in rows:
        if row["variant"].endswith("compiled") and isinstance(row["step ms"], float):
            eager = next(r for r in rows if r["variant"] == row["variant"].replace("compiled", "eager"))
            row["eager / compiled"] = round(eager["step ms"] / row["step ms"], 2)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tv_resnet18", "resnet", "yolov5"],
                        help=f"zoo models ({', '.join(zoo.ZOO)}) or tv_<torchvision name> (needs torchvision)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for name in args.models for r in measure(name, args.batch, args.size, args.reps)]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print_table(rows, columns, title="torch.compile vs eager, one training step")
    md = "\n\n".join(["# torch.compile of QAT (`benchmarks/compile.py`)", __doc__.split("\n\n")[1],
                      f"batch {args.batch}, {args.size}x{args.size}, {args.threads} thread(s), median of "
                      f"{args.reps} interleaved rounds; torch {torch.__version__}.", markdown_table(rows, columns)])
    write_results(args.out, "compile", {"environment": environment(), "args": vars(args), "rows": rows}, md)
    return rows


if __name__ == "__main__":
    main()
