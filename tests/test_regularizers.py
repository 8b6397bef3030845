"""Regularizer factories and the pure penalty (Keras equality lives in test_keras_conformance)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed
from jaxembed import regularizers

TABLE = jnp.array([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]])
PARAMS = {"embeddings": TABLE}


@pytest.mark.parametrize(
    ("regularizer", "expected"),
    [
        ("l1", 0.01 * 7.5),
        ("l2", 0.01 * 15.25),
        ("l1_l2", 0.01 * 7.5 + 0.01 * 15.25),
        ("l1l2", 0.01 * 7.5 + 0.01 * 15.25),
        ("L2", 0.01 * 15.25),
        (regularizers.l1(0.5), 0.5 * 7.5),
        (regularizers.l1_l2(l1=0.0, l2=2.0), 2.0 * 15.25),
        (lambda w: jnp.sum(w), 1.5),
        (None, 0.0),
    ],
)
def test_penalty_values(regularizer, expected, variant):
    penalty = variant(
        functools.partial(jaxembed.regularization_penalty, embeddings_regularizer=regularizer)
    )(PARAMS)
    chex.assert_shape(penalty, ())
    np.testing.assert_allclose(penalty, expected, rtol=1e-6)


def test_penalty_in_table_dtype_and_differentiable():
    params = {"embeddings": TABLE.astype(jnp.bfloat16)}
    chex.assert_type(jaxembed.regularization_penalty(params, "l2"), jnp.bfloat16)
    grads = jax.grad(lambda p: jaxembed.regularization_penalty(p, "l2"))(PARAMS)
    np.testing.assert_allclose(grads["embeddings"], 0.02 * TABLE, rtol=1e-6)


def test_orthogonal_regularizer_zero_for_orthogonal_rows():
    eye = {"embeddings": jnp.eye(3)}
    assert float(jaxembed.regularization_penalty(eye, "orthogonal_regularizer")) == 0.0
    same = {"embeddings": jnp.ones((3, 2))}
    np.testing.assert_allclose(jaxembed.regularization_penalty(same, "orthogonal"), 0.01, rtol=1e-5)


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (regularizers.l1, {"l1": -0.1}, "`l1` must be a finite non-negative number"),
        (regularizers.l2, {"l2": float("nan")}, "`l2` must be a finite non-negative number"),
        (regularizers.l1_l2, {"l2": "0.1"}, r"`l2` must be .* Received: l2='0.1'"),
        (regularizers.orthogonal_regularizer, {"mode": "diag"}, "`mode` must be one of"),
    ],
)
def test_bad_factors(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


@pytest.mark.parametrize("bad", ["l3", 0.1, ("l2",)])
def test_unknown(bad):
    with pytest.raises(ValueError, match="embeddings_regularizer"):
        regularizers.get(bad)
