"""`jaxembed.resize` on a vocab-sharded table (8 simulated CPU devices): the old rows stay
where they were and no program gathers the table."""

import functools

import chex
import jax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
from jaxembed import _hlo

V, D = 64, 16


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_grow_a_vocab_sharded_table_without_gathering_it(kind, quantization):
    mesh = jax.make_mesh((8,), ("model",), axis_types=(kind,))
    params = jaxembed.init(jax.random.key(0), V, D, embeddings_initializer="normal")
    if quantization:
        params = jaxembed.quantize(params, quantization)
    sharded = {
        k: jax.device_put(v, NamedSharding(mesh, P("model", *(None,) * (v.ndim - 1))))
        for k, v in params.items()
    }
    grow = jax.jit(functools.partial(jaxembed.resize, new_input_dim=V + 5, pad_to_multiple_of=8))
    with jax.set_mesh(mesh):
        grown = grow(sharded)
        hlo = _hlo.compiled_text(grow, sharded)
    expected = jaxembed.resize(params, V + 5, pad_to_multiple_of=8)
    chex.assert_trees_all_close(grown, expected, rtol=1e-6, atol=1e-7)
    # the values (the table) are never gathered; a quantized table's (V,) scales may be
    table = params["embeddings_int8" if quantization else "embeddings"]
    assert not _hlo.all_gathers(hlo, table.shape)
