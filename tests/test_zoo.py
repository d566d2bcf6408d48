"""Tests for the reference model zoo: registry, output structure, gradients and fx traceability."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.fx as fx
from torch import nn

from fxfusion import zoo
from fxfusion.zoo import resnet, yolov5, yolov8

NAMES = list(zoo.ZOO)
TRACEABLE = ["unet", "resnet", "densenet", "inception", "fpn", "transformer"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny: thread start-up and contention cost more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.build(name)


def _tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def _check_yolov5(out: object, train: bool, batch: int) -> None:
    no = 3 + 5  # default nc = 3
    raw = out if train else out[1]
    if not train:
        assert isinstance(out, tuple) and len(out) == 2
        n = 3 * (8 * 8 + 4 * 4 + 2 * 2)  # na * sum(ny * nx) at 64 px, strides 8/16/32
        assert out[0].shape == (batch, n, no)
    assert isinstance(raw, list)
    assert [tuple(t.shape) for t in raw] == [(batch, 3, s, s, no) for s in (8, 4, 2)]


def _check_yolov8(out: object, train: bool, batch: int) -> None:
    no = 3 + 4  # default nc = 3, DFL-free box
    raw = out if train else out[1]
    if not train:
        assert isinstance(out, tuple) and len(out) == 2
        assert out[0].shape == (batch, no, 8 * 8 + 4 * 4 + 2 * 2)
    assert isinstance(raw, list)
    assert [tuple(t.shape) for t in raw] == [(batch, no, s, s) for s in (8, 4, 2)]


def _check_shape(*shape: int) -> Callable[[object, bool, int], None]:
    def check(out: object, train: bool, batch: int) -> None:
        assert isinstance(out, torch.Tensor)
        assert out.shape == (batch, *shape)

    return check


def _check_fpn(out: object, train: bool, batch: int) -> None:
    assert isinstance(out, tuple)
    assert [tuple(t.shape) for t in out] == [(batch, 16, s, s) for s in (16, 8, 4, 2)]


CHECKS: dict[str, Callable[[object, bool, int], None]] = {
    "yolov5": _check_yolov5,
    "yolov8": _check_yolov8,
    "unet": _check_shape(2, 64, 64),
    "resnet": _check_shape(10),
    "densenet": _check_shape(10),
    "inception": _check_shape(10),
    "fpn": _check_fpn,
    "transformer": _check_shape(10),
}


# Registry


def test_registry_entries_are_consistent() -> None:
    assert set(NAMES) == {"yolov5", "yolov8", "unet", "resnet", "densenet", "inception", "fpn", "transformer"}
    for name, entry in zoo.ZOO.items():
        assert entry.name == name
        assert isinstance(entry.expected_sites, int) and entry.expected_sites > 0
        assert len(entry.input_shape) == 4 and entry.description
    assert set(CHECKS) == set(NAMES)


def test_zoo_entry_is_frozen() -> None:
    with pytest.raises(AttributeError):
        zoo.ZOO["resnet"].expected_sites = 0  # type: ignore[misc]


def test_build_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown zoo model 'yolov9'.*yolov5.*transformer"):
        zoo.build("yolov9")
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.example_inputs("nope")


def test_build_forwards_kwargs() -> None:
    model = zoo.build("yolov5", nc=5)
    assert model.nc == 5 and model.model[-1].no == 10


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs_are_reproducible(name: str) -> None:
    (a,) = zoo.example_inputs(name, batch=3, seed=1)
    (b,) = zoo.example_inputs(name, batch=3, seed=1)
    (c,) = zoo.example_inputs(name, batch=3, seed=2)
    assert a.shape == (3, *zoo.ZOO[name].input_shape[1:])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_example_inputs_rejects_bad_batch() -> None:
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        zoo.example_inputs("resnet", batch=0)


# Forward and backward


@pytest.mark.parametrize("name", NAMES)
def test_forward_train_and_eval(name: str) -> None:
    model = _build(name)
    inputs = zoo.example_inputs(name)
    batch = inputs[0].shape[0]
    assert model.training
    out = model(*inputs)
    CHECKS[name](out, True, batch)
    assert all(torch.isfinite(t).all() for t in _tensors(out))

    model.eval()
    with torch.no_grad():
        out = model(*inputs)
        again = model(*inputs)  # second call reuses cached grids / anchor points
    CHECKS[name](out, False, batch)
    for t, u in zip(_tensors(out), _tensors(again), strict=True):
        assert torch.isfinite(t).all()
        torch.testing.assert_close(t, u)
    # BatchNorm statistics are initialised, so eval outputs depend on the input.
    first = _tensors(out)[0]
    assert (first[0] - first[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _build(name)
    out = model(*zoo.example_inputs(name))
    generator = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=generator)).sum() for t in _tensors(out))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_build_is_deterministic_under_seed() -> None:
    a, b = _build("yolov8"), _build("yolov8")
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(t, u), name


# YOLO specifics


@pytest.mark.parametrize("name", ["yolov5", "yolov8"])
def test_yolo_layers_carry_routing_attributes(name: str) -> None:
    model = _build(name)
    for idx, layer in enumerate(model.model):
        assert isinstance(layer.i, int) and layer.i == idx
        f = layer.f
        assert isinstance(f, int) or (isinstance(f, list) and all(isinstance(j, int) for j in f))
        assert isinstance(layer.type, str)
    assert model.save == sorted(model.save)
    concats = [m for m in model.model if isinstance(m, yolov5.Concat)]
    assert len(concats) == 4 and all(isinstance(m.f, list) for m in concats)


def test_yolov5_detect_attributes_and_decoding() -> None:
    model = _build("yolov5")
    detect = model.model[-1]
    assert isinstance(detect, yolov5.Detect)
    assert (detect.nl, detect.na, detect.no) == (3, 3, model.nc + 5)
    assert detect.stride.tolist() == [8.0, 16.0, 32.0]
    assert "anchors" in dict(detect.named_buffers())
    # The buffer is in stride units (YOLOv5); times the stride it gives the pixel anchors.
    pixels = detect.anchors * detect.stride.view(-1, 1, 1)
    torch.testing.assert_close(pixels.view(3, 6), torch.tensor(yolov5.ANCHORS).float())
    model.eval()
    with torch.no_grad():
        pred, raw = model(*zoo.example_inputs("yolov5"))
    p = raw[0].sigmoid()
    grid_x = torch.arange(8).view(1, 1, 1, 8).float()
    expected_x = (p[..., 0] * 2 - 0.5 + grid_x) * 8
    torch.testing.assert_close(pred[:, : 3 * 64, 0], expected_x.reshape(2, -1))
    expected_w = (p[..., 2] * 2) ** 2 * pixels[0, :, 0].view(1, 3, 1, 1)
    torch.testing.assert_close(pred[:, : 3 * 64, 2], expected_w.reshape(2, -1))
    torch.testing.assert_close(pred[:, : 3 * 64, 4:], p[..., 4:].reshape(2, -1, model.nc + 1))


def test_yolov5_grids_follow_the_input_size() -> None:
    model = _build("yolov5").eval()
    with torch.no_grad():
        small, _ = model(torch.randn(1, 3, 64, 64))
        large, _ = model(torch.randn(1, 3, 96, 96))
    assert small.shape == (1, 3 * (64 + 16 + 4), 8)
    assert large.shape == (1, 3 * (144 + 36 + 9), 8)


def test_yolov5_augment_needs_eval_mode() -> None:
    model = _build("yolov5")
    (x,) = zoo.example_inputs("yolov5")
    with pytest.raises(ValueError, match="eval mode"):
        model(x, augment=True)
    model.eval()
    with torch.no_grad():
        pred, extra = model(x, augment=True)
    assert pred.shape == (2, 2 * 252, 8) and extra is None


def test_yolov8_detect_decoding() -> None:
    model = _build("yolov8").eval()
    detect = model.model[-1]
    assert isinstance(detect, yolov8.Detect)
    assert detect.stride.tolist() == [8.0, 16.0, 32.0]
    with torch.no_grad():
        y, raw = model(*zoo.example_inputs("yolov8"))
    # First P3 cell: centre (0.5, 0.5) * 8 px; box from the distances (l, t, r, b).
    left, top, right, bottom = raw[0][:, :4, 0, 0].unbind(1)
    torch.testing.assert_close(y[:, 0, 0], (0.5 + (right - left) / 2) * 8)
    torch.testing.assert_close(y[:, 3, 0], (top + bottom) * 8)
    torch.testing.assert_close(y[:, 4:, 0], raw[0][:, 4:, 0, 0].sigmoid())


def test_device_and_dtype_moves_keep_detect_attributes() -> None:
    for name in ("yolov5", "yolov8"):
        model = _build(name).eval()
        (x,) = zoo.example_inputs(name)
        with torch.no_grad():
            model(x)
            model.double()
            out = model(x.double())
        assert model.model[-1].stride.dtype == torch.float64
        assert all(t.dtype == torch.float64 for t in _tensors(out))


# torch.fx traceability


@pytest.mark.parametrize("name", ["yolov5", "yolov8"])
@pytest.mark.parametrize("train", [True, False])
def test_whole_yolo_model_does_not_trace(name: str, train: bool) -> None:
    model = _build(name).train(train)
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)


def test_yolov5_eval_fails_on_the_grid_check_even_without_augment() -> None:
    model = _build("yolov5").eval()
    with pytest.raises(fx.proxy.TraceError, match="control flow"):
        fx.symbolic_trace(model, concrete_args={"augment": False})


def test_c2f_does_not_trace() -> None:
    block = yolov8.C2f(16, 16, n=2, shortcut=True)
    with pytest.raises(fx.proxy.TraceError, match="Proxy object cannot be iterated"):
        fx.symbolic_trace(block)


def _first(model: nn.Module, cls: type[nn.Module]) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, cls))


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("yolov5", yolov5.C3),
        ("yolov5", yolov5.SPPF),
        ("yolov5", yolov5.Bottleneck),
        ("yolov8", yolov8.Bottleneck),
        ("yolov8", yolov8.SPPF),
    ],
)
def test_yolo_blocks_trace_alone(name: str, cls: type[nn.Module]) -> None:
    block = _first(_build(name), cls).eval()
    c1 = next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, c1, 8, 8)
    traced = fx.symbolic_trace(block)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), block(x))


@pytest.mark.parametrize("name", ["yolov5", "yolov8"])
def test_concat_layer_traces_alone(name: str) -> None:
    model = _build(name)
    concat = next(m for m in model.model if isinstance(m, yolov5.Concat))
    traced = fx.symbolic_trace(concat)
    xs = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 4, 4)]
    torch.testing.assert_close(traced(xs), torch.cat(xs, 1))
    assert any(n.target is torch.cat for n in traced.graph.nodes)


@pytest.mark.parametrize("name", TRACEABLE)
def test_other_models_trace_whole(name: str) -> None:
    model = _build(name).eval()
    traced = fx.symbolic_trace(model)
    inputs = zoo.example_inputs(name)
    with torch.no_grad():
        for t, u in zip(_tensors(traced(*inputs)), _tensors(model(*inputs)), strict=True):
            torch.testing.assert_close(t, u)


def test_resnet_residual_is_a_traced_add() -> None:
    block = _first(_build("resnet"), resnet.BasicBlock)
    graph = fx.symbolic_trace(block).graph
    assert sum(n.target is operator.add for n in graph.nodes) == 1
