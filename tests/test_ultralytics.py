"""The YOLO user's path end to end, in Ultralytics' own trainer and tools (extra ``[ultralytics]``).

A tiny detection dataset in Ultralytics' layout is written to a temp dir (the demo's shapes, two
classes). For yolov8n and yolo11n, built from their yaml: ``fxfusion yolo train`` for one
epoch at 64 px, ``YOLO(last.pt)`` val and predict, ``fxfusion yolo deploy``, then Ultralytics'
predict and val on the QDQ ONNX and on the deployed checkpoint, and its own ONNX export of it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="fxfusion-yolo-cfg-"))  # before the import
os.environ["YOLO_AUTOINSTALL"] = "false"  # its exporter would pip-install onnxslim
os.environ["YOLO_VERBOSE"] = "false"
pytest.importorskip("ultralytics")

from ultralytics import YOLO  # noqa: E402

from fxfusion.cli import main  # noqa: E402
from fxfusion.demo.data import write_yolo_dataset  # noqa: E402
from fxfusion.deployed import DeployedFusion  # noqa: E402
from fxfusion.gabfusion import GABFusion  # noqa: E402
from fxfusion.integrations.ultralytics import deploy, train  # noqa: E402
from fxfusion.quant.layers import is_quantized  # noqa: E402

NAMES = {0: "circle", 1: "square"}
COMMON = dict(epochs=1, imgsz=64, batch=4, workers=0, device="cpu", plots=False, amp=False, exist_ok=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_yolo_dataset(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=4, img_size=64, num_classes=2)


def _image(data: Path) -> str:
    return str(data.parent / "images" / "val" / "0.png")


def _check_tools(weights: str | Path, data: Path) -> None:
    """Ultralytics' val and predict run on the file and name the classes."""
    model = YOLO(str(weights))
    metrics = model.val(data=str(data), imgsz=64, batch=4, workers=0, plots=False)
    assert 0.0 <= metrics.box.map50 <= 1.0
    (result,) = model.predict(_image(data), imgsz=64, verbose=False)
    assert result.names == NAMES
    assert result.boxes.data.shape[1] == 6


@pytest.mark.parametrize("cfg, extra", [("yolov8n.yaml", {"ada": True}), ("yolo11n.yaml", {"balanced": True})])
def test_train_reload_val_deploy_and_onnx_in_ultralytics(tmp_path: Path, data: Path, cfg: str, extra: dict) -> None:
    last = train(cfg, str(data), bits=4, project=str(tmp_path), name="run", **extra, **COMMON)

    # the checkpoint holds the sites and the quantizers; DFL stayed float
    trained = YOLO(str(last))
    sites = [n for n, m in trained.model.named_modules() if isinstance(m, GABFusion)]
    assert len(sites) >= 8  # the neck Concats and the C2f/C3k2 cats
    assert sum(is_quantized(m) for m in trained.model.modules()) > 50
    assert not is_quantized(trained.model.model[-1].dfl.conv)
    _check_tools(last, data)  # val fuses the model: the quantized convs must survive that
    assert sum(isinstance(m, GABFusion) for m in YOLO(str(last)).model.modules()) == len(sites)

    result = deploy(last, finetune=2, batch=4)
    assert result.pt.is_file() and result.onnx.is_file()
    assert result.verify.passed, str(result.verify)
    assert result.report.sites and all(s["exact"] for s in result.report.sites)
    deployed = YOLO(str(result.pt))
    assert not any(isinstance(m, (GABFusion, DeployedFusion)) for m in deployed.model.modules())  # original topology
    assert result.export.op_histogram["QuantizeLinear"] > 50
    _check_tools(result.onnx, data)
    _check_tools(result.pt, data)
    exported = deployed.export(format="onnx", imgsz=64)  # Ultralytics' own exporter on what fxfusion produced
    assert Path(exported).is_file()

    # training on from an fxfusion checkpoint keeps its sites (not a second rewrite); ADA then needs the float net
    more = train(last, str(data), project=str(tmp_path), name="more", **COMMON)
    assert sum(isinstance(m, GABFusion) for m in YOLO(str(more)).model.modules()) == len(sites)
    with pytest.raises(ValueError, match="needs the float network: pass teacher="):
        train(last, str(data), ada=True, project=str(tmp_path), name="ada", **COMMON)


