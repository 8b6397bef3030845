"""The pure functions: init, apply, compute_mask, attend, and their bad-input errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.experimental import checkify
from strategies import id_arrays

import jaxembed

KEY = jax.random.key(0)


def small_params(input_dim=7, output_dim=3):
    table = np.arange(input_dim * output_dim, dtype=np.float32).reshape(input_dim, output_dim)
    return jaxembed.init(None, input_dim, output_dim, weights=table), table


class TestInit:
    def test_shape_dtype_and_default_uniform_range(self):
        params = jaxembed.init(KEY, 1000, 64)
        chex.assert_shape(params["embeddings"], (1000, 64))
        chex.assert_type(params["embeddings"], jnp.float32)
        assert float(jnp.abs(params["embeddings"]).max()) <= 0.05
        assert float(params["embeddings"].std()) > 0.02  # not all zeros

    def test_param_dtype(self):
        params = jaxembed.init(KEY, 10, 4, param_dtype=jnp.bfloat16)
        chex.assert_type(params["embeddings"], jnp.bfloat16)

    def test_same_key_same_table_different_key_different_table(self):
        a, b = jaxembed.init(KEY, 10, 4), jaxembed.init(KEY, 10, 4)
        c = jaxembed.init(jax.random.key(1), 10, 4)
        chex.assert_trees_all_equal(a, b)
        assert not np.array_equal(a["embeddings"], c["embeddings"])

    def test_jax_initializer_callable(self):
        params = jaxembed.init(KEY, 10, 4, embeddings_initializer=jax.nn.initializers.ones)
        np.testing.assert_array_equal(params["embeddings"], np.ones((10, 4)))

    def test_weights_copied_cast_and_not_mutated(self):
        weights = np.arange(12, dtype=np.float64).reshape(4, 3)
        before = weights.copy()
        params = jaxembed.init(None, 4, 3, weights=weights, param_dtype=jnp.float32)
        chex.assert_type(params["embeddings"], jnp.float32)
        np.testing.assert_array_equal(params["embeddings"], before)
        weights[0, 0] = 99.0
        assert params["embeddings"][0, 0] == 0.0
        np.testing.assert_array_equal(weights[1:], before[1:])

    @pytest.mark.parametrize(
        "weights",
        [
            [[1, 2, 3], [4, 5, 6]],  # nested lists of ints
            np.ones((2, 3), np.float16),
            jnp.ones((2, 3), jnp.bfloat16),
            [np.ones((2, 3))],  # Keras-style list of one matrix
        ],
    )
    def test_weights_any_array_like(self, weights):
        params = jaxembed.init(None, 2, 3, weights=weights)
        chex.assert_shape(params["embeddings"], (2, 3))
        chex.assert_type(params["embeddings"], jnp.float32)

    def test_init_under_jit(self):
        init = jax.jit(functools.partial(jaxembed.init, input_dim=10, output_dim=4))
        chex.assert_trees_all_equal(init(KEY), jaxembed.init(KEY, 10, 4))


class TestInitErrors:
    @pytest.mark.parametrize("bad", [3.7, "3", None, True, 0, -1])
    @pytest.mark.parametrize("argument", ["input_dim", "output_dim"])
    def test_dims_must_be_positive_ints(self, argument, bad):
        dims = {"input_dim": 5, "output_dim": 3, argument: bad}
        with pytest.raises(ValueError, match=f"`{argument}` must be a positive integer.*{bad!r}"):
            jaxembed.init(KEY, **dims)

    def test_numpy_int_dims_accepted(self):
        chex.assert_shape(jaxembed.init(KEY, np.int64(5), np.int32(3))["embeddings"], (5, 3))

    @pytest.mark.parametrize(
        ("weights", "match"),
        [
            (np.ones((4, 3)), r"shape \(input_dim, output_dim\) = \(5, 3\).*\(4, 3\)"),
            (np.ones((3, 5)), r"\(5, 3\).*\(3, 5\)"),
            (np.ones(15), r"2-D.*1-D"),
            (np.ones((5, 3, 1)), r"2-D.*3-D"),
            (np.full((5, 3), np.nan), "finite.*15 NaN"),
            (np.where(np.eye(5, 3) > 0, np.inf, 0.0), "finite.*3 NaN or infinite"),
            (np.array([["a"] * 3] * 5), "real numbers"),
            (np.ones((5, 3), bool), "real numbers"),
            ([[1, 2], [3]], "not array-like"),
        ],
    )
    def test_bad_weights(self, weights, match):
        with pytest.raises(ValueError, match=match):
            jaxembed.init(KEY, 5, 3, weights=weights)

    def test_unknown_initializer_lists_names(self):
        with pytest.raises(
            ValueError,
            match=r"Unknown `embeddings_initializer`: 'unifrom'.*"
            r"glorot_uniform",
        ):
            jaxembed.init(KEY, 5, 3, embeddings_initializer="unifrom")

    def test_non_callable_initializer(self):
        match = r"`embeddings_initializer` must be one of .*=3 \(of type int\)"
        with pytest.raises(ValueError, match=match):
            jaxembed.init(KEY, 5, 3, embeddings_initializer=3)

    def test_key_required_without_weights(self):
        with pytest.raises(ValueError, match="`key` must be a JAX PRNG key"):
            jaxembed.init(None, 5, 3)

    @pytest.mark.parametrize("dtype", [jnp.int32, "bool", "not-a-dtype"])
    def test_param_dtype_must_be_floating(self, dtype):
        with pytest.raises(ValueError, match="`param_dtype` must be a floating-point dtype"):
            jaxembed.init(KEY, 5, 3, param_dtype=dtype)


class TestApply:
    @pytest.mark.parametrize("shape", [(), (4,), (2, 3), (2, 3, 4), (1, 1, 1, 2)])
    @pytest.mark.parametrize("ids_dtype", [np.int32, np.int64, np.uint8, np.int16, np.uint32])
    def test_any_rank_and_int_dtype(self, shape, ids_dtype):
        params, table = small_params()
        ids = np.random.default_rng(0).integers(0, 7, size=shape).astype(ids_dtype)
        out = jaxembed.apply(params, ids)
        chex.assert_shape(out, (*shape, 3))
        np.testing.assert_array_equal(out, table[ids])

    def test_python_scalar_and_list_ids(self):
        params, table = small_params()
        np.testing.assert_array_equal(jaxembed.apply(params, 2), table[2])
        np.testing.assert_array_equal(jaxembed.apply(params, [[1, 2]]), table[[[1, 2]]])

    def test_jit_and_no_jit_agree(self, variant):
        params, table = small_params()
        apply = variant(functools.partial(jaxembed.apply, out_of_range="clip"))
        ids = jnp.array([[0, 6], [3, 3]])
        np.testing.assert_array_equal(apply(params, ids), table[np.asarray(ids)])

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
    def test_output_dtype(self, dtype):
        params, table = small_params()
        out = jaxembed.apply(params, jnp.array([1, 2]), dtype=dtype)
        chex.assert_type(out, dtype)
        np.testing.assert_allclose(np.asarray(out, np.float32), table[[1, 2]], rtol=1e-2)

    def test_bf16_params_f32_output(self):
        params = jaxembed.init(KEY, 10, 4, param_dtype=jnp.bfloat16)
        chex.assert_type(jaxembed.apply(params, jnp.array([1]), dtype=jnp.float32), jnp.float32)

    def test_grad_flows_to_looked_up_rows_only(self):
        params, _ = small_params()
        ids = jnp.array([1, 1, 4])
        grads = jax.grad(lambda p: jaxembed.apply(p, ids, out_of_range="clip").sum())(params)
        expected = np.zeros((7, 3), np.float32)
        expected[1], expected[4] = 2.0, 1.0
        np.testing.assert_array_equal(grads["embeddings"], expected)

    @given(ids=id_arrays(0, 6))
    @settings(max_examples=30, deadline=None)
    def test_property_equals_numpy_indexing(self, ids):
        params, table = small_params()
        for policy in ("error", "fill", "clip"):
            np.testing.assert_array_equal(
                jaxembed.apply(params, ids, out_of_range=policy), table[ids]
            )


class TestOutOfRange:
    @pytest.mark.parametrize("bad_id", [-1, -7, 7, 100])
    def test_error_is_default_and_names_the_id(self, bad_id):
        params, _ = small_params()
        with pytest.raises(IndexError, match=rf"\[0, 7\); got id {bad_id}\b"):
            jaxembed.apply(params, jnp.array([0, bad_id, 1]))

    def test_fill_gives_nan_rows_for_negative_and_large_ids(self):
        params, table = small_params()
        out = jaxembed.apply(params, jnp.array([-1, 3, 7]), out_of_range="fill")
        assert np.isnan(out[0]).all() and np.isnan(out[2]).all()
        np.testing.assert_array_equal(out[1], table[3])

    def test_minus_one_never_returns_the_last_row(self):
        params, table = small_params()
        for policy in ("fill", "clip"):
            out = jaxembed.apply(params, jnp.array([-1]), out_of_range=policy)
            assert not np.array_equal(out[0], table[-1])

    def test_clip_clamps_both_ends(self):
        params, table = small_params()
        out = jaxembed.apply(params, jnp.array([-5, 9]), out_of_range="clip")
        np.testing.assert_array_equal(out, table[[0, 6]])

    def test_error_under_jit_through_checkify(self):
        params, table = small_params()
        checked = jax.jit(checkify.checkify(jaxembed.apply))
        error, _ = checked(params, jnp.array([[2, 9]]))
        with pytest.raises(checkify.JaxRuntimeError, match=r"\[0, 7\); got id 9"):
            error.throw()
        error, out = checked(params, jnp.array([[2, 6]]))
        error.throw()
        np.testing.assert_array_equal(out, table[[[2, 6]]])

    def test_error_under_plain_jit_compiles_and_gives_nan_rows(self):
        params, table = small_params()
        out = jax.jit(jaxembed.apply)(params, jnp.array([1, 7, -1]))
        np.testing.assert_array_equal(out[0], table[1])
        assert np.isnan(out[1:]).all()

    def test_check_in_range_public(self):
        jaxembed.check_in_range(np.array([[0, 6]]), 7)
        with pytest.raises(IndexError, match=r"\[0, 7\); got id 7"):
            jaxembed.check_in_range([1, 7], 7)
        with pytest.raises(TypeError, match="`ids` must hold integers"):
            jaxembed.check_in_range([1.5], 7)
        with pytest.raises(ValueError, match="`input_dim` must be a positive integer"):
            jaxembed.check_in_range([1], 0)

    def test_unknown_policy(self):
        params, _ = small_params()
        with pytest.raises(
            ValueError,
            match=r"`out_of_range` must be one of \['error', 'fill',"
            r" 'clip'\]. Received: out_of_range='wrap'",
        ):
            jaxembed.apply(params, jnp.array([1]), out_of_range="wrap")


class TestApplyErrors:
    @pytest.mark.parametrize(
        "ids", [jnp.array([1.7]), np.array([1.0]), [0.5], 1.5, jnp.array([True])]
    )
    def test_non_integer_ids_refused(self, ids):
        params, _ = small_params()
        with pytest.raises(TypeError, match="`ids` must hold integers.*Received: ids of dtype"):
            jaxembed.apply(params, ids)

    def test_params_without_table(self):
        with pytest.raises(ValueError, match="under 'embeddings'.*\\['table'\\]"):
            jaxembed.apply({"table": jnp.ones((3, 2))}, jnp.array([1]))

    def test_output_dtype_must_be_floating(self):
        params, _ = small_params()
        with pytest.raises(ValueError, match="`dtype` must be a floating-point dtype"):
            jaxembed.apply(params, jnp.array([1]), dtype=jnp.int32)


class TestComputeMask:
    def test_mask_zero(self):
        mask = jaxembed.compute_mask(jnp.array([[0, 3], [2, 0]]), mask_zero=True)
        np.testing.assert_array_equal(mask, [[False, True], [True, False]])
        chex.assert_type(mask, jnp.bool_)

    def test_none_when_off(self):
        assert jaxembed.compute_mask(jnp.array([0, 1]), mask_zero=False) is None

    def test_mask_under_jit(self):
        mask = jax.jit(functools.partial(jaxembed.compute_mask, mask_zero=True))(jnp.array([0, 1]))
        np.testing.assert_array_equal(mask, [False, True])

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="`mask_zero` must be one of"):
            jaxembed.compute_mask(jnp.array([0]), mask_zero="yes")
        with pytest.raises(TypeError, match="`ids` must hold integers"):
            jaxembed.compute_mask(jnp.array([0.0]), mask_zero=True)


class TestAttend:
    def test_tied_logits(self, variant):
        params, table = small_params()
        query = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
        logits = variant(jaxembed.attend)(params, query)
        chex.assert_shape(logits, (2, 5, 7))
        np.testing.assert_allclose(logits, query @ table.T, rtol=1e-5)

    def test_dtype(self):
        params, _ = small_params()
        chex.assert_type(jaxembed.attend(params, jnp.ones(3), dtype=jnp.bfloat16), jnp.bfloat16)
        chex.assert_type(jaxembed.attend(params, jnp.ones(3, jnp.bfloat16)), jnp.float32)

    def test_matches_flax_embed_attend(self):
        import flax.linen as nn

        params, table = small_params()
        query = jnp.ones((4, 3))
        flax_logits = nn.Embed(7, 3).apply({"params": {"embedding": table}}, query, method="attend")
        np.testing.assert_allclose(jaxembed.attend(params, query), flax_logits, rtol=1e-6)

    def test_bad_query(self):
        params, _ = small_params()
        with pytest.raises(ValueError, match=r"last dimension output_dim=3.*\(2, 4\)"):
            jaxembed.attend(params, jnp.ones((2, 4)))
        with pytest.raises(TypeError, match="`query` must be a floating-point array"):
            jaxembed.attend(params, jnp.ones((2, 3), jnp.int32))
