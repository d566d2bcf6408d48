"""Shared fixtures for the quantizer tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def prime(quantizer: nn.Module, **values: object) -> nn.Module:
    """Mark ``quantizer`` initialized and set its named parameters/buffers to ``values``."""
    with torch.no_grad():
        for name, value in values.items():
            target = getattr(quantizer, name)
            target.copy_(torch.as_tensor(value, dtype=target.dtype))
        quantizer.initialized.fill_(True)
    return quantizer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def primed():
    return prime
