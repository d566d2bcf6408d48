"""The scratch copy that rewrite's deploy prediction and export_onnx work on (runtime.structural_copy):
it shares the weights, and nothing done to its structure reaches the model. And the passes pause
Python's garbage collector only while they run."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import fxfusion
from fxfusion.passes.runtime import set_submodule, structural_copy


class _Fused(nn.Module):
    """A YOLO-style block in its fused state: ``forward`` is an instance attribute bound to it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.forward = self.forward_fuse

    def forward_fuse(self, x):
        return self.conv(x)


def test_the_copy_shares_tensors_but_not_structure() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), _Fused())
    model[1].running_mean.fill_(0.5)
    shared = model[0]
    model.add_module("again", shared)  # one module reachable twice
    x = torch.randn(1, 3, 4, 4)
    want = model.eval()(x)
    work = structural_copy(model)
    assert work[0].weight is model[0].weight and work[1].running_mean is model[1].running_mean
    assert work[0] is not model[0] and work.again is work[0]

    # what scratch work does: replace a tensor, a module, an attribute; register a hook
    work[0].weight = nn.Parameter(torch.zeros_like(work[0].weight))
    set_submodule(work, "1", nn.Identity())
    work[2].conv.bias = None
    seen = []
    work[2].register_forward_hook(lambda *a: seen.append(1))
    work.train(True)
    work(x)
    assert seen == [1] and work[2].forward.__self__ is work[2]  # the fused forward is the copy's own

    assert isinstance(model[1], nn.BatchNorm2d) and model[2].conv.bias is not None
    assert not model[2]._forward_hooks and not model.training
    assert torch.equal(model(x), want)  # the model computes what it computed


@pytest.mark.parametrize("enabled", [True, False])
def test_the_passes_give_the_garbage_collector_back_as_they_found_it(tmp_path, enabled) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    seen = []
    hook = model[0].register_forward_pre_hook(lambda *_: seen.append(gc.isenabled()))
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        q = fxfusion.quantize(model, x, method="minmax", w_bits=8, a_bits=8)
        assert seen and not any(seen), "paused while the pass runs"
        assert gc.isenabled() is enabled
        q(x)
        deployed = fxfusion.deploy(q, [x], progress=False)
        assert gc.isenabled() is enabled
        fxfusion.export_onnx(deployed, x, tmp_path / "m.onnx")
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError, match="alpha"):
            fxfusion.rewrite(model, x, alpha="bad")
        assert gc.isenabled() is enabled, "and after a failure"
    finally:
        hook.remove()
        (gc.enable if was else gc.disable)()
