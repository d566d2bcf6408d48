"""Shared fixtures: zoo models are built once per session, with fixed seeds."""

from __future__ import annotations

import functools

import pytest
import torch

from fxfusion.zoo import ZOO, example_inputs

# The test tensors are tiny: one thread avoids oversubscribing CI's 2 cores.
torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _built(name: str):
    torch.manual_seed(0)
    return ZOO[name].build(), example_inputs(name)


@pytest.fixture
def zoo_model():
    """``zoo_model(name) -> (fresh deep copy of the model, example inputs)``."""
    import copy

    def get(name: str):
        model, x = _built(name)
        return copy.deepcopy(model), x

    return get
