"""Conformance with Keras 3: jaxembed against `keras.layers.Embedding` on the JAX backend.

Every test builds the same table in both libraries (`weights=`) or draws from the same named
distribution, and compares: forward values, masks, regularization penalties, constraint
projections (alone and after one SGD step), initializer distributions, and the arguments
both refuse. The deliberate differences are tested as such: jaxembed refuses float ids,
rejects out-of-range ids by default (neither is exercised here), and reads the name "l1_l2"
as L1L2(0.01, 0.01), a name Keras 3 refuses.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

import jaxembed

assert keras.backend.backend() == "jax", (
    "keras was imported with another backend before this module; run with KERAS_BACKEND=jax"
)

KEY = jax.random.key(0)
V, D = 13, 5  # small vocabulary for the layer-level comparisons


def random_table(input_dim=V, output_dim=D, seed=0):
    """A float32 table whose rows and columns have widely different norms."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(input_dim, output_dim))
    table *= rng.uniform(0.05, 2.0, size=(input_dim, 1))
    table *= rng.uniform(0.2, 1.5, size=(1, output_dim))
    return table.astype(np.float32)


def random_ids(shape, input_dim=V, dtype=np.int32, seed=0):
    """In-range ids of `shape`; every non-scalar draw includes both ends, 0 and input_dim-1."""
    ids = np.random.default_rng(seed).integers(0, input_dim, size=shape)
    if ids.size > 1:
        ids.flat[0], ids.flat[-1] = 0, input_dim - 1
    return np.asarray(ids, dtype=dtype)


def keras_layer(table, **kwargs):
    return keras.layers.Embedding(table.shape[0], table.shape[1], weights=table, **kwargs)


def linen_layer(table, **kwargs):
    return jaxembed.Embedding(table.shape[0], table.shape[1], weights=table, **kwargs)


def unboxed(variables):
    return nn.meta.unbox(variables)


# --------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------

ID_SHAPES = [(), (7,), (3, 4), (2, 3, 4)]
ID_DTYPES = [np.int32, np.int64, np.int16, np.uint8]


class TestForward:
    @pytest.mark.parametrize("dtype", ID_DTYPES, ids=lambda d: np.dtype(d).name)
    @pytest.mark.parametrize("shape", ID_SHAPES, ids=lambda s: f"rank{len(s)}")
    def test_apply_and_linen_equal_keras_call(self, shape, dtype):
        table = random_table()
        ids = random_ids(shape, dtype=dtype, seed=len(shape))
        expected = np.asarray(keras_layer(table)(ids))
        chex.assert_shape(expected, (*shape, D))

        out = jaxembed.apply(jaxembed.init(None, V, D, weights=table), ids)
        chex.assert_shape(out, (*shape, D))
        chex.assert_type(out, jnp.float32)
        np.testing.assert_array_equal(np.asarray(out), expected)

        layer = linen_layer(table)
        variables = layer.init(KEY, ids)
        out = layer.apply(variables, ids)
        chex.assert_shape(out, (*shape, D))
        np.testing.assert_array_equal(np.asarray(out), expected)

    @pytest.mark.parametrize("shape", ID_SHAPES, ids=lambda s: f"rank{len(s)}")
    def test_jax_array_ids_under_jit(self, shape):
        table = random_table(seed=3)
        ids = jnp.asarray(random_ids(shape, seed=7))
        expected = np.asarray(keras_layer(table)(ids))
        params = jaxembed.init(None, V, D, weights=table)
        out = jax.jit(jaxembed.apply, static_argnames="out_of_range")(
            params, ids, out_of_range="clip"
        )
        np.testing.assert_array_equal(np.asarray(out), expected)

    def test_output_shape_matches_keras_compute_output_shape(self):
        layer = keras.layers.Embedding(V, D)
        for shape in ID_SHAPES:
            params = jaxembed.init(KEY, V, D)
            out = jaxembed.apply(params, random_ids(shape))
            assert out.shape == tuple(layer.compute_output_shape(shape))

    def test_every_row_reachable(self):
        table = random_table(seed=5)
        ids = np.arange(V, dtype=np.int32)
        np.testing.assert_array_equal(
            np.asarray(jaxembed.apply(jaxembed.init(None, V, D, weights=table), ids)),
            np.asarray(keras_layer(table)(ids)),
        )


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


class TestMask:
    @pytest.mark.parametrize("mask_zero", [True, False])
    @pytest.mark.parametrize("shape", ID_SHAPES, ids=lambda s: f"rank{len(s)}")
    def test_compute_mask_equals_keras(self, shape, mask_zero):
        ids = random_ids(shape, seed=11)
        if ids.size > 2:
            ids.flat[1] = 0  # at least one padding id besides the first
        expected = keras.layers.Embedding(V, D, mask_zero=mask_zero).compute_mask(ids)
        got = jaxembed.compute_mask(ids, mask_zero)
        linen_got = jaxembed.Embedding(V, D, mask_zero=mask_zero).compute_mask(ids)
        if not mask_zero:
            assert expected is None
            assert got is None
            assert linen_got is None
            return
        expected = np.asarray(expected)
        for mask in (got, linen_got):
            chex.assert_shape(mask, shape)
            chex.assert_type(mask, jnp.bool_)
            np.testing.assert_array_equal(np.asarray(mask), expected)
        assert shape == () or not expected.all()  # the padding ids are masked

    def test_mask_zero_is_a_mask_not_a_change_of_values(self):
        # Keras embeds id 0 as row 0 even when it is padding; the mask only travels beside.
        table = random_table(seed=2)
        ids = np.array([[0, 3, 0, 1]], np.int32)
        expected = np.asarray(keras_layer(table, mask_zero=True)(ids))
        layer = linen_layer(table, mask_zero=True)
        out = layer.apply(layer.init(KEY, ids), ids)
        np.testing.assert_array_equal(np.asarray(out), expected)
        np.testing.assert_array_equal(np.asarray(out[0, 0]), table[0])


