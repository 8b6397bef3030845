"""Row-sparse tables in a whole linen model: equal to dense training, never V x D."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxembed

V, D = 64, 8


class Model(nn.Module):
    """Two tables (tokens, one clamping positions) -> mean -> dense head."""

    vocab: int = V
    tied: bool = False

    @nn.compact
    def __call__(self, ids):
        tokens = jaxembed.Embedding(self.vocab, D, out_of_range="fill", name="tokens")
        positions = jaxembed.Embedding(4, D, out_of_range="clip", name="positions")
        x = tokens(ids) + positions(jnp.arange(ids.shape[-1]))
        x = jnp.nan_to_num(x).mean(axis=-2)
        if self.tied:
            return tokens.attend(x)
        return nn.Dense(3, name="head")(x)


def batches(steps=4, vocab=V):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        ids = rng.integers(0, vocab, (6, 5)).astype(np.int32)
        ids[0, :2] = ids[1, :2]  # duplicates
        ids[2, 3] = vocab + 3  # out of range: "fill" -> NaN rows -> nan_to_num, no update
        yield ids, rng.integers(0, 3, (6,)).astype(np.int32)


def loss_fn(model, params, ids, labels):
    logits = model.apply({"params": params}, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sparse_step(model, optimizer, tx):
    value_and_grad = jaxembed.sparse.linen_value_and_grad(functools.partial(loss_fn, model))

    @jax.jit
    def step(tables, rest, table_states, rest_state, ids, labels):
        loss, rest_grads, rows = value_and_grad(tables, rest, ids, labels)
        updates, rest_state = tx.update(rest_grads, rest_state, rest)
        rest = optax.apply_updates(rest, updates)
        tables, table_states = jaxembed.sparse.update_tables(optimizer, tables, table_states, rows)
        return tables, rest, table_states, rest_state, loss

    return step


def dense_step(model, tx):
    @jax.jit
    def step(params, state, ids, labels):
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, model))(params, ids, labels)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


@pytest.mark.parametrize(
    ("sparse_optimizer", "dense_tx"),
    [
        (jaxembed.sparse.sgd(0.5), optax.sgd(0.5)),
        (jaxembed.sparse.adagrad(0.5), optax.adagrad(0.5)),
    ],
    ids=["sgd", "adagrad"],
)
def test_equals_dense_training_of_the_whole_model(sparse_optimizer, dense_tx):
    model = Model()
    params = model.init(jax.random.key(0), next(batches())[0])["params"]
    tables, rest = jaxembed.sparse.split_tables(params)
    assert sorted(tables) == ["positions/embeddings", "tokens/embeddings"]
    table_states = jaxembed.sparse.init_tables(sparse_optimizer, tables)
    rest_state = dense_tx.init(rest)
    step = sparse_step(model, sparse_optimizer, dense_tx)
    dense_params, dense_state, dense = params, dense_tx.init(params), dense_step(model, dense_tx)
    for ids, labels in batches():
        tables, rest, table_states, rest_state, loss = step(
            tables, rest, table_states, rest_state, ids, labels
        )
        dense_params, dense_state, dense_loss = dense(dense_params, dense_state, ids, labels)
        np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
    merged = jaxembed.sparse.merge_tables(tables, rest)
    # Float rounding only: summation order of duplicate ids differs from the dense scatter.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), merged, dense_params
    )


def test_step_never_builds_a_vocab_by_dim_buffer():
    vocab = 65536
    model = Model(vocab=vocab)
    ids, labels = next(batches(vocab=vocab))
    params = model.init(jax.random.key(0), ids)["params"]
    tables, rest = jaxembed.sparse.split_tables(params)
    optimizer, tx = jaxembed.sparse.adagrad(0.1), optax.adagrad(0.1)
    args = (tables, rest, jaxembed.sparse.init_tables(optimizer, tables), tx.init(rest))
    bound = vocab * D * 4 / 4
    sparse = jax.jit(sparse_step(model, optimizer, tx), donate_argnums=(0, 2))
    temp = sparse.lower(*args, ids, labels).compile().memory_analysis().temp_size_in_bytes
    assert temp < bound, temp
    dense = jax.jit(dense_step(model, tx), donate_argnums=(0, 1))
    control = dense.lower(params, tx.init(params), ids, labels).compile().memory_analysis()
    assert control.temp_size_in_bytes > bound  # the dense step does build one


def test_tied_table_is_refused_not_silently_dropped():
    model = Model(tied=True)
    ids, labels = next(batches())
    params = model.init(jax.random.key(0), ids)["params"]
    tables, rest = jaxembed.sparse.split_tables(params)

    def tied_loss(params, ids, labels):
        logits = model.apply({"params": params}, ids)[:, :3]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value_and_grad = jaxembed.sparse.linen_value_and_grad(tied_loss)
    with pytest.raises(ValueError, match="tokens/embeddings.*tied"):
        value_and_grad(tables, rest, ids, labels)


def test_tables_under_lora_stay_in_the_rest():
    model = jaxembed.Embedding(V, D, lora_rank=2)
    params = model.init(jax.random.key(0), jnp.arange(3))["params"]
    tables, rest = jaxembed.sparse.split_tables(params)
    assert tables == {} and rest["embeddings"] is not None


def test_split_and_merge_round_trip_boxed_or_not():
    model = Model()
    variables = model.init(jax.random.key(0), next(batches())[0])
    params = nn.unbox(variables["params"])
    tables, rest = jaxembed.sparse.split_tables(params)
    assert jax.tree.all(
        jax.tree.map(
            lambda a, b: bool((a == b).all()), jaxembed.sparse.merge_tables(tables, rest), params
        )
    )
    boxed = Model().init(jax.random.key(0), next(batches())[0])["params"]  # flax boxes
    tables, rest = jaxembed.sparse.split_tables(boxed)
    assert sorted(tables) == ["positions/embeddings", "tokens/embeddings"]
    assert isinstance(
        jaxembed.sparse.merge_tables(tables, rest)["tokens"]["embeddings"],
        nn.Partitioned | nn.LogicallyPartitioned,
    )
