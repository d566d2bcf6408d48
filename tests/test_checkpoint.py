"""Checkpoints: QAT resumes bit-identically in a fresh process; float checkpoints load; a deployed model
round-trips through torch.save/torch.load into a fresh process and re-exports the same ONNX bytes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

_SCRIPT = textwrap.dedent('''
    import sys, warnings
    import torch
    import fxfusion
    from fxfusion.zoo import ZOO, example_inputs

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    mode, path = sys.argv[1], sys.argv[2]

    def build():
        torch.manual_seed(0)
        model = ZOO["resnet"].build()
        x = example_inputs("resnet")
        return fxfusion.quantize(fxfusion.rewrite(model, x), x, method="lsq", w_bits=4, a_bits=4), x

    def steps(model, opt, n, start):
        losses = []
        for i in range(start, start + n):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(2, 3, 64, 64, generator=g)
            target = torch.randn(2, 10, generator=g)
            loss = torch.nn.functional.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    model, x = build()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    if mode == "first":
        steps(model, opt, 3, 0)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        print(repr(steps(model, opt, 3, 3)))
    else:
        ckpt = torch.load(path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        print(repr(steps(model, opt, 3, 3)))
''')


def _run(tmp_path, mode):
    script = tmp_path / "qat.py"
    script.write_text(_SCRIPT)
    out = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "ckpt.pt")],
                         capture_output=True, text=True, check=True, timeout=300)
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr of a list of floats


def test_qat_resumes_bit_identically_in_a_fresh_process(tmp_path):
    continued = _run(tmp_path, "first")
    resumed = _run(tmp_path, "resume")
    assert continued == resumed  # exact float equality, not a tolerance


def test_float_checkpoint_loads_into_rewritten_and_quantized_models(zoo_model):
    import warnings

    import fxfusion

    model, x = zoo_model("yolov5")
    state = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = fxfusion.rewrite(model, x)
    result = rewritten.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all("gabfusion" in k for k in result.missing_keys)
    for k, v in state.items():
        assert torch.equal(rewritten.state_dict()[k], v)


_REEXPORT = textwrap.dedent('''
    import sys, warnings
    import torch
    import fxfusion
    from fxfusion.passes.runtime import tensors as flatten_outputs

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    ckpt = torch.load(sys.argv[1], weights_only=False)
    model = ckpt["model"].eval()
    with torch.no_grad():
        outputs = flatten_outputs(model(ckpt["x"]))
    same = all(torch.equal(a, b) for a, b in zip(outputs, ckpt["outputs"], strict=True))
    fxfusion.export_onnx(model, ckpt["x"], sys.argv[2])
    print(same)
''')


def test_deployed_model_round_trips_and_reexports_the_same_onnx_bytes(zoo_model, tmp_path):
    import warnings

    import fxfusion
    from fxfusion.passes.runtime import tensors as flatten_outputs

    model, (x,) = zoo_model("yolov5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxfusion.quantize(fxfusion.rewrite(model, x), x, method="lsq", w_bits=4, a_bits=4).train()
        opt = torch.optim.SGD(qat.parameters(), lr=1e-2, momentum=0.9)
        for _ in range(2):
            loss = sum(o.pow(2).mean() for o in qat(x))  # Detect's 3 raw maps in train mode
            opt.zero_grad()
            loss.backward()
            opt.step()
        deployed = fxfusion.deploy(qat, [(x,)], progress=False).eval()
        fxfusion.export_onnx(deployed, x, tmp_path / "saved.onnx")
    with torch.no_grad():
        outputs = flatten_outputs(deployed(x))  # eval-mode Detect: (boxes, [raw maps])
    torch.save({"model": deployed, "x": x, "outputs": outputs}, tmp_path / "deployed.pt")

    script = tmp_path / "reexport.py"
    script.write_text(_REEXPORT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "deployed.pt"), str(tmp_path / "loaded.onnx")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.split() == ["True"]  # the loaded model computes the same outputs
    assert (tmp_path / "loaded.onnx").read_bytes() == (tmp_path / "saved.onnx").read_bytes()