# --------------------------------------------------------------------------------------------
# Regularization penalties
# --------------------------------------------------------------------------------------------

REGULARIZER_CASES = {
    # id: (jaxembed spec factory, keras regularizer factory)
    "l1": (lambda: "l1", lambda: keras.regularizers.get("l1")),
    "l2": (lambda: "l2", lambda: keras.regularizers.get("l2")),
    "L1": (lambda: "L1", lambda: keras.regularizers.get("L1")),
    "L2": (lambda: "L2", lambda: keras.regularizers.get("L2")),
    "l1(0.3)": (lambda: jaxembed.regularizers.l1(0.3), lambda: keras.regularizers.L1(0.3)),
    "l2(0.2)": (lambda: jaxembed.regularizers.l2(0.2), lambda: keras.regularizers.L2(0.2)),
    "l1_l2(0.05,0.2)": (
        lambda: jaxembed.regularizers.l1_l2(l1=0.05, l2=0.2),
        lambda: keras.regularizers.L1L2(l1=0.05, l2=0.2),
    ),
    "l1_l2(0,0.2)": (
        lambda: jaxembed.regularizers.l1_l2(l1=0.0, l2=0.2),
        lambda: keras.regularizers.L1L2(l2=0.2),
    ),
    # Deliberate difference: Keras 3 refuses the string "l1_l2"; jaxembed reads it as the
    # defaults Keras documents for that name.
    "l1_l2-name": (lambda: "l1_l2", lambda: keras.regularizers.L1L2(l1=0.01, l2=0.01)),
    "orthogonal_regularizer": (
        lambda: "orthogonal_regularizer",
        lambda: keras.regularizers.get("orthogonal_regularizer"),
    ),
    "OrthogonalRegularizer": (
        lambda: "OrthogonalRegularizer",
        lambda: keras.regularizers.get("OrthogonalRegularizer"),
    ),
    "orthogonal(0.5,rows)": (
        lambda: jaxembed.regularizers.orthogonal_regularizer(0.5, mode="rows"),
        lambda: keras.regularizers.OrthogonalRegularizer(0.5, mode="rows"),
    ),
    "orthogonal(0.7,columns)": (
        lambda: jaxembed.regularizers.orthogonal_regularizer(0.7, mode="columns"),
        lambda: keras.regularizers.OrthogonalRegularizer(0.7, mode="columns"),
    ),
    "keras-instance": (
        lambda: keras.regularizers.L1L2(l1=0.02, l2=0.3),
        lambda: keras.regularizers.L1L2(l1=0.02, l2=0.3),
    ),
}


def table_with_degenerate_rows():
    """Rows of norm 0 and 1e-9 exercise the epsilon floor of Keras's normalize()."""
    table = random_table(seed=4)
    table[2] = 0.0
    table[5] = 1e-9 * np.arange(1, D + 1, dtype=np.float32)
    return table


