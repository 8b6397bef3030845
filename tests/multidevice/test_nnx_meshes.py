"""Layers created under `jax.set_mesh` on 8 devices, as flax creates its own there.

A mesh of axes "X", "Y" and no logical axis rules: the NNX layer is created replicated (as
`nnx.Embed` is) and computes what it computes without a mesh. Rules mapping "vocab" to "Y"
shard the table and LoRA's A over "Y" at creation; a rule naming an axis the mesh lacks leaves
that dimension whole. The linen module is initialized there too, and sharded the way flax
users shard a linen model: `nn.get_partition_spec`, `nn.logical_to_mesh_sharding`, and
`jax.jit(init, out_shardings=...)`.

Its own pytest invocation, `pytest tests/multidevice`: conftest.py asks XLA for the devices.
"""

import functools

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
import jaxembed.nnx

assert jax.device_count() == 8, "run as `pytest tests/multidevice` (its conftest makes 8 devices)"

V, D, RANK, ADAPTERS = 64, 16, 4, 3
IDS = np.array([[0, 3, 9, 17, 63, 5, 40, 2], [1, 1, 62, 33, 8, 0, 4, 21]], np.int32)
ADAPTER_IDS = np.array([2, -1], np.int32)
QUERY = np.linspace(-1.0, 1.0, IDS.size * D, dtype=np.float32).reshape(*IDS.shape, D)
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
RULE_CONTEXTS = {"linen_rules": nn.logical_axis_rules, "nnx_rules": nnx.logical_axis_rules}
VOCAB_ON_Y = [("vocab", "Y"), ("embed", None)]
SPLIT_BOTH = [("vocab", "Y"), ("embed", "X")]
LAYERS = {
    "plain": ({}, {}),
    "lora": ({"lora_rank": RANK}, {}),
    "stacked": ({"lora_rank": RANK, "num_lora_adapters": ADAPTERS}, {"adapter_ids": ADAPTER_IDS}),
    "tokens": ({"trainable_token_ids": (2, 40)}, {}),
    "quantized": ({"quantization": "int8"}, {}),
}


def mesh_xy(kind):
    return jax.make_mesh((2, 4), ("X", "Y"), axis_types=(AXIS_TYPES[kind],) * 2)


def nnx_layer(name, seed=0):
    kwargs, _ = LAYERS[name]
    layer = jaxembed.nnx.Embedding(V, D, **kwargs, rngs=nnx.Rngs(seed))
    for weight in ("lora_embeddings_b", "trainable_tokens_delta"):  # zeros at creation
        if hasattr(layer, weight):
            variable = getattr(layer, weight)
            variable[...] = variable[...] + 0.25  # keeps its sharding
    return layer


def outputs(layer, name):
    _, call = LAYERS[name]

    @nnx.jit
    def forward(layer, ids, query):
        return layer(ids, **call), layer.attend(query, **call)

    return forward(layer, IDS, QUERY)


@functools.cache
def unmeshed(name):
    """The layer `name`'s state and outputs, created and called without a mesh."""
    layer = nnx_layer(name)
    return nnx.state(layer), outputs(layer, name)


def specs(layer):
    """{variable name: the PartitionSpec its value is laid out with}."""
    return {
        ".".join(map(str, path)): variable[...].sharding.spec
        for path, variable in nnx.to_flat_state(nnx.state(layer))
    }


def assert_replicated(layer, mesh):
    for path, variable in nnx.to_flat_state(nnx.state(layer)):
        sharding = variable[...].sharding
        assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh, path
        assert sharding.is_fully_replicated, (path, sharding.spec)


def assert_equal_to(reference, layer, name):
    """`layer`'s state and outputs equal `reference = unmeshed(name)` (taken outside the
    mesh: a first call inside would create the reference there)."""
    state, expected = reference
    chex.assert_trees_all_equal(nnx.state(layer), state)
    chex.assert_trees_all_close(outputs(layer, name), expected, rtol=1e-6, atol=1e-6)


