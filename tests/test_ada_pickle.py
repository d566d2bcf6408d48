"""ADA attached to a student: saving, deep copies (EMA) and deploy (issue 15)."""

from __future__ import annotations

import copy
import functools
import pickle
import warnings

import pytest
import torch

import fxfusion
from fxfusion import zoo
from fxfusion.ada import detach_ada


@functools.lru_cache(maxsize=None)
def _built():
    torch.manual_seed(0)
    fp = zoo.build("resnet")
    (x,) = zoo.example_inputs("resnet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = fxfusion.quantize(fxfusion.rewrite(fp, x), x, method="lsq", w_bits=4, a_bits=4)
        teacher = fxfusion.rewrite(fp, x)
    return student.eval(), teacher, x


def _attached(**kwargs):
    """A fresh (student, teacher, x) and an ADALoss on them."""
    student, teacher, x = (copy.deepcopy(v) for v in _built())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # q-ada without a quantizer at one site
        return student, x, fxfusion.ADALoss(student, teacher, **kwargs)


def _hooks(model):
    return [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]


def _loss(student, ada, x):
    student(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ada(x)


@pytest.mark.parametrize("kwargs", [{}, {"attention": "q-ada", "quantizers": "auto"}], ids=["simam", "qada-auto"])
def test_torch_save_and_load_with_ada_attached(kwargs, tmp_path):
    student, x, ada = _attached(**kwargs)
    path = tmp_path / "student.pt"
    torch.save(student, path)  # before the first forward: "auto" still has its discovery hooks on
    loaded = torch.load(path, weights_only=False)
    assert len(_hooks(loaded)) == len(_hooks(student)) > 0

    # The loaded copy's hooks are inert: its forward alone gives the loss nothing.
    with torch.no_grad():
        out = loaded(x)
    with pytest.raises(RuntimeError, match="no student features"):
        ada(x)
    with torch.no_grad():
        assert torch.equal(out, student(x))
    assert torch.isfinite(_loss(student, ada, x))
    if kwargs:  # the original's auto discovery found the consuming quantizers
        assert sum(q is not None for q in ada.site_quantizers.values()) > 0


def test_deepcopy_of_attached_student_leaves_the_loss_alone():
    student, x, ada = _attached()
    before = _loss(student, ada, x)
    per_site = ada.last_per_site

    student(x)  # features for the next ADA call, then an EMA-style copy runs on other data
    ema = copy.deepcopy(student)
    ema(torch.randn_like(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = ada(x)
    assert torch.equal(after, before) and ada.last_per_site == per_site

    ema(x)  # the copy alone does not feed the loss
    with pytest.raises(RuntimeError, match="no student features"):
        ada(x)


@pytest.mark.parametrize("kwargs", [{}, {"sites": ["layer1"]}, {"attention": "q-ada", "quantizers": "auto"}],
                         ids=["fusion-sites", "kept-module", "qada-auto"])
def test_deploy_drops_ada_hooks_and_the_deployed_model_pickles(kwargs):
    # Deploy folds the GABFusion sites away, but a site on a kept module and the discovery hooks on the
    # quantizers (still there before the first forward) would stay without detach_ada.
    student, x, ada = _attached(**kwargs)
    assert len(_hooks(student)) >= len(ada.sites)
    deployed = fxfusion.deploy(student, [x], progress=False)
    assert _hooks(deployed) == []
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(deployed))(x), deployed(x))
    assert torch.isfinite(_loss(student, ada, x))  # deploy worked on a copy: ADA still trains the student


def test_detach_ada_removes_live_hooks():
    student, x, ada = _attached()
    assert detach_ada(student) == len(ada.sites)
    assert detach_ada(ada.teacher) == len(ada.sites)
    assert detach_ada(student) == 0 and _hooks(student) == [] and _hooks(ada.teacher) == []
    student(x)
    with pytest.raises(RuntimeError, match="no student features"):
        ada(x)
    ada.remove()  # still safe once the hooks are gone
