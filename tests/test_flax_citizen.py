"""jaxembed's Flax modules behave as Flax's own layers do, where Flax users meet them.

* Creation under a mesh set with `jax.set_mesh` whose axis names mean nothing to jaxembed
  ("X", "Y") and with no logical axis rules: the layer is created (replicated) as `nnx.Embed`
  is, computes what it computes without a mesh, and keeps its logical axes as metadata. Rules
  that name a mesh axis shard the table at creation; rules naming an absent axis leave it whole.
* Graphdefs: static data holds what a call reads, never how the params were made, so layers
  built alike share one graphdef and one `nnx.jit` trace, and layers that compute differently
  do not.
* Sparse ids: `jax.experimental.sparse` arrays are read as Keras reads them on the JAX backend
  (made dense: implicit zeros are id 0), by every public function that takes ids, labels or a
  query; SciPy sparse matrices are refused with the fix.
* `flax.nnx.bridge.to_linen`: boxed variables carry the logical partitioning, `nn.unbox`
  gives plain arrays, and both apply alike.

Single device (the 1 x 1 meshes run anywhere); tests/multidevice/test_nnx_meshes.py repeats
the mesh cases on 8 devices, where a split is visible.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"  # read once, when keras is first imported

import functools
import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge
from jax.experimental import sparse
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
import jaxembed.nnx

assert keras.backend.backend() == "jax", (
    "keras was imported with another backend before this module; run with KERAS_BACKEND=jax"
)

V, D, RANK, ADAPTERS = 16, 8, 2, 3
IDS = np.array([[0, 3, 0, 7], [5, 0, 0, 15]], np.int32)  # zeros: implicit in a sparse array
ADAPTER_IDS = np.array([0, 2], np.int32)
TOKEN_IDS = np.array([0, 3, 7], np.int32)
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
RULE_CONTEXTS = {"linen_rules": nn.logical_axis_rules, "nnx_rules": nnx.logical_axis_rules}

# Layer arguments, and the extra call arguments each needs.
LAYERS = {
    "plain": ({}, {}),
    "lora": ({"lora_rank": RANK}, {}),
    "stacked": ({"lora_rank": RANK, "num_lora_adapters": ADAPTERS}, {"adapter_ids": ADAPTER_IDS}),
    "tokens": ({"trainable_token_ids": (2, 5)}, {}),
    "quantized": ({"quantization": "int8"}, {}),
    "qlora": ({"quantization": "int4", "lora_rank": RANK}, {}),
}


def foreign_mesh(kind):
    """One device, axes named as no jaxembed rule or default names them."""
    return jax.make_mesh((1, 1), ("X", "Y"), axis_types=(AXIS_TYPES[kind],) * 2)


def nnx_layer(name, seed=0):
    kwargs, _ = LAYERS[name]
    return jaxembed.nnx.Embedding(V, D, **kwargs, rngs=nnx.Rngs(seed))


def exercise(layer):
    """Gives zero-initialized weights (LoRA's B, trainable tokens' delta) values, keeping their
    sharding, so that the outputs depend on every variable."""
    for name in ("lora_embeddings_b", "trainable_tokens_delta"):
        if hasattr(layer, name):
            variable = getattr(layer, name)
            variable[...] = variable[...] + 0.25
    return layer


_RAMP = np.linspace(-1.0, 1.0, IDS.size * D, dtype=np.float32).reshape(*IDS.shape, D)
QUERY = np.where(np.abs(_RAMP) > 0.5, _RAMP, 0.0).astype(np.float32)  # half zeros


def outputs(layer, name):
    """The layer's lookup and tied logits, under `nnx.jit` (eager calls on a mesh compile
    every op anew: the linen cases call eagerly)."""
    _, call = LAYERS[name]

    @nnx.jit
    def jitted(layer, ids, query):
        return layer(ids, **call), layer.attend(query, **call)

    return jitted(layer, IDS, QUERY)


@functools.cache
def unmeshed_outputs(name):
    """`outputs` of the layer `name` created and called without a mesh (shared by cases)."""
    return outputs(exercise(nnx_layer(name)), name)


def logical_axes(name, ndim):
    """The logical axes every variable of a layer records, by variable name."""
    if name in ("embeddings", "embeddings_int8", "embeddings_int4"):
        return ("vocab", "embed")
    if name in ("embeddings_scale", "embeddings_zero"):
        return ("vocab", *(None,) * (ndim - 1))
    if name == "lora_embeddings_a":  # stacked adapters: a leading adapter axis, whole
        return (*(None,) * (ndim - 2), "vocab", None)
    if name == "lora_embeddings_b":
        return (*(None,) * (ndim - 1), "embed")
    if name == "trainable_tokens_delta":
        return (None, "embed")
    if name == "trainable_tokens_ids":
        return None  # row ids: nothing to split
    raise AssertionError(f"a variable this sweep does not know: {name!r}")


def flat(state):
    """{dotted path: nnx.Variable} of an `nnx.State`."""
    return {".".join(map(str, path)): variable for path, variable in nnx.to_flat_state(state)}


def variables(layer):
    """{name: nnx.Variable} of every variable of the layer."""
    return flat(nnx.state(layer))


def bcoo(array):
    """`array` as a BCOO array, its zeros implicit. Built from NumPy indices, as the sparse
    formats below: `BCOO.fromdense` compiles (about a second a shape on CPU)."""
    array = np.asarray(array)
    indices = np.argwhere(array != 0).astype(np.int32)
    return sparse.BCOO((array[tuple(indices.T)], indices), shape=array.shape)


def bcoo_batched(matrix):
    """A 2-D `matrix` as a BCOO array with one batch dimension (`n_batch=1`): each row holds
    its own nonzeros, padded with zeros at index 0 to the longest row."""
    rows = [np.flatnonzero(row) for row in matrix]
    nse = max(map(len, rows))
    indices = np.zeros((len(rows), nse, 1), np.int32)
    data = np.zeros((len(rows), nse), matrix.dtype)
    for i, columns in enumerate(rows):
        indices[i, : len(columns), 0] = columns
        data[i, : len(columns)] = matrix[i, columns]
    return sparse.BCOO((data, indices), shape=matrix.shape)


def bcsr(matrix):
    """A 2-D `matrix` as a BCSR array (compressed rows)."""
    rows, columns = np.nonzero(matrix)
    indptr = np.searchsorted(rows, np.arange(matrix.shape[0] + 1)).astype(np.int32)
    return sparse.BCSR(
        (matrix[rows, columns], columns.astype(np.int32), indptr), shape=matrix.shape
    )


class TestCreationUnderForeignMesh:
    @pytest.mark.parametrize("kind", AXIS_TYPES)
    @pytest.mark.parametrize("name", [name for name in LAYERS if name != "qlora"])
    def test_nnx_replicated_and_equal_to_unmeshed(self, name, kind):
        reference = nnx_layer(name)
        mesh = foreign_mesh(kind)
        with jax.set_mesh(mesh):
            layer = nnx_layer(name)
            for path, variable in variables(layer).items():
                sharding = variable[...].sharding
                assert isinstance(sharding, NamedSharding), path
                assert sharding.mesh.axis_names == ("X", "Y"), path
                assert all(entry is None for entry in sharding.spec), (path, sharding.spec)
            chex.assert_trees_all_equal(nnx.state(layer), nnx.state(reference))
            got = outputs(exercise(layer), name)
        chex.assert_trees_all_equal(got, unmeshed_outputs(name))

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    @pytest.mark.parametrize("name", LAYERS)
    def test_every_variable_keeps_its_logical_axes(self, name, kind):
        with jax.set_mesh(foreign_mesh(kind)):
            layer = nnx_layer(name)
        found = variables(layer)
        specs = flat(nnx.get_partition_spec(nnx.state(layer)))  # as flax users read them
        for path, variable in found.items():
            axes = logical_axes(path, variable[...].ndim)
            assert variable.get_metadata().get("out_sharding") == axes, path
            assert specs[path].get_value() == P(*(axes or ())), path
        # Metadata (part of the graphdef) as without a mesh: one graphdef either way.
        plain = variables(nnx_layer(name))
        assert found.keys() == plain.keys()
        for path, variable in found.items():
            assert variable.get_metadata() == plain[path].get_metadata(), path
        assert nnx.graphdef(layer) == nnx.graphdef(nnx_layer(name))

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    def test_like_flax_embed(self, kind):
        # flax's own nnx.Embed is created on such a mesh, whole: so is jaxembed's.
        with jax.set_mesh(foreign_mesh(kind)):
            theirs = nnx.Embed(V, D, rngs=nnx.Rngs(0)).embedding[...].sharding
            ours = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0)).embeddings[...].sharding
        assert ours.mesh == theirs.mesh
        assert ours.is_equivalent_to(theirs, 2)

    @pytest.mark.parametrize("context", RULE_CONTEXTS)
    @pytest.mark.parametrize("kind", AXIS_TYPES)
    def test_rules_naming_a_mesh_axis_shard_at_creation(self, kind, context):
        rules = [("vocab", "Y"), ("embed", None)]
        with jax.set_mesh(foreign_mesh(kind)), RULE_CONTEXTS[context](rules):
            layer = nnx_layer("lora")
        assert layer.embeddings[...].sharding.spec == P("Y", None)
        assert layer.lora_embeddings_a[...].sharding.spec == P("Y", None)
        assert all(entry is None for entry in layer.lora_embeddings_b[...].sharding.spec)
        assert layer.embeddings.get_metadata()["out_sharding"] == ("vocab", "embed")

    @pytest.mark.parametrize("context", RULE_CONTEXTS)
    @pytest.mark.parametrize("kind", AXIS_TYPES)
    def test_rules_naming_an_absent_axis_leave_it_whole(self, kind, context):
        rules = [("vocab", "model"), ("embed", "Y")]  # "model" is not an axis of this mesh
        with jax.set_mesh(foreign_mesh(kind)), RULE_CONTEXTS[context](rules):
            layer = nnx_layer("stacked")
            assert layer.embeddings[...].sharding.spec == P(None, "Y")
            assert all(entry is None for entry in layer.lora_embeddings_a[...].sharding.spec)
            exercise(layer)
            got = outputs(layer, "stacked")
        chex.assert_trees_all_equal(got, unmeshed_outputs("stacked"))

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    @pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
    def test_linen_init_and_apply(self, kind, lora):
        module = jaxembed.Embedding(V, D, lora_rank=RANK if lora else None)
        key = jax.random.key(0)
        reference = module.init(key, IDS)
        with jax.set_mesh(foreign_mesh(kind)):
            boxed = module.init(key, IDS)
            got = module.apply(boxed, IDS)
            jitted = jax.jit(module.apply)(boxed, IDS)
        expected = {"embeddings": P("vocab", "embed")}
        if lora:
            expected |= {
                "lora_embeddings_a": P("vocab", None),
                "lora_embeddings_b": P(None, "embed"),
            }
        assert nn.get_partition_spec(boxed) == {"params": expected}
        chex.assert_trees_all_equal(nn.unbox(boxed), nn.unbox(reference))
        chex.assert_trees_all_equal(got, jitted, module.apply(reference, IDS))


# Layers differing only in how their params were made: one graphdef.
CREATION_ONLY = {
    "initializer": ({}, {"embeddings_initializer": "normal"}),
    "callable_initializer": ({}, {"embeddings_initializer": jax.nn.initializers.ones}),
    "weights": ({}, {"weights": np.ones((V, D), np.float32)}),
    "seed": ({}, {"seed": 7}),
    "lora_seed": ({"lora_rank": RANK}, {"lora_rank": RANK, "seed": 7}),
}
# Layers computing differently: different graphdefs.
CALL_TIME = {
    "out_of_range": ({}, {"out_of_range": "clip"}),
    "dtype": ({}, {"dtype": jnp.bfloat16}),
    "mask_zero": ({}, {"mask_zero": True}),
    "embeddings_regularizer": ({}, {"embeddings_regularizer": "l2"}),
    "embeddings_constraint": ({}, {"embeddings_constraint": "non_neg"}),
    "padding_idx": ({}, {"padding_idx": 0}),
    "input_dim": ({}, {"input_dim": V + 1}),
    "lora_alpha": ({"lora_rank": RANK}, {"lora_rank": RANK, "lora_alpha": 8.0}),
    "use_rslora": ({"lora_rank": RANK}, {"lora_rank": RANK, "use_rslora": True}),
}


class TestGraphdef:
    @staticmethod
    def make(arguments):
        arguments = {"input_dim": V, "output_dim": D, **arguments}
        seed = arguments.pop("seed", 0)
        return jaxembed.nnx.Embedding(**arguments, rngs=nnx.Rngs(seed))

    @pytest.mark.parametrize("case", CREATION_ONLY)
    def test_creation_only_arguments_share_one_graphdef(self, case):
        first, second = (self.make(arguments) for arguments in CREATION_ONLY[case])
        assert nnx.graphdef(first) == nnx.graphdef(second)
        assert hash(nnx.graphdef(first)) == hash(nnx.graphdef(second))
        # ... while holding different arrays (else the case proves nothing).
        differ = jax.tree.map(
            lambda a, b: not np.array_equal(a, b), first.params(), second.params()
        )
        assert any(jax.tree.leaves(differ))

    @pytest.mark.parametrize("case", CALL_TIME)
    def test_call_time_arguments_make_another_graphdef(self, case):
        first, second = (self.make(arguments) for arguments in CALL_TIME[case])
        assert nnx.graphdef(first) != nnx.graphdef(second)

    @pytest.mark.parametrize(
        "argument, build, other",
        [
            ("embeddings_regularizer", lambda: jaxembed.regularizers.l2(0.1), "l1"),
            ("embeddings_regularizer", lambda: jaxembed.regularizers.l1_l2(0.1, 0.2), "l2"),
            ("embeddings_regularizer", jaxembed.regularizers.orthogonal_regularizer, "l2"),
            ("embeddings_constraint", lambda: jaxembed.constraints.max_norm(2.0), "non_neg"),
            ("embeddings_constraint", lambda: jaxembed.constraints.unit_norm(1), "non_neg"),
        ],
    )
    def test_built_in_objects_compare_by_value(self, argument, build, other):
        # Built twice, equal: one graphdef (and one nnx.jit trace), as for the name strings.
        first, second = (self.make({argument: build()}) for _ in range(2))
        assert build() == build() and hash(build()) == hash(build())
        assert nnx.graphdef(first) == nnx.graphdef(second)
        # Another hyperparameter or another function: another graphdef.
        assert nnx.graphdef(first) != nnx.graphdef(self.make({argument: other}))
        module = jaxembed.regularizers if "regularizer" in argument else jaxembed.constraints
        assert build() != module.get(other)

    def test_built_in_objects_with_other_hyperparameters_differ(self):
        l2 = jaxembed.regularizers.l2
        assert l2(0.1) != l2(0.2) and repr(l2(0.1)) == "l2(0.1)"
        assert nnx.graphdef(self.make({"embeddings_regularizer": l2(0.1)})) != nnx.graphdef(
            self.make({"embeddings_regularizer": l2(0.2)})
        )

    def test_nnx_jit_traces_once_for_layers_built_alike(self):
        traces = []

        @nnx.jit
        def forward(layer, ids):
            traces.append(None)
            return layer(ids)

        layers = [self.make(arguments) for pair in CREATION_ONLY.values() for arguments in pair]
        layers = [layer for layer in layers if layer.lora_rank is None]
        for layer in layers:
            np.testing.assert_array_equal(forward(layer, IDS), layer(IDS))
        assert len(layers) > 2
        assert len(traces) == 1

    def test_nnx_jit_retraces_for_a_call_time_argument(self):
        # Were the dtype left out of the graphdef, the second call would reuse the first trace
        # and return float32.
        traces = []

        @nnx.jit
        def forward(layer, ids):
            traces.append(None)
            return layer(ids)

        assert forward(self.make({}), IDS).dtype == jnp.float32
        assert forward(self.make({"dtype": jnp.bfloat16}), IDS).dtype == jnp.bfloat16
        assert len(traces) == 2

    def test_enable_lora_on_differently_initialized_layers(self):
        first = self.make({})
        second = self.make({"embeddings_initializer": "normal", "seed": 3})
        first.enable_lora(RANK, rngs=nnx.Rngs(0))
        second.enable_lora(RANK, a_initializer="zeros", b_initializer="ones", rngs=nnx.Rngs(5))
        assert nnx.graphdef(first) == nnx.graphdef(first)
        assert nnx.graphdef(first) == nnx.graphdef(second)
        # ... and as a layer created with its adapter.
        assert nnx.graphdef(first) == nnx.graphdef(self.make({"lora_rank": RANK}))
        traces = []

        @nnx.jit
        def forward(layer, ids):
            traces.append(None)
            return layer(ids)

        for layer in (first, second):
            np.testing.assert_array_equal(forward(layer, IDS), layer(IDS))
        assert len(traces) == 1
        # An alpha given to enable_lora is read at call time: another graphdef.
        third = self.make({})
        third.enable_lora(RANK, lora_alpha=8.0, rngs=nnx.Rngs(0))
        assert nnx.graphdef(third) != nnx.graphdef(first)

    def built(self, route):
        """(a layer built by `route`, one created directly with the same arguments)."""
        if route == "quantize":
            layer = self.make({})
            layer.quantize("int8")
            return layer, self.make({"quantization": "int8", "seed": 1})
        if route == "resize":
            layer = self.make({"input_dim": V - 4})
            layer.resize(V)
            return layer, self.make({"seed": 1})
        if route == "enable_trainable_tokens":
            layer = self.make({})
            layer.enable_trainable_tokens([1, 4])
            return layer, self.make({"trainable_token_ids": [3, 9], "seed": 1})
        if route == "merge_lora":
            layer = self.make({"lora_rank": RANK})
            layer.merge_lora()
            return layer, self.make({"seed": 1})
        if route == "linen_round_trip":
            original = self.make({"lora_rank": RANK, "seed": 1})
            return jaxembed.nnx.Embedding.from_linen(*original.to_linen()), original
        if route == "split_merge":
            original = self.make({"lora_rank": RANK})
            return nnx.merge(*nnx.split(original)), original
        raise AssertionError(route)

    @pytest.mark.parametrize(
        "route",
        [
            "quantize",
            "resize",
            "enable_trainable_tokens",
            "merge_lora",
            "linen_round_trip",
            "split_merge",
        ],
    )
    def test_layers_built_by_other_routes_share_the_graphdef(self, route):
        layer, alike = self.built(route)
        assert nnx.graphdef(layer) == nnx.graphdef(alike)

    @pytest.mark.parametrize("name", ["embeddings_initializer", "weights"])
    def test_creation_only_attributes_explain_themselves(self, name):
        layer = self.make({"weights": np.ones((V, D), np.float32)})
        with pytest.raises(AttributeError, match=rf"{name}.*only to create the params"):
            getattr(layer, name)
        assert not hasattr(layer, name)  # hasattr and getattr's default still work
        assert getattr(layer, name, "default") == "default"

    def test_structural_arguments_still_read_from_the_variables(self):
        layer = self.make(
            {
                "lora_rank": RANK,
                "num_lora_adapters": ADAPTERS,
                "quantization": "int8",
                "trainable_token_ids": [9, 2],
                "padding_idx": 1,
                "out_of_range": "clip",
            }
        )
        assert (layer.lora_rank, layer.num_lora_adapters) == (RANK, ADAPTERS)
        assert layer.quantization == "int8"
        assert layer.trainable_token_ids == (2, 9)
        assert (layer.input_dim, layer.padding_idx, layer.out_of_range) == (V, 1, "clip")


@pytest.fixture(scope="module")
def params():
    return jaxembed.init(jax.random.key(0), V, D, embeddings_initializer="normal")


@pytest.fixture(scope="module")
def stacked(params):
    """Params with stacked adapters whose B is not zero."""
    return jaxembed.enable_lora(
        params, jax.random.key(1), RANK, b_initializer="ones", num_adapters=ADAPTERS
    )


class TestSparseIds:
    """Sparse ids made dense, eagerly and under jit; the sweep below gives each argument of
    each public function a sparse array in turn, eagerly."""

    def test_apply(self, params, variant):
        got = variant(jaxembed.apply)(params, bcoo(IDS))  # BCOO is a pytree: jit takes it
        np.testing.assert_array_equal(got, jaxembed.apply(params, IDS))
        assert got.shape == (*IDS.shape, D)

    @pytest.mark.parametrize("layout", [bcoo_batched, bcsr], ids=["bcoo_batched", "bcsr"])
    def test_apply_other_layouts(self, params, layout):
        ids = layout(IDS)
        np.testing.assert_array_equal(ids.todense(), IDS)  # the helper builds what it says
        np.testing.assert_array_equal(jaxembed.apply(params, ids), jaxembed.apply(params, IDS))

    def test_jitted_training_step(self, params):
        @jax.jit
        def step(params, ids, labels):
            def loss(params):
                query = jaxembed.apply(params, ids)
                return jaxembed.attend_cross_entropy(params, query, labels)

            return jax.value_and_grad(loss)(params)

        labels = np.roll(IDS, 1)
        chex.assert_trees_all_equal(
            step(params, bcoo(IDS), bcoo(labels)), step(params, IDS, labels)
        )

    def test_compute_mask(self):
        np.testing.assert_array_equal(jaxembed.compute_mask(bcoo(IDS), True), IDS != 0)
        assert jaxembed.compute_mask(bcoo(IDS), False) is None
        jitted = jax.jit(jaxembed.compute_mask, static_argnums=1)(bcoo(IDS), True)
        np.testing.assert_array_equal(jitted, IDS != 0)

    def test_check_in_range(self):
        jaxembed.check_in_range(bcoo(IDS), V)  # implicit zeros are id 0, in range
        with pytest.raises(IndexError, match="ids"):
            jaxembed.check_in_range(bcoo(IDS), int(IDS.max()))
        with pytest.raises(IndexError, match="-2"):
            jaxembed.check_in_range(bcoo(np.where(IDS == 5, -2, IDS)), V)

    def test_out_of_range_policies(self, params):
        ids = np.where(IDS == 5, V, IDS)
        np.testing.assert_array_equal(
            jaxembed.apply(params, bcoo(ids), out_of_range="clip"),
            jaxembed.apply(params, ids, out_of_range="clip"),
        )
        with pytest.raises(IndexError, match=str(V)):
            jaxembed.apply(params, bcoo(ids))

    def test_linen_module_under_jit(self, stacked):
        module = jaxembed.Embedding(
            V, D, mask_zero=True, lora_rank=RANK, num_lora_adapters=ADAPTERS
        )

        @jax.jit
        def everything(variables, ids, adapter_ids, query):
            return (
                module.apply(variables, ids, adapter_ids),
                module.apply(variables, ids, method="compute_mask"),
                module.apply(variables, query, adapter_ids, method="attend"),
            )

        variables = {"params": stacked}
        sparse_args = (bcoo(IDS), bcoo(ADAPTER_IDS), bcoo(QUERY))
        chex.assert_trees_all_equal(
            everything(variables, *sparse_args), everything(variables, IDS, ADAPTER_IDS, QUERY)
        )

    def test_nnx_module_under_jit(self):
        layer = exercise(
            jaxembed.nnx.Embedding(
                V, D, mask_zero=True, lora_rank=RANK, num_lora_adapters=ADAPTERS, rngs=nnx.Rngs(0)
            )
        )

        @nnx.jit
        def everything(layer, ids, adapter_ids, query):
            return (
                layer(ids, adapter_ids),
                layer.compute_mask(ids),
                layer.attend(query, adapter_ids),
            )

        sparse_args = (bcoo(IDS), bcoo(ADAPTER_IDS), bcoo(QUERY))
        chex.assert_trees_all_equal(
            everything(layer, *sparse_args), everything(layer, IDS, ADAPTER_IDS, QUERY)
        )
        plain = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0))
        loss = nnx.jit(lambda m, q, labels: m.attend_cross_entropy(q, labels))
        np.testing.assert_array_equal(loss(plain, bcoo(QUERY), bcoo(IDS)), loss(plain, QUERY, IDS))

    def test_attend_with_a_sparse_query(self, stacked):
        assert (QUERY == 0).any()  # zeros left implicit
        np.testing.assert_array_equal(
            jaxembed.attend(stacked, bcoo(QUERY), adapter_ids=ADAPTER_IDS),
            jaxembed.attend(stacked, QUERY, adapter_ids=ADAPTER_IDS),
        )

    def test_attend_cross_entropy_with_sparse_labels(self, params):
        expected = jaxembed.attend_cross_entropy(params, QUERY, IDS, reduction="none")
        got = jaxembed.attend_cross_entropy(params, QUERY, bcoo(IDS), reduction="none")
        assert got.shape == IDS.shape
        np.testing.assert_array_equal(got, expected)

    def test_bool_where_mask(self, params):
        # A bool BCOO, the mask's own dtype, which JAX's `todense` refuses (it scatter-adds).
        mask = np.array([[True, True, False, True], [True, False, False, True]])
        expected = jaxembed.attend_cross_entropy(params, QUERY, IDS, where=mask)
        got = jaxembed.attend_cross_entropy(params, QUERY, IDS, where=bcoo(mask))
        np.testing.assert_array_equal(got, expected)

    def test_vocab_parallel_apply_on_one_device(self, params):
        mesh = jax.make_mesh((1,), ("model",))
        got = jaxembed.sharding.vocab_parallel_apply(
            params, bcoo(IDS), vocab_axis="model", mesh=mesh
        )
        np.testing.assert_array_equal(got, jaxembed.apply(params, IDS))

    def test_adapter_ids(self, stacked):
        adapter_ids = np.array([0, 2], np.int32)  # 0: implicit in the sparse array
        np.testing.assert_array_equal(
            jaxembed.apply(stacked, IDS, adapter_ids=bcoo(adapter_ids)),
            jaxembed.apply(stacked, IDS, adapter_ids=adapter_ids),
        )
        # -1 (the base table alone) is stored explicitly.
        np.testing.assert_array_equal(
            jaxembed.apply(stacked, IDS, adapter_ids=bcoo(np.array([-1, 1]))),
            jaxembed.apply(stacked, IDS, adapter_ids=np.array([-1, 1])),
        )

    def test_enable_trainable_tokens(self, params):
        got = jaxembed.enable_trainable_tokens(params, bcoo(TOKEN_IDS))
        chex.assert_trees_all_equal(got, jaxembed.enable_trainable_tokens(params, TOKEN_IDS))
        layer = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0))
        layer.enable_trainable_tokens(bcoo(TOKEN_IDS))
        assert layer.trainable_token_ids == tuple(TOKEN_IDS.tolist())
        with pytest.raises(ValueError, match="token_ids.*distinct"):
            jaxembed.enable_trainable_tokens(params, bcoo(np.array([0, 0, 3])))

    def test_like_keras(self, params):
        table = np.asarray(params["embeddings"])
        layer = keras.layers.Embedding(V, D, weights=table)
        np.testing.assert_array_equal(
            np.asarray(layer(bcoo(IDS))), jaxembed.apply(params, bcoo(IDS))
        )
        module = jaxembed.Embedding(V, D, weights=table)
        np.testing.assert_array_equal(
            np.asarray(layer(bcoo(IDS))),
            module.apply(module.init(jax.random.key(0), IDS), bcoo(IDS)),
        )

    @pytest.mark.parametrize(
        "argument", ["ids", "labels", "query", "adapter_ids", "token_ids", "weights"]
    )
    def test_scipy_sparse_refused(self, params, stacked, argument):
        scipy_sparse = pytest.importorskip("scipy.sparse")
        query = np.ones((2, D), np.float32)
        calls = {
            "ids": lambda x: jaxembed.apply(params, x),
            "labels": lambda x: jaxembed.attend_cross_entropy(params, query, x),
            "query": lambda x: jaxembed.attend(params, x),
            "adapter_ids": lambda x: jaxembed.apply(stacked, IDS[:1], adapter_ids=x),
            "token_ids": lambda x: jaxembed.enable_trainable_tokens(params, x),
            "weights": lambda x: jaxembed.init(None, V, D, weights=x),
        }
        values = {
            "ids": IDS,
            "labels": np.array([[1, 0]]),
            "query": query,
            "adapter_ids": np.array([[1]]),
            "token_ids": np.array([[3, 7]]),
            "weights": np.asarray(params["embeddings"]),
        }
        matrix = scipy_sparse.csr_matrix(values[argument])
        with pytest.raises(TypeError, match=rf"`{argument}`.*{argument}\.toarray\(\)"):
            calls[argument](matrix)


# The sweep: every public function (and module method) taking ids, labels or a query, each such
# argument given as a BCOO array in turn. Each entry: the arguments to make sparse, and a
# function of the fixtures and those arguments.
ID_LIKE = ("ids", "labels", "query", "adapter_ids", "token_ids", "where", "row_grads")


@functools.cache
def _jit_sharded(name):
    """`jaxembed.sharding.<name>` on a 1-device mesh of axis "model", jitted."""
    function = getattr(jaxembed.sharding, name)
    mesh = jax.make_mesh((1,), ("model",))
    static = (0,) if name == "vocab_parallel_update" else ()  # the optimizer
    return jax.jit(
        functools.partial(function, vocab_axis="model", mesh=mesh), static_argnums=static
    )


def _optimizer_update(make):
    def update(f, ids, row_grads):
        optimizer = make(0.1)
        table = f.params["embeddings"]
        return optimizer.update(table, optimizer.init(table), ids, row_grads)

    return update


SWEEP = {
    "jaxembed.apply": (
        ("ids", "adapter_ids"),
        lambda f, ids, adapter_ids: jaxembed.apply(f.stacked, ids, adapter_ids=adapter_ids),
    ),
    "jaxembed.attend": (
        ("query", "adapter_ids"),
        lambda f, query, adapter_ids: jaxembed.attend(f.stacked, query, adapter_ids=adapter_ids),
    ),
    "jaxembed.attend_cross_entropy": (
        ("query", "labels", "where"),
        lambda f, query, labels, where: jaxembed.attend_cross_entropy(
            f.params, query, labels, where=where
        ),
    ),
    "jaxembed.check_in_range": (("ids",), lambda f, ids: jaxembed.check_in_range(ids, V)),
    "jaxembed.compute_mask": (("ids",), lambda f, ids: jaxembed.compute_mask(ids, True)),
    "jaxembed.enable_trainable_tokens": (
        ("token_ids",),
        lambda f, token_ids: jaxembed.enable_trainable_tokens(f.params, token_ids),
    ),
    "jaxembed.trainable_tokens.check_token_ids": (
        ("token_ids",),
        lambda f, token_ids: jaxembed.trainable_tokens.check_token_ids(token_ids, V),
    ),
    "jaxembed.sparse.value_and_row_grads": (
        ("ids",),
        lambda f, ids: jaxembed.sparse.value_and_row_grads(
            lambda rows: jnp.sum(rows**2), f.params, ids
        ),
    ),
    "jaxembed.sparse.nnx_value_and_grad": (
        ("ids",),
        lambda f, ids: jaxembed.sparse.nnx_value_and_grad(lambda m, x: jnp.sum(m(x) ** 2))(
            jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0)), ids
        ),
    ),
    # Every row-wise optimizer's `update` is one function (`jaxembed.sparse._rowwise`).
    "jaxembed.sparse.sgd.update": (("ids", "row_grads"), _optimizer_update(jaxembed.sparse.sgd)),
    # jitted: eager shard_map compiles op by op (seconds a call); BCOO is a pytree.
    "jaxembed.sharding.vocab_parallel_apply": (
        ("ids",),
        lambda f, ids: _jit_sharded("vocab_parallel_apply")(f.params, ids),
    ),
    "jaxembed.sharding.vocab_parallel_attend_cross_entropy": (
        ("query", "labels", "where"),
        lambda f, query, labels, where: _jit_sharded("vocab_parallel_attend_cross_entropy")(
            f.params, query, labels, where=where
        ),
    ),
    "jaxembed.sharding.vocab_parallel_update": (
        ("ids", "row_grads"),
        lambda f, ids, row_grads: _jit_sharded("vocab_parallel_update")(
            f.sgd, f.params["embeddings"], f.sgd.init(f.params["embeddings"]), ids, row_grads
        ),
    ),
    "jaxembed.linen.Embedding.__call__": (
        ("ids", "adapter_ids"),
        lambda f, ids, adapter_ids: f.module.apply(f.variables, ids, adapter_ids),
    ),
    "jaxembed.linen.Embedding.attend": (
        ("query", "adapter_ids"),
        lambda f, query, adapter_ids: f.module.apply(
            f.variables, query, adapter_ids, method="attend"
        ),
    ),
    "jaxembed.linen.Embedding.attend_cross_entropy": (
        ("query", "labels"),
        lambda f, query, labels: jaxembed.Embedding(V, D).apply(
            {"params": f.params}, query, labels, method="attend_cross_entropy"
        ),
    ),
    "jaxembed.linen.Embedding.compute_mask": (
        ("ids",),
        lambda f, ids: f.module.apply(f.variables, ids, method="compute_mask"),
    ),
    "jaxembed.nnx.Embedding.__call__": (
        ("ids", "adapter_ids"),
        lambda f, ids, adapter_ids: f.layer(ids, adapter_ids),
    ),
    "jaxembed.nnx.Embedding.attend": (
        ("query", "adapter_ids"),
        lambda f, query, adapter_ids: f.layer.attend(query, adapter_ids),
    ),
    "jaxembed.nnx.Embedding.attend_cross_entropy": (
        ("query", "labels"),
        lambda f, query, labels: jaxembed.nnx.Embedding(
            V, D, weights=f.params["embeddings"], rngs=nnx.Rngs(0)
        ).attend_cross_entropy(query, labels),
    ),
    "jaxembed.nnx.Embedding.compute_mask": (
        ("ids",),
        lambda f, ids: f.layer.compute_mask(ids),
    ),
    "jaxembed.nnx.Embedding.enable_trainable_tokens": (
        ("token_ids",),
        lambda f, token_ids: _enabled_tokens(token_ids),
    ),
}


def _enabled_tokens(token_ids):
    layer = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0))
    layer.enable_trainable_tokens(token_ids)
    return layer.params()


DENSE = {
    "ids": IDS,
    "labels": IDS,
    "query": QUERY,
    "adapter_ids": ADAPTER_IDS,
    "token_ids": TOKEN_IDS,
    "where": IDS != 0,
    "row_grads": QUERY,
}


class _Fixtures:
    """What the sweep's calls share, built once."""

    def __init__(self):
        self.params = jaxembed.init(jax.random.key(0), V, D, embeddings_initializer="normal")
        self.stacked = jaxembed.enable_lora(
            self.params, jax.random.key(1), RANK, b_initializer="ones", num_adapters=ADAPTERS
        )
        self.sgd = jaxembed.sparse.sgd(0.1)
        self.module = jaxembed.Embedding(
            V, D, mask_zero=True, lora_rank=RANK, num_lora_adapters=ADAPTERS
        )
        self.variables = {"params": self.stacked}
        self.layer = jaxembed.nnx.Embedding.from_linen(self.module, self.variables)