def test_the_command_line_trains_and_deploys_the_plain_qat_baseline(tmp_path: Path, data: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    args = [f"{k}={v}" for k, v in COMMON.items()]
    assert main(["yolo", "train", "model=yolov8n.yaml", f"data={data}", "bits=4", "rewrite=False",
                 f"project={tmp_path}", "name=cli", *args]) == 0
    last = tmp_path / "cli" / "weights" / "last.pt"
    assert f"trained checkpoint {last}" in capsys.readouterr().out
    trained = YOLO(str(last)).model
    assert not any(isinstance(m, GABFusion) for m in trained.modules())
    assert sum(is_quantized(m) for m in trained.modules()) > 50
    assert main(["yolo", "deploy", f"model={last}", "batch=4"]) == 0
    assert "PASSED" in capsys.readouterr().out
    _check_tools(tmp_path / "cli" / "weights" / "last-deployed.onnx", data)


@pytest.mark.parametrize("argv, message", [
    (["yolo", "train", "data=x.yaml"], "missing model=..."),
    (["yolo", "train", "model=yolov8n.yaml", "data=x.yaml", "bits=9"], "bits=9 is out of range"),
    (["yolo", "train", "model=yolov8n.yaml", "data=x.yaml", "method=foo"], "method='foo' is not one of"),
    (["yolo", "train", "model=yolov8n.yaml", "data=x.yaml", "epoch=3"], "unknown argument(s) epoch"),
    (["yolo", "deploy", "model=a.pt", "finetune=3", "ada=True"], "unknown argument(s) ada"),
    (["yolo", "train", "model=yolov8n.yaml", "data=x.yaml", "ada=True", "rewrite=False"], "need rewrite=True"),
    (["yolo", "train", "model=yolov8n.yaml", "data=x.yaml", "pow2=3"], "pow2=3 must be True or False"),
])
def test_bad_yolo_arguments_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_yolo_wrapper_is_read_by_find_and_refused_with_directions_by_rewrite() -> None:
    import torch

    import fxfusion

    yolo = YOLO("yolov8n.yaml")
    x = torch.randn(1, 3, 64, 64)
    report = fxfusion.find_fusions(yolo, x)
    assert len(report.sites) == len(fxfusion.find_fusions(yolo.model, x).sites) >= 8
    with pytest.raises(TypeError, match=r"yolo.model = fxfusion.rewrite\(yolo.model"):
        fxfusion.rewrite(yolo, x)


def test_inspect_reads_an_ultralytics_yaml(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "yolov8n.yaml", "--input-shape", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "cat #0 in model.12 (C2f)" in out and "placed" in out


def test_an_interrupted_run_resumes_with_its_sites(tmp_path: Path, data: Path) -> None:
    import torch

    from fxfusion.integrations.ultralytics import FusionOptions, GABFusionTrainer

    args = {**COMMON, "epochs": 2, "model": "yolov8n.yaml", "data": str(data), "project": str(tmp_path),
            "name": "run"}
    trainer = GABFusionTrainer(overrides=args, fxfusion=FusionOptions(bits=4))

    def interrupt(t: GABFusionTrainer) -> None:
        if t.epoch == 0:
            raise KeyboardInterrupt

    trainer.add_callback("on_fit_epoch_end", interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    last = tmp_path / "run" / "weights" / "last.pt"
    sites = sum(isinstance(m, GABFusion) for m in YOLO(str(last)).model.modules())
    assert torch.load(last, weights_only=False)["epoch"] == 0  # stopped after its first epoch

    assert train(last, str(data), resume=True) == last
    assert torch.load(last, weights_only=False)["epoch"] == -1  # finished (Ultralytics strips it)
    assert sum(isinstance(m, GABFusion) for m in YOLO(str(last)).model.modules()) == sites > 0
