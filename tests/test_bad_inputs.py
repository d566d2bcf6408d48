"""The catalogue of bad inputs: one test per case, each asserting what the user gets and that it names the
module, site or argument (listed in the README's Troubleshooting section).

Every case lives here and nowhere else in tests/.
"""

from __future__ import annotations

import errno
import os
import tempfile
import warnings

import onnxruntime
import pytest
import torch
from torch import nn

import fxfusion
import fxfusion.passes.export as export_pass
from fxfusion.passes.trace import Untraceable
from fxfusion.report import dumps, write_atomic

X = torch.randn(2, 3, 8, 8)


class TwoBranch(nn.Module):
    """One fusion site: ``out(cat(relu(a(x)), relu(b(x))))``."""

    def __init__(self, width: int = 4, cin: int = 3) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(cin, width, 3, padding=1), nn.Conv2d(cin, width, 1)
        self.out = nn.Conv2d(2 * width, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


class Gated(TwoBranch):
    """A cat behind data-dependent control flow: torch.fx cannot trace this forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        if y.sum() > 0:
            y = torch.relu(y)
        return self.out(y)


class LenSliced(TwoBranch):
    """``len()`` of a tensor in forward: nothing of this model traces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[: len(x)]


def _rewrite(model: nn.Module, x: torch.Tensor = X, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxfusion.rewrite(model, x, **kwargs)


def _quantized(model: nn.Module) -> nn.Module:
    """QAT model with initialized quantizers (one training forward)."""
    q = fxfusion.quantize(model, X, method="lsq", w_bits=4, a_bits=4)
    q.train()(X)
    return q.eval()


def _leftovers(directory) -> list[str]:
    return sorted(os.listdir(directory))


# --------------------------------------------------------------------------- models


def test_data_dependent_control_flow_is_reported_not_rewritten():
    model = nn.Sequential(TwoBranch(), nn.ReLU(), Gated(cin=2))
    q = _rewrite(model)
    report = q.fxfusion_reports["rewrite"]
    assert [p["module"] for p in report.placed] == ["0"]  # the traceable block is rewritten
    reason = "TraceError: symbolically traced variables cannot be used as inputs to control flow"
    assert report.found.untraceable == [Untraceable("2", "Gated", reason)]
    assert "Untraceable modules (not examined)" in str(report) and "Gated" in str(report)
    assert type(q[2]) is Gated  # left as it was


def test_model_that_cannot_be_traced_at_all_warns_with_the_reason():
    with pytest.warns(UserWarning, match=r"no fusion site was rewritten in LenSliced.*torch\.fx could not trace "
                                         r"<root> \(LenSliced\): RuntimeError: 'len' is not supported"):
        q = fxfusion.rewrite(LenSliced(), X)
    assert type(q) is LenSliced and "rewrite" in q.fxfusion_reports


def test_model_without_sites_warns_and_comes_back_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.warns(UserWarning, match=r"rewrite: no fusion site was rewritten in Sequential; returned unchanged"):
        q = fxfusion.rewrite(model, X)
    assert [type(m) for m in q.modules()] == [type(m) for m in model.modules()]


# --------------------------------------------------------------------------- example inputs


@pytest.mark.parametrize("pass_", ["find_fusions", "rewrite", "quantize"])
def test_example_inputs_of_the_wrong_shape(pass_):
    with pytest.raises(ValueError, match=r"TwoBranch failed on the example inputs \(\(2, 5, 8, 8\) float32\): "
                                         r"Given groups=1.*Pass inputs of the shape and dtype"):
        getattr(fxfusion, pass_)(TwoBranch(), torch.randn(2, 5, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_example_inputs_of_the_wrong_dtype(dtype):
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"TwoBranch failed on the example inputs \(\(2, 3, 8, 8\) {name}\): "
                                         r"Input type .* should be the same"):
        fxfusion.rewrite(TwoBranch(), X.to(dtype))


# --------------------------------------------------------------------------- deploy's calibration data


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_calibration_data(bad):
    poisoned = X.clone()
    poisoned[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match=r"calibration batch 1 contains NaN or inf values"):
        fxfusion.deploy(_rewrite(TwoBranch()), [(X,), (poisoned,)], progress=False)


@pytest.mark.parametrize("loader", ["list", "DataLoader"])
def test_empty_calibration_data(loader):
    empty = [] if loader == "list" else torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:0]))
    with pytest.raises(ValueError, match=r"the calibration data is empty: pass a non-empty DataLoader"):
        fxfusion.deploy(_rewrite(TwoBranch()), empty, progress=False)


# --------------------------------------------------------------------------- quantize options


