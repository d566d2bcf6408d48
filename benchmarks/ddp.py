"""Distributed QAT step time: one process against two (DistributedDataParallel, gloo, CPU).

The setup of ``tests/test_ddp_qat.py``: the YOLOv5-style zoo model rewritten with balanced α,
quantized with LSQ W4A4, ADA against its float teacher, AlphaBalancer, SGD with momentum. Every
process runs one torch thread on the same per-rank batch, so two processes do twice the work of one.

Variants, each in fresh spawned processes (building the models is not timed):

1. ``1 process``: the plain QAT loop, no DDP;
2. ``1 process, DDP``: the same loop wrapped in DDP with a world of one (the wrapper's own cost);
3. ``2 processes, DDP``: world of two, different data per rank.

A step is forward, losses, backward (with DDP's gradient all-reduce), optimizer step and
balancer step (its energy all-reduce). The job's time for a step is its slowest rank's; the table
gives medians over the timed steps of all rounds (variants interleaved round by round, so that load
from other processes hits them alike) and the ratio to one process. Each rank's CPU time per step is
reported too: on a 2-core machine, two ranks plus anything else running share the cores.

Prints a table and saves ``benchmarks/results/ddp.{json,md}``. ``--quick`` shrinks everything for a
smoke run. It never asserts timings.

    python benchmarks/ddp.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, print_table, write_results  # noqa: E402

import fxfusion  # noqa: E402
from fxfusion.zoo import build  # noqa: E402

VARIANTS = {"1 process": (1, False), "1 process, DDP": (1, True), "2 processes, DDP": (2, True)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in every rank (and so recorded in the environment)
    config = ({"batch": 2, "size": 64, "warmup": 1, "steps": 3, "rounds": 1} if args.quick
              else {"batch": 8, "size": 128, "warmup": 3, "steps": 15, "rounds": 2})

    steps: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(config["rounds"]):
            for name, (world, use_ddp) in VARIANTS.items():
                out = Path(tmp) / f"{r}-{world}-{use_ddp}"
                out.mkdir()
                mp.spawn(_worker, args=(world, _free_port(), use_ddp, config, str(out)), nprocs=world, join=True)
                ranks = [torch.load(out / f"rank{k}.pt") for k in range(world)]
                steps[name] += [max(walls) for walls in zip(*(rk["wall"] for rk in ranks))]
                cpu[name] += [c for rk in ranks for c in rk["cpu"]]

    base, cpu_base = statistics.median(steps["1 process"]), statistics.median(cpu["1 process"])
    rows = []
    for name, (world, _use_ddp) in VARIANTS.items():
        median, cpu_median = statistics.median(steps[name]), statistics.median(cpu[name])
        rows.append({"variant": name, "processes": world, "ms/step": 1000 * median,
                     "vs 1 process": median / base, "images/s": world * config["batch"] / median,
                     "cpu ms/step per rank": 1000 * cpu_median, "cpu vs 1 process": cpu_median / cpu_base})
    title = (f"QAT step (YOLOv5-style, LSQ W4A4, balanced α, ADA), batch {config['batch']} per rank, "
             f"{config['size']}px, gloo, 1 thread per process, median of {len(steps['1 process'])} steps")
    print_table(rows, title=title)
    ratio = rows[2]["vs 1 process"]
    print(f"2 processes vs 1: step time ratio {ratio:.3f}")  # noqa: T201 - a benchmark prints its result

    payload = {"environment": environment(), "load_average": _load(), "quick": args.quick, "config": config,
               "rows": rows,
               "ratio_2_vs_1": ratio, "ratio_2_vs_1_ddp": rows[2]["ms/step"] / rows[1]["ms/step"],
               "step_seconds": steps}
    md = "\n\n".join([f"# Distributed QAT step time\n\n{title}.", markdown_table(rows),
                      f"Step time of 2 processes against 1: **{ratio:.3f}x** (same per-rank batch; 1.0 would "
                      f"be perfect scaling). Per-rank CPU time: {rows[2]['cpu vs 1 process']:.3f}x. "
                      f"Load average when done: {_load()}."])
    write_results(args.out, "ddp", payload, md)
    return payload


def _worker(rank: int, world: int, port: int, use_ddp: bool, config: dict, out: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if use_ddp:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        student, teacher = _models(config["size"])
        student.train()
        model = nn.parallel.DistributedDataParallel(student) if use_ddp else student
        ada = fxfusion.ADALoss(model, teacher)
        balancer = fxfusion.AlphaBalancer(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(config["batch"], 3, config["size"], config["size"], generator=gen)
        wall, cpu = [], []
        for i in range(config["warmup"] + config["steps"]):
            t, c = time.perf_counter(), time.process_time()
            loss = sum(o.pow(2).mean() for o in model(x)) + ada(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            balancer.step()
            if i >= config["warmup"]:
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        torch.save({"wall": wall, "cpu": cpu}, Path(out) / f"rank{rank}.pt")
    finally:
        if use_ddp:
            dist.destroy_process_group()


def _models(size: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fp = build("yolov5")
    x = torch.randn(2, 3, size, size)
    student = fxfusion.quantize(fxfusion.rewrite(fp, x, alpha="balanced"), x, method="lsq", w_bits=4, a_bits=4)
    teacher = fxfusion.rewrite(fp, x, alpha="fixed", alpha_init=1.0, norm="none")
    return student, teacher


def _load() -> str:
    """The 1/5/15-minute load averages: above the core count, other processes took CPU time from the ranks."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