class TestNNXCreation:
    @pytest.mark.parametrize("kind", AXIS_TYPES)
    @pytest.mark.parametrize("name", LAYERS)
    def test_without_rules_replicated(self, name, kind):
        mesh, reference = mesh_xy(kind), unmeshed(name)
        with jax.set_mesh(mesh):
            layer = nnx_layer(name)
            assert_replicated(layer, mesh)
            assert_equal_to(reference, layer, name)
        table = layer.embeddings_int8 if name == "quantized" else layer.embeddings
        assert table.get_metadata()["out_sharding"] == ("vocab", "embed")  # kept for later

    @pytest.mark.parametrize("context", RULE_CONTEXTS)
    @pytest.mark.parametrize("kind", AXIS_TYPES)
    def test_rules_shard_vocab_over_y_at_creation(self, kind, context):
        mesh, reference = mesh_xy(kind), unmeshed("lora")
        with jax.set_mesh(mesh), RULE_CONTEXTS[context](VOCAB_ON_Y):
            layer = nnx_layer("lora")
            table = layer.embeddings[...]
            assert table.sharding.spec == P("Y", None)
            assert {shard.data.shape for shard in table.addressable_shards} == {(V // 4, D)}
            assert layer.lora_embeddings_a[...].sharding.spec == P("Y", None)  # A follows
            assert layer.lora_embeddings_b[...].sharding.is_fully_replicated
            assert_equal_to(reference, layer, "lora")

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    def test_rules_shard_every_variable(self, kind):
        reference = unmeshed("quantized")
        with jax.set_mesh(mesh_xy(kind)), nn.logical_axis_rules(SPLIT_BOTH):
            stacked, tokens, quantized = map(nnx_layer, ("stacked", "tokens", "quantized"))
            assert specs(stacked) == {
                "embeddings": P("Y", "X"),
                "lora_embeddings_a": P(None, "Y", None),
                "lora_embeddings_b": P(None, None, "X"),
            }
            assert specs(tokens) == {
                "embeddings": P("Y", "X"),
                "trainable_tokens_delta": P(None, "X"),
                "trainable_tokens_ids": P(),
            }
            assert specs(quantized) == {"embeddings_int8": P("Y", "X"), "embeddings_scale": P("Y")}
            assert_equal_to(reference, quantized, "quantized")  # computes as unsharded

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    @pytest.mark.parametrize("name", ["stacked", "tokens"])
    def test_table_split_both_ways_computes_as_unsharded(self, name, kind):
        # Fails on Explicit axes (JAX 0.10): `attend` on a table split by rows and columns
        # moves the query's features to the columns' axis ("X"), and the einsums of stacked
        # adapters (`lora.add_stacked_to_logits`) and trainable tokens
        # (`trainable_tokens.add_to_logits`) then contract two "X"-split dimensions:
        # ShardingTypeError. One adapter, or a table split one way, computes.
        reference = unmeshed(name)
        with jax.set_mesh(mesh_xy(kind)), nn.logical_axis_rules(SPLIT_BOTH):
            assert_equal_to(reference, nnx_layer(name), name)

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    def test_rule_naming_an_absent_axis_leaves_it_whole(self, kind):
        mesh, reference = mesh_xy(kind), unmeshed("lora")
        rules = [("vocab", "model"), ("embed", None)]  # the mesh has no "model"
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            layer = nnx_layer("lora")  # no error
            assert_replicated(layer, mesh)  # LoRA's A too
            assert_equal_to(reference, layer, "lora")
        with jax.set_mesh(mesh), nn.logical_axis_rules([("vocab", ("model", "Y"))]):
            # One absent name in a tuple: the dimension stays whole (never half a rule).
            assert nnx_layer("plain").embeddings[...].sharding.is_fully_replicated

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    def test_like_flax_nnx_embed(self, kind):
        # With rules, jaxembed's table is laid out as flax's own nnx.Embed with the same
        # logical axes; without them, nnx.Embed without partitioning is replicated, as is ours.
        init = nnx.with_partitioning(nnx.initializers.normal(), ("vocab", "embed"))
        with jax.set_mesh(mesh_xy(kind)), nn.logical_axis_rules(VOCAB_ON_Y):
            theirs = nnx.Embed(V, D, embedding_init=init, rngs=nnx.Rngs(0)).embedding[...]
            ours = nnx_layer("plain").embeddings[...]
        assert ours.sharding == theirs.sharding
        with jax.set_mesh(mesh_xy(kind)):
            theirs = nnx.Embed(V, D, rngs=nnx.Rngs(0)).embedding[...]
            ours = nnx_layer("plain").embeddings[...]
        assert ours.sharding.is_equivalent_to(theirs.sharding, 2)

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    def test_created_replicated_then_sharded_as_flax_users_do(self, kind):
        # A layer created without rules keeps its logical axes: flax's get_named_sharding
        # maps them through rules given later, and the sharded layer computes the same.
        mesh, reference = mesh_xy(kind), unmeshed("lora")
        with jax.set_mesh(mesh):
            layer = nnx_layer("lora")
            with nn.logical_axis_rules(VOCAB_ON_Y):
                shardings = nnx.get_named_sharding(nnx.state(layer), mesh)
            nnx.update(layer, jax.device_put(nnx.state(layer), shardings))
            assert specs(layer) == {
                "embeddings": P("Y", None),
                "lora_embeddings_a": P("Y", None),
                "lora_embeddings_b": P(None, None),
            }
            assert_equal_to(reference, layer, "lora")


class TestLinen:
    @pytest.mark.parametrize("kind", AXIS_TYPES)
    @pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
    def test_init_and_apply_without_rules(self, kind, lora):
        module = jaxembed.Embedding(V, D, lora_rank=RANK if lora else None)
        key = jax.random.key(0)
        reference = module.init(key, IDS)
        mesh = mesh_xy(kind)
        with jax.set_mesh(mesh):
            boxed = module.init(key, IDS)
            for array in jax.tree.leaves(nn.unbox(boxed)):
                assert array.sharding.is_fully_replicated
            got = module.apply(boxed, IDS), jax.jit(module.apply)(boxed, IDS)
        chex.assert_trees_all_equal(nn.unbox(boxed), nn.unbox(reference))
        expected = module.apply(reference, IDS)
        chex.assert_trees_all_close(got, (expected, expected), rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    @pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
    def test_jit_init_with_out_shardings(self, kind, lora):
        # flax's recipe: logical specs from the abstract variables, mapped through the rules.
        module = jaxembed.Embedding(V, D, lora_rank=RANK if lora else None)
        key = jax.random.key(0)
        mesh = mesh_xy(kind)
        with jax.set_mesh(mesh):
            abstract = jax.eval_shape(functools.partial(module.init, key), IDS)
            logical = nn.get_partition_spec(abstract)
            shardings = nn.logical_to_mesh_sharding(logical, mesh, VOCAB_ON_Y)
            variables = jax.jit(module.init, out_shardings=shardings)(key, IDS)
            got = jax.jit(module.apply)(variables, IDS)
        params = nn.unbox(variables)["params"]
        assert logical["params"]["embeddings"] == P("vocab", "embed")
        assert params["embeddings"].sharding.spec == P("Y", None)
        assert {s.data.shape for s in params["embeddings"].addressable_shards} == {(V // 4, D)}
        if lora:
            assert params["lora_embeddings_a"].sharding.spec == P("Y", None)
            assert params["lora_embeddings_b"].sharding.is_fully_replicated
        reference = module.init(key, IDS)
        chex.assert_trees_all_equal(nn.unbox(variables), nn.unbox(reference))
        np.testing.assert_allclose(got, module.apply(reference, IDS), rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    @pytest.mark.parametrize(
        "rules", [VOCAB_ON_Y, [("vocab", "model"), ("embed", None)]], ids=["on_y", "absent"]
    )
    def test_eager_init_under_rules_like_flax_embed(self, kind, rules):
        # Eager linen init under rules is flax's own business (its boxes constrain on unbox):
        # jaxembed's module does what flax's nn.Embed with the same logical axes does, layout
        # or error alike.
        init = nn.with_logical_partitioning(nn.initializers.normal(), ("vocab", "embed"))
        modules = {
            "flax": nn.Embed(V, D, embedding_init=init),
            "jaxembed": jaxembed.Embedding(V, D),
        }

        def outcome(module):
            try:
                (table,) = jax.tree.leaves(nn.unbox(module.init(jax.random.key(0), IDS)))
            except Exception as error:  # flax's error, whichever it is
                return type(error)
            return table.sharding

        with jax.set_mesh(mesh_xy(kind)), nn.logical_axis_rules(rules):
            outcomes = {name: outcome(module) for name, module in modules.items()}
        assert outcomes["jaxembed"] == outcomes["flax"]
