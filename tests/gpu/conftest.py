"""tests/gpu/ needs a GPU backend: on any other machine (CI) every test here is skipped, visibly."""

import os
import pathlib

# pytest-xdist runs several processes on the one GPU: each would otherwise reserve 75% of its memory at start
# (set before any test touches the backend).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest

_HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU (default backend is {jax.default_backend()})")
    for item in items:
        if _HERE in pathlib.Path(item.fspath).parents:
            item.add_marker(skip)
