"""Sharded tables on 8 simulated CPU devices: every result equals the unsharded one.

Its own pytest invocation, `pytest tests/multidevice`: conftest.py asks XLA for the devices.
The factors (mesh shape, axis types, table layout, LoRA) are covered pairwise: every pair of
values of any two factors meets in some case, which `test_cases_cover_every_pair` checks.
"""

import functools
import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
import jaxembed.nnx
from jaxembed import _hlo

assert jax.device_count() == 8, "run as `pytest tests/multidevice` (its conftest makes 8 devices)"

V, D, RANK = 64, 16, 4
MESH_SHAPES = {"1x8": (1, 8), "2x4": (2, 4), "8x1": (8, 1)}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
TABLE_SPECS = {"vocab": P("model", None), "dim": P(None, "model"), "both": P("model", "data")}
LORA = {"plain": False, "lora": True}
RULES = {
    "vocab": [("vocab", "model"), ("embed", None)],
    "dim": [("vocab", None), ("embed", "model")],
    "both": [("vocab", "model"), ("embed", "data")],
}


def make_mesh(shape, kind):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AXIS_TYPES[kind],) * 2)


def reference_params(lora):
    keys = jax.random.split(jax.random.key(0), 3)
    params = jaxembed.init(keys[0], V, D, embeddings_initializer="normal")
    if lora:
        params = jaxembed.enable_lora(params, keys[1], RANK)
        params["lora_embeddings_b"] = jax.random.normal(keys[2], (RANK, D))
    return params


def shard_params(params, mesh, layout):
    specs = {
        "embeddings": TABLE_SPECS[layout],
        "lora_embeddings_a": P(TABLE_SPECS[layout][0], None),
        "lora_embeddings_b": P(None, TABLE_SPECS[layout][1]),
    }
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}


IDS = (jnp.arange(8 * 6).reshape(8, 6) * 7) % V
QUERY = jax.random.normal(jax.random.key(5), (8, 3, D))


# Pairwise covering sets, "mesh-kind-layout-lora": 9 cases for the 36 of the full product.
LOOKUP_CASES = [
    "1x8-explicit-vocab-plain",
    "1x8-auto-dim-lora",
    "1x8-explicit-both-lora",
    "2x4-auto-vocab-lora",
    "2x4-explicit-dim-plain",
    "2x4-explicit-both-lora",
    "8x1-explicit-vocab-lora",
    "8x1-explicit-dim-lora",
    "8x1-auto-both-plain",
]
# "mesh-kind-lora" (the table is vocab-parallel): 6 cases for 12.
VOCAB_PARALLEL_CASES = [
    "1x8-explicit-plain",
    "1x8-auto-lora",
    "2x4-explicit-lora",
    "2x4-auto-plain",
    "8x1-explicit-lora",
    "8x1-auto-plain",
]

cases = pytest.mark.parametrize("shape", list(MESH_SHAPES.values()), ids=list(MESH_SHAPES))
kinds = pytest.mark.parametrize("kind", list(AXIS_TYPES))
layouts = pytest.mark.parametrize("layout", list(TABLE_SPECS))


@pytest.mark.parametrize(
    "covering, factors",
    [
        (LOOKUP_CASES, [MESH_SHAPES, AXIS_TYPES, TABLE_SPECS, LORA]),
        (VOCAB_PARALLEL_CASES, [MESH_SHAPES, AXIS_TYPES, LORA]),
    ],
    ids=["lookup", "vocab_parallel"],
)
def test_cases_cover_every_pair(covering, factors):
    rows = [case.split("-") for case in covering]
    assert all(v in factor for row in rows for v, factor in zip(row, factors, strict=True))
    uncovered = [
        (a, b)
        for (i, first), (j, second) in itertools.combinations(enumerate(factors), 2)
        for a, b in itertools.product(first, second)
        if not any(row[i] == a and row[j] == b for row in rows)
    ]
    assert not uncovered


