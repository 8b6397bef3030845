"""The fused tied-logits loss on a vocab-sharded table, 8 simulated CPU devices (2x4 mesh).

`jaxembed.sharding.vocab_parallel_attend_cross_entropy` equals the unsharded
`jaxembed.attend_cross_entropy`, loss and gradients, and its compiled program moves only
per-token statistics (and the data-parallel sum of the table shard's gradient): no all-gather
of the table, no collective as large as one device's block of logits.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
from jaxembed import _hlo

assert jax.device_count() == 8, "run as `pytest tests/multidevice` (its conftest makes 8 devices)"

V, D, RANK = 256, 8, 4
MESH_SHAPE = (2, 4)  # ("data", "model")
BATCH, LENGTH = 8, 6
LOCAL_TOKENS = BATCH * LENGTH // MESH_SHAPE[0]
LOGITS_BLOCK_BYTES = LOCAL_TOKENS * (V // MESH_SHAPE[1]) * 4  # one device's float32 logits
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
SPECS = {
    "embeddings": P("model", None),
    "lora_embeddings_a": P("model", None),
    "lora_embeddings_b": P(None, None),
}
OPTIONS = {
    "lora_alpha": 8.0,
    "label_smoothing": 0.1,
    "z_loss": 1e-3,
    "logit_soft_cap": 5.0,
    "chunk_size": 24,  # 64 rows per shard: two whole chunks and an overlapping last one
}


def make_mesh(kind):
    return jax.make_mesh(MESH_SHAPE, ("data", "model"), axis_types=(AXIS_TYPES[kind],) * 2)


@functools.cache
def inputs():
    # NumPy draws: no eager JAX ops to compile, which would cost seconds on 8 CPU devices.
    rng = np.random.default_rng(0)
    params = {
        "embeddings": rng.normal(size=(V, D)).astype(np.float32),
        "lora_embeddings_a": rng.normal(size=(V, RANK)).astype(np.float32),
        "lora_embeddings_b": rng.normal(size=(RANK, D)).astype(np.float32),
    }
    query = rng.normal(size=(BATCH, LENGTH, D)).astype(np.float32)
    labels = rng.integers(0, V, (BATCH, LENGTH), dtype=np.int32)
    labels[0, :3] = [0, V - 1, V // 4]  # shard boundaries
    mask = rng.random((BATCH, LENGTH)) < 0.75
    mask[0, :3] = True
    return params, query, labels, mask


def place(mesh, params, query, labels, mask):
    params = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params.items()}
    query = jax.device_put(query, NamedSharding(mesh, P("data", None, None)))
    labels, mask = (jax.device_put(x, NamedSharding(mesh, P("data", None))) for x in (labels, mask))
    return params, query, labels, mask


def fused(params, query, labels, mask):
    return jaxembed.attend_cross_entropy(params, query, labels, where=mask, **OPTIONS)


def value_and_grads(loss):
    return jax.value_and_grad(loss, argnums=(0, 1))


@functools.cache
def reference():
    params, query, labels, mask = inputs()
    return jax.jit(value_and_grads(fused))(params, query, labels, mask)


def assert_equals_reference(value_and_grads):
    """The loss and its gradients equal the unsharded ones; returns the params' gradients."""
    value, (param_grads, query_grad) = value_and_grads
    expected_value, (expected_param_grads, expected_query_grad) = reference()
    chex.assert_trees_all_close(value, expected_value, rtol=1e-5)
    chex.assert_trees_all_close(query_grad, expected_query_grad, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(param_grads, expected_param_grads, rtol=1e-5, atol=1e-6)
    return param_grads


@pytest.mark.parametrize("kind", list(AXIS_TYPES))
def test_vocab_parallel_loss_equals_unsharded_without_logits_sized_traffic(kind):
    mesh = make_mesh(kind)
    args = place(mesh, *inputs())

    def parallel(params, query, labels, mask):
        return jaxembed.sharding.vocab_parallel_attend_cross_entropy(
            params,
            query,
            labels,
            where=mask,
            mesh=mesh,
            vocab_axis="model",
            batch_axes="data",
            **OPTIONS,
        )

    compiled = jax.jit(value_and_grads(parallel)).lower(*args).compile()
    param_grads = assert_equals_reference(compiled(*args))
    for name in ["embeddings", "lora_embeddings_a"]:  # their gradients stay split by rows
        assert param_grads[name].sharding.spec[0] == "model", name

    found = _hlo.collectives(compiled.as_text())
    for whole in [(V, D), (V, RANK)]:  # the table, LoRA's A
        assert not any(c.op == "all-gather" and c.has_shape(whole) for c in found), found
    assert max(c.nbytes for c in found) < LOGITS_BLOCK_BYTES, found
    # The per-token combine: one pmax and one psum over the 4 vocab shards.
    assert any(c.group_size == 4 and c.has_shape((3, LOCAL_TOKENS)) for c in found), found


def test_control_plain_jit_gathers_the_table():
    # The same checks catch the partitioner's program for plain jit on Auto axes, which
    # all-gathers the whole table (forward and backward; JAX 0.10).
    mesh = make_mesh("auto")
    text = _hlo.compiled_text(jax.jit(value_and_grads(fused)), *place(mesh, *inputs()))
    assert _hlo.all_gathers(text, (V, D))
    assert max(c.nbytes for c in _hlo.collectives(text)) >= LOGITS_BLOCK_BYTES


def test_vocab_parallel_per_position_losses_and_fill():
    mesh = make_mesh("explicit")
    params, query, labels, mask = inputs()
    labels, mask = labels.copy(), mask.copy()
    labels[1, :2], mask[1, :2] = [V, -5], [True, False]  # outside the table: counted, ignored
    options = dict(OPTIONS, chunk_size=None, reduction="none", out_of_range="fill")
    sharded = place(mesh, params, query, labels, mask)
    losses = jax.jit(
        functools.partial(
            jaxembed.sharding.vocab_parallel_attend_cross_entropy,
            vocab_axis="model",
            batch_axes="data",
            **options,
        )
    )(*sharded[:3], where=sharded[3])
    expected = jaxembed.attend_cross_entropy(params, query, labels, where=mask, **options)
    assert jax.typeof(losses).sharding.spec[0] == "data"  # the mesh read from the types
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert np.isnan(np.asarray(losses)[1, 0]) and np.asarray(losses)[1, 1] == 0


# Plain `attend_cross_entropy` on Explicit axes: the mesh's split is read from the arrays'
# types and the shard_map walk runs by itself, with no argument (the default must work in a
# plain jitted step). Rows over "model" or "data" and columns over "model" (FSDP-style);
# the table whole with data-parallel tokens.
EXPLICIT_LAYOUTS = {
    "vocab-parallel": (P("model", None), P("data", None, None)),
    "vocab-parallel, tokens whole": (P("model", None), P(None, None, None)),
    "rows and columns": (P("data", "model"), P("data", None, None)),
    "table whole, data-parallel": (P(None, None), P("data", None, None)),
    "table whole, tokens over model": (P(None, None), P("model", None, None)),
}


def place_explicit(mesh, table_spec, query_spec):
    params, query, labels, mask = inputs()
    specs = {
        "embeddings": table_spec,
        "lora_embeddings_a": P(table_spec[0], None),
        "lora_embeddings_b": P(None, None),
    }
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    query = jax.device_put(query, NamedSharding(mesh, query_spec))
    labels, mask = (
        jax.device_put(x, NamedSharding(mesh, P(*query_spec[:2]))) for x in (labels, mask)
    )
    return params, query, labels, mask


@pytest.mark.parametrize("layout", list(EXPLICIT_LAYOUTS))
def test_plain_loss_on_explicit_axes_equals_unsharded(layout):
    mesh = make_mesh("explicit")
    table_spec, query_spec = EXPLICIT_LAYOUTS[layout]
    args = place_explicit(mesh, table_spec, query_spec)
    with jax.set_mesh(mesh):
        compiled = jax.jit(value_and_grads(fused)).lower(*args).compile()
        param_grads = assert_equals_reference(compiled(*args))
    assert param_grads["embeddings"].sharding.spec == table_spec  # gradients keep the layout
    found = _hlo.collectives(compiled.as_text())
    if table_spec == P("model", None):  # vocab-parallel: statistics move, never the table
        assert not _hlo.all_gathers(compiled.as_text(), (V, D)), found
        assert max(c.nbytes for c in found) < LOGITS_BLOCK_BYTES, found


@pytest.mark.parametrize(
    "table_spec", [P(None, "model"), P(None, ("data", "model"))], ids=["columns", "columns2"]
)
def test_plain_loss_refuses_a_table_split_by_columns_alone(table_spec):
    mesh = make_mesh("explicit")
    args = place_explicit(mesh, table_spec, P("data", None, None))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"a table split by columns alone"):
        jax.jit(fused)(*args)


def test_plain_loss_on_explicit_axes_refuses_trainable_tokens():
    mesh = make_mesh("explicit")
    params, query, labels, mask = place_explicit(mesh, P("model", None), P("data", None, None))
    params = jaxembed.enable_trainable_tokens(
        {"embeddings": params["embeddings"]}, jnp.array([1, 5])
    )
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"does not support trainable tokens"):
        jax.jit(fused)(params, query, labels, mask)
