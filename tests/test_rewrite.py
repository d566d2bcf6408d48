"""rewrite: GABFusion at every site, with the drop-in guarantees users rely on."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import fxfusion
from fxfusion.gabfusion import GABFusion, set_gate
from fxfusion.passes.rewrite import gabfusion_modules
from fxfusion.passes.runtime import leaves
from fxfusion.zoo import ZOO


def _outputs(model, x):
    return [t for t in leaves(model(*x)) if isinstance(t, torch.Tensor)]


def _rewrite_quietly(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxfusion.rewrite(model, x, **kw)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_rewrite_zoo_model(zoo_model, name):
    model, x = zoo_model(name)
    original_keys = set(model.state_dict())
    q = fxfusion.rewrite(model, x, fold="any")  # every site, foldable or not (test_fold_default: which)
    fusions = gabfusion_modules(q)
    assert len(fusions) == ZOO[name].expected_sites
    assert not gabfusion_modules(model), "the input model must not be mutated"
    assert type(q).__name__ == type(model).__name__ and isinstance(q, type(model))

    # train and eval forward keep the output structure
    for mode in (True, False):
        model.train(mode)
        q.train(mode)
        ref, out = _outputs(model, x), _outputs(q, x)
        assert [t.shape for t in ref] == [t.shape for t in out]
        assert all(torch.isfinite(t).all() for t in out)

    # backward reaches every original parameter; α only once the normalization gate is open
    q.train()
    q.zero_grad()
    sum(t.float().pow(2).mean() for t in _outputs(q, x)).backward()
    missing = [n for n, p in q.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(float(m.log_alpha.grad.abs().sum()) == 0.0 for m in fusions.values())  # the gate is closed
    set_gate(q, 0.5)
    q.zero_grad()
    sum(t.float().pow(2).mean() for t in _outputs(q, x)).backward()
    assert all(m.log_alpha.grad.abs().sum() > 0 for m in fusions.values())

    # original checkpoints load; only GABFusion keys are missing
    result = q.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == set(q.state_dict()) - original_keys
    assert all(".gabfusion" in k or k.startswith("gabfusion") for k in result.missing_keys)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_alpha_one_without_norm_reproduces_the_model(zoo_model, name):
    model, x = zoo_model(name)
    q = fxfusion.rewrite(model, x, alpha="fixed", alpha_init=1.0, norm="none")
    model.eval()
    q.eval()
    for a, b in zip(_outputs(model, x), _outputs(q, x)):
        assert torch.equal(a, b)


def test_idempotent_pickle_deepcopy_and_attributes(zoo_model):
    model, x = zoo_model("yolov5")
    q = fxfusion.rewrite(model, x)
    with pytest.warns(UserWarning, match="no fusion site was rewritten"):
        twice = fxfusion.rewrite(q, x)
    assert set(twice.state_dict()) == set(q.state_dict())
    assert len(gabfusion_modules(twice)) == len(gabfusion_modules(q))

    for layer, new in zip(model.model, q.model):  # YOLO routes on integer attributes of each layer
        assert (new.i, new.f, new.type) == (layer.i, layer.f, layer.type)
        assert isinstance(new, type(layer))
    assert q.save == model.save

    q.eval()
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(q)
    for other in (loaded, clone):
        other.eval()
        for a, b in zip(_outputs(q, x), _outputs(other, x)):
            assert torch.equal(a, b)
        assert type(other.model[12]).__name__ == "Concat" and other.model[12].f == model.model[12].f


def test_inplace_edits_the_given_model(zoo_model):
    model, x = zoo_model("unet")
    q = fxfusion.rewrite(model, x, fold="any", inplace=True)
    assert q is model and len(gabfusion_modules(model)) == 3


def test_filtered_sites_are_the_only_ones_rewritten(zoo_model):
    model, x = zoo_model("yolov5")
    sites = fxfusion.find_fusions(model, x, ops=["cat"])
    q = fxfusion.rewrite(model, sites=sites)
    assert {m.op for m in gabfusion_modules(q).values()} == {"cat"} and len(gabfusion_modules(q)) == len(sites)


def test_options_reach_the_modules(zoo_model):
    model, x = zoo_model("resnet")
    q = fxfusion.rewrite(model, x, alpha="balanced", norm="layernorm", affine=True, eps=1e-3)
    m = next(iter(gabfusion_modules(q).values()))
    assert m.alpha_mode == "balanced" and m.weight is not None and m.eps == 1e-3
    assert torch.allclose(m.alpha(), torch.full((2,), 0.5))


def test_bad_arguments(zoo_model):
    model, x = zoo_model("resnet")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxfusion.rewrite(42, x)
    with pytest.raises(TypeError, match="example_inputs"):
        fxfusion.rewrite(model)
    with pytest.raises(ValueError, match="alpha='big'"):
        fxfusion.rewrite(model, x, alpha="big")
    with pytest.raises(ValueError, match="norm='batch'"):
        fxfusion.rewrite(model, x, norm="batch")
    quantized = fxfusion.quantize(model, x)
    with pytest.raises(ValueError, match="rewrite first"):
        fxfusion.rewrite(quantized, x)


@pytest.mark.parametrize("op, dim, shapes", [("cat", 1, [(2, 3, 4, 4), (2, 5, 4, 4)]),
                                             ("add", 2, [(2, 6, 8), (2, 6, 8)])])
def test_gabfusion_math(op, dim, shapes):
    torch.manual_seed(0)
    xs = [torch.randn(s) for s in shapes]
    m = GABFusion(op, 2, dim, None)
    out = m(*xs)
    a = m.alpha().detach()
    assert torch.allclose(a, torch.full((2,), 0.5))
    h = torch.cat([a[0] * xs[0], a[1] * xs[1]], dim) if op == "cat" else a[0] * xs[0] + a[1] * xs[1]
    mu, var = h.mean(dim, keepdim=True), h.var(dim, unbiased=False, keepdim=True)
    assert torch.allclose(out, (h - mu) / torch.sqrt(var + 1e-5), atol=1e-6)
    assert torch.allclose(out.mean(dim), torch.zeros(()), atol=1e-5)
    with pytest.raises(ValueError, match="alpha_init must be positive"):
        GABFusion(op, 2, dim, alpha_init=0.0)
