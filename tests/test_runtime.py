"""The scratch copy that rewrite's deploy prediction and export_onnx work on (runtime.structural_copy):
it shares the weights, and nothing done to its structure reaches the model."""

from __future__ import annotations

import torch
from torch import nn

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
