"""Shared fixtures. `variant` runs a test once eagerly and once under `jax.jit`."""

import os

# Keras is the reference implementation, on its JAX backend; it reads this once, at import.
os.environ["KERAS_BACKEND"] = "jax"

import jax
import pytest


@pytest.fixture(params=["without_jit", "with_jit"])
def variant(request):
    """Wraps a function in `jax.jit` or not; jit and no-jit must agree (chex's variants idea)."""
    return jax.jit if request.param == "with_jit" else (lambda fn: fn)
