"""Does the default rewrite keep the meaning of models nobody here wrote? torchvision, checked.

For each torchvision classification model (random weights, BatchNorm statistics from one batch,
96 px; ViT at 64 px with its zero-initialised head drawn at random): ``rewrite(model, x,
calib_data=...)`` with the defaults, then on a fresh
input the largest output difference from the original model relative to the output's magnitude
(the gate closed, as right after the rewrite), and the relative L2 difference the sites would
cause with the normalization fully open (``set_gate(model, 1)``), i.e. what ``NormSchedule``
phases in during QAT. Models with 0 sites are those whose fusions ``find_fusions`` does not reach
yet (see the rewrite report's refusals).

torchvision must import beside the installed torch. On this project's CPU machine the PyPI
torchvision does not load with the pinned CPU torch 2.13.0; a separate venv with
``pip install torch==2.14.1 torchvision==0.29.1`` and ``pip install -e .`` works:

    python benchmarks/real_models.py [model ...]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_third_party, environment, markdown_table, print_table, write_results  # noqa: E402

import fxfusion  # noqa: E402
from fxfusion.gabfusion import set_gate  # noqa: E402
from fxfusion.passes.runtime import leaves  # noqa: E402
from fxfusion.zoo.common import bn_stats_from  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "densenet121", "mobilenet_v2", "googlenet", "inception_v3", "regnet_x_400mf",
          "shufflenet_v2_x1_0", "efficientnet_b0", "convnext_tiny", "swin_t", "vit_b_16")


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [t for t in leaves(model(x)) if isinstance(t, torch.Tensor)]


def check(name: str) -> dict:
    size = 64 if name.startswith("vit") else 96
    model = build_third_party("tv", name, size).eval()
    bn_stats_from(model, [torch.randn(4, 3, size, size)])
    x = torch.randn(2, 3, size, size)
    t0 = time.perf_counter()
    rewritten = fxfusion.rewrite(model, x, calib_data=[torch.randn(2, 3, size, size)])
    seconds = time.perf_counter() - t0
    fresh = torch.randn(2, 3, size, size)
    ref, now = _outputs(model, fresh), _outputs(rewritten, fresh)
    dev = max(float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12) for a, b in zip(ref, now))
    set_gate(rewritten, 1.0)
    opened = _outputs(rewritten, fresh)
    norms = [(float((a - b).norm()), float(a.norm())) for a, b in zip(ref, opened)]
    rel = max((d / n for d, n in norms if n > 0), default=float("nan"))
    return {"model": name, "px": size, "sites": len(rewritten.fxfusion_reports["rewrite"].placed),
            "rewrite s": f"{seconds:.1f}", "max rel. dev, gate closed": f"{dev:.1e}",
            "rel. L2, gate open": f"{rel:.2f}" if rel == rel else "n/a (zero output)"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models:
        try:
            rows.append(check(name))
        except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end of the table
            rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:160]}"})
        print(rows[-1], flush=True)  # noqa: T201
    print_table(rows, title="Default rewrite on torchvision models")
    md = "\n\n".join(["# The default (function-preserving) rewrite on torchvision models", __doc__.split("\n\n")[1],
                      markdown_table(rows)])
    write_results(args.out, "real_models", {"environment": environment(), "rows": rows}, md)
    return rows


if __name__ == "__main__":
    main()