@pytest.fixture(scope="module")
def sweep_fixtures():
    return _Fixtures()


def _public_functions_taking_ids():
    """(name, argument) of every public function and module method with an id-like argument
    annotated `ArrayLike` (the helpers typed `jax.Array`, `jaxembed.sharding.gather_sharding`
    and `attend_shardings`, take JAX arrays only). A function re-exported by the package is
    named as the package exports it (`jaxembed.apply`)."""
    modules = [jaxembed] + [
        getattr(jaxembed, name)
        for name in (
            "functional",
            "loss",
            "sparse",
            "sharding",
            "trainable_tokens",
            "lora",
            "vocabulary",
            "quantization",
            "optim",
            "regularizers",
            "constraints",
        )
    ]
    names = {}  # function -> its first public name
    for module in modules:
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isfunction(value):
                names.setdefault(value, f"{module.__name__}.{name}")
    for cls in (jaxembed.Embedding, jaxembed.nnx.Embedding):
        for name, value in inspect.getmembers(cls, inspect.isfunction):
            names.setdefault(value, f"{cls.__module__}.Embedding.{name}")
    return {
        (name, parameter.name)
        for function, name in names.items()
        for parameter in inspect.signature(function).parameters.values()
        if parameter.name in ID_LIKE and not str(parameter.annotation).startswith("jax.Array")
    }


