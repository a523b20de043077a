"""tests/gpu/ needs a GPU backend: on any other machine (CI) every test here is skipped, visibly."""

import pathlib

import jax
import pytest

_HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU (default backend is {jax.default_backend()})")
    for item in items:
        if _HERE in pathlib.Path(item.fspath).parents:
            item.add_marker(skip)
