"""Children whose forward branches on ``self.training`` are leaf calls, so their parents trace.

timm's ``DropPath``/``BatchNormAct2d`` and torchvision's ``StochasticDepth`` used to make every
parent "mode-dependent", hiding its residual adds and cats. These modules are written the way
those libraries write them.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxfusion
from fxfusion.passes.dataflow import keeps_feature_axis
from fxfusion.passes.trace import FxTracer, mode_leaves, reads_training, shallow_trace, trace_units

X = torch.randn(2, 8, 8, 8)


def _rewrite(model, x):
    """Every found site placed: which sites deploy can fold is rewrite's own choice (``fold=``),
    not what these tests are about."""
    kw = {"fold": "any"} if "fold" in inspect.signature(fxfusion.rewrite).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxfusion.rewrite(model, x, **kw)


class DropPath(nn.Module):
    """timm's DropPath: identity in eval mode or at p = 0, a per-sample mask in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm subclass whose own forward branches on training."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, bn_training,
                         self.momentum, self.eps)
        return self.act(x)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int, p: float) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw1, self.act, self.pw2 = nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, c, 1)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.drop_path = DropPath(p)

    def forward(self, x):
        return x + self.drop_path(self.gamma * self.pw2(self.act(self.pw1(self.dw(x)))))


def convnext(p: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 8, 1), ConvNeXtBlock(8, p), ConvNeXtBlock(8, p), nn.Conv2d(8, 4, 1))