class TestRegularization:
    @pytest.mark.parametrize(
        "table_fn", [random_table, table_with_degenerate_rows], ids=["plain", "degenerate"]
    )
    @pytest.mark.parametrize("case", list(REGULARIZER_CASES))
    def test_penalty_equals_keras_layer_losses(self, case, table_fn):
        spec_fn, keras_fn = REGULARIZER_CASES[case]
        table = table_fn()
        ids = random_ids((2, 3))

        layer = keras_layer(table, embeddings_regularizer=keras_fn())
        layer(ids)
        assert len(layer.losses) == 1
        keras_penalty = float(layer.losses[0])
        direct = float(keras_fn()(jnp.asarray(table)))
        np.testing.assert_allclose(keras_penalty, direct, rtol=1e-6)
        assert keras_penalty > 0

        params = jaxembed.init(None, V, D, weights=table)
        penalty = jaxembed.regularization_penalty(params, spec_fn())
        chex.assert_shape(penalty, ())
        chex.assert_type(penalty, jnp.float32)
        np.testing.assert_allclose(float(penalty), keras_penalty, rtol=1e-5, atol=1e-8)

        module = linen_layer(table, embeddings_regularizer=spec_fn())
        variables = module.init(KEY, ids)
        _, state = module.apply({"params": variables["params"]}, ids, mutable=["losses"])
        sown = state["losses"]["embeddings_regularization"]
        chex.assert_shape(sown, ())
        np.testing.assert_allclose(float(sown), keras_penalty, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(
            float(jaxembed.linen.losses(state)), keras_penalty, rtol=1e-5, atol=1e-8
        )

    def test_sown_penalty_not_accumulated_over_calls(self):
        # Keras's layer.losses holds one weight-regularization term however often it is called.
        table = random_table()
        ids = random_ids((4,))
        layer = keras_layer(table, embeddings_regularizer="l2")
        layer(ids)
        layer(ids)
        assert len(layer.losses) == 1

        class Twice(nn.Module):
            @nn.compact
            def __call__(self, x):
                embed = linen_layer(table, embeddings_regularizer="l2")
                return embed(x) + embed(x)

        module = Twice()
        variables = module.init(KEY, ids)
        _, state = module.apply({"params": variables["params"]}, ids, mutable=["losses"])
        np.testing.assert_allclose(
            float(jaxembed.linen.losses(state)), float(layer.losses[0]), rtol=1e-6
        )

    def test_no_regularizer_no_losses(self):
        # Keras's test_embedding_basics: expected_num_losses=0.
        table = random_table()
        ids = random_ids((2, 3))
        layer = keras_layer(table)
        layer(ids)
        assert layer.losses == []
        module = linen_layer(table)
        variables = module.init(KEY, ids)
        _, state = module.apply({"params": variables["params"]}, ids, mutable=["losses"])
        assert not state.get("losses")
        params = jaxembed.init(None, V, D, weights=table)
        assert float(jaxembed.regularization_penalty(params, None)) == 0.0

    def test_penalty_gradient_equals_keras_formula_gradient(self):
        # d/dW of l1*sum|W| + l2*sum W^2 is l1*sign(W) + 2*l2*W, through Keras's own function.
        table = random_table()
        keras_reg = keras.regularizers.L1L2(l1=0.03, l2=0.2)
        expected = jax.grad(lambda w: keras_reg(w))(jnp.asarray(table))
        spec = jaxembed.regularizers.l1_l2(l1=0.03, l2=0.2)
        grads = jax.grad(jaxembed.regularization_penalty)(
            jaxembed.init(None, V, D, weights=table), spec
        )
        chex.assert_trees_all_close(grads["embeddings"], expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------

CONSTRAINT_CASES = {
    "max_norm": (lambda: "max_norm", lambda: keras.constraints.get("max_norm")),
    "min_max_norm": (lambda: "min_max_norm", lambda: keras.constraints.get("min_max_norm")),
    "non_neg": (lambda: "non_neg", lambda: keras.constraints.get("non_neg")),
    "unit_norm": (lambda: "unit_norm", lambda: keras.constraints.get("unit_norm")),
    "MaxNorm": (lambda: "MaxNorm", lambda: keras.constraints.get("MaxNorm")),
    "MinMaxNorm": (lambda: "MinMaxNorm", lambda: keras.constraints.get("MinMaxNorm")),
    "NonNeg": (lambda: "NonNeg", lambda: keras.constraints.get("NonNeg")),
    "UnitNorm": (lambda: "UnitNorm", lambda: keras.constraints.get("UnitNorm")),
    "max_norm(1.5,axis=1)": (
        lambda: jaxembed.constraints.max_norm(1.5, axis=1),
        lambda: keras.constraints.MaxNorm(1.5, axis=1),
    ),
    "max_norm(1.0,axis=-1)": (
        lambda: jaxembed.constraints.max_norm(1.0, axis=-1),
        lambda: keras.constraints.MaxNorm(1.0, axis=-1),
    ),
    "max_norm(0.5)": (
        lambda: jaxembed.constraints.max_norm(0.5),
        lambda: keras.constraints.MaxNorm(0.5),
    ),
    "min_max_norm(0.5,1.2,0.7,axis=1)": (
        lambda: jaxembed.constraints.min_max_norm(0.5, 1.2, rate=0.7, axis=1),
        lambda: keras.constraints.MinMaxNorm(0.5, 1.2, rate=0.7, axis=1),
    ),
    "min_max_norm(2,3)": (
        lambda: jaxembed.constraints.min_max_norm(2.0, 3.0),
        lambda: keras.constraints.MinMaxNorm(2.0, 3.0),
    ),
    "unit_norm(axis=1)": (
        lambda: jaxembed.constraints.unit_norm(axis=1),
        lambda: keras.constraints.UnitNorm(axis=1),
    ),
    "non_neg()": (lambda: jaxembed.constraints.non_neg(), lambda: keras.constraints.NonNeg()),
    "keras-instance": (
        lambda: keras.constraints.MaxNorm(0.8, axis=1),
        lambda: keras.constraints.MaxNorm(0.8, axis=1),
    ),
}


def keras_project(keras_constraint, matrix):
    return np.asarray(keras_constraint(jnp.asarray(matrix)))


class TestConstraints:
    @pytest.mark.parametrize("case", list(CONSTRAINT_CASES))
    def test_apply_constraint_equals_keras(self, case):
        spec_fn, keras_fn = CONSTRAINT_CASES[case]
        table = random_table(seed=8)
        expected = keras_project(keras_fn(), table)
        assert not np.allclose(expected, table)  # the constraint binds on this table

        params = {"embeddings": jnp.asarray(table), "other": jnp.arange(3.0)}
        projected = jaxembed.apply_constraint(params, spec_fn())
        chex.assert_shape(projected["embeddings"], (V, D))
        chex.assert_type(projected["embeddings"], jnp.float32)
        np.testing.assert_allclose(
            np.asarray(projected["embeddings"]), expected, rtol=2e-6, atol=1e-7
        )
        np.testing.assert_array_equal(np.asarray(projected["other"]), np.arange(3.0))
        np.testing.assert_array_equal(np.asarray(params["embeddings"]), table)  # not mutated

    def test_keras_layer_and_linen_module_accept_the_same_constraint_names(self):
        # Keras's test_embedding_constraints: the name resolves to NonNeg on the weight.
        layer = keras.layers.Embedding(3, 2, embeddings_constraint="non_neg")
        layer.build((None, 2))
        assert isinstance(layer.embeddings.constraint, keras.constraints.NonNeg)
        jaxembed.Embedding(3, 2, embeddings_constraint="non_neg")  # constructs
        w = np.array([[-1.0, 2.0], [0.5, -0.0], [-3.0, -4.0]], np.float32)
        np.testing.assert_array_equal(
            np.asarray(jaxembed.constraints.get("non_neg")(jnp.asarray(w))),
            keras_project(layer.embeddings.constraint, w),
        )

    @pytest.mark.parametrize(
        "case",
        ["max_norm(1.5,axis=1)", "min_max_norm(0.5,1.2,0.7,axis=1)", "unit_norm", "non_neg"],
    )
    def test_one_sgd_step_equals_keras(self, case):
        spec_fn, keras_fn = CONSTRAINT_CASES[case]
        lr = 0.5
        table = random_table(seed=9)
        ids = random_ids((4, 6), seed=9)
        target = np.random.default_rng(9).normal(size=(4, 6, D)).astype(np.float32)

        def loss(params):
            return jnp.sum(jnp.square(jaxembed.apply(params, ids) - target))

        params = jaxembed.init(None, V, D, weights=table)
        grads = jax.grad(loss)(params)
        g = np.asarray(grads["embeddings"])

        # Keras: w - lr * g, then the constraint (by hand, with keras's constraint) ...
        by_hand = keras_project(keras_fn(), table - lr * g)
        # ... and the same through a Keras optimizer step on a layer holding the constraint.
        layer = keras_layer(table, embeddings_constraint=keras_fn())
        keras.optimizers.SGD(learning_rate=lr).apply([jnp.asarray(g)], [layer.embeddings])
        np.testing.assert_allclose(np.asarray(layer.embeddings), by_hand, rtol=1e-6, atol=1e-6)
        assert not np.allclose(by_hand, table - lr * g)  # the constraint binds after the step

        tx = optax.chain(optax.sgd(lr), jaxembed.keep_embeddings_constrained(spec_fn()))
        updates, _ = tx.update(grads, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(new["embeddings"], by_hand, rtol=1e-5, atol=1e-6)

        # The same step on the linen module's (boxed) params.
        module = linen_layer(table, embeddings_constraint=spec_fn())
        boxed = module.init(KEY, ids)["params"]

        def module_loss(p):
            return jnp.sum(jnp.square(module.apply({"params": p}, ids) - target))

        module_grads = jax.grad(module_loss)(boxed)
        updates, _ = tx.update(module_grads, tx.init(boxed), boxed)
        new_module = unboxed(optax.apply_updates(boxed, updates))
        chex.assert_trees_all_close(new_module["embeddings"], by_hand, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Initializers
# --------------------------------------------------------------------------------------------

N_ROWS, N_COLS = 512, 64
N = N_ROWS * N_COLS
FAN_IN, FAN_OUT = N_ROWS, N_COLS  # Keras's and JAX's fans of a 2-D (rows, cols) shape
TRUNC_STD = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]
TRUNC_MASS_BEYOND_2SD = math.erfc(2 / math.sqrt(2))  # P(|Z| > 2), ~0.0455

# name -> (family, parameter): "uniform" limit L for U(-L, L); "normal" stddev sigma;
# "truncated" stddev sigma of the normal before its truncation at 2 sigma.
RANDOM_INITIALIZERS = {
    "uniform": ("uniform", 0.05),
    "random_uniform": ("uniform", 0.05),
    "normal": ("normal", 0.05),
    "random_normal": ("normal", 0.05),
    "truncated_normal": ("truncated", 0.05),
    "glorot_uniform": ("uniform", math.sqrt(3 / ((FAN_IN + FAN_OUT) / 2))),
    "glorot_normal": ("truncated", math.sqrt(1 / ((FAN_IN + FAN_OUT) / 2)) / TRUNC_STD),
    "he_uniform": ("uniform", math.sqrt(6 / FAN_IN)),
    "he_normal": ("truncated", math.sqrt(2 / FAN_IN) / TRUNC_STD),
    "lecun_uniform": ("uniform", math.sqrt(3 / FAN_IN)),
    "lecun_normal": ("truncated", math.sqrt(1 / FAN_IN) / TRUNC_STD),
    "variance_scaling": ("truncated", math.sqrt(1 / FAN_IN) / TRUNC_STD),
}

# Configured factories: (jaxembed initializer, keras initializer, family, parameter, mean).
CONFIGURED_INITIALIZERS = {
    "random_uniform(0,2)": (
        lambda: jaxembed.initializers.random_uniform(0.0, 2.0),
        lambda: keras.initializers.RandomUniform(0.0, 2.0, seed=1),
        "uniform",
        1.0,
        1.0,
    ),
    "random_normal(1,0.2)": (
        lambda: jaxembed.initializers.random_normal(1.0, 0.2),
        lambda: keras.initializers.RandomNormal(1.0, 0.2, seed=2),
        "normal",
        0.2,
        1.0,
    ),
    "truncated_normal(0.3,0.1)": (
        lambda: jaxembed.initializers.truncated_normal(0.3, 0.1),
        lambda: keras.initializers.TruncatedNormal(0.3, 0.1, seed=3),
        "truncated",
        0.1,
        0.3,
    ),
    "variance_scaling(2,fan_out,uniform)": (
        lambda: jaxembed.initializers.variance_scaling(2.0, "fan_out", "uniform"),
        lambda: keras.initializers.VarianceScaling(2.0, "fan_out", "uniform", seed=4),
        "uniform",
        math.sqrt(3 * 2.0 / FAN_OUT),
        0.0,
    ),
    "variance_scaling(0.5,fan_avg,untruncated_normal)": (
        lambda: jaxembed.initializers.variance_scaling(0.5, "fan_avg", "untruncated_normal"),
        lambda: keras.initializers.VarianceScaling(0.5, "fan_avg", "untruncated_normal", seed=5),
        "normal",
        math.sqrt(0.5 / ((FAN_IN + FAN_OUT) / 2)),
        0.0,
    ),
    "variance_scaling(3,fan_in,truncated_normal)": (
        lambda: jaxembed.initializers.variance_scaling(3.0, "fan_in", "truncated_normal"),
        lambda: keras.initializers.VarianceScaling(3.0, "fan_in", "truncated_normal", seed=6),
        "truncated",
        math.sqrt(3.0 / FAN_IN) / TRUNC_STD,
        0.0,
    ),
    # Keras maps distribution="normal" to "truncated_normal" (VarianceScaling.__init__).
    "variance_scaling(1,fan_in,normal)": (
        lambda: jaxembed.initializers.variance_scaling(1.0, "fan_in", "normal"),
        lambda: keras.initializers.VarianceScaling(1.0, "fan_in", "normal", seed=7),
        "truncated",
        math.sqrt(1.0 / FAN_IN) / TRUNC_STD,
        0.0,
    ),
}


def check_distribution(sample, family, param, mean=0.0):
    """Asserts that `sample` (N values) fits the family, with tolerances from N.

    Means within 5 standard errors; stds within 5 standard errors of the sample std
    (sigma * sqrt((kurtosis - 1) / (4N)), taking the normal kurtosis 3, which bounds the
    uniform's 1.8 and the truncated normal's); bounds tight to within what N draws reach.
    """
    x = np.asarray(sample, np.float64).ravel() - mean
    n = x.size
    if family == "uniform":
        std = param / math.sqrt(3)
        assert np.abs(x).max() <= param * (1 + 1e-6)
        # P(no draw within param*40/n of an end) = (1 - 20/n)^n ~ e^-20.
        assert x.max() >= param * (1 - 40 / n)
        assert x.min() <= -param * (1 - 40 / n)
    elif family == "truncated":
        std = param * TRUNC_STD
        bound = 2 * param
        assert np.abs(x).max() <= bound * (1 + 1e-6)
        # Density at the bound is ~0.11/param per unit: P(none within param/100) ~ e^-37.
        assert np.abs(x).max() >= bound - param / 100
    else:
        std = param
        beyond = np.mean(np.abs(x) > 2 * param)
        se = math.sqrt(TRUNC_MASS_BEYOND_2SD * (1 - TRUNC_MASS_BEYOND_2SD) / n)
        assert abs(beyond - TRUNC_MASS_BEYOND_2SD) <= 5 * se, beyond
    assert abs(x.mean()) <= 5 * std / math.sqrt(n), x.mean()
    assert abs(x.std() - std) <= 5 * std / math.sqrt(2 * n), (x.std(), std)
    return x.mean(), x.std()


def two_sample_close(a, b, std):
    """Means and stds of two N-samples from the same law agree within 5 joint std errors."""
    (mean_a, std_a), (mean_b, std_b) = a, b
    assert abs(mean_a - mean_b) <= 5 * math.sqrt(2) * std / math.sqrt(N)
    assert abs(std_a - std_b) <= 5 * math.sqrt(2) * std / math.sqrt(2 * N)


def expected_std(family, param):
    return {"uniform": param / math.sqrt(3), "truncated": param * TRUNC_STD}.get(family, param)


@pytest.fixture
def keras_seeded():
    keras.utils.set_random_seed(1234)


class TestInitializers:
    @pytest.mark.parametrize("name", list(RANDOM_INITIALIZERS))
    def test_random_initializer_distribution_equals_keras(self, name, keras_seeded):
        family, param = RANDOM_INITIALIZERS[name]
        keras_sample = keras.initializers.get(name)(shape=(N_ROWS, N_COLS), dtype="float32")
        table = jaxembed.init(jax.random.key(17), N_ROWS, N_COLS, embeddings_initializer=name)[
            "embeddings"
        ]
        chex.assert_shape(table, (N_ROWS, N_COLS))
        chex.assert_type(table, jnp.float32)
        k = check_distribution(keras_sample, family, param)  # validates the expectation
        j = check_distribution(table, family, param)
        two_sample_close(j, k, expected_std(family, param))

    @pytest.mark.parametrize("case", list(CONFIGURED_INITIALIZERS))
    def test_configured_initializer_distribution_equals_keras(self, case):
        jax_fn, keras_fn, family, param, mean = CONFIGURED_INITIALIZERS[case]
        keras_sample = keras_fn()(shape=(N_ROWS, N_COLS), dtype="float32")
        table = jaxembed.init(jax.random.key(23), N_ROWS, N_COLS, embeddings_initializer=jax_fn())[
            "embeddings"
        ]
        k = check_distribution(keras_sample, family, param, mean)
        j = check_distribution(table, family, param, mean)
        two_sample_close(j, k, expected_std(family, param))

    def test_default_initializer_is_keras_default(self, keras_seeded):
        layer = keras.layers.Embedding(N_ROWS, N_COLS)
        layer.build()
        assert isinstance(layer.embeddings_initializer, keras.initializers.RandomUniform)
        k = check_distribution(layer.embeddings, "uniform", 0.05)
        j = check_distribution(jaxembed.init(KEY, N_ROWS, N_COLS)["embeddings"], "uniform", 0.05)
        two_sample_close(j, k, 0.05 / math.sqrt(3))

    @pytest.mark.parametrize(
        ("jax_spec", "keras_init"),
        [
            ("zeros", lambda: keras.initializers.get("zeros")),
            ("zero", lambda: keras.initializers.get("zero")),
            ("ones", lambda: keras.initializers.get("ones")),
            ("one", lambda: keras.initializers.get("one")),
            # keras.initializers.get("constant") raises KeyError('value'): use the class.
            ("constant", lambda: keras.initializers.Constant()),
            (
                lambda: jaxembed.initializers.constant(0.7),
                lambda: keras.initializers.Constant(0.7),
            ),
            ("identity", lambda: keras.initializers.get("identity")),
            ("Identity", lambda: keras.initializers.get("Identity")),
            (
                lambda: jaxembed.initializers.identity(gain=3.0),
                lambda: keras.initializers.Identity(gain=3.0),
            ),
        ],
        ids=[
            "zeros",
            "zero",
            "ones",
            "one",
            "constant",
            "constant(0.7)",
            "identity",
            "Identity",
            "identity(3)",
        ],
    )
    @pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)], ids=str)
    def test_deterministic_initializers_equal_keras_exactly(self, jax_spec, keras_init, shape):
        spec = jax_spec if isinstance(jax_spec, str) else jax_spec()
        expected = np.asarray(keras_init()(shape=shape, dtype="float32"))
        table = jaxembed.init(KEY, *shape, embeddings_initializer=spec)["embeddings"]
        chex.assert_type(table, jnp.float32)
        np.testing.assert_array_equal(np.asarray(table), expected)
        # ... and the key plays no part.
        again = jaxembed.init(jax.random.key(99), *shape, embeddings_initializer=spec)
        np.testing.assert_array_equal(np.asarray(again["embeddings"]), expected)

    @pytest.mark.parametrize("shape", [(256, 32), (32, 256), (64, 64)], ids=str)
    @pytest.mark.parametrize(
        ("spec_fn", "keras_fn", "gain"),
        [
            (lambda: "orthogonal", lambda: keras.initializers.get("orthogonal"), 1.0),
            (lambda: "Orthogonal", lambda: keras.initializers.get("Orthogonal"), 1.0),
            (
                lambda: "OrthogonalInitializer",
                lambda: keras.initializers.get("OrthogonalInitializer"),
                1.0,
            ),
            (
                lambda: jaxembed.initializers.orthogonal(gain=2.5),
                lambda: keras.initializers.Orthogonal(gain=2.5),
                2.5,
            ),
        ],
        ids=["orthogonal", "Orthogonal", "OrthogonalInitializer", "orthogonal(gain=2.5)"],
    )
    def test_orthogonal_equals_keras(self, spec_fn, keras_fn, gain, shape, keras_seeded):
        spec, keras_init = spec_fn(), keras_fn()
        keras_q = np.asarray(keras_init(shape=shape, dtype="float32"), np.float64)
        q = np.asarray(
            jaxembed.init(jax.random.key(5), *shape, embeddings_initializer=spec)["embeddings"],
            np.float64,
        )
        small = min(shape)
        for m in (keras_q, q):
            gram = m.T @ m if shape[0] >= shape[1] else m @ m.T  # the fewer vectors
            np.testing.assert_allclose(gram, gain**2 * np.eye(small), atol=2e-5 * gain**2)
        # Random, not a fixed basis: two keys give different matrices.
        other = jaxembed.init(jax.random.key(6), *shape, embeddings_initializer=spec)
        assert not np.allclose(np.asarray(other["embeddings"]), q, atol=1e-3)

    @pytest.mark.parametrize(
        ("camel", "snake"),
        [
            ("RandomUniform", "random_uniform"),
            ("RandomNormal", "random_normal"),
            ("TruncatedNormal", "truncated_normal"),
            ("GlorotUniform", "glorot_uniform"),
            ("GlorotNormal", "glorot_normal"),
            ("HeUniform", "he_uniform"),
            ("HeNormal", "he_normal"),
            ("LecunUniform", "lecun_uniform"),
            ("LecunNormal", "lecun_normal"),
            ("VarianceScaling", "variance_scaling"),
            ("Zeros", "zeros"),
            ("Ones", "ones"),
            ("Constant", "constant"),
            ("Identity", "identity"),
            ("IdentityInitializer", "identity"),
            ("Orthogonal", "orthogonal"),
            ("OrthogonalInitializer", "orthogonal"),
            ("uniform", "random_uniform"),
            ("normal", "random_normal"),
        ],
    )
    def test_camel_case_and_alias_names_resolve_like_keras(self, camel, snake):
        if snake != "constant":  # Keras's get() cannot build Constant from a name.
            keras_cls = type(keras.initializers.get(camel))
            assert keras_cls is type(keras.initializers.get(snake))
        a = jaxembed.init(KEY, 24, 16, embeddings_initializer=camel)
        b = jaxembed.init(KEY, 24, 16, embeddings_initializer=snake)
        chex.assert_trees_all_equal(a, b)


