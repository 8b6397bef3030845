"""Trainable tokens and stacked LoRA adapters on sharded tables (8 simulated CPU devices):
lookups, tied logits, the fused loss and their gradients equal the unsharded results, and no
program gathers the vocab-sharded table."""

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
from jaxembed import _hlo

assert jax.device_count() == 8, "run as `pytest tests/multidevice` (its conftest makes 8 devices)"

V, D, RANK, N_ADAPTERS = 64, 16, 4, 3
TOKEN_IDS = [0, 9, 40, 63]
KINDS = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
LAYOUTS = {"vocab": ("model", None), "dim": (None, "model")}


def make_mesh(kind):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(KINDS[kind],) * 2)


def reference_params(tokens=True, adapters=None):
    keys = jax.random.split(jax.random.key(0), 4)
    params = jaxembed.init(keys[0], V, D, embeddings_initializer="normal")
    if adapters:
        params = jaxembed.enable_lora(
            params, keys[1], RANK, num_adapters=adapters, b_initializer="normal"
        )
    if tokens:
        params = jaxembed.enable_trainable_tokens(params, TOKEN_IDS)
        params["trainable_tokens_delta"] = jax.random.normal(keys[2], (len(TOKEN_IDS), D))
    return params


def shard(params, mesh, layout):
    rows, columns = LAYOUTS[layout]
    specs = {
        "embeddings": P(rows, columns),
        "lora_embeddings_a": P(None, rows, None),
        "lora_embeddings_b": P(None, None, columns),
        "trainable_tokens_ids": P(),
        "trainable_tokens_delta": P(None, columns),
    }
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}


def batch(mesh, shape, dtype=jnp.int32, high=V):
    ids = jax.random.randint(jax.random.key(3), shape, 0, high, dtype)
    ids = ids.at[0, :4].set(jnp.asarray(TOKEN_IDS, dtype))
    spec = P("data", *(None,) * (len(shape) - 1))
    return ids, jax.device_put(ids, NamedSharding(mesh, spec))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
class TestTrainableTokensSharded:
    def test_apply_attend_and_gradients_equal_unsharded(self, kind, layout):
        mesh = make_mesh(kind)
        params = reference_params()
        sharded = shard(params, mesh, layout)
        ids, sharded_ids = batch(mesh, (4, 6))
        query = jax.random.normal(jax.random.key(4), (4, 6, D))
        sharded_query = jax.device_put(query, NamedSharding(mesh, P("data", None, None)))
        trainable, frozen = jaxembed.lora.split_trainable(params)
        s_trainable, s_frozen = jaxembed.lora.split_trainable(sharded)

        def loss(trainable, frozen, ids, query):
            p = jaxembed.lora.combine(trainable, frozen)
            rows = jaxembed.apply(p, ids)
            logits = jaxembed.attend(p, query)
            return jnp.sum(rows**2) + jnp.sum(jax.nn.logsumexp(logits, axis=-1))

        step = jax.jit(jax.value_and_grad(loss))
        with jax.set_mesh(mesh):
            got = step(s_trainable, s_frozen, sharded_ids, sharded_query)
            hlo = _hlo.compiled_text(step, s_trainable, s_frozen, sharded_ids, sharded_query)
        want = step(trainable, frozen, ids, query)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
        assert not _hlo.all_gathers(hlo, (V, D))

    def test_adam_loop_trains_only_the_delta(self, kind, layout):
        mesh = make_mesh(kind)
        params = reference_params()
        params["trainable_tokens_delta"] = jnp.zeros_like(params["trainable_tokens_delta"])
        sharded = shard(params, mesh, layout)
        _, sharded_ids = batch(mesh, (4, 6))
        tx = optax.adam(1e-2)
        trainable, frozen = jaxembed.lora.split_trainable(sharded)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(trainable, state, frozen, ids):
            def loss(t):
                return jnp.sum(jaxembed.apply(jaxembed.lora.combine(t, frozen), ids) ** 2)

            grads = jax.grad(loss)(trainable)
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state

        with jax.set_mesh(mesh):
            state = tx.init(trainable)
            for _ in range(3):
                trainable, state = step(trainable, state, frozen, sharded_ids)
        assert frozen["embeddings"] is sharded["embeddings"]
        chex.assert_trees_all_equal(frozen["embeddings"], params["embeddings"])
        assert float(jnp.abs(trainable["trainable_tokens_delta"]).min()) > 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_loss_with_tokens_equals_unsharded(layout):
    # The plain fused loss on an Explicit mesh is the vocab-parallel form's job (which
    # refuses trainable tokens); under the partitioner (Auto) it takes sharded inputs.
    mesh = make_mesh("auto")
    params = reference_params()
    sharded = shard(params, mesh, layout)
    labels, sharded_labels = batch(mesh, (4, 6))
    query = jax.random.normal(jax.random.key(4), (4, 6, D))
    sharded_query = jax.device_put(query, NamedSharding(mesh, P("data", None, None)))
    trainable, frozen = jaxembed.lora.split_trainable(params)
    s_trainable, s_frozen = jaxembed.lora.split_trainable(sharded)

    def loss(trainable, frozen, query, labels):
        p = jaxembed.lora.combine(trainable, frozen)
        return jaxembed.attend_cross_entropy(p, query, labels, chunk_size=24)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))
    with jax.set_mesh(mesh):
        got = step(s_trainable, s_frozen, sharded_query, sharded_labels)
    want = step(trainable, frozen, query, labels)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
