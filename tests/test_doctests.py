"""The examples in the public docstrings run, and print what they say.

Every module of the installed ``fxfusion`` package (``fxfusion.passes`` included) is collected;
each example starts with ``torch``, ``nn``, ``fxfusion`` and a small input ``x`` (one 32×32 RGB
image) in scope. An example that needs a file, a dataset or a long run is marked
``# doctest: +SKIP`` where it stands.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import torch
from torch import nn

import fxfusion


def _modules() -> list[str]:
    import fxfusion.passes  # installed from its own folder: walk it too

    names = ["fxfusion", "fxfusion.passes"]
    for package in (fxfusion, fxfusion.passes):
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                  if not info.name.endswith("__main__")]
    return sorted(set(names))


# modules of an optional extra, collected only where the extra is installed
_NEEDS = {"fxfusion.integrations.ultralytics": "ultralytics"}


def _tests(name: str) -> list[doctest.DocTest]:
    if name in _NEEDS and importlib.util.find_spec(_NEEDS[name]) is None:
        return []
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(module, name) if t.examples]


_ALL = [(name, t) for name in _modules() for t in _tests(name)]


def test_docstring_examples_are_collected() -> None:
    found = {name for name, _ in _ALL}
    assert {"fxfusion.passes.find", "fxfusion.gabfusion", "fxfusion.passes.deploy"} <= found, sorted(found)


@pytest.mark.parametrize("test", [t for _, t in _ALL], ids=[t.name for _, t in _ALL])
def test_docstring_example(test: doctest.DocTest) -> None:
    torch.manual_seed(0)
    test.globs.update({"torch": torch, "nn": nn, "fxfusion": fxfusion, "x": torch.randn(1, 3, 32, 32)})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output: list[str] = []
    runner.run(test, out=output.append)
    assert not runner.failures, "".join(output)