# --------------------------------------------------------------------------------------------
# Invalid arguments
# --------------------------------------------------------------------------------------------

BAD_DIMS = [3.7, 4.0, "3", None, True, False, 0, -1]


class TestInvalidArguments:
    @pytest.mark.parametrize("bad", BAD_DIMS, ids=repr)
    @pytest.mark.parametrize("arg", ["input_dim", "output_dim"])
    def test_bad_dims_rejected_like_keras(self, arg, bad):
        dims = {"input_dim": 10, "output_dim": 8, arg: bad}
        with pytest.raises(ValueError, match=f"`{arg}` must be a positive integer"):
            keras.layers.Embedding(**dims)
        received = f"{arg}={bad!r}"
        with pytest.raises(ValueError, match=f"`{arg}`") as info:
            jaxembed.init(KEY, dims["input_dim"], dims["output_dim"])
        assert received in str(info.value)
        with pytest.raises(ValueError, match=f"`{arg}`") as info:
            jaxembed.Embedding(**dims)
        assert received in str(info.value)

    def test_unknown_initializer_lists_valid_names(self):
        with pytest.raises(ValueError):
            keras.initializers.get("glorot")
        for call in (
            lambda: jaxembed.init(KEY, 4, 3, embeddings_initializer="glorot"),
            lambda: jaxembed.Embedding(4, 3, embeddings_initializer="glorot"),
        ):
            with pytest.raises(ValueError, match="'glorot'") as info:
                call()
            for valid in ("uniform", "glorot_uniform", "he_normal", "orthogonal", "identity"):
                assert f"'{valid}'" in str(info.value)

    def test_unknown_regularizer_lists_valid_names(self):
        with pytest.raises(ValueError):
            keras.regularizers.get("l3")
        params = jaxembed.init(KEY, 4, 3)
        for call in (
            lambda: jaxembed.regularization_penalty(params, "l3"),
            lambda: jaxembed.Embedding(4, 3, embeddings_regularizer="l3"),
        ):
            with pytest.raises(ValueError, match="'l3'") as info:
                call()
            for valid in ("l1", "l2", "l1_l2", "orthogonal_regularizer"):
                assert f"'{valid}'" in str(info.value)

    def test_unknown_constraint_lists_valid_names(self):
        with pytest.raises(ValueError):
            keras.constraints.get("bogus")
        params = jaxembed.init(KEY, 4, 3)
        for call in (
            lambda: jaxembed.apply_constraint(params, "bogus"),
            lambda: jaxembed.keep_embeddings_constrained("bogus"),
            lambda: jaxembed.Embedding(4, 3, embeddings_constraint="bogus"),
        ):
            with pytest.raises(ValueError, match="'bogus'") as info:
                call()
            for valid in ("max_norm", "min_max_norm", "non_neg", "unit_norm"):
                assert f"'{valid}'" in str(info.value)

    @pytest.mark.parametrize("kind", ["initializer", "regularizer", "constraint"])
    def test_non_callable_identifier_rejected_like_keras(self, kind):
        with pytest.raises(ValueError):
            getattr(keras, f"{kind}s").get(3)
        with pytest.raises(ValueError, match=f"`embeddings_{kind}`"):
            jaxembed.Embedding(4, 3, **{f"embeddings_{kind}": 3})

    @pytest.mark.parametrize(
        "bad_shape", [(3, 3), (3, 4), (4, 3, 1), (12,), (5, 3), (2, 4, 3)], ids=str
    )
    def test_weights_of_wrong_shape_rejected_like_keras(self, bad_shape):
        bad = np.ones(bad_shape, np.float32)
        with pytest.raises(ValueError):
            keras.layers.Embedding(4, 3, weights=bad)
        with pytest.raises(ValueError, match=r"\(4, 3\)"):
            jaxembed.init(None, 4, 3, weights=bad)
        with pytest.raises(ValueError, match=r"\(4, 3\)"):
            jaxembed.init(None, 4, 3, weights=[bad])
        # Keras refuses at construction, and jaxembed.Embedding validates its arguments at
        # construction "as Keras does" (linen.py): the weights should be refused there too.
        with pytest.raises(ValueError, match=r"\(4, 3\)"):
            jaxembed.Embedding(4, 3, weights=bad)

    def test_weights_of_wrong_shape_never_reach_the_params(self):
        # Whether refused at construction or at init, the linen module never builds them.
        with pytest.raises(ValueError, match=r"\(4, 3\)"):
            module = jaxembed.Embedding(4, 3, weights=np.ones((3, 3), np.float32))
            module.init(KEY, np.zeros((2,), np.int32))

    @pytest.mark.parametrize(
        ("jax_factory", "keras_factory"),
        [
            (
                lambda: jaxembed.regularizers.l1(-1.0),
                lambda: keras.regularizers.L1(-1.0),
            ),
            (
                lambda: jaxembed.regularizers.l2(float("nan")),
                lambda: keras.regularizers.L2(float("nan")),
            ),
            (
                lambda: jaxembed.regularizers.l1_l2(l1=0.1, l2=-0.5),
                lambda: keras.regularizers.L1L2(l1=0.1, l2=-0.5),
            ),
            (
                lambda: jaxembed.regularizers.orthogonal_regularizer(-0.1),
                lambda: keras.regularizers.OrthogonalRegularizer(-0.1),
            ),
            (
                lambda: jaxembed.regularizers.orthogonal_regularizer(0.1, mode="diagonal"),
                lambda: keras.regularizers.OrthogonalRegularizer(0.1, mode="diagonal"),
            ),
            (
                lambda: jaxembed.initializers.variance_scaling(1.0, mode="fan_max"),
                lambda: keras.initializers.VarianceScaling(1.0, mode="fan_max"),
            ),
            (
                lambda: jaxembed.initializers.variance_scaling(1.0, distribution="cauchy"),
                lambda: keras.initializers.VarianceScaling(1.0, distribution="cauchy"),
            ),
            (
                lambda: jaxembed.initializers.variance_scaling(0.0),
                lambda: keras.initializers.VarianceScaling(0.0),
            ),
            (
                lambda: jaxembed.initializers.variance_scaling(-2.0),
                lambda: keras.initializers.VarianceScaling(-2.0),
            ),
        ],
        ids=[
            "l1(-1)",
            "l2(nan)",
            "l1_l2(l2=-0.5)",
            "orthogonal(-0.1)",
            "orthogonal(mode)",
            "variance_scaling(mode)",
            "variance_scaling(distribution)",
            "variance_scaling(scale=0)",
            "variance_scaling(scale=-2)",
        ],
    )
    def test_bad_factory_arguments_rejected_like_keras(self, jax_factory, keras_factory):
        with pytest.raises(ValueError):
            keras_factory()
        with pytest.raises(ValueError):
            jax_factory()


