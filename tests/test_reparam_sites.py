"""Adds that a re-parameterization merges (RepConv, RepVGG) are refused by find, with the reason;
a nonlinearity on a branch, a residual block or a cat stays a site; ``reparameterizable=True`` opts in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfusion
from fxfusion.passes.reparam import REASON

X = torch.randn(2, 8, 8, 8)


def conv_bn(k: int = 3, relu: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(8, 8, k, padding=k // 2, bias=False), nn.BatchNorm2d(8)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class RepConvLike(nn.Module):
    """Ultralytics' RepConv: ``act(bn(x) + conv1(x) + conv2(x))`` with conv+bn branches."""

    def __init__(self, relu_in_branch: bool = False, bn: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8) if bn else None
        self.conv1, self.conv2 = conv_bn(3, relu=relu_in_branch), conv_bn(1)
        self.act = nn.SiLU()

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)  # RT-DETR's RepConv has no identity BN
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm subclass that reads ``training``, so it is a leaf."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__(8)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, 0.1, self.eps)
        return self.act(self.drop(x))


class RepVGGLike(nn.Module):
    """timm's RepVggBlock: ``x = conv_1x1(x) + conv_kxk(x); x = drop_path(x); x += identity``."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.identity = BNAct(act or nn.Identity())
        self.conv_1x1 = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), BNAct(nn.Identity()))
        self.conv_kxk = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), BNAct(nn.Identity()))
        self.drop_path, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        identity = self.identity(x)
        x = self.drop_path(self.conv_1x1(x) + self.conv_kxk(x))
        x += identity
        return self.act(x)


class Residual(nn.Module):
    """``x + bn(conv(relu(bn(conv(x)))))`` (ReLU after it with ``relu_out``): the ReLU inside makes it a site."""

    def __init__(self, relu_out: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, relu=True), conv_bn(3, relu=relu_out))

    def forward(self, x):
        return x + self.body(x)


class CatOfLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3), conv_bn(1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def net(block: nn.Module) -> nn.Module:
    """stem -> block -> head conv, so the block's fusion reaches a learnable layer."""
    head = nn.Conv2d(16 if isinstance(block, CatOfLinear) else 8, 4, 1)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), block, head).eval()


def reparam_refusals(report) -> list:
    return [r for r in report.refused if r.reason.startswith("re-parameterizable")]


def test_repconv_block_is_refused_with_the_reason():
    report = fxfusion.find_fusions(net(RepConvLike()), X)
    assert len(report) == 0, str(report)
    assert len(report.refused) == 1  # the 3-branch chain is one refusal, its inner add absorbed
    assert report.refused[0].reason == REASON and report.refused[0].kind == "add"
    assert "every branch is a linear function of the same input (RepConv/RepVGG style)" in REASON
    assert "merges them into one conv and would bypass the site" in REASON


def test_repconv_without_identity_bn_is_refused():
    """RT-DETR's RepConv: ``conv1(x) + conv2(x) + 0``; the ``+ 0`` is refused as before."""
    report = fxfusion.find_fusions(net(RepConvLike(bn=False)), X)
    assert len(report) == 0
    assert len(reparam_refusals(report)) == 1 and len(report.refused) == 2


def test_relu_inside_one_branch_makes_it_a_site():
    report = fxfusion.find_fusions(net(RepConvLike(relu_in_branch=True)), X)
    assert len(report) == 1 and report[0].num_branches == 3
    assert not reparam_refusals(report)


@pytest.mark.parametrize("relu_out", [True, False])
def test_residual_block_is_a_site(relu_out):
    report = fxfusion.find_fusions(net(Residual(relu_out)), X)
    assert len(report) == 1 and report[0].kind == "add" and not report.refused


def test_cat_of_linear_branches_is_a_site():
    report = fxfusion.find_fusions(net(CatOfLinear()), X)
    assert len(report) == 1 and report[0].kind == "cat" and not report.refused


class PlainSum(nn.Module):
    """Bare convs (or bare BatchNorms) of one input: linear, but no BN-trained branches for a
    re-parameterization to fold into a conv, so a site."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        make = (lambda: nn.Conv2d(8, 8, 3, padding=1)) if conv else (lambda: nn.BatchNorm2d(8))
        self.a, self.b = make(), make()

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("conv", [True, False])
def test_plain_linear_sums_stay_sites(conv):
    report = fxfusion.find_fusions(net(PlainSum(conv)), X)
    assert len(report) == 1 and not report.refused


def test_repvgg_block_through_leaf_batchnorms():
    """The BNAct leaves are traced to see that they are linear: both adds are refused."""
    report = fxfusion.find_fusions(net(RepVGGLike()), X)
    assert len(report) == 0 and len(reparam_refusals(report)) == 2 == len(report.refused)


def test_repvgg_block_with_an_activation_in_the_identity_leaf():
    """A ReLU inside the identity branch's leaf: the outer add is a site, the inner one still refused."""
    report = fxfusion.find_fusions(net(RepVGGLike(act=nn.ReLU())), X)
    assert len(report) == 1 and len(reparam_refusals(report)) == 1


def test_opt_in_places_the_site():
    model = net(RepConvLike())
    report = fxfusion.find_fusions(model, X, reparameterizable=True)
    assert len(report) == 1 and report[0].num_branches == 3 and not report.refused
    rewritten = fxfusion.rewrite(model, X, sites=report, fold="any")
    assert len(rewritten.fxfusion_reports["rewrite"].placed) == 1
    assert torch.equal(rewritten(X), model(X))  # init="preserve": the gate starts closed
    with pytest.warns(UserWarning, match="no fusion site was rewritten"):
        fxfusion.rewrite(model, X)  # the default finds nothing to rewrite in it