@pytest.mark.parametrize("case", LOOKUP_CASES)
def test_lookup_gradient_and_attend_equal_unsharded(case):
    mesh_name, kind, layout, lora = case.split("-")
    shape = MESH_SHAPES[mesh_name]
    mesh = make_mesh(shape, kind)
    params = reference_params(LORA[lora])
    sharded = shard_params(params, mesh, layout)
    ids = jax.device_put(IDS, NamedSharding(mesh, P("data", None)))
    query = jax.device_put(QUERY, NamedSharding(mesh, P("data", None, None)))
    apply = functools.partial(jaxembed.apply, out_of_range="clip", lora_alpha=8.0)
    attend = functools.partial(jaxembed.attend, lora_alpha=8.0)

    def loss(p, ids, query):
        return jnp.sum(apply(p, ids) ** 2) + jnp.sum(jnp.tanh(attend(p, query[:, 0])))

    out = jax.jit(apply)(sharded, ids)
    chex.assert_trees_all_close(out, apply(params, IDS), rtol=1e-5, atol=1e-5)
    if kind == "explicit" and shape[0] > 1:
        assert out.sharding.spec[0] == "data"  # the batch follows the ids

    logits = jax.jit(attend)(sharded, query)
    chex.assert_trees_all_close(logits, attend(params, QUERY), rtol=1e-4, atol=1e-4)

    grads = jax.jit(jax.grad(loss))(sharded, ids, query)
    chex.assert_trees_all_close(grads, jax.grad(loss)(params, IDS, QUERY), rtol=1e-4, atol=1e-4)
    if kind == "explicit":
        for name, grad in grads.items():
            assert grad.sharding.spec == sharded[name].sharding.spec, name


@cases
@kinds
def test_no_all_gather_of_the_table(shape, kind):
    mesh = make_mesh(shape, kind)
    sharded = shard_params(reference_params(lora=True), mesh, "vocab")
    ids = jax.device_put(IDS, NamedSharding(mesh, P("data", None)))
    query = jax.device_put(QUERY, NamedSharding(mesh, P("data", None, None)))

    def step(p, ids):
        def loss(p):
            out = jaxembed.apply(p, ids, out_of_range="clip")
            return jnp.sum(out**2) + jnp.sum(jaxembed.attend(p, query) ** 2)

        return jax.grad(loss)(p)

    for fn, args in [(step, (sharded, ids)), (jaxembed.attend, (sharded, query))]:
        text = _hlo.compiled_text(fn, *args)
        for whole in [(V, D), (V, RANK)]:  # the table, LoRA's A
            assert not _hlo.all_gathers(text, whole), _hlo.all_gathered_shapes(text)

    # Control: gathering the table on purpose shows up in the same search.
    def replicate(p):
        replicated = NamedSharding(mesh, P(None, None))
        if kind == "explicit":
            return jax.sharding.reshard(p["embeddings"], replicated) * 2
        return jax.lax.with_sharding_constraint(p["embeddings"], replicated) * 2

    text = _hlo.compiled_text(replicate, sharded)
    assert _hlo.all_gathers(text, (V, D)) or shape[1] == 1


@cases
@kinds
def test_attend_logits_sharded_over_vocab(shape, kind):
    mesh = make_mesh(shape, kind)
    sharded = shard_params(reference_params(lora=True), mesh, "vocab")
    query = jax.device_put(QUERY, NamedSharding(mesh, P("data", None, None)))
    logits = jax.jit(jaxembed.attend)(sharded, query)
    if kind == "explicit":
        assert jax.typeof(logits).sharding.spec == P("data", None, "model")
    # Each device holds only its slice of the vocabulary.
    assert logits.addressable_shards[0].data.shape[-1] == V // shape[1]


@pytest.mark.parametrize("case", VOCAB_PARALLEL_CASES)
def test_vocab_parallel_shard_map_equals_unsharded(case):
    mesh_name, kind, lora = case.split("-")
    shape = MESH_SHAPES[mesh_name]
    mesh = make_mesh(shape, kind)
    params = reference_params(LORA[lora])
    sharded = shard_params(params, mesh, "vocab")
    all_ids = jnp.concatenate([IDS, jnp.array([[0] * 5 + [V - 1]] * 8)], axis=1)
    ids = jax.device_put(all_ids, NamedSharding(mesh, P("data", None)))
    parallel = functools.partial(
        jaxembed.sharding.vocab_parallel_apply,
        mesh=mesh,
        vocab_axis="model",
        batch_axes="data",
        out_of_range="clip",
        lora_alpha=2.0,
    )
    reference = functools.partial(jaxembed.apply, out_of_range="clip", lora_alpha=2.0)
    chex.assert_trees_all_close(
        jax.jit(parallel)(sharded, ids), reference(params, all_ids), rtol=1e-5, atol=1e-6
    )

    def loss(apply, ids):
        return lambda p: jnp.sum(jnp.sin(apply(p, ids)))

    chex.assert_trees_all_close(
        jax.jit(jax.grad(loss(parallel, ids)))(sharded),
        jax.grad(loss(reference, all_ids))(params),
        rtol=1e-4,
        atol=1e-5,
    )


