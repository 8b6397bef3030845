"""Two options the weights of other libraries need: rank-stabilized LoRA (`use_rslora`, PEFT's
`lora_alpha / sqrt(r)`) and torch's `padding_idx` (a zeroed row that gets no gradient)."""

import functools
import math

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

V, D, RANK, ALPHA = 12, 6, 4, 8.0
IDS = jnp.array([[3, 1, 3], [0, 11, 3]])
QUERY = jax.random.normal(jax.random.key(3), (2, D))


@functools.cache
def lora_params():
    params = jaxembed.init(jax.random.key(0), V, D)
    return jaxembed.enable_lora(params, jax.random.key(1), RANK, b_initializer="normal")


def dense_table(params, scale):
    return params["embeddings"] + scale * params["lora_embeddings_a"] @ params["lora_embeddings_b"]


class TestRsLoRA:
    @pytest.mark.parametrize("use_rslora", [False, True])
    def test_every_function_scales_by_alpha_over_sqrt_rank(self, variant, use_rslora):
        params = lora_params()
        scale = ALPHA / (math.sqrt(RANK) if use_rslora else RANK)
        assert jaxembed.lora.scale(RANK, ALPHA, use_rslora) == scale
        table = dense_table(params, scale)
        options = {"lora_alpha": ALPHA, "use_rslora": use_rslora}
        apply = variant(functools.partial(jaxembed.apply, **options))
        attend = variant(functools.partial(jaxembed.attend, **options))
        chex.assert_trees_all_close(apply(params, IDS), table[IDS], rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(attend(params, QUERY), QUERY @ table.T, rtol=1e-5, atol=1e-6)
        merged = jaxembed.merge_lora(params, **options)
        chex.assert_trees_all_close(merged["embeddings"], table, rtol=1e-5, atol=1e-6)
        adapter = {k: v for k, v in params.items() if k.startswith("lora")}
        restored = jaxembed.lora.unmerge_lora(merged, adapter, **options)
        chex.assert_trees_all_close(restored, params, rtol=1e-5, atol=1e-6)
        labels = jnp.array([1, 7])
        fused = jaxembed.attend_cross_entropy(params, QUERY, labels, **options)
        expected = optax.softmax_cross_entropy_with_integer_labels(QUERY @ table.T, labels)
        np.testing.assert_allclose(fused, expected.mean(), rtol=1e-5)

    def test_modules(self):
        ids = IDS
        module = jaxembed.Embedding(V, D, lora_rank=RANK, lora_alpha=ALPHA, use_rslora=True)
        variables = module.init(jax.random.key(0), ids)
        params = {**nn.unbox(variables)["params"], "lora_embeddings_b": jnp.ones((RANK, D))}
        out = module.apply({"params": params}, ids)
        table = dense_table(params, ALPHA / math.sqrt(RANK))
        chex.assert_trees_all_close(out, table[ids], rtol=1e-5, atol=1e-6)

        layer = jaxembed.nnx.Embedding(
            V, D, lora_rank=RANK, lora_alpha=ALPHA, use_rslora=True, rngs=nnx.Rngs(0)
        )
        layer.lora_embeddings_b[...] = jnp.ones((RANK, D))
        expected = dense_table(layer.params(), ALPHA / math.sqrt(RANK))
        chex.assert_trees_all_close(layer(ids), expected[ids], rtol=1e-5, atol=1e-6)
        layer.merge_lora()
        chex.assert_trees_all_close(layer(ids), expected[ids], rtol=1e-5, atol=1e-6)
        assert layer.to_linen()[0].use_rslora

    @pytest.mark.parametrize("bad", [1, "yes", None])
    def test_not_a_bool(self, bad):
        with pytest.raises(ValueError, match="use_rslora"):
            jaxembed.apply(lora_params(), IDS, use_rslora=bad)
        with pytest.raises(ValueError, match="use_rslora"):
            jaxembed.Embedding(V, D, use_rslora=bad)


class TestPaddingIdx:
    @pytest.mark.parametrize("padding_idx, row", [(3, 3), (-1, V - 1), (0, 0)])
    def test_drawn_tables_zero_the_row_weights_keep_it(self, padding_idx, row):
        params = jaxembed.init(
            jax.random.key(0), V, D, embeddings_initializer="normal", padding_idx=padding_idx
        )
        np.testing.assert_array_equal(params["embeddings"][row], 0.0)
        assert (np.abs(np.delete(np.asarray(params["embeddings"]), row, 0)) > 0).all()
        weights = np.ones((V, D), np.float32)
        given = jaxembed.init(None, V, D, weights=weights, padding_idx=padding_idx)
        np.testing.assert_array_equal(given["embeddings"], weights)

    def test_lookup_reads_the_row_and_its_gradient_is_exactly_zero(self):
        params = jaxembed.init(None, V, D, weights=np.arange(V * D, dtype=np.float32).reshape(V, D))
        params = jaxembed.enable_lora(params, jax.random.key(1), RANK, b_initializer="normal")
        chex.assert_trees_all_equal(
            jaxembed.apply(params, IDS, padding_idx=3), jaxembed.apply(params, IDS)
        )
        tx = optax.sgd(0.1)  # the whole params, table included, to see its gradient

        def loss(params):
            return jnp.sum(jaxembed.apply(params, IDS, padding_idx=3) ** 2)

        @jax.jit
        def step(params, state):
            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state)
            return optax.apply_updates(params, updates), state, grads

        new, _, grads = step(params, tx.init(params))
        np.testing.assert_array_equal(grads["embeddings"][3], 0.0)
        np.testing.assert_array_equal(grads["lora_embeddings_a"][3], 0.0)
        assert (np.abs(grads["embeddings"][jnp.array([0, 1, 11])]) > 0).all()
        np.testing.assert_array_equal(new["embeddings"][3], params["embeddings"][3])
        assert not np.array_equal(new["embeddings"][1], params["embeddings"][1])

    def test_forward_compiles_to_the_same_program(self):
        """The padding row costs nothing in the lookup: the forward's select of a value with
        itself folds away (the gradient gains one select on the cotangent)."""
        params = jaxembed.init(jax.random.key(0), V, D)

        def ops(padding_idx):
            lowered = jax.jit(functools.partial(jaxembed.apply, padding_idx=padding_idx))
            text = lowered.lower(params, IDS).compile().as_text()
            return sorted(
                line.split("=")[1].split("(")[0].strip().split()[-1]
                for line in text.splitlines()
                if " = " in line and "(" in line
            )

        assert ops(3) == ops(None)

    def test_modules(self):
        module = jaxembed.Embedding(V, D, padding_idx=3, embeddings_initializer="normal")
        variables = module.init(jax.random.key(0), IDS)
        np.testing.assert_array_equal(nn.unbox(variables)["params"]["embeddings"][3], 0.0)
        grads = jax.grad(lambda v: jnp.sum(module.apply(v, IDS) ** 2 + module.apply(v, IDS)))(
            variables
        )
        np.testing.assert_array_equal(nn.unbox(grads)["params"]["embeddings"][3], 0.0)

        layer = jaxembed.nnx.Embedding(V, D, padding_idx=3, rngs=nnx.Rngs(0))
        np.testing.assert_array_equal(layer.embeddings[...][3], 0.0)
        grads = nnx.grad(lambda m: jnp.sum(m(IDS) + 1.0))(layer)
        np.testing.assert_array_equal(grads["embeddings"][...][3], 0.0)
        assert (np.asarray(grads["embeddings"][...][1]) != 0).all()
        assert layer.to_linen()[0].padding_idx == 3

    @pytest.mark.parametrize("bad", [V, -V - 1, 2.0, True, "0"])
    def test_bad_padding_idx(self, bad):
        with pytest.raises(ValueError, match="padding_idx"):
            jaxembed.init(jax.random.key(0), V, D, padding_idx=bad)
        with pytest.raises(ValueError, match="padding_idx"):
            jaxembed.apply(lora_params(), IDS, padding_idx=bad)
        with pytest.raises(ValueError, match="padding_idx"):
            jaxembed.Embedding(V, D, padding_idx=bad)