# --------------------------------------------------------------------------------------------
# Keras's embedding_test.py, ported
# --------------------------------------------------------------------------------------------


class TestKerasEmbeddingTestPort:
    @pytest.mark.parametrize(
        ("input_dim", "output_dim", "mask_zero", "shape", "dtype"),
        [(4, 3, False, (2,), np.int32), (5, 4, True, (2, 3), np.int64)],
    )
    def test_embedding_basics(self, input_dim, output_dim, mask_zero, shape, dtype):
        ids = random_ids(shape, input_dim=input_dim, dtype=dtype)
        layer = keras.layers.Embedding(input_dim, output_dim, mask_zero=mask_zero)
        keras_out = layer(ids)
        assert len(layer.trainable_weights) == 1 and not layer.non_trainable_weights
        assert layer.supports_masking == mask_zero

        module = jaxembed.Embedding(input_dim, output_dim, mask_zero=mask_zero)
        variables = module.init(KEY, ids)
        assert set(variables) == {"params"}
        params = unboxed(variables["params"])
        assert list(params) == ["embeddings"]
        chex.assert_shape(params["embeddings"], (input_dim, output_dim))
        out = module.apply(variables, ids)
        chex.assert_shape(out, keras_out.shape)
        assert out.shape == (*shape, output_dim)
        assert (module.compute_mask(ids) is not None) == mask_zero

    def test_correctness(self):
        table = np.array([[0.0, 0.0], [2.0, 2.0], [3.0, 3.0]], np.float32)
        ids = np.array([2, 1, 0])
        expected = np.array([[3.0, 3.0], [2.0, 2.0], [0.0, 0.0]])
        layer = keras.layers.Embedding(input_dim=3, output_dim=2)
        layer.build()
        layer.embeddings.assign(table)
        np.testing.assert_allclose(np.asarray(layer(ids)), expected)
        params = jaxembed.init(KEY, 3, 2)
        params["embeddings"] = jnp.asarray(table)
        np.testing.assert_allclose(np.asarray(jaxembed.apply(params, ids)), expected)
        module = jaxembed.Embedding(3, 2, weights=table)
        np.testing.assert_allclose(np.asarray(module.apply(module.init(KEY, ids), ids)), expected)

    def test_masking(self):
        ids = np.array([2, 1, 0])
        expected = np.array([True, True, False])
        layer = keras.layers.Embedding(input_dim=3, output_dim=2, mask_zero=True)
        layer.build()
        np.testing.assert_array_equal(np.asarray(layer.compute_mask(ids)), expected)
        np.testing.assert_array_equal(np.asarray(jaxembed.compute_mask(ids, True)), expected)
        module = jaxembed.Embedding(input_dim=3, output_dim=2, mask_zero=True)
        np.testing.assert_array_equal(np.asarray(module.compute_mask(ids)), expected)

    def test_compute_mask_no_masking(self):
        ids = np.array([2, 1, 0])
        assert keras.layers.Embedding(3, 2, mask_zero=False).compute_mask(ids) is None
        assert jaxembed.compute_mask(ids, False) is None
        assert jaxembed.Embedding(3, 2, mask_zero=False).compute_mask(ids) is None

    @pytest.mark.parametrize("wrap", [False, True], ids=["array", "list"])
    def test_weights_constructor_arg(self, wrap):
        weights = np.ones((3, 4))
        arg = [weights] if wrap else weights
        layer = keras.layers.Embedding(3, 4, weights=arg)
        np.testing.assert_allclose(np.asarray(layer.embeddings), np.ones((3, 4)))
        params = jaxembed.init(None, 3, 4, weights=arg)
        chex.assert_type(params["embeddings"], jnp.float32)
        np.testing.assert_array_equal(
            np.asarray(params["embeddings"]), np.asarray(layer.embeddings)
        )
        module = jaxembed.Embedding(3, 4, weights=arg)
        variables = unboxed(module.init(KEY, np.zeros((1,), np.int32)))
        np.testing.assert_array_equal(
            np.asarray(variables["params"]["embeddings"]), np.asarray(layer.embeddings)
        )