SWEPT = [(name, argument) for name, (arguments, _) in SWEEP.items() for argument in arguments]


def test_sweep_covers_every_public_function_taking_ids():
    missing = _public_functions_taking_ids() - set(SWEPT)
    assert not missing, f"add these to SWEEP: {sorted(missing)}"


@pytest.mark.parametrize(("name", "argument"), SWEPT, ids=[f"{n}:{a}" for n, a in SWEPT])
def test_sparse_argument_reads_as_dense(sweep_fixtures, name, argument):
    arguments, call = SWEEP[name]
    dense = {key: DENSE[key] for key in arguments}
    expected = call(sweep_fixtures, **dense)
    given = {**dense, argument: bcoo(dense[argument])}
    chex.assert_trees_all_equal(call(sweep_fixtures, **given), expected)


class TestBridge:
    def test_to_linen_boxes_unbox_and_apply(self):
        model = bridge.to_linen(jaxembed.nnx.Embedding, V, D)
        boxed = model.init(jax.random.key(0), IDS)
        table = boxed["params"]["embeddings"]
        assert isinstance(table, bridge.NNXMeta)
        assert nn.get_partition_spec(boxed) == {"params": {"embeddings": P("vocab", "embed")}}
        unboxed = nn.unbox(boxed)
        assert isinstance(unboxed["params"]["embeddings"], jax.Array)
        assert unboxed["params"]["embeddings"].shape == (V, D)
        out = model.apply(unboxed, IDS)
        np.testing.assert_array_equal(out, model.apply(boxed, IDS))
        np.testing.assert_array_equal(out, jaxembed.apply(unboxed["params"], IDS))
        np.testing.assert_array_equal(jax.jit(model.apply)(unboxed, IDS), out)

    def test_to_linen_with_lora(self):
        model = bridge.to_linen(jaxembed.nnx.Embedding, V, D, lora_rank=RANK, lora_alpha=4.0)
        boxed = model.init(jax.random.key(0), IDS)
        specs = nn.get_partition_spec(boxed)
        assert specs["params"] == {"embeddings": P("vocab", "embed")}
        assert specs["LoRAParam"] == {
            "lora_embeddings_a": P("vocab", None),
            "lora_embeddings_b": P(None, "embed"),
        }
        unboxed = nn.unbox(boxed)
        assert jax.tree.map(jnp.shape, unboxed) == {
            "params": {"embeddings": (V, D)},
            "LoRAParam": {"lora_embeddings_a": (V, RANK), "lora_embeddings_b": (RANK, D)},
        }
        b = jnp.linspace(-1, 1, RANK * D).reshape(RANK, D)  # B starts at zero: give it values
        unboxed["LoRAParam"]["lora_embeddings_b"] = b
        out = model.apply(unboxed, IDS)
        params = {**unboxed["params"], **unboxed["LoRAParam"]}
        np.testing.assert_array_equal(out, jaxembed.apply(params, IDS, lora_alpha=4.0))
        assert not np.array_equal(out, jaxembed.apply(unboxed["params"], IDS))

    @pytest.mark.parametrize("kind", AXIS_TYPES)
    def test_to_linen_under_a_foreign_mesh(self, kind):
        model = bridge.to_linen(jaxembed.nnx.Embedding, V, D, lora_rank=RANK)
        reference = nn.unbox(model.init(jax.random.key(0), IDS))
        with jax.set_mesh(foreign_mesh(kind)):
            boxed = model.init(jax.random.key(0), IDS)
            out = jax.jit(model.apply)(nn.unbox(boxed), IDS)
        assert nn.get_partition_spec(boxed)["params"] == {"embeddings": P("vocab", "embed")}
        chex.assert_trees_all_equal(nn.unbox(boxed), reference)
        np.testing.assert_array_equal(out, model.apply(reference, IDS))
