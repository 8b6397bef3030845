"""Vocab-sharded quantized tables on 8 simulated CPU devices: packed values, scales and zero
points all split over rows; lookups, tied logits and the vocab-parallel lookup equal the
unsharded results on Explicit and Auto meshes, and no program gathers a table array."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
import jaxembed.nnx
from jaxembed import _hlo, _table

assert jax.device_count() == 8, "run as `pytest tests/multidevice` (its conftest makes 8 devices)"

V, D, RANK = 64, 16, 2
FORMATS = {"int8": ("int8", None), "int4": ("int4", None), "int4-grouped": ("int4", 8)}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
IDS = (jnp.arange(8 * 6).reshape(8, 6) * 7) % V
QUERY = jax.random.normal(jax.random.key(5), (8, 3, D))

formats = pytest.mark.parametrize("fmt", list(FORMATS))
kinds = pytest.mark.parametrize("kind", list(AXIS_TYPES))
loras = pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])


def make_mesh(kind):
    return jax.make_mesh((1, 8), ("data", "model"), axis_types=(AXIS_TYPES[kind],) * 2)


def quantized_params(fmt, lora):
    mode, block = FORMATS[fmt]
    params = jaxembed.init(jax.random.key(0), V, D, embeddings_initializer="normal")
    params = jaxembed.quantize(params, mode, block_size=block)
    if lora:
        params = jaxembed.enable_lora(params, jax.random.key(1), RANK, b_initializer="normal")
    return params


def shard_rows(params, mesh):
    """Every array split over rows ("model"), LoRA's B whole."""

    def spec(key, value):
        if key == _table.LORA_B:
            return P(None, None)
        return P("model", *(None,) * (value.ndim - 1))

    return {k: jax.device_put(v, NamedSharding(mesh, spec(k, v))) for k, v in params.items()}


def gathered_table_arrays(hlo, params):
    return [
        k for k, v in params.items() if k in _table.table_keys() and _hlo.all_gathers(hlo, v.shape)
    ]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows, so `attend` walks 4 strided chunks of the 64-row table."""
    monkeypatch.setattr(_table, "_CHUNK_BYTES", 4 * D * 16)


@formats
@kinds
@loras
def test_lookup_and_attend_equal_unsharded_without_gathering(fmt, kind, lora, small_chunks):
    params = quantized_params(fmt, lora)
    mesh = make_mesh(kind)
    sharded = shard_rows(params, mesh)
    ids = jax.device_put(IDS, NamedSharding(mesh, P("data", None)))
    query = jax.device_put(QUERY, NamedSharding(mesh, P("data", None, None)))
    with jax.set_mesh(mesh):
        rows = jax.jit(jaxembed.apply)(sharded, ids)
        logits = jax.jit(jaxembed.attend)(sharded, query)
        lookup_hlo = _hlo.compiled_text(jaxembed.apply, sharded, ids)
        attend_hlo = _hlo.compiled_text(jaxembed.attend, sharded, query)
    chex.assert_trees_all_close(rows, jaxembed.apply(params, IDS), rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(logits, jaxembed.attend(params, QUERY), rtol=1e-5, atol=1e-5)
    assert gathered_table_arrays(lookup_hlo, params) == []
    assert gathered_table_arrays(attend_hlo, params) == []


@formats
@kinds
def test_vocab_parallel_apply_equals_unsharded(fmt, kind):
    params = quantized_params(fmt, lora=True)
    mesh = make_mesh(kind)
    sharded = shard_rows(params, mesh)
    ids = jax.device_put(IDS, NamedSharding(mesh, P("data", None)))
    parallel = jax.jit(
        functools.partial(jaxembed.sharding.vocab_parallel_apply, vocab_axis="model")
    )
    with jax.set_mesh(mesh):
        rows = parallel(sharded, ids)
        hlo = _hlo.compiled_text(parallel, sharded, ids)
    chex.assert_trees_all_close(rows, jaxembed.apply(params, IDS), rtol=1e-6)
    assert gathered_table_arrays(hlo, params) == []


RULES = [("vocab", "model"), ("embed", None)]


@pytest.mark.parametrize("quantization", ["int8", "int4/8"])
def test_linen_quantized_collection_is_sharded_over_vocab(quantization):
    mesh = make_mesh("explicit")
    module = jaxembed.Embedding(V, D, quantization=quantization, lora_rank=RANK)
    # As tests/multidevice/test_sharded.py: init with out_shardings outside the mesh context
    # (linen's boxes assert their sharding inside it), apply inside it.
    abstract = jax.eval_shape(module.init, jax.random.key(0), IDS)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    variables = jax.jit(module.init, out_shardings=shardings)(jax.random.key(0), IDS)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        out = jax.jit(module.apply)(variables, IDS)
    quantized = nn.unbox(variables)["quantized"]
    for key, value in quantized.items():
        assert value.sharding.spec[0] == "model", key
        assert value.addressable_shards[0].data.shape[0] == V // 8, key
    chex.assert_trees_all_close(out, module.apply(jax.device_get(variables), IDS), rtol=1e-6)


def test_nnx_quantized_variables_carry_vocab_axes():
    mesh = make_mesh("explicit")
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        layer = jaxembed.nnx.Embedding(V, D, quantization="int4/8", rngs=nnx.Rngs(0))
        out = layer(IDS)
    for key in ("embeddings_int4", "embeddings_scale", "embeddings_zero"):
        variable = getattr(layer, key)
        assert isinstance(variable, jaxembed.nnx.Quantized)
        assert variable[...].sharding.spec[0] == "model", key
    chex.assert_shape(out, (*IDS.shape, D))


@formats
@kinds
def test_fused_loss_on_a_vocab_sharded_quantized_table(fmt, kind):
    """vocab_parallel_attend_cross_entropy: each device walks its own stored rows; the loss
    and the adapter's gradients equal the unsharded ones, and no table array is gathered."""
    params = quantized_params(fmt, lora=True)
    trainable, frozen = jaxembed.lora.split_trainable(params)
    labels = IDS[:, :3]
    mesh = make_mesh(kind)
    sharded_frozen = shard_rows({k: v for k, v in frozen.items() if v is not None}, mesh)
    sharded_frozen = {**frozen, **sharded_frozen}

    def loss(trainable, frozen, loss_fn):
        return loss_fn(jaxembed.lora.combine(trainable, frozen), QUERY, labels, chunk_size=8)

    parallel = functools.partial(
        jaxembed.sharding.vocab_parallel_attend_cross_entropy, vocab_axis="model", mesh=mesh
    )
    step = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    with jax.set_mesh(mesh):
        value, grads = step(trainable, sharded_frozen, parallel)
        hlo = _hlo.compiled_text(
            jax.jit(jax.value_and_grad(functools.partial(loss, loss_fn=parallel))),
            trainable,
            sharded_frozen,
        )
    expected_value, expected_grads = jax.value_and_grad(loss)(
        trainable, frozen, jaxembed.attend_cross_entropy
    )
    chex.assert_trees_all_close(value, expected_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-4, atol=1e-6)
    assert gathered_table_arrays(hlo, params) == []