class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1, bias=False), BatchNormAct(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class CSPBlock(nn.Module):
    """Two branches concatenated and a residual add, every conv followed by a BatchNormAct."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b, self.mix = ConvBNAct(c, c // 2), ConvBNAct(c, c // 2), ConvBNAct(c, c)

    def forward(self, x):
        return x + self.mix(torch.cat([self.a(x), self.b(x)], 1))


def csp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(ConvBNAct(8, 8), CSPBlock(8), CSPBlock(8), nn.Conv2d(8, 4, 1))


class ModeCat(nn.Module):
    """Its own forward branches on training between the cat and its consumer: truly mode-dependent."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        if self.training:
            y = y * 2
        return self.out(y)


class MaybeDropCat(nn.Module):
    """Reads training, but with p = 0 traces the same graph in both modes."""

    def __init__(self, c: int = 8, p: float = 0.0) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(2 * c, c, 1)
        self.p = p

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        if self.training and self.p > 0:
            y = F.dropout(y, self.p)
        return self.out(y)


class Residual(nn.Module):
    """A plain parent around a mode-dependent child."""

    def __init__(self, child: nn.Module, c: int = 8) -> None:
        super().__init__()
        self.pre, self.child, self.head = nn.Conv2d(c, c, 1), child, nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.head(x + self.child(self.pre(x)))


def _sites(report):
    return sorted((s.owner, s.kind, s.num_branches) for s in report)


def _mode_refusals(report):
    return [u for u in report.untraceable if "train and eval" in u.reason]


# ----------------------------------------------------------------------------- which forward reads training


def test_reads_training_looks_at_the_own_forward_and_its_helpers():
    class Helper(nn.Module):
        def forward(self, x):
            return self._impl(x)

        def _impl(self, x):
            return x * 2 if self.training else x

    class Super(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class Docstring(nn.Module):
        def forward(self, x):
            """Used during training and evaluation alike."""
            # training: nothing special
            return self.child(x)

    assert reads_training(DropPath) is True
    assert reads_training(BatchNormAct) is True
    assert reads_training(Helper) is True
    assert reads_training(Super) is True  # through super().forward
    assert reads_training(Docstring) is False  # comments and docstrings do not count
    assert reads_training(ConvNeXtBlock) is False  # its child reads it, not its own forward
    unknown = type("Unknown", (nn.Module,), {"forward": eval("lambda self, x: x")})
    assert reads_training(unknown) is None  # no source: both modes are compared, as before


def test_mode_dependent_children_are_leaves_and_visited_as_units():
    model = convnext(p=0.2)
    result = trace_units(model)
    assert [u.path for u in result.units] == ["1", "2"]  # the Sequential root is a container
    block = result.units[0]
    calls = [n.target for n in block.graph_module.graph.nodes if n.op == "call_module"]
    assert calls == ["dw", "pw1", "act", "pw2", "drop_path"]
    assert mode_leaves(block.graph_module.graph, block.module) == ["drop_path"]
    # DropPath's two graphs differ, but neither joins two values: nothing to examine, not listed
    assert result.untraceable == []

    # with p = 0 the DropPath traces the same in both modes: the block is traced through it, one
    # graph valid in both modes (no unit per DropPath, no second trace of it)
    plain = trace_units(convnext(p=0.0))
    assert [u.path for u in plain.units] == ["1", "2"]
    calls = [n.target for n in plain.units[0].graph_module.graph.nodes if n.op == "call_module"]
    assert calls == ["dw", "pw1", "act", "pw2"] and mode_leaves(plain.units[0].graph_module.graph, block.module) == []


def test_shallow_trace_is_unchanged_for_a_mode_dependent_child():
    graph = shallow_trace(ConvNeXtBlock(8, 0.2))
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["dw", "pw1", "act", "pw2", "drop_path"]


# ----------------------------------------------------------------------------- find and rewrite


@pytest.mark.parametrize("p", [0.2, 0.0])
def test_convnext_residual_adds_are_found_through_droppath(p):
    model = convnext(p)
    report = fxfusion.find_fusions(model, X)
    assert _sites(report) == [("1", "add", 2), ("2", "add", 2)]
    assert not _mode_refusals(report) and not report.untraceable
    assert all(s.axis == 1 and s.consumers for s in report)


def test_csp_with_batchnorm_act_finds_cats_and_adds():
    model = csp()
    report = fxfusion.find_fusions(model, X)
    assert _sites(report) == [("1", "add", 2), ("1", "cat", 2), ("2", "add", 2), ("2", "cat", 2)]
    assert not report.untraceable, str(report)
    cat = next(s for s in report if s.kind == "cat" and s.owner == "1")
    assert cat.axis == 1 and cat.consumers == ("1.mix.conv",)


@pytest.mark.parametrize("build", [convnext, csp], ids=["convnext", "csp"])
def test_rewrite_preserves_outputs_in_eval_and_train_mode(build):
    model = build().eval()
    rewritten = _rewrite(model, X)
    placed = rewritten.fxfusion_reports["rewrite"].placed
    assert len(placed) == len(fxfusion.find_fusions(model, X)) == (4 if build is csp else 2)
    with torch.no_grad():
        assert torch.equal(rewritten.eval()(X), model.eval()(X))
        # train mode: batch statistics, and DropPath draws the same masks from the same seed
        for m in (model, rewritten):
            m.train()
        torch.manual_seed(1)
        ref = model(X)
        torch.manual_seed(1)
        assert torch.equal(rewritten(X), ref)


def test_rewrite_in_train_mode_with_drop_probability_zero_is_exact():
    model = convnext(p=0.0)
    rewritten = _rewrite(model, X)
    assert len(rewritten.fxfusion_reports["rewrite"].placed) == 2
    with torch.no_grad():
        assert torch.equal(rewritten.train()(X), model.train()(X))
        assert torch.equal(rewritten.eval()(X), model.eval()(X))


def test_convnext_quantize_deploy_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = convnext(p=0.2).eval()
    rewritten = _rewrite(model, X)
    q = fxfusion.quantize(rewritten, X, method="lsq", w_bits=4, a_bits=4)
    q.train()(X)  # initializes the quantizers
    deployed = fxfusion.deploy(q.eval(), [X], progress=False)
    path = tmp_path / "convnext.onnx"
    fxfusion.export_onnx(deployed, X, path)
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "Add" for n in graph.node) >= 2  # the residual adds, back to the bare op


# ----------------------------------------------------------------------------- what is still mode-dependent


def test_own_training_branch_between_fused_tensors_is_still_refused():
    report = fxfusion.find_fusions(ModeCat(), X)
    assert len(report) == 0
    assert [(u.path, u.cls) for u in _mode_refusals(report)] == [("<root>", "ModeCat")]


def test_mode_dependent_child_is_refused_but_its_parent_is_examined():
    model = Residual(ModeCat())
    report = fxfusion.find_fusions(model, X)
    assert _sites(report) == [("", "add", 2)]  # the parent's residual add
    assert [(u.path, u.cls) for u in _mode_refusals(report)] == [("child", "ModeCat")]
    rewritten = _rewrite(model, X)
    assert [p["module"] for p in rewritten.fxfusion_reports["rewrite"].placed] == ["<root>"]
    assert type(rewritten.child) is ModeCat  # left as it was
    with torch.no_grad():
        for mode in (False, True):
            assert torch.equal(rewritten.train(mode)(X), model.train(mode)(X))


def test_mode_reading_child_with_the_same_graph_in_both_modes_is_examined():
    model = Residual(MaybeDropCat(p=0.0))
    report = fxfusion.find_fusions(model, X)
    assert _sites(report) == [("", "add", 2), ("child", "cat", 2)]
    assert not report.untraceable
    rewritten = _rewrite(model, X)
    assert len(rewritten.fxfusion_reports["rewrite"].placed) == 2
    with torch.no_grad():
        assert torch.equal(rewritten.eval()(X), model.eval()(X))


def test_mode_dependent_root_still_descends_to_children():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = CSPBlock(8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.head(self.body(x))
            return y if self.training else y.softmax(1)

    report = fxfusion.find_fusions(Root(), X)
    assert [(u.path, u.cls) for u in report.untraceable] == []  # the root joins nothing of its own
    assert _sites(report) == [("body", "add", 2), ("body", "cat", 2)]


# ----------------------------------------------------------------------------- the consumer walk through leaves


class ShrinkInTraining(nn.Module):
    """Parameter-free, mode-dependent, changes the shape: not an obvious pass-through."""

    def forward(self, x):
        return F.avg_pool2d(x, 2) if self.training else F.max_pool2d(x, 2)


@pytest.mark.parametrize(("leaf", "found"), [(DropPath(0.3), True), (nn.Dropout(0.3), True),
                                             (ShrinkInTraining(), False)])
def test_cat_reaches_its_consumer_through_a_pass_through_leaf(leaf, found):
    class CatThen(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.leaf, self.out = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), leaf, nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.out(self.leaf(torch.cat([self.a(x), self.b(x)], 1)))

    report = fxfusion.find_fusions(CatThen(), X)
    assert len(report) == int(found), str(report)
    if found:
        assert report[0].consumers == ("out",)
    else:
        assert any("reaches no learnable layer" in r.reason for r in report.refused)


def _leaf_node(module: nn.Module, x: torch.Tensor):
    """The graph of ``module.leaf(x)``, shapes propagated, and its leaf node."""

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.leaf = module

        def forward(self, x):
            return self.leaf(x)

    gm = fx.GraphModule(Wrap(), FxTracer().trace(Wrap()))
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(x)
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    return node, dict(gm.named_modules())


def test_keeps_feature_axis_rule_for_unknown_leaves():
    class Scale(nn.Module):  # has a parameter: a layer of its own, not a pass-through
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.s if self.training else x

    assert keeps_feature_axis(*_leaf_node(DropPath(0.1), X))
    assert not keeps_feature_axis(*_leaf_node(Scale(), X))
    assert not keeps_feature_axis(*_leaf_node(ShrinkInTraining(), X))
    # torch.nn modules are the table's business: nn.Softmax keeps the shape but mixes an axis
    softmax = fx.GraphModule(nn.Sequential(nn.Softmax(1)), fx.symbolic_trace(nn.Sequential(nn.Softmax(1))).graph)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(softmax).propagate(X)
    node = next(n for n in softmax.graph.nodes if n.op == "call_module")
    assert not keeps_feature_axis(node, dict(softmax.named_modules()))


def test_model_is_left_as_it_was():
    model = csp().train()
    before = copy.deepcopy(model.state_dict())
    fxfusion.find_fusions(model, X)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
