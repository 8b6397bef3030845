"""`jaxembed.resize`: growing and shrinking the vocabulary, for every table kind, LoRA and the
modules; old rows (and a tied model's old logits) unchanged."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxembed
import jaxembed.nnx

V, D, RANK = 20, 8, 2
OLD = jnp.arange(V)


def table(dtype=jnp.float32):
    return jaxembed.init(
        jax.random.key(0), V, D, embeddings_initializer="normal", param_dtype=dtype
    )


class TestGrow:
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_mean_rows_and_old_rows_kept(self, variant, dtype):
        params = table(dtype)
        grown = variant(functools.partial(jaxembed.resize, new_input_dim=V + 3))(params)
        chex.assert_shape(grown["embeddings"], (V + 3, D))
        chex.assert_type(grown["embeddings"], dtype)
        chex.assert_trees_all_equal(grown["embeddings"][:V], params["embeddings"])
        mean = params["embeddings"].astype(jnp.float32).mean(axis=0).astype(dtype)
        chex.assert_trees_all_equal(grown["embeddings"][V:], jnp.broadcast_to(mean, (3, D)))

    def test_covariance_noise_and_initializers(self):
        params = table()
        grown = jaxembed.resize(params, V + 4, key=jax.random.key(1), init="covariance")
        new = np.asarray(grown["embeddings"][V:])
        mean = np.asarray(params["embeddings"]).mean(axis=0)
        assert np.isfinite(new).all()
        assert np.abs(new - mean).max() < 0.05  # 1e-5 x a covariance of order 1
        assert not np.allclose(new[0], new[1])  # drawn, not copied
        zeros = jaxembed.resize(params, V + 2, key=jax.random.key(1), init="zeros")
        np.testing.assert_array_equal(zeros["embeddings"][V:], 0.0)
        with pytest.raises(ValueError, match="`key` must be a JAX PRNG key"):
            jaxembed.resize(params, V + 2, init="covariance")

    def test_pad_to_multiple_of(self):
        assert jaxembed.resize(table(), 21, pad_to_multiple_of=8)["embeddings"].shape[0] == 24
        assert jaxembed.resize(table(), 24, pad_to_multiple_of=8)["embeddings"].shape[0] == 24

    @pytest.mark.parametrize("mode, block_size", [("int8", None), ("int4", None), ("int4", 4)])
    def test_quantized_tables_grow_in_their_format(self, mode, block_size):
        float_params = table()
        params = jaxembed.quantize(float_params, mode, block_size=block_size)
        grown = jaxembed.resize(params, V + 3)
        assert set(grown) == set(params)
        for name, array in params.items():
            chex.assert_trees_all_equal(grown[name][:V], array)
            assert grown[name].shape[0] == V + 3
        new = jaxembed.apply(grown, jnp.arange(V, V + 3))
        mean = jaxembed.dequantize(params)["embeddings"].mean(axis=0)
        bound = np.abs(np.asarray(mean)).max() / (7 if mode == "int4" else 127)
        assert np.abs(np.asarray(new) - np.asarray(mean)).max() <= bound

    def test_lora_and_tied_logits_of_old_tokens_unchanged(self):
        params = jaxembed.enable_lora(table(), jax.random.key(1), RANK, b_initializer="normal")
        grown = jaxembed.resize(params, V + 5)
        np.testing.assert_array_equal(grown["lora_embeddings_a"][V:], 0.0)
        chex.assert_trees_all_equal(grown["lora_embeddings_b"], params["lora_embeddings_b"])
        chex.assert_trees_all_equal(jaxembed.apply(grown, OLD), jaxembed.apply(params, OLD))
        query = jax.random.normal(jax.random.key(2), (3, D))
        chex.assert_trees_all_close(
            jaxembed.attend(grown, query)[:, :V], jaxembed.attend(params, query), atol=1e-6
        )  # the same rows; a wider matmul may round differently
        # a new token's row is the mean row (its adapter delta is zero)
        mean = params["embeddings"].mean(axis=0)
        chex.assert_trees_all_close(jaxembed.apply(grown, V + 1), mean, rtol=1e-6)


class TestShrink:
    def test_refused_unless_told(self):
        with pytest.raises(ValueError, match="shrink=True"):
            jaxembed.resize(table(), V - 2)
        params = jaxembed.enable_lora(table(), jax.random.key(1), RANK)
        small = jaxembed.resize(params, V - 2, shrink=True)
        chex.assert_trees_all_equal(small["embeddings"], params["embeddings"][: V - 2])
        chex.assert_trees_all_equal(small["lora_embeddings_a"], params["lora_embeddings_a"][:-2])
        chex.assert_trees_all_equal(jaxembed.resize(params, V), params)


class TestModules:
    def test_nnx_resizes_in_place(self):
        layer = jaxembed.nnx.Embedding(V, D, lora_rank=RANK, rngs=nnx.Rngs(0))
        before = layer(OLD)
        layer.resize(V + 3, pad_to_multiple_of=8)
        assert layer.input_dim == 24 and layer.embeddings.shape == (24, D)
        assert layer.lora_embeddings_a.shape == (24, RANK)
        chex.assert_trees_all_equal(layer(OLD), before)
        layer(jnp.array([23]))  # the new ids are in range

    def test_linen_variables(self):
        module = jaxembed.Embedding(V, D, quantization="int8", lora_rank=RANK)
        variables = module.init(jax.random.key(0), OLD)
        grown = jaxembed.linen.resize_variables(variables, V + 4)
        bigger = module.clone(input_dim=V + 4)
        chex.assert_trees_all_equal(bigger.apply(grown, OLD), module.apply(variables, OLD))
        specs = nn.get_partition_spec(grown)
        assert specs["quantized"]["embeddings_scale"] == jax.sharding.PartitionSpec("vocab")
        assert nn.unbox(grown)["params"]["lora_embeddings_a"].shape == (V + 4, RANK)


class TestBadInput:
    @pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10", None])
    def test_bad_size(self, bad):
        with pytest.raises(ValueError, match="new_input_dim"):
            jaxembed.resize(table(), bad)

    def test_bad_options(self):
        with pytest.raises(ValueError, match="pad_to_multiple_of"):
            jaxembed.resize(table(), V + 1, pad_to_multiple_of=0)
        with pytest.raises(ValueError, match="shrink"):
            jaxembed.resize(table(), V - 1, shrink=1)
        with pytest.raises(ValueError, match="no_such_initializer"):
            jaxembed.resize(table(), V + 1, init="no_such_initializer")
