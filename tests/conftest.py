"""Shared fixtures. `variant` runs a test once eagerly and once under `jax.jit`."""

import importlib.util
import os
import pathlib
import sys

# Keras is the reference implementation, on its JAX backend; it reads this once, at import.
os.environ["KERAS_BACKEND"] = "jax"

import jax
import pytest

# tests/multidevice needs 8 simulated devices, fixed when JAX's backend starts, and
# tests/multihost starts processes joined by jax.distributed: each is its own pytest
# invocation, `pytest tests/multidevice` and `pytest tests/multihost` (a path given on the
# command line is collected even when listed here), and README's test command runs all three.
collect_ignore = ["multidevice", "multihost"]


@pytest.fixture(params=["without_jit", "with_jit"])
def variant(request):
    """Wraps a function in `jax.jit` or not; jit and no-jit must agree (chex's variants idea)."""
    return jax.jit if request.param == "with_jit" else (lambda fn: fn)


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def load_example():
    """Imports `examples/<name>.py` as a module (examples/ is not a package)."""

    def load(name):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module

    return load
