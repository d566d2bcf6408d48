"""Tests of fxfusion.demo.loss on a tiny stand-in detector that honours the Detect-head contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fxfusion.demo.data import ShapesDataset, make_loader
from fxfusion.demo.loss import YoloLoss, bbox_ciou
from fxfusion.demo.train import train

_ANCHORS_PX = [[(10, 10), (16, 20), (22, 16)], [(28, 28), (36, 44), (46, 36)]]


class _Detect(nn.Module):
    """The contract of fxfusion.zoo's Detect: raw list in train mode, (pred, raw) in eval mode."""

    def __init__(self, nc: int, channels: tuple[int, ...], strides: tuple[float, ...]) -> None:
        super().__init__()
        self.nc, self.nl, self.na, self.no = nc, len(channels), 3, nc + 5
        self.register_buffer("stride", torch.tensor(strides))
        anchors = torch.tensor(_ANCHORS_PX[: self.nl], dtype=torch.float32)
        self.register_buffer("anchors", anchors / self.stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in channels)

    def forward(self, features):
        raw, decoded = [], []
        for i, x in enumerate(features):
            b, _, ny, nx = x.shape
            p = self.m[i](x).view(b, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(p)
            if not self.training:
                yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
                grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float() - 0.5
                anchor_px = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2)
                s = p.sigmoid()
                xy = (s[..., :2] * 2 + grid) * self.stride[i]
                wh = (s[..., 2:4] * 2) ** 2 * anchor_px
                decoded.append(torch.cat((xy, wh, s[..., 4:]), -1).view(b, -1, self.no))
        return raw if self.training else (torch.cat(decoded, 1), raw)


class TinyDetector(nn.Module):
    """Four strided convs and a two-level head (strides 8, 16), in a YOLOv5-like model.model."""

    def __init__(self, nc: int = 3) -> None:
        super().__init__()

        def conv(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1), nn.SiLU())

        self.model = nn.ModuleList(
            [
                conv(3, 16),
                conv(16, 32),
                conv(32, 32),
                conv(32, 64),
                _Detect(nc, (32, 64), (8.0, 16.0)),
            ]
        )

    def forward(self, x):
        x = self.model[1](self.model[0](x))
        p3 = self.model[2](x)
        p4 = self.model[3](p3)
        return self.model[4]([p3, p4])


def _batch(n=4, img_size=64):
    ds = ShapesDataset("train", n=n, img_size=img_size, seed=5)
    return next(iter(make_loader(ds, batch_size=n, shuffle=False)))


def test_loss_is_finite_positive_and_has_gradients():
    torch.manual_seed(0)
    model = TinyDetector()
    images, targets = _batch()
    loss, items = YoloLoss(model)(model(images), targets)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert items.shape == (3,) and (items > 0).all() and not items.requires_grad
    assert torch.allclose(loss, items.sum() * images.shape[0])
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_eval_mode_pair_gives_the_train_mode_loss():
    torch.manual_seed(0)
    model = TinyDetector()
    images, targets = _batch()
    loss_fn = YoloLoss(model)
    train_loss, _ = loss_fn(model(images), targets)
    eval_loss, _ = loss_fn(model.eval()(images), targets)
    assert torch.allclose(train_loss, eval_loss)


def test_no_targets_leaves_only_objectness():
    torch.manual_seed(0)
    model = TinyDetector()
    images, _ = _batch()
    loss, (box, obj, cls) = YoloLoss(model)(model(images), torch.zeros((0, 6)))
    assert torch.isfinite(loss) and box == 0 and cls == 0 and obj > 0


def test_assignment_uses_anchor_ratio_and_two_neighbour_cells():
    # One level, 6x6 grid. The target sits at grid (2.25, 2.75) with size 1x1 cell; anchors of
    # size 1, 3.9 and 4.1 cells: the first two pass max(r, 1/r) < 4, the third does not. The
    # x fraction 0.25 adds the left neighbour, the y fraction 0.75 adds the lower neighbour.
    head = _Detect(2, (8,), (8.0,))
    head.anchors = torch.tensor([[[1.0, 1.0], [3.9, 3.9], [4.1, 4.1]]])
    loss_fn = YoloLoss(nn.Sequential(head))
    p = torch.zeros(1, 3, 6, 6, 7)
    target = torch.tensor([[0.0, 1.0, 2.25 / 6, 2.75 / 6, 1 / 6, 1 / 6]])
    b, a, gj, gi, tbox, tcls, anchors = loss_fn._assign(0, p, target)
    cells = sorted(zip(a.tolist(), gi.tolist(), gj.tolist(), strict=True))
    expected = sorted((anchor, x, y) for anchor in (0, 1) for x, y in ((2, 2), (1, 2), (2, 3)))
    assert cells == expected
    assert (b == 0).all() and (tcls == 1).all()
    # Box targets are relative to the assigned cell: xy spans -0.5..1.5, wh stays in grid units.
    own = (gi == 2) & (gj == 2)
    assert torch.allclose(tbox[own], torch.tensor([[0.25, 0.75, 1.0, 1.0]] * 2))
    left = gi == 1
    assert torch.allclose(tbox[left][:, :2], torch.tensor([[1.25, 0.75]] * 2))
    below = gj == 3
    assert torch.allclose(tbox[below][:, :2], torch.tensor([[0.25, -0.25]] * 2))
    assert torch.allclose(anchors[a == 1], torch.tensor([[3.9, 3.9]] * 3))


def test_ciou_hand_values():
    same = torch.tensor([[5.0, 5.0, 2.0, 3.0]])
    assert torch.allclose(bbox_ciou(same, same), torch.tensor([1.0]), atol=1e-5)
    # Same centre and aspect: rho = 0 and v = 0, so CIoU = IoU = 4 / 16.
    inner, outer = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    assert torch.allclose(bbox_ciou(inner, outer), torch.tensor([0.25]), atol=1e-5)
    # Disjoint unit squares 2 apart: IoU 0, rho^2 = 4, enclosing diagonal^2 = 3^2 + 1^2.
    a, b = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 1.0, 1.0]])
    assert math.isclose(bbox_ciou(a, b).item(), -0.4, abs_tol=1e-5)


@pytest.fixture
def one_thread():
    # Tiny convs gain nothing from intra-op threads, and lose badly when other jobs share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_decreases_when_training_a_tiny_detector(one_thread):
    torch.manual_seed(0)
    model = TinyDetector()
    loader = make_loader(
        ShapesDataset("train", n=4, img_size=64, seed=1), batch_size=4, shuffle=False
    )
    losses = train(
        model,
        loader,
        30,
        lr=3e-3,
        optimizer="adam",
        loss_fn=YoloLoss(model),
        desc="tiny",
        progress=False,
    )
    assert len(losses) == 30 and all(math.isfinite(v) and v > 0 for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first


def test_model_without_detect_head_is_refused():
    with pytest.raises(ValueError, match="Detect head"):
        YoloLoss(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_wrong_outputs_are_refused_with_shapes():
    model = TinyDetector()
    with pytest.raises(ValueError, match=r"expected 2 tensors"):
        YoloLoss(model)([torch.zeros(1, 3, 4, 4, 8)], torch.zeros((0, 6)))


def test_targets_with_unknown_classes_are_refused():
    model = TinyDetector(nc=2)
    targets = torch.tensor([[0.0, 2.0, 0.5, 0.5, 0.2, 0.2]])
    with pytest.raises(ValueError, match="nc=2"):
        YoloLoss(model)(model(torch.zeros(1, 3, 64, 64)), targets)