def test_vocab_parallel_policies_and_errors():
    mesh = make_mesh((2, 4), "explicit")
    params = reference_params(lora=False)
    parallel = functools.partial(
        jaxembed.sharding.vocab_parallel_apply, mesh=mesh, vocab_axis="model"
    )
    bad = jnp.array([[-1, 3, V]])
    assert np.isnan(parallel(params, bad, out_of_range="fill")[0, [0, 2]]).all()
    with pytest.raises(IndexError, match="got id -1"):
        parallel(params, bad)
    # checkify's own error retrieval fails for shard_map on Explicit axes (inside JAX), so the
    # traced check is exercised on an Auto mesh.
    auto = functools.partial(
        jaxembed.sharding.vocab_parallel_apply, mesh=make_mesh((2, 4), "auto"), vocab_axis="model"
    )
    error, _ = jax.jit(checkify.checkify(auto))(params, bad)
    with pytest.raises(checkify.JaxRuntimeError, match="got id -1"):
        error.throw()
    with pytest.raises(ValueError, match="divisible by the size of mesh axis 'model' \\(4\\)"):
        parallel(jaxembed.init(jax.random.key(0), 10, 4), bad % 10)
    with pytest.raises(ValueError, match="`vocab_axis` must be an axis of the mesh"):
        jaxembed.sharding.vocab_parallel_apply(params, bad, mesh=mesh, vocab_axis="tensor")
    with pytest.raises(ValueError, match="needs a mesh.*Received: mesh=None"):
        jaxembed.sharding.vocab_parallel_apply(params, bad, vocab_axis="model")
    with jax.set_mesh(mesh):  # the mesh in context
        out = jaxembed.sharding.vocab_parallel_apply(params, bad % V, vocab_axis="model")
    np.testing.assert_array_equal(out, jaxembed.apply(params, bad % V))


@layouts
@kinds
def test_linen_sharded_init_places_params(layout, kind):
    mesh = make_mesh((2, 4), kind)
    model = jaxembed.Embedding(V, D, lora_rank=RANK, out_of_range="clip")
    # Linen's boxes assert their sharding inside a mesh context, an error on Explicit axes for
    # values still being created: init with out_shardings outside it, apply inside it.
    abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES[layout])
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), IDS)
    params = nn.unbox(variables)["params"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES[layout]):
        out = jax.jit(model.apply)(variables, IDS)
    expected = TABLE_SPECS[layout]
    assert params["embeddings"].sharding == NamedSharding(mesh, expected)
    assert params["lora_embeddings_a"].sharding == NamedSharding(mesh, P(expected[0], None))
    assert params["lora_embeddings_b"].sharding == NamedSharding(mesh, P(None, expected[1]))
    chex.assert_trees_all_close(
        out, jaxembed.apply(jax.device_get(params), IDS, out_of_range="clip"), rtol=1e-6
    )


@layouts
def test_nnx_eager_sharding_under_a_mesh(layout):
    mesh = make_mesh((2, 4), "explicit")
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES[layout]):
        layer = jaxembed.nnx.Embedding(V, D, lora_rank=RANK, out_of_range="clip", rngs=nnx.Rngs(0))
        ids = jax.device_put(IDS, NamedSharding(mesh, P("data", None)))
        out = nnx.jit(lambda m, i: m(i))(layer, ids)
    expected = TABLE_SPECS[layout]
    assert layer.embeddings[...].sharding == NamedSharding(mesh, expected)
    assert layer.lora_embeddings_a[...].sharding == NamedSharding(mesh, P(expected[0], None))
    chex.assert_trees_all_close(
        out, jaxembed.apply(jax.device_get(layer.params()), IDS, out_of_range="clip"), rtol=1e-6
    )


@kinds
def test_error_policy_under_checkify_with_sharded_ids(kind):
    mesh = make_mesh((2, 4), kind)
    sharded = shard_params(reference_params(lora=True), mesh, "vocab")
    ids = jax.device_put(jnp.array([[1, 2], [V + 3, 0]]), NamedSharding(mesh, P("data", None)))
    error, _ = jax.jit(checkify.checkify(jaxembed.apply))(sharded, ids)
    with pytest.raises(checkify.JaxRuntimeError, match=f"got id {V + 3}"):
        error.throw()
