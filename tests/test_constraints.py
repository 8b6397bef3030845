"""Constraint projections and the optax transformation that enforces them."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxembed
from jaxembed import constraints

TABLE = jnp.array([[3.0, -4.0], [4.0, 0.0], [0.0, 3.0]])  # column norms 5 and 5


@pytest.mark.parametrize(
    ("constraint", "column_norms"),
    [
        ("max_norm", [2.0, 2.0]),
        (constraints.max_norm(10.0), [5.0, 5.0]),
        ("unit_norm", [1.0, 1.0]),
        (constraints.min_max_norm(6.0, 7.0), [6.0, 6.0]),
        (constraints.min_max_norm(0.0, 1.0, rate=0.5), [3.0, 3.0]),
    ],
)
def test_norm_constraints(constraint, column_norms, variant):
    project = variant(
        functools.partial(jaxembed.apply_constraint, embeddings_constraint=constraint)
    )
    out = project({"embeddings": TABLE})["embeddings"]
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=0), column_norms, rtol=1e-5)


def test_axis_one_constrains_each_token_vector():
    out = jaxembed.apply_constraint({"embeddings": TABLE}, constraints.unit_norm(axis=1))
    np.testing.assert_allclose(jnp.linalg.norm(out["embeddings"], axis=1), 1.0, rtol=1e-5)


def test_non_neg_and_other_entries_pass_through_unmutated():
    params = {"embeddings": TABLE, "other": jnp.array([-1.0])}
    out = jaxembed.apply_constraint(params, "NonNeg")
    assert float(out["embeddings"].min()) == 0.0
    assert out["other"] is params["other"] and params["embeddings"] is TABLE
    assert jaxembed.apply_constraint(params, None) == params


def test_keeps_dtype():
    out = jaxembed.apply_constraint({"embeddings": TABLE.astype(jnp.bfloat16)}, "max_norm")
    chex.assert_type(out["embeddings"], jnp.bfloat16)


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (constraints.max_norm, {"max_value": -1}, "`max_value` must be a finite non-negative"),
        (constraints.max_norm, {"axis": 2}, r"`axis` must be an axis of the 2-D.*axis=2"),
        (constraints.unit_norm, {"axis": "0"}, "`axis` must be an axis"),
        (constraints.min_max_norm, {"rate": None}, "`rate` must be a finite non-negative"),
    ],
)
def test_bad_arguments(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


@pytest.mark.parametrize("bad", ["maxnorm", 2.0])
def test_unknown(bad):
    with pytest.raises(ValueError, match="embeddings_constraint"):
        constraints.get(bad)


class TestKeepEmbeddingsConstrained:
    def test_sgd_step_lands_on_constraint_set_under_jit(self):
        params = {"embeddings": TABLE, "bias": jnp.array([-5.0])}
        tx = optax.chain(optax.sgd(0.1), jaxembed.keep_embeddings_constrained("max_norm"))
        grads = {"embeddings": -jnp.ones_like(TABLE), "bias": jnp.array([1.0])}

        @jax.jit
        def step(params, state):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        new, _ = step(params, tx.init(params))
        expected = jaxembed.apply_constraint({"embeddings": TABLE + 0.1}, "max_norm")
        np.testing.assert_allclose(new["embeddings"], expected["embeddings"], rtol=1e-6)
        np.testing.assert_allclose(new["bias"], [-5.1])  # untouched by the constraint

    def test_finds_boxed_tables_in_a_linen_model(self):
        class Model(nn.Module):
            @nn.compact
            def __call__(self, ids):
                x = jaxembed.Embedding(
                    5, 2, embeddings_initializer="ones", out_of_range="clip", name="tokens"
                )(ids)
                return nn.Dense(1)(x)

        variables = Model().init(jax.random.key(0), jnp.array([1]))
        params = variables["params"]
        tx = optax.chain(optax.sgd(1.0), jaxembed.keep_embeddings_constrained("non_neg"))
        grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 10.0), params)
        updates, _ = tx.update(grads, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        assert float(nn.unbox(new)["tokens"]["embeddings"].min()) == 0.0
        assert float(nn.unbox(new)["Dense_0"]["kernel"].max()) < 0  # not constrained

    def test_needs_params_and_a_constraint(self):
        tx = jaxembed.keep_embeddings_constrained("non_neg")
        with pytest.raises(ValueError, match="needs the current params.*params=None"):
            tx.update({"embeddings": TABLE}, tx.init(None))
        with pytest.raises(ValueError, match="embeddings_constraint=None"):
            jaxembed.keep_embeddings_constrained(None)
