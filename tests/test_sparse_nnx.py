"""Row-sparse tables in a whole NNX model: equal to dense training, never V x D."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxembed
import jaxembed.nnx

V, D = 64, 8


class Model(nnx.Module):
    def __init__(self, vocab=V, *, tied=False, rngs):
        self.tokens = jaxembed.nnx.Embedding(vocab, D, out_of_range="fill", rngs=rngs)
        self.positions = jaxembed.nnx.Embedding(4, D, out_of_range="clip", rngs=rngs)
        self.head = nnx.Linear(D, 3, rngs=rngs)
        self.tied = tied

    def __call__(self, ids):
        x = self.tokens(ids) + self.positions(jnp.arange(ids.shape[-1]))
        x = jnp.nan_to_num(x).mean(axis=-2)
        return self.tokens.attend(x)[..., :3] if self.tied else self.head(x)


def batches(steps=4, vocab=V):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        ids = rng.integers(0, vocab, (6, 5)).astype(np.int32)
        ids[0, :2] = ids[1, :2]  # duplicates
        ids[2, 3] = vocab + 3  # out of range: NaN row -> nan_to_num, no update
        yield ids, rng.integers(0, 3, (6,)).astype(np.int32)


def loss_fn(model, ids, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(ids), labels).mean()


def rest_filter(model):
    return nnx.All(nnx.Param, nnx.Not(jaxembed.sparse.nnx_tables(model)))


def make_sparse_step():
    value_and_grad = jaxembed.sparse.nnx_value_and_grad(loss_fn)

    @nnx.jit(static_argnums=2)
    def step(model, optimizer, sparse_optimizer, table_states, ids, labels):
        loss, grads, rows = value_and_grad(model, ids, labels)
        optimizer.update(model, grads)
        table_states = jaxembed.sparse.nnx_update_tables(
            sparse_optimizer, model, table_states, rows
        )
        return loss, table_states

    return step


@nnx.jit
def dense_step(model, optimizer, ids, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, ids, labels)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize(
    ("name", "dense_tx"), [("sgd", optax.sgd(0.5)), ("adagrad", optax.adagrad(0.5))]
)
def test_equals_dense_training_of_the_whole_model(name, dense_tx):
    sparse_optimizer = getattr(jaxembed.sparse, name)(0.5)
    model, reference = Model(rngs=nnx.Rngs(0)), Model(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, dense_tx, wrt=rest_filter(model))
    table_states = jaxembed.sparse.nnx_init_tables(sparse_optimizer, model)
    assert sorted(table_states) == ["positions", "tokens"]
    dense_optimizer = nnx.Optimizer(reference, dense_tx, wrt=nnx.Param)
    step = make_sparse_step()
    for ids, labels in batches():
        loss, table_states = step(model, optimizer, sparse_optimizer, table_states, ids, labels)
        dense_loss = dense_step(reference, dense_optimizer, ids, labels)
        np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
    # Float rounding only: summation order of duplicate ids differs from the dense scatter.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.state(model, nnx.Param),
        nnx.state(reference, nnx.Param),
    )


def test_step_never_builds_a_vocab_by_dim_buffer():
    vocab = 65536
    model = Model(vocab, rngs=nnx.Rngs(0))
    ids, labels = next(batches(vocab=vocab))
    sparse_optimizer = jaxembed.sparse.adagrad(0.1)
    value_and_grad = jaxembed.sparse.nnx_value_and_grad(loss_fn)
    graphdef, state = nnx.split(model)

    def step(state, table_states, ids, labels):
        model = nnx.merge(graphdef, state)
        loss, grads, rows = value_and_grad(model, ids, labels)
        table_states = jaxembed.sparse.nnx_update_tables(
            sparse_optimizer, model, table_states, rows
        )
        return nnx.state(model), table_states, loss, grads

    table_states = jaxembed.sparse.nnx_init_tables(sparse_optimizer, model)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state, table_states, ids, labels)
    temp = compiled.compile().memory_analysis().temp_size_in_bytes
    bound = vocab * D * 4 / 4
    assert temp < bound, temp

    def dense(state, ids, labels):
        grads = jax.grad(lambda s: loss_fn(nnx.merge(graphdef, s), ids, labels))(state)
        return jax.tree.map(lambda p, g: p - 0.1 * g, state, grads)

    control = jax.jit(dense, donate_argnums=0).lower(state, ids, labels).compile()
    assert control.memory_analysis().temp_size_in_bytes > bound  # the dense gradient is one


def test_tied_table_is_refused_not_silently_dropped():
    model = Model(tied=True, rngs=nnx.Rngs(0))
    ids, labels = next(batches())
    with pytest.raises(ValueError, match="tied"):
        jaxembed.sparse.nnx_value_and_grad(loss_fn)(model, ids, labels)


def test_layers_under_lora_are_not_sparse_tables():
    layer = jaxembed.nnx.Embedding(V, D, lora_rank=2, rngs=nnx.Rngs(0))
    assert jaxembed.sparse.nnx_init_tables(jaxembed.sparse.sgd(0.1), layer) == {}
    assert len(nnx.state(layer, jaxembed.sparse.nnx_tables(layer))) == 0


def test_plain_calls_record_nothing():
    layer = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0))
    before = nnx.state(layer)
    layer(jnp.array([1, 2]))
    assert jax.tree.structure(nnx.state(layer)) == jax.tree.structure(before)
