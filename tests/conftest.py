"""Shared fixtures. `variant` runs a test once eagerly and once under `jax.jit`."""

import os

# Keras is the reference implementation, on its JAX backend; it reads this once, at import.
os.environ["KERAS_BACKEND"] = "jax"

import jax
import pytest

# tests/multidevice needs 8 simulated devices from process start: tests/test_sharding.py runs
# it in its own process, with this variable set.
collect_ignore = [] if os.environ.get("JAXEMBED_MULTIDEVICE") else ["multidevice"]


@pytest.fixture(params=["without_jit", "with_jit"])
def variant(request):
    """Wraps a function in `jax.jit` or not; jit and no-jit must agree (chex's variants idea)."""
    return jax.jit if request.param == "with_jit" else (lambda fn: fn)
