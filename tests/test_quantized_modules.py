"""Quantized tables in the Flax modules: `quantization=` on linen and NNX, linen's "quantized"
collection and `quantize_variables`, NNX's `Quantized` variables and `layer.quantize`, QLoRA
training through the usual train steps, and conversions between the two."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxembed
import jaxembed.nnx
from jaxembed import _table

V, D, RANK = 50, 16, 2
IDS = jnp.array([[1, 2, 3], [49, 0, 7]])
WEIGHTS = np.random.default_rng(0).normal(size=(V, D)).astype(np.float32)
FORMATS = {"int8": ("int8", None), "int4": ("int4", None), "int4/8": ("int4", 8)}
formats = pytest.mark.parametrize("quantization", list(FORMATS))


def expected_params(quantization):
    mode, block = FORMATS[quantization]
    return jaxembed.quantize({"embeddings": jnp.asarray(WEIGHTS)}, mode, block_size=block)


class TestLinen:
    @formats
    def test_weights_are_quantized_into_their_own_collection(self, quantization):
        module = jaxembed.Embedding(V, D, weights=WEIGHTS, quantization=quantization)
        variables = module.init(jax.random.key(0), IDS)
        expected = expected_params(quantization)
        assert set(variables) == {"quantized"}
        chex.assert_trees_all_equal(nn.unbox(variables["quantized"]), expected)
        chex.assert_trees_all_equal(module.apply(variables, IDS), jaxembed.apply(expected, IDS))
        query = jnp.ones((2, D))
        chex.assert_trees_all_close(
            module.apply(variables, query, method="attend"), jaxembed.attend(expected, query)
        )

    def test_logical_axes(self):
        module = jaxembed.Embedding(V, D, quantization="int4/8", lora_rank=RANK)
        variables = module.init(jax.random.key(0), IDS)
        specs = nn.get_partition_spec(variables)
        assert specs["quantized"]["embeddings_int4"] == jax.sharding.PartitionSpec("vocab", "embed")
        assert specs["quantized"]["embeddings_scale"] == jax.sharding.PartitionSpec("vocab", None)
        assert specs["quantized"]["embeddings_zero"] == jax.sharding.PartitionSpec("vocab", None)
        per_row = jaxembed.Embedding(V, D, quantization="int8").init(jax.random.key(0), IDS)
        spec = nn.get_partition_spec(per_row)["quantized"]["embeddings_scale"]
        assert spec == jax.sharding.PartitionSpec("vocab")

    def test_qlora_train_step_updates_the_adapter_only(self):
        module = jaxembed.Embedding(V, D, weights=WEIGHTS, quantization="int4", lora_rank=RANK)
        variables = module.init(jax.random.key(0), IDS)
        quantized, params = variables["quantized"], variables["params"]
        tx = optax.adam(1e-2)
        state = tx.init(params)
        target = jnp.ones((*IDS.shape, D))

        @jax.jit
        def step(params, state):
            def loss(params):
                out = module.apply({"params": params, "quantized": quantized}, IDS)
                return jnp.mean((out - target) ** 2)

            value, grads = jax.value_and_grad(loss)(params)
            updates, state = tx.update(grads, state)
            return optax.apply_updates(params, updates), state, value

        losses = []
        for _ in range(20):
            params, state, value = step(params, state)
            losses.append(float(value))
        assert losses[-1] < losses[0]
        assert set(nn.unbox(params)) == set(_table.LORA_KEYS)

    @formats
    def test_quantize_variables_of_a_float_model(self, quantization):
        mode, block = FORMATS[quantization]

        class Model(nn.Module):
            @nn.compact
            def __call__(self, ids):
                rows = jaxembed.Embedding(V, D, weights=WEIGHTS, name="tokens")(ids)
                return nn.Dense(3, name="head")(rows)

        model = Model()
        variables = model.init(jax.random.key(0), IDS)
        quantized = jaxembed.linen.quantize_variables(variables, mode, block_size=block)
        assert "tokens" not in quantized["params"] or not quantized["params"]["tokens"]
        assert set(quantized["params"]["head"]) == {"kernel", "bias"}
        stored = nn.unbox(quantized["quantized"]["tokens"])
        chex.assert_trees_all_equal(stored, expected_params(quantization))
        assert isinstance(quantized["quantized"]["tokens"]["embeddings_scale"], nn.Partitioned)

        class QuantizedModel(nn.Module):
            @nn.compact
            def __call__(self, ids):
                table = jaxembed.Embedding(V, D, quantization=quantization, name="tokens")
                return nn.Dense(3, name="head")(table(ids))

        out = QuantizedModel().apply(quantized, IDS)
        float_out = model.apply(variables, IDS)
        chex.assert_trees_all_close(out, float_out, atol=0.2)  # quantization error only
        assert not np.array_equal(out, float_out)
        # the input is not modified
        assert "quantized" not in variables and "tokens" in variables["params"]

    def test_quantize_variables_without_a_table(self):
        with pytest.raises(ValueError, match="hold no jaxembed table"):
            jaxembed.linen.quantize_variables({"params": {"kernel": jnp.ones(3)}}, "int8")


class TestNNX:
    @formats
    def test_quantized_variables_and_outputs(self, quantization):
        layer = jaxembed.nnx.Embedding(
            V, D, weights=WEIGHTS, quantization=quantization, rngs=nnx.Rngs(0)
        )
        expected = expected_params(quantization)
        assert layer.quantization == quantization
        for key in expected:
            assert isinstance(getattr(layer, key), jaxembed.nnx.Quantized)
        assert not hasattr(layer, "embeddings")
        assert len(nnx.state(layer, nnx.Param)) == 0
        chex.assert_trees_all_equal(layer.params(), expected)
        chex.assert_trees_all_equal(layer(IDS), jaxembed.apply(expected, IDS))

    def test_quantize_in_place_like_keras(self):
        layer = jaxembed.nnx.Embedding(V, D, weights=WEIGHTS, rngs=nnx.Rngs(0))
        assert layer.quantization is None
        layer.quantize("int4", block_size=8)
        assert layer.quantization == "int4/8"
        chex.assert_trees_all_equal(layer.params(), expected_params("int4/8"))
        with pytest.raises(ValueError, match="already quantized"):
            layer.quantize("int8")

    def test_qlora_with_nnx_optimizer_and_merge(self):
        layer = jaxembed.nnx.Embedding(
            V, D, weights=WEIGHTS, quantization="int4", lora_rank=RANK, rngs=nnx.Rngs(0)
        )
        stored = {k: v for k, v in layer.params().items() if k not in _table.LORA_KEYS}
        optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
        target = jnp.ones((*IDS.shape, D))

        @nnx.jit
        def step(layer, optimizer):
            def loss(layer):
                return jnp.mean((layer(IDS) - target) ** 2)

            value, grads = nnx.value_and_grad(loss)(layer)
            optimizer.update(layer, grads)
            return value

        losses = [float(step(layer, optimizer)) for _ in range(20)]
        assert losses[-1] < losses[0]
        after = {k: v for k, v in layer.params().items() if k not in _table.LORA_KEYS}
        chex.assert_trees_all_equal(after, stored)  # bit-identical
        assert jaxembed.nnx.trainable(layer)  # a filter; the quantized arrays are not in it
        trainable = nnx.state(layer, jaxembed.nnx.trainable(layer))
        assert set(trainable.keys()) == set(_table.LORA_KEYS)

        before = layer(IDS)
        layer.merge_lora()
        assert layer.lora_rank is None and layer.quantization == "int4"
        # requantized: within half a step (of the merged table's scales) of the float merge
        half_step = 0.5 / layer.params()["embeddings_scale"][IDS][..., None]
        assert (jnp.abs(layer(IDS) - before) <= half_step * (1 + 1e-5)).all()

    def test_merge_lora_without_requantizing_gives_a_float_layer(self):
        layer = jaxembed.nnx.Embedding(
            V, D, weights=WEIGHTS, quantization="int8", lora_rank=RANK, rngs=nnx.Rngs(0)
        )
        before = layer(IDS)
        layer.merge_lora(requantize=False)
        assert layer.quantization is None
        assert isinstance(layer.embeddings, nnx.Param)
        chex.assert_trees_all_close(layer(IDS), before, rtol=1e-6, atol=1e-7)

    @formats
    def test_to_linen_and_back_carry_the_stored_arrays(self, quantization):
        layer = jaxembed.nnx.Embedding(
            V, D, weights=WEIGHTS, quantization=quantization, lora_rank=RANK, rngs=nnx.Rngs(0)
        )
        module, variables = layer.to_linen()
        assert module.quantization == quantization
        assert set(variables) == {"params", "quantized"}
        chex.assert_trees_all_equal(module.apply(variables, IDS), layer(IDS))
        back = jaxembed.nnx.Embedding.from_linen(module, variables)
        chex.assert_trees_all_equal(back.params(), layer.params())
        assert back.quantization == quantization and back.lora_rank == RANK


class TestArguments:
    @pytest.mark.parametrize("bad", ["int2", "int4/", "int4/abc", "int4/-8", "INT8", 8, True])
    def test_unknown_quantization_is_refused(self, bad):
        with pytest.raises(ValueError, match="quantization"):
            jaxembed.Embedding(V, D, quantization=bad)
        with pytest.raises(ValueError, match="quantization"):
            jaxembed.nnx.Embedding(V, D, quantization=bad, rngs=nnx.Rngs(0))

    def test_block_size_must_divide_output_dim(self):
        with pytest.raises(ValueError, match="block_size"):
            jaxembed.Embedding(V, D, quantization="int4/6")

    def test_int4_with_odd_output_dim(self):
        with pytest.raises(ValueError, match="output_dim=15"):
            jaxembed.Embedding(V, 15, quantization="int4")
        jaxembed.Embedding(V, 15, quantization="int8").init(jax.random.key(0), IDS)

    def test_constraint_with_quantization_is_refused(self):
        with pytest.raises(ValueError, match="frozen"):
            jaxembed.Embedding(V, D, quantization="int8", embeddings_constraint="max_norm")
        layer = jaxembed.nnx.Embedding(V, D, embeddings_constraint="max_norm", rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="frozen"):
            layer.quantize("int8")
