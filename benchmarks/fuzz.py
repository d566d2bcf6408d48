"""The long fuzzing campaign: the whole fxfusion flow on thousands of random multi-branch networks.

Same generator and properties as ``tests/fuzz/test_fuzz.py`` (``tests/fuzz/generator.py``), but each
network comes from a seeded ``random.Random`` instead of hypothesis, so that example ``i`` of seed
``S`` is always the same network and can be replayed alone. Per example:

- ``find_fusions`` reports exactly the planted sites and traces the whole model;
- ``rewrite(alpha="fixed", alpha_init=1.0, norm="none")`` leaves the eval outputs bit for bit unchanged;
- float variant: ``rewrite`` (random α) -> ``deploy``: where every site is reported exact, the deployed
  model equals the frozen-LayerNorm model to 1e-5 of the output range;
- QAT: ``rewrite`` -> ``quantize`` (method among lsq/pact/dsq/n2uq/minmax, weight and activation bits
  2..8) -> 2 SGD steps -> ``deploy`` (2 calibration batches) -> ``export_onnx`` -> ``verify_onnx``
  passes (at most 0.1% mismatching elements at both onnxruntime optimization levels).

Failures are grouped by kind (the property, or ``crash:<pass>:<exception>``); for each kind the
results keep the count and the smallest failing network (fewest plan steps) as the repro, with the
command that replays it. Kinds listed in ``generator.KNOWN_ISSUES`` are known and pinned by strict
xfail regression tests; they are counted separately.

Usage::

    python benchmarks/fuzz.py --examples 2000 [--seed 0] [--workers 2] [--time-budget 1200]
    python benchmarks/fuzz.py --seed 0 --replay 123      # one example, with its plan and full messages
    python benchmarks/fuzz.py --examples 2000 --pow2     # the same networks, power-of-two scales

Writes ``fuzz.json`` and ``fuzz.md`` (``fuzz_pow2.*`` with ``--pow2``) under ``--out`` (default
``benchmarks/results``), also every ``--save-every`` examples, so an interrupted run keeps what it
did. Each worker runs one torch thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from common import environment, markdown_table, write_results  # a sibling file: run as ``python benchmarks/fuzz.py``

REPO = Path(__file__).resolve().parents[1]


def _load_generator():
    # tests/ is not an installed package, and "fuzz" would be this very script: load the file by path.
    path = REPO / "tests" / "fuzz" / "generator.py"
    spec = importlib.util.spec_from_file_location("fxfusion_fuzz_generator", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def example_seed(seed: int, index: int) -> int:
    """The seed of example ``index`` of campaign ``seed`` (independent of the other examples)."""
    return seed * 1_000_003 + index


def example(seed: int, index: int) -> tuple[Any, str, int, int]:
    """``(spec, method, w_bits, a_bits)`` of example ``index``."""
    s = example_seed(seed, index)
    spec = gen.plan_network(gen.RandomChoices(s))
    rng = random.Random(s ^ 0x5EED)
    return spec, rng.choice(gen.METHODS), rng.randint(2, 8), rng.randint(2, 8)


def run_one(args: tuple[int, int, bool]) -> dict[str, Any]:
    """Run example ``index`` of campaign ``seed`` (power-of-two scales when ``pow2``); everything the
    summary needs, picklable."""
    seed, index, pow2 = args
    torch.set_num_threads(1)
    start = time.perf_counter()
    spec, method, w_bits, a_bits = example(seed, index)
    row: dict[str, Any] = {"index": index, "method": method, "w_bits": w_bits, "a_bits": a_bits,
                           "sites": spec.sites, "steps": len(spec.steps), "layers": len(spec.layers),
                           "tags": sorted(spec.tags), "failures": [], "info": {}, "seconds": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="fxfusion-fuzz-") as tmp:
            outcome = gen.run_example(spec, method=method, w_bits=w_bits, a_bits=a_bits, tmpdir=tmp, pow2=pow2)
        row["failures"] = [{"kind": f.kind, "message": _message(f)} for f in outcome.failures]
        row["info"], row["seconds"] = outcome.info, outcome.seconds
    except Exception as e:  # noqa: BLE001 - a harness crash is a finding too; keep the campaign going
        row["failures"] = [{"kind": f"crash:harness:{type(e).__name__}", "message": traceback.format_exc()}]
    if row["failures"]:
        row["plan"] = gen.describe(spec)
    row["seconds"]["total"] = time.perf_counter() - start
    return row


def _message(failure: BaseException, limit: int = 4000) -> str:
    text = str(failure)
    cause = failure.__cause__
    if cause is not None:  # a crashed pass: where it raised
        tb = traceback.extract_tb(cause.__traceback__)
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb if "/fxfusion/" in f.filename
                  or "/passes/" in f.filename][-4:]
        text += "\nraised at: " + " <- ".join(reversed(frames))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- the campaign


def campaign(examples: int, seed: int, workers: int, budget: float | None, out: Path, save_every: int,
             pow2: bool = False) -> dict:
    start = time.perf_counter()
    rows: list[dict] = []
    jobs = [(seed, i, pow2) for i in range(examples)]
    stopped = ""
    pool = mp.Pool(workers) if workers > 1 else None
    results = pool.imap(run_one, jobs, chunksize=1) if pool else map(run_one, jobs)
    try:
        for row in results:
            rows.append(row)
            bad = ", ".join(f["kind"] for f in row["failures"])
            print(f"[{len(rows)}/{examples}] #{row['index']} sites={row['sites']} {row['method']} "  # noqa: T201
                  f"w{row['w_bits']}a{row['a_bits']} {row['seconds']['total']:.2f}s {bad}", flush=True)
            if len(rows) % save_every == 0:
                _save(rows, seed, examples, time.perf_counter() - start, workers, "running", out, pow2)
            if budget is not None and time.perf_counter() - start > budget:
                stopped = f"time budget of {budget:.0f} s reached"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        if pool:
            pool.terminate()
            pool.join()
    summary = _save(rows, seed, examples, time.perf_counter() - start, workers, stopped or "complete", out, pow2)
    return summary


def _save(rows: list[dict], seed: int, requested: int, seconds: float, workers: int, status: str, out: Path,
          pow2: bool) -> dict:
    summary = summarize(rows, seed, requested, seconds, workers, status, pow2)
    write_results(out, "fuzz_pow2" if pow2 else "fuzz", summary, to_markdown(summary))
    return summary


def summarize(rows: list[dict], seed: int, requested: int, seconds: float, workers: int, status: str,
              pow2: bool = False) -> dict:
    kinds: dict[str, dict] = {}
    for row in rows:
        for f in row["failures"]:
            k = kinds.setdefault(f["kind"], {"kind": f["kind"], "count": 0, "known": f["kind"] in gen.KNOWN_ISSUES,
                                             "regression_test": gen.KNOWN_ISSUES.get(f["kind"], ""), "repro": None})
            k["count"] += 1
            repro = k["repro"]
            if repro is None or row["steps"] < repro["steps"]:  # the smallest network is the repro
                k["repro"] = {"index": row["index"], "steps": row["steps"], "method": row["method"],
                              "w_bits": row["w_bits"], "a_bits": row["a_bits"], "message": f["message"],
                              "plan": row["plan"],
                              "replay": f"python benchmarks/fuzz.py --seed {seed} --replay {row['index']}"
                                        + (" --pow2" if pow2 else "")}
    failed = [r for r in rows if r["failures"]]
    unknown = [r for r in rows if any(f["kind"] not in gen.KNOWN_ISSUES for f in r["failures"])]
    tags = Counter(t for r in rows for t in r["tags"])
    stage_seconds = Counter()
    for r in rows:
        stage_seconds.update(r["seconds"])
    float_info = [r["info"]["float_deploy"] for r in rows if "float_deploy" in r["info"]]
    exact_rows = [(r["index"], r["info"]["float_deploy"]) for r in rows
                  if r["info"].get("float_deploy", {}).get("exact")]
    worst = max(exact_rows, key=lambda e: e[1]["max_vs_frozen_ln"] / max(1.0, e[1]["output_range"]), default=None)
    qat_info = [r["info"]["qat"] for r in rows if "qat" in r["info"]]
    return {
        "meta": {**environment(), "seed": seed, "pow2": pow2, "examples_requested": requested, "workers": workers,
                 "status": status, "generator": "tests/fuzz/generator.py (RandomChoices)"},
        "examples_run": len(rows),
        "examples_failed": len(failed),
        "examples_failed_unknown": len(unknown),
        "seconds": round(seconds, 1),
        "seconds_per_example": round(seconds / max(len(rows), 1), 3),
        "seconds_by_stage": {k: round(v, 1) for k, v in sorted(stage_seconds.items())},
        "failures": sorted(kinds.values(), key=lambda k: (k["known"], -k["count"])),
        "sites_planted": {
            "total": sum(r["sites"] for r in rows),
            "histogram": dict(sorted(Counter(min(r["sites"], 10) for r in rows).items())),
        },
        "methods": dict(Counter(r["method"] for r in rows)),
        "float_deploy": {
            "examples": len(float_info),
            "all_sites_exact": sum(i["exact"] for i in float_info),
            "examples_with_explicit_sites": sum(i["explicit"] > 0 for i in float_info),
            "worst_exact": None if worst is None else {  # relative to the property's bound 1e-5 * max(1, range)
                "index": worst[0], "max_vs_frozen_ln": worst[1]["max_vs_frozen_ln"],
                "output_range": worst[1]["output_range"],
                "ratio_to_bound": worst[1]["max_vs_frozen_ln"] / (1e-5 * max(1.0, worst[1]["output_range"]))},
        },
        "qat": {
            "examples_verified": len(qat_info),
            "verify_exact": sum(bool(i["verify_exact"]) for i in qat_info),
            "bit_exact": sum(bool(i.get("bit_exact")) for i in qat_info),
            "max_mismatch_fraction": max((i["mismatch"] for i in qat_info), default=0.0),
        },
        "coverage": dict(sorted(tags.items())),
        "examples": [_compact(r) for r in rows],
    }


def _compact(row: dict) -> dict:
    """One line per example in the JSON: enough to find an outlier and replay it."""
    fd = row["info"].get("float_deploy", {})
    qat = row["info"].get("qat", {})
    return {"index": row["index"], "sites": row["sites"], "steps": row["steps"], "method": row["method"],
            "bits": f"w{row['w_bits']}a{row['a_bits']}", "failures": [f["kind"] for f in row["failures"]],
            "float_exact": fd.get("exact"), "max_vs_frozen_ln": fd.get("max_vs_frozen_ln"),
            "output_range": fd.get("output_range"), "bit_exact": qat.get("bit_exact"),
            "tags": row["tags"], "seconds": round(row["seconds"]["total"], 3)}


def to_markdown(s: dict) -> str:
    m = s["meta"]
    lines = [
        "# Fuzzing campaign (`benchmarks/fuzz.py`)",
        "",
        f"Seed {m['seed']}{', power-of-two scales (`--pow2`)' if m.get('pow2') else ''}, "
        f"{s['examples_run']} of {m['examples_requested']} examples run ({m['status']}), "
        f"{s['seconds']:.0f} s wall with {m['workers']} worker(s) of 1 torch thread "
        f"({s['seconds_per_example']:.2f} s per example); torch {m['torch']}, {m['date']}.",
        "",
        f"Examples with a failure: {s['examples_failed']} ({s['examples_failed_unknown']} with a failure "
        "that is not a known issue).",
        "",
        "## Failures by kind",
        "",
        markdown_table([{"kind": k["kind"], "count": k["count"], "known": "yes" if k["known"] else "",
                         "regression test": k["regression_test"], "repro": k["repro"]["replay"]}
                        for k in s["failures"]]) if s["failures"] else "(none)",
    ]
    for k in s["failures"]:
        r = k["repro"]
        lines += ["", f"### `{k['kind']}` ({k['count']}x)", "",
                  f"Smallest failing network: example {r['index']} ({r['steps']} steps), "
                  f"{r['method']} w{r['w_bits']}a{r['a_bits']}. Replay: `{r['replay']}`", "",
                  "```text", r["plan"], "```", "", "```text", r["message"][:2000], "```"]
    fd, q = s["float_deploy"], s["qat"]
    lines += [
        "", "## What ran",
        "",
        f"- sites planted: {s['sites_planted']['total']} (histogram by sites per network, 10 = 10+: "
        f"{s['sites_planted']['histogram']})",
        f"- float deploy: {fd['all_sites_exact']} of {fd['examples']} passing networks with every site reported "
        f"exact; closest to the bound 1e-5 x max(1, output range): {_worst(fd['worst_exact'])}; "
        f"{fd['examples_with_explicit_sites']} kept an explicit per-channel site",
        f"- QAT: {q['examples_verified']} networks verified in onnxruntime, {q['verify_exact']} with every "
        f"quantizer exact on its own input, {q.get('bit_exact', '-')} with onnxruntime's outputs bit for bit "
        f"PyTorch's; largest mismatch fraction {q['max_mismatch_fraction']:.3g}",
        f"- methods: {s['methods']}",
        f"- seconds by stage (summed over workers): {s['seconds_by_stage']}",
        "", "## Coverage (networks containing each pattern)", "",
        markdown_table([{"pattern": k, "networks": v} for k, v in s["coverage"].items()]),
    ]
    return "\n".join(lines)


def _worst(w: dict | None) -> str:
    if w is None:
        return "-"
    return (f"example {w['index']}, max_vs_frozen_ln {w['max_vs_frozen_ln']:.3g} at output range "
            f"{w['output_range']:.3g} ({w['ratio_to_bound']:.2f} of the bound)")


def replay(seed: int, index: int, pow2: bool = False) -> None:
    spec, method, w_bits, a_bits = example(seed, index)
    print(gen.describe(spec))  # noqa: T201
    print(f"method={method} w_bits={w_bits} a_bits={a_bits}; tags: {sorted(spec.tags)}")  # noqa: T201
    print(torch.fx.symbolic_trace(gen.build(spec)).code)  # noqa: T201
    row = run_one((seed, index, pow2))
    for f in row["failures"]:
        print(f"--- {f['kind']}\n{f['message']}")  # noqa: T201
    print("no failure" if not row["failures"] else f"{len(row['failures'])} failure(s)")  # noqa: T201


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes (each one torch thread)")
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds (examples run "
                   "so far are kept: always a prefix 0..k-1 of the campaign)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--replay", type=int, default=None, help="run example REPLAY alone and print everything")
    p.add_argument("--pow2", action="store_true", help="quantize with power-of-two scales (writes fuzz_pow2.*)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.replay is not None:
        replay(a.seed, a.replay, a.pow2)
        return 0
    s = campaign(a.examples, a.seed, max(1, a.workers), a.time_budget, a.out, a.save_every, a.pow2)
    print(f"\n{s['examples_run']} examples in {s['seconds']:.0f} s; failures by kind:")  # noqa: T201
    for k in s["failures"]:
        print(f"  {k['kind']}: {k['count']}{' (known)' if k['known'] else ''}  -> {k['repro']['replay']}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