@pytest.mark.parametrize(("option", "bits", "error", "says"), [
    ("w_bits", 1, ValueError, "w_bits=1 is out of range"),
    ("a_bits", 9, ValueError, "a_bits=9 is out of range"),
    ("first_last_bits", 0, ValueError, "first_last_bits=0 is out of range"),
    ("w_bits", 4.5, TypeError, r"w_bits must be an int in 2\.\.8, got 4\.5"),
])
def test_bits_outside_2_to_8_name_the_argument(option, bits, error, says):
    with pytest.raises(error, match=says) as info:
        fxfusion.quantize(TwoBranch(), X, **{option: bits})
    assert "2..8" in str(info.value) and f"e.g. {option}=4" in str(info.value)


# --------------------------------------------------------------------------- export


def test_export_of_a_model_that_was_not_deployed(tmp_path):
    qat = _quantized(_rewrite(TwoBranch()))
    with pytest.raises(ValueError, match=r"the model is not deployed: it still contains 1 GABFusion training "
                                         r"site\(s\) \(gabfusion0\); call fxfusion\.deploy"):
        fxfusion.export_onnx(qat, X, tmp_path / "qat.onnx")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["missing directory", "a directory", "parent is a file", "read-only directory"])
def test_unwritable_onnx_path_is_named_before_any_work(case, tmp_path, monkeypatch):
    if case == "read-only directory" and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    monkeypatch.setattr(export_pass, "_check_deployed", lambda m: pytest.fail("work started before the path check"))
    (tmp_path / "file").write_text("")
    path, error, says = {
        "missing directory": (tmp_path / "no" / "dir" / "m.onnx", FileNotFoundError, "no/dir' does not exist"),
        "a directory": (tmp_path, IsADirectoryError, "it is a directory"),
        "parent is a file": (tmp_path / "file" / "m.onnx", NotADirectoryError, "file' is a file, not a directory"),
        "read-only directory": (tmp_path / "ro" / "m.onnx", PermissionError, "ro' is not writable"),
    }[case]
    (tmp_path / "ro").mkdir(mode=0o500)
    before = _leftovers(tmp_path)
    try:
        with pytest.raises(error, match=rf"cannot write the ONNX file '{path}'.*{says}"):
            fxfusion.export_onnx(TwoBranch(), X, path)
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert _leftovers(tmp_path) == before and _leftovers(tmp_path / "ro") == []


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated onnxruntime failure")

    monkeypatch.setattr(onnxruntime, "InferenceSession", broken)
    with pytest.raises(fxfusion.passes.export.OnnxExportError, match="simulated onnxruntime failure"):
        fxfusion.export_onnx(_quantized(TwoBranch()), X, tmp_path / "m.onnx")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("previous", [None, b"previous"])
@pytest.mark.parametrize("what", ["onnx", "report"])
def test_failed_write_leaves_no_partial_file(what, previous, tmp_path, monkeypatch):
    """The disk fills up halfway through writing the temporary file: the target keeps its old content (or
    does not exist) and the temporary file is gone."""
    target = tmp_path / f"out.{what}"
    if previous is not None:
        target.write_bytes(previous)
    ours, real_mkstemp, real_fdopen = set(), tempfile.mkstemp, os.fdopen

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if os.path.basename(name).startswith(".fxfusion-") and "probe" not in name:  # write_atomic's temp file
            ours.add(fd)
        return fd, name

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWritten(real_fdopen(fd, *a, **k)) if fd in ours
                        else real_fdopen(fd, *a, **k))
    with pytest.raises(OSError, match="No space left on device"):
        if what == "onnx":
            fxfusion.export_onnx(_quantized(TwoBranch()), X, target)
        else:
            write_atomic(target, dumps(fxfusion.find_fusions(TwoBranch(), X)))
    assert ours, "the failure was not simulated inside the atomic write"
    assert _leftovers(tmp_path) == ([target.name] if previous is not None else [])
    assert previous is None or target.read_bytes() == previous


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("other", ["another architecture", "another width"])
def test_checkpoint_of_a_different_architecture_names_the_keys(other):
    q = _rewrite(TwoBranch())
    if other == "another architecture":
        state = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).state_dict()
        says = r'Missing key\(s\) in state_dict: "a\.weight".*Unexpected key\(s\) in state_dict: "0\.weight"'
    else:
        state = TwoBranch(width=8).state_dict()
        says = r"size mismatch for a\.weight: copying a param with shape torch\.Size\(\[8, 3, 3, 3\]\)"
    with pytest.raises(RuntimeError, match=rf"(?s)Error\(s\) in loading state_dict for TwoBranch:.*{says}"):
        q.load_state_dict(state)
