"""The flax.linen module: a thin wrapper whose every output equals the pure functions'."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxembed

KEY = jax.random.key(0)
IDS = jnp.array([[1, 2, 0], [4, 0, 0]])


def make(**kwargs):
    kwargs.setdefault("out_of_range", "clip")
    layer = jaxembed.Embedding(5, 3, **kwargs)
    return layer, layer.init(KEY, IDS)


def test_seed_example_shapes():
    layer = jaxembed.Embedding(1000, 64)
    ids = np.random.default_rng(0).integers(1000, size=(32, 10))
    variables = layer.init(KEY, ids)
    chex.assert_shape(layer.apply(variables, ids), (32, 10, 64))


def test_param_layout_and_partitioning():
    _, variables = make()
    boxed = variables["params"]["embeddings"]
    assert isinstance(boxed, nn.LogicallyPartitioned)
    assert boxed.names == ("vocab", "embed")
    chex.assert_shape(boxed.value, (5, 3))
    assert nn.get_partition_spec(variables)["params"]["embeddings"] == jax.sharding.PartitionSpec(
        "vocab", "embed"
    )


def test_same_as_functional(variant):
    layer, variables = make()
    params = nn.unbox(variables)["params"]
    out = variant(layer.apply)(variables, IDS)
    np.testing.assert_array_equal(out, jaxembed.apply(params, IDS))
    np.testing.assert_array_equal(jaxembed.init(KEY, 5, 3)["embeddings"].shape, (5, 3))


def test_weights_and_initializer():
    weights = np.arange(15.0).reshape(5, 3)
    layer, variables = make(weights=weights)
    np.testing.assert_array_equal(layer.apply(variables, jnp.array([2])), weights[[2]])
    np.testing.assert_array_equal(weights, np.arange(15.0).reshape(5, 3))  # not mutated
    _, variables = make(embeddings_initializer="ones")
    np.testing.assert_array_equal(nn.unbox(variables)["params"]["embeddings"], np.ones((5, 3)))


def test_dtype_and_param_dtype():
    layer, variables = make(dtype=jnp.bfloat16)
    chex.assert_type(layer.apply(variables, IDS), jnp.bfloat16)
    chex.assert_type(nn.unbox(variables)["params"]["embeddings"], jnp.float32)
    layer, variables = make(param_dtype=jnp.bfloat16)
    chex.assert_type(nn.unbox(variables)["params"]["embeddings"], jnp.bfloat16)
    chex.assert_type(layer.apply(variables, IDS), jnp.bfloat16)


def test_grad_through_module_under_jit():
    layer, variables = make()

    @jax.jit
    def loss(params):
        return jnp.sum(layer.apply({"params": params}, IDS) ** 2)

    grads = nn.unbox(jax.grad(loss)(variables["params"]))
    table = nn.unbox(variables)["params"]["embeddings"]
    counts = np.bincount(np.asarray(IDS).ravel(), minlength=5)[:, None]
    np.testing.assert_allclose(grads["embeddings"], 2 * counts * table, rtol=1e-6)


def test_mask_and_attend_methods():
    layer, variables = make(mask_zero=True)
    np.testing.assert_array_equal(layer.apply(variables, IDS, method="compute_mask"), IDS != 0)
    layer_off, variables_off = make()
    assert layer_off.apply(variables_off, IDS, method="compute_mask") is None
    query = jnp.ones((2, 3))
    table = nn.unbox(variables)["params"]["embeddings"]
    np.testing.assert_allclose(
        layer.apply(variables, query, method="attend"), query @ table.T, rtol=1e-6
    )


def test_out_of_range_default_is_error():
    layer = jaxembed.Embedding(5, 3)
    variables = layer.init(KEY, IDS)
    with pytest.raises(IndexError, match=r"\[0, 5\); got id -1"):
        layer.apply(variables, jnp.array([-1]))
    assert bool(jnp.isnan(make(out_of_range="fill")[0].apply(variables, jnp.array([5]))).all())


def test_regularizer_sown_once_per_layer():
    layer, variables = make(embeddings_regularizer="l2")
    table = nn.unbox(variables)["params"]["embeddings"]

    class TwoCalls(nn.Module):
        @nn.compact
        def __call__(self, ids):
            inner = jaxembed.Embedding(5, 3, embeddings_regularizer="l2", out_of_range="clip")
            return inner(ids) + inner(ids)

    _, state = layer.apply(variables, IDS, mutable=["losses"])
    expected = 0.01 * jnp.sum(table**2)
    np.testing.assert_allclose(state["losses"]["embeddings_regularization"], expected, rtol=1e-6)
    np.testing.assert_allclose(jaxembed.linen.losses(state), expected, rtol=1e-6)
    model_vars = TwoCalls().init(KEY, IDS)
    _, state = TwoCalls().apply({"params": model_vars["params"]}, IDS, mutable=["losses"])
    inner_table = nn.unbox(model_vars)["params"]["Embedding_0"]["embeddings"]
    np.testing.assert_allclose(
        jaxembed.linen.losses(state), 0.01 * jnp.sum(inner_table**2), rtol=1e-6
    )


def test_no_regularizer_sows_nothing():
    layer, variables = make()
    _, state = layer.apply(variables, IDS, mutable=["losses"])
    assert state == {} or not jax.tree_util.tree_leaves(state)
    assert float(jaxembed.linen.losses(state)) == 0.0


def test_training_loop_with_regularizer_and_constraint():
    layer, variables = make(
        embeddings_regularizer="l2", embeddings_constraint="max_norm", embeddings_initializer="ones"
    )
    tx = optax.chain(optax.adam(0.1), jaxembed.keep_embeddings_constrained("max_norm"))
    params = variables["params"]
    targets = jnp.full((2, 3, 3), 5.0)

    def loss_fn(params):
        out, state = layer.apply({"params": params}, IDS, mutable=["losses"])
        return jnp.mean((out - targets) ** 2) + jaxembed.linen.losses(state)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(20):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    table = nn.unbox(params)["embeddings"]
    assert float(jnp.linalg.norm(table, axis=0).max()) <= 2.0 + 1e-5


def test_mask_feeds_flax_attention_and_rnn():
    layer, variables = make(mask_zero=True)
    x = layer.apply(variables, IDS)
    mask = layer.apply(variables, IDS, method="compute_mask")
    attention = nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=3)
    attention_mask = nn.make_attention_mask(mask, mask)
    attn_vars = attention.init(KEY, x, mask=attention_mask)
    y = attention.apply(attn_vars, x, mask=attention_mask)
    chex.assert_shape(y, (2, 3, 3))
    rnn = nn.RNN(nn.GRUCell(4))
    seq_lengths = mask.sum(axis=-1)
    rnn_vars = rnn.init(KEY, x, seq_lengths=seq_lengths)
    chex.assert_shape(rnn.apply(rnn_vars, x, seq_lengths=seq_lengths), (2, 3, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_dim": 3.7}, ValueError, "`input_dim` must be a positive integer.*3.7"),
        ({"output_dim": 0}, ValueError, "`output_dim` must be a positive integer.*0"),
        ({"embeddings_initializer": "nope"}, ValueError, "Unknown `embeddings_initializer`"),
        ({"embeddings_regularizer": "nope"}, ValueError, "Unknown `embeddings_regularizer`"),
        ({"embeddings_constraint": "nope"}, ValueError, "Unknown `embeddings_constraint`"),
        ({"mask_zero": 1.0}, ValueError, "`mask_zero` must be one of"),
        ({"out_of_range": "wrap"}, ValueError, "`out_of_range` must be one of"),
        ({"dtype": jnp.int8}, ValueError, "`dtype` must be a floating-point dtype"),
        ({"param_dtype": "int32"}, ValueError, "`param_dtype` must be a floating-point dtype"),
    ],
)
def test_construction_errors(kwargs, error, match):
    arguments = {"input_dim": 5, "output_dim": 3, **kwargs}
    with pytest.raises(error, match=match):
        jaxembed.Embedding(**arguments)


def test_bad_weights_fail_at_construction():
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(3, 5\)"):
        jaxembed.Embedding(5, 3, weights=np.ones((3, 5)))


def test_float_ids_refused():
    layer, variables = make()
    with pytest.raises(TypeError, match="`ids` must hold integers"):
        layer.apply(variables, jnp.array([1.7]))