class TestPaddingIdxRowSparse:
    """Row-sparse training (`jaxembed.sparse`) leaves the padding row alone too: its ids are
    recorded out of range, and the row-wise update drops them."""

    IDS = np.array([[0, 3, 0, 5], [2, 0, 7, 7]], np.int32)  # 0 is the padding id

    def test_linen(self):
        module = jaxembed.Embedding(V, D, padding_idx=0, embeddings_initializer="normal")
        params = nn.unbox(module.init(jax.random.key(0), self.IDS))["params"]
        tables, rest = jaxembed.sparse.split_tables(params)

        def loss(params, ids):  # `+ rows`: a nonzero gradient even at the zeroed padding row
            rows = module.apply({"params": params}, ids)
            return jnp.sum(rows**2 + rows)

        _, _, rows = jaxembed.sparse.linen_value_and_grad(loss)(tables, rest, self.IDS)
        optimizer = jaxembed.sparse.sgd(0.5)
        states = jaxembed.sparse.init_tables(optimizer, tables)
        new, _ = jaxembed.sparse.update_tables(optimizer, tables, states, rows)
        dense = jax.grad(loss)(params, self.IDS)["embeddings"]
        np.testing.assert_array_equal(dense[0], 0.0)
        expected = params["embeddings"] - 0.5 * dense
        chex.assert_trees_all_close(new["embeddings"], expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(new["embeddings"][0], params["embeddings"][0])

    def test_nnx(self):
        layer = jaxembed.nnx.Embedding(V, D, padding_idx=0, rngs=nnx.Rngs(0))
        before = layer.embeddings[...]

        def loss(layer, ids):
            rows = layer(ids)
            return jnp.sum(rows**2 + rows)

        optimizer = jaxembed.sparse.sgd(0.5)
        states = jaxembed.sparse.nnx_init_tables(optimizer, layer)
        _, _, rows = jaxembed.sparse.nnx_value_and_grad(loss)(layer, self.IDS)
        jaxembed.sparse.nnx_update_tables(optimizer, layer, states, rows)
        np.testing.assert_array_equal(layer.embeddings[...][0], before[0])
        assert not np.array_equal(layer.embeddings[...][5], before[5])
