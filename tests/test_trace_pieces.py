"""Iterating the result of chunk/split when the number of pieces is a trace-time constant.

Ultralytics' C2f / C3k2 do ``y = list(self.cv1(x).chunk(2, 1)); y.extend(m(y[-1]) for m in
self.m); return self.cv2(torch.cat(y, 1))``, which plain torch.fx refuses ("Proxy object cannot
be iterated"), so their own cats were never examined.
"""

from __future__ import annotations

import inspect
import operator
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxfusion
from fxfusion.passes.trace import FxTracer, piece_count, shallow_trace, trace_units

X = torch.randn(2, 8, 8, 8)


def _rewrite(model, x):
    """Every found site placed (which ones deploy can fold is rewrite's ``fold=`` choice)."""
    kw = {"fold": "any"} if "fold" in inspect.signature(fxfusion.rewrite).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxfusion.rewrite(model, x, **kw)


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), \
            nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """As Ultralytics writes it; ``how`` picks the spelling of the split."""

    def __init__(self, c1: int, c2: int, n: int = 2, shortcut: bool = True, how: str = "chunk") -> None:
        super().__init__()
        self.c, self.how = c2 // 2, how
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def pieces(self, t):
        if self.how == "chunk":
            return t.chunk(2, 1)
        if self.how == "torch.chunk":
            return torch.chunk(t, 2, dim=1)
        if self.how == "split":
            return t.split((self.c, self.c), 1)
        return torch.split(t, [self.c, self.c], dim=1)

    def forward(self, x):
        y = list(self.pieces(self.cv1(x)))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def yolo_like(how: str = "chunk", shortcut: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Conv(8, 8, 3), C2f(8, 8, 2, shortcut, how), nn.Conv2d(8, 4, 1))
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


HOWS = ["chunk", "torch.chunk", "split", "torch.split"]


# ----------------------------------------------------------------------------- the tracer


@pytest.mark.parametrize("how", HOWS)
def test_c2f_traces_deep_and_shallow(how):
    block = C2f(8, 8, 2, True, how)
    gm = fx.GraphModule(block, FxTracer().trace(block))
    assert torch.equal(gm.eval()(X), block.eval()(X))
    graph = shallow_trace(block)
    cat = next(n for n in graph.nodes if n.target is torch.cat)
    assert len(cat.args[0]) == 4  # both pieces and the two bottleneck outputs
    getitems = [n for n in graph.nodes if n.target is operator.getitem]
    assert [g.args[1] for g in getitems] == [0, 1]


def test_piece_counts():
    def count(fn):
        graph = fx.Graph()
        x = graph.placeholder("x")
        return piece_count(fn(graph, x))

    assert count(lambda g, x: g.call_method("chunk", (x, 3, 1))) == 3
    assert count(lambda g, x: g.call_method("chunk", (x,), {"chunks": 2})) == 2
    assert count(lambda g, x: g.call_function(torch.chunk, (x, 4))) == 4
    assert count(lambda g, x: g.call_method("split", (x, [1, 2, 5], 1))) == 3
    assert count(lambda g, x: g.call_function(torch.split, (x, (4, 4)), {"dim": 1})) == 2
    assert count(lambda g, x: g.call_method("split_with_sizes", (x, [2, 6]))) == 2
    assert count(lambda g, x: g.call_method("split", (x, 4, 1))) is None  # count depends on the shape
    assert count(lambda g, x: g.call_method("unbind", (x, 1))) is None
    assert count(lambda g, x: g.call_method("chunk", (x, x, 1))) is None  # a traced count


class IterSplitBySize(nn.Module):
    def forward(self, x):
        return torch.cat([t * 2 for t in x.split(4, 1)], 1)


class IterUnbind(nn.Module):
    def forward(self, x):
        return torch.stack([t * 2 for t in x.unbind(1)], 1)


@pytest.mark.parametrize("module", [IterSplitBySize(), IterUnbind()])
def test_other_proxies_still_refuse_to_iterate(module):
    with pytest.raises(fx.proxy.TraceError, match="cannot be iterated"):
        FxTracer().trace(module)
    result = trace_units(module)
    assert not result.units and "cannot be iterated" in result.untraceable[0].reason


def test_len_of_a_chunk_is_its_count():
    class Len(nn.Module):
        def forward(self, x):
            parts = x.chunk(4, 1)
            return parts[len(parts) - 1] * len(parts)

    gm = fx.GraphModule(Len(), FxTracer().trace(Len()))
    assert torch.equal(gm(X), Len()(X))


def test_chunk_with_fewer_pieces_at_run_time_raises_instead_of_computing_something_else():
    class Quarters(nn.Module):
        def forward(self, x):
            q = list(x.chunk(4, 1))
            return torch.cat(q[-2:], 1)  # the last two quarters: which ones depends on the count

    module = Quarters()
    gm = fx.GraphModule(module, FxTracer().trace(module))
    assert torch.equal(gm(X), module(X))  # 8 channels: 4 pieces, as assumed
    five = torch.randn(1, 5, 2, 2)
    assert len(five.chunk(4, 1)) == 3  # torch gives 3 pieces of 2, 2 and 1 channels
    with pytest.raises(IndexError):
        gm(five)


# ----------------------------------------------------------------------------- find and rewrite


@pytest.mark.parametrize("how", HOWS)
def test_c2f_cat_is_found_with_all_its_branches(how):
    report = fxfusion.find_fusions(yolo_like(how), X)
    assert not report.untraceable, str(report)
    sites = sorted((s.owner, s.kind, s.num_branches) for s in report)
    assert sites == [("1", "cat", 4), ("1.m.0", "add", 2), ("1.m.1", "add", 2)]
    cat = next(s for s in report if s.kind == "cat")
    assert cat.axis == 1 and cat.shapes == ((2, 4, 8, 8),) * 4 and cat.consumers == ("1.cv2.conv",)


@pytest.mark.parametrize("how", ["chunk", "torch.split"])
def test_rewrite_places_the_c2f_cat_and_keeps_outputs(how):
    model = yolo_like(how)
    rewritten = _rewrite(model, X)
    placed = rewritten.fxfusion_reports["rewrite"].placed
    assert sorted((p["module"], p["op"], p["branches"]) for p in placed) == [
        ("1", "cat", 4), ("1.m.0", "add", 2), ("1.m.1", "add", 2)]
    assert isinstance(rewritten[1], C2f) and hasattr(rewritten[1], "gabfusion0")
    with torch.no_grad():
        assert torch.equal(rewritten.eval()(X), model.eval()(X))
        assert torch.equal(rewritten.train()(X), model.train()(X))


def test_c2f_without_shortcut_quantize_deploy_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = yolo_like("chunk", shortcut=False)
    rewritten = _rewrite(model, X)
    assert [p["op"] for p in rewritten.fxfusion_reports["rewrite"].placed] == ["cat"]
    q = fxfusion.quantize(rewritten, X, method="lsq", w_bits=4, a_bits=4)
    q.train()(X)  # initializes the quantizers
    deployed = fxfusion.deploy(q.eval(), [X], progress=False)
    path = tmp_path / "c2f.onnx"
    fxfusion.export_onnx(deployed, X, path)
    nodes = onnx.load(str(path)).graph.node
    assert sum(n.op_type == "Concat" for n in nodes) == 1  # the C2f cat, back to the bare op
