"""Initializer names and factories (statistics against Keras live in test_keras_conformance)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxembed import initializers

KEY = jax.random.key(0)


@pytest.mark.parametrize("name", initializers.NAMES)
def test_every_name_draws_the_requested_shape_and_dtype(name):
    table = initializers.get(name)(KEY, (16, 8), jnp.bfloat16)
    chex.assert_shape(table, (16, 8))
    chex.assert_type(table, jnp.bfloat16)
    assert bool(jnp.isfinite(table).all())


@pytest.mark.parametrize(
    ("camel", "snake"),
    [
        ("RandomUniform", "random_uniform"),
        ("GlorotNormal", "glorot_normal"),
        ("HeUniform", "he_uniform"),
        ("Zeros", "zeros"),
    ],
)
def test_camel_case_class_names(camel, snake):
    np.testing.assert_array_equal(
        initializers.get(camel)(KEY, (4, 3)), initializers.get(snake)(KEY, (4, 3))
    )


def test_configured_factories():
    np.testing.assert_array_equal(initializers.constant(2.5)(KEY, (2, 2)), np.full((2, 2), 2.5))
    np.testing.assert_array_equal(initializers.identity(3.0)(KEY, (2, 3)), 3.0 * np.eye(2, 3))
    table = initializers.random_uniform(0.0, 1e-3)(KEY, (100, 10))
    assert 0.0 <= float(table.min()) and float(table.max()) <= 1e-3
    table = initializers.truncated_normal(1.0, 0.1)(KEY, (100, 10))
    assert 0.8 <= float(table.min()) and float(table.max()) <= 1.2


def test_orthogonal_gain():
    table = initializers.orthogonal(2.0)(KEY, (8, 4))
    np.testing.assert_allclose(table.T @ table, 4.0 * np.eye(4), atol=1e-5)


def test_identity_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"2-D matrices only. Received: shape=\(4,\)"):
        initializers.identity()(KEY, (4,))


def test_variance_scaling_bad_arguments():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        initializers.variance_scaling(mode="fan_sum")
    with pytest.raises(ValueError, match="`distribution` must be one of"):
        initializers.variance_scaling(distribution="cauchy")


def test_callable_passes_through():
    assert initializers.get(jax.nn.initializers.zeros) is jax.nn.initializers.zeros


@pytest.mark.parametrize("bad", ["unifrom", "", None, 3, ["uniform"]])
def test_unknown(bad):
    with pytest.raises(ValueError, match="embeddings_initializer"):
        initializers.get(bad)
