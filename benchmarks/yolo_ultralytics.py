"""The YOLO user's path, measured: float training, then 4-bit QAT in Ultralytics' own trainer.

On the demo's synthetic shapes written in Ultralytics' layout (``write_yolo_dataset``), yolov8n
from its yaml:

1. float: Ultralytics' ``YOLO.train`` from scratch;
2. QAT from that float ``best.pt``, each run through ``fxfusion yolo train`` (Ultralytics'
   trainer, EMA, validation): plain LSQ W4A4 (``rewrite=False``), GABFusion, GABFusion + ADA, and
   the first two again with power-of-two scales (``pow2=True``);
3. ``fxfusion yolo deploy`` of each ``last.pt``, then Ultralytics' own ``val`` on the QDQ ONNX
   (onnxruntime) and ``verify_onnx``.

Every run's record goes to ``results/yolo_ultralytics/<run>.json`` when it is done, so a second
session continues where the first stopped (``--force`` redoes them). Needs the ``[ultralytics]``
extra and a torchvision that imports (see ``setup.cfg``).

    python benchmarks/yolo_ultralytics.py [--float-epochs 30] [--qat-epochs 10] [--imgsz 96]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="fxfusion-yolo-cfg-"))
os.environ["YOLO_AUTOINSTALL"] = "false"
os.environ["YOLO_VERBOSE"] = "false"

from ultralytics import YOLO  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, print_table, write_results  # noqa: E402

from fxfusion.demo.data import write_yolo_dataset  # noqa: E402
from fxfusion.integrations.ultralytics import deploy, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QAT_RUNS = {"lsq_w4a4": {"rewrite": False}, "gabfusion": {}, "gabfusion_ada": {"ada": True},
            # power-of-two scales: what they cost in mAP, and whether the ONNX is then bit-exact
            "lsq_w4a4_pow2": {"rewrite": False, "pow2": True}, "gabfusion_pow2": {"pow2": True}}


def _val(weights: Path, data: Path, imgsz: int) -> dict:
    m = YOLO(str(weights)).val(data=str(data), imgsz=imgsz, batch=16, workers=0, plots=False, verbose=False)
    return {"mAP50": round(float(m.box.map50), 4), "mAP50-95": round(float(m.box.map), 4)}


def _deployed(last: Path, data: Path, imgsz: int) -> dict:
    """``fxfusion yolo deploy`` of a checkpoint, and Ultralytics' val of its ONNX in onnxruntime."""
    result = deploy(last, batch=16)
    onnx = _val(result.onnx, data, imgsz)
    return {"onnx mAP50": onnx["mAP50"], "onnx mAP50-95": onnx["mAP50-95"],
            "verify": "passed" if result.verify.passed else "FAILED",
            "verify err/range": f"{result.verify.max_relative_error:.2g}",
            "tie flips only": result.verify.tie_flips_only,
            "bit exact": result.verify.max_abs_error == 0.0,
            "deploy max dev": result.report.output_deviation["max_vs_undeployed"],
            "sites": len(result.report.sites)}


def _record(path: Path, force: bool, fn) -> dict:
    if path.exists() and not force:
        return json.loads(path.read_text())
    start = time.perf_counter()
    rec = fn()
    rec["minutes"] = round((time.perf_counter() - start) / 60, 2)
    path.write_text(json.dumps(rec, indent=1, default=str))
    print(rec, flush=True)  # noqa: T201
    return rec


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--float-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=10)
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--force", action="store_true", help="redo runs that already have a record")
    parser.add_argument("--redeploy", action="store_true", help="deploy the trained checkpoints again")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    records_dir = args.out / "yolo_ultralytics"
    records_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.gettempdir()) / "fxfusion-yolo-bench"
    data = work / "shapes" / "data.yaml"
    if not data.exists():
        write_yolo_dataset(data.parent, n_train=args.n_train, n_val=args.n_val, img_size=args.imgsz)
    common = dict(imgsz=args.imgsz, batch=16, workers=0, device="cpu", plots=False, exist_ok=True,
                  project=str(work / "runs"), verbose=False)

    def float_run() -> dict:
        YOLO("yolov8n.yaml").train(data=str(data), epochs=args.float_epochs, name="float", **common)
        return {"run": "float", "epochs": args.float_epochs, **_val(work / "runs/float/weights/best.pt", data,
                                                                    args.imgsz)}

    float_best = work / "runs/float/weights/best.pt"
    # the float weights live in a temporary folder: a later session trains them again (seed 0)
    records = [_record(records_dir / "float.json", args.force or not float_best.exists(), float_run)]
    for name, options in QAT_RUNS.items():
        last = work / "runs" / name / "weights" / "last.pt"

        def qat_run(name: str = name, options: dict = options, last: Path = last) -> dict:
            train(float_best, str(data), bits=4, epochs=args.qat_epochs, name=name, **options, **common)
            return {"run": name, "epochs": args.qat_epochs, **_val(last, data, args.imgsz)}

        rec = _record(records_dir / f"{name}.json", args.force, qat_run)
        if args.redeploy or "verify err/range" not in rec:  # deploy again, training numbers kept
            rec.update(_deployed(last, data, args.imgsz))
            (records_dir / f"{name}.json").write_text(json.dumps(rec, indent=1, default=str))
        records.append(rec)
    columns = list(dict.fromkeys(k for r in records for k in r))
    print_table(records, columns, title="yolov8n on shapes: float, then 4-bit QAT in Ultralytics' trainer")
    settings = (f"{args.n_train} train / {args.n_val} val images at {args.imgsz} px, batch 16, Ultralytics' "
                "defaults otherwise (optimizer auto, EMA, seed 0); W4A4 LSQ, first and last layers 8 bits; "
                "GABFusion with NormSchedule ramp 0.25, taper 0.25.")
    md = "\n\n".join(["# The YOLO user's path (`benchmarks/yolo_ultralytics.py`)", __doc__.split("\n\n")[1],
                      settings, markdown_table(records, columns)])
    write_results(args.out, "yolo_ultralytics", {"environment": environment(), "records": records}, md)
    return records


if __name__ == "__main__":
    main()