class TestStackedAdaptersSharded:
    def test_apply_attend_and_gradients_equal_unsharded(self, kind, layout):
        mesh = make_mesh(kind)
        params = reference_params(tokens=False, adapters=N_ADAPTERS)
        sharded = shard(params, mesh, layout)
        ids, sharded_ids = batch(mesh, (4, 6))
        adapter_ids = jnp.array([2, -1, 0, 1])
        sharded_adapters = jax.device_put(adapter_ids, NamedSharding(mesh, P("data")))
        query = jax.random.normal(jax.random.key(4), (4, 6, D))
        sharded_query = jax.device_put(query, NamedSharding(mesh, P("data", None, None)))
        trainable, frozen = jaxembed.lora.split_trainable(params)
        s_trainable, s_frozen = jaxembed.lora.split_trainable(sharded)

        def loss(trainable, frozen, ids, adapter_ids, query):
            p = jaxembed.lora.combine(trainable, frozen)
            rows = jaxembed.apply(p, ids, adapter_ids=adapter_ids)
            logits = jaxembed.attend(p, query, adapter_ids=adapter_ids)
            return jnp.sum(rows**2) + jnp.sum(jax.nn.logsumexp(logits, axis=-1))

        step = jax.jit(jax.value_and_grad(loss))
        with jax.set_mesh(mesh):
            got = step(s_trainable, s_frozen, sharded_ids, sharded_adapters, sharded_query)
            hlo = _hlo.compiled_text(
                step, s_trainable, s_frozen, sharded_ids, sharded_adapters, sharded_query
            )
        want = step(trainable, frozen, ids, adapter_ids, query)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
        assert not _hlo.all_gathers(hlo, (V, D))

    def test_each_example_matches_its_own_adapter(self, kind, layout):
        mesh = make_mesh(kind)
        params = reference_params(tokens=True, adapters=N_ADAPTERS)
        sharded = shard(params, mesh, layout)
        ids, sharded_ids = batch(mesh, (4, 6))
        adapter_ids = [1, 2, -1, 0]
        sharded_adapters = jax.device_put(jnp.array(adapter_ids), NamedSharding(mesh, P("data")))
        with jax.set_mesh(mesh):
            got = jax.jit(jaxembed.apply)(sharded, sharded_ids, adapter_ids=sharded_adapters)
        got = jax.device_get(got)
        for example, adapter in enumerate(adapter_ids):
            if adapter < 0:
                single = jaxembed.lora.remove_lora(params)
            else:
                single = jaxembed.lora.select_adapter(params, adapter)
            want = jaxembed.apply(single, ids[example])
            chex.assert_trees_all_close(got[example], want, rtol=1e-5, atol=1e-6)
