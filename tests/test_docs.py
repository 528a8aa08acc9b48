"""Every docstring example in the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import lipbound


def _modules_with_examples() -> list[str]:
    finder = doctest.DocTestFinder()
    names = []
    for info in pkgutil.walk_packages(lipbound.__path__, "lipbound."):
        if any(t.examples for t in finder.find(importlib.import_module(info.name))):
            names.append(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_public_entry_points_have_examples():
    assert {"lipbound.api", "lipbound.formulations.lipsdp", "lipbound.solvers.native", "lipbound.rigorous",
            "lipbound.bounds", "lipbound.lower", "lipbound.importers.torch_module", "lipbound.importers.weights",
            "lipbound.graph"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
