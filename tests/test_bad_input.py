"""Bad input, one pytest class per class of input.

Every public entry point must answer bad input with a clear error that names the argument, or
with a correct result. The first two classes pin the out-of-range contract that the other
classes lean on:

* `TestOutOfRangeContract`: `out_of_range="error"` (the default) raises `IndexError` naming
  the id as the user gave it for concrete ids; under plain `jax.jit` it compiles and gives
  all-NaN rows for bad ids; under `jax.jit(checkify.checkify(...))` the error names the id.
  "fill" gives NaN rows, "clip" the nearest valid row. Checked on `jaxembed.apply`,
  `jaxembed.sharding.vocab_parallel_apply` (1-device mesh), the linen and the NNX modules.
* `TestDefaultsUnderTransformations`: the defaults inside a jitted train step (linen, NNX),
  `jax.lax.scan` and `jax.vmap`.

Then one class per kind of bad input: unsigned ids, 64-bit ids with and without x64, empty
ids, vocabularies too large for int32 indexing, weights or LoRA merges that overflow the
table's dtype, caller-owned weights mutated after construction, integer tables, rank-0
adapters, user callables returning the wrong thing, float16 tables under constraints and
penalties, degenerate tables under the orthogonal regularizer, malformed containers, the
import surface, and quantizing (modes, block sizes, misshapen quantized arrays).

Each class runs its inputs eagerly, under plain `jax.jit` and under `checkify` where those
apply (the `MODES` helpers below). A new kind of bad input gets a new class here, with the
same three variants. Shapes are small and shared so that jit compilations stay few.
"""

import functools
import re
import subprocess
import sys

import chex
import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import checkify

import jaxembed
import jaxembed.nnx
import jaxembed.sharding

KEY = jax.random.key(0)
V, D = 7, 3  # the shared table: row i holds 3i, 3i + 1, 3i + 2
TABLE = np.arange(V * D, dtype=np.float32).reshape(V, D)
PARAMS = {"embeddings": jnp.asarray(TABLE)}
POLICIES = ("error", "fill", "clip")
ENTRY_POINTS = ("apply", "vocab_parallel_apply", "linen", "nnx")
MODES = ("eager", "jit", "checkify")
UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)


@functools.cache
def one_device_mesh():
    # Auto axes: on Explicit axes JAX's checkify cannot read back an error raised around a
    # shard_map (docs/guides/sharding.md); tests/multidevice covers vocab_parallel_apply there.
    return jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))


def lookup(entry, out_of_range=None, params=None):
    """`ids -> rows` through one public entry point; `out_of_range=None` keeps the default."""
    params = PARAMS if params is None else params
    policy = {} if out_of_range is None else {"out_of_range": out_of_range}
    if entry == "apply":
        return functools.partial(jaxembed.apply, params, **policy)
    if entry == "vocab_parallel_apply":
        return functools.partial(
            jaxembed.sharding.vocab_parallel_apply,
            params,
            vocab_axis="model",
            mesh=one_device_mesh(),
            **policy,
        )
    input_dim, output_dim = params["embeddings"].shape
    if entry == "linen":
        module = jaxembed.Embedding(input_dim, output_dim, **policy)
        return functools.partial(module.apply, {"params": params})
    assert entry == "nnx"
    layer = jaxembed.nnx.Embedding(
        input_dim, output_dim, weights=params["embeddings"], **policy, rngs=nnx.Rngs(0)
    )
    return lambda ids: layer(ids)


def run(mode, fn, *args):
    """`fn(*args)` eagerly, under `jax.jit`, or under `jax.jit(checkify.checkify(fn))` with
    the checkify error thrown."""
    if mode == "eager":
        return fn(*args)
    if mode == "jit":
        return jax.jit(fn)(*args)
    assert mode == "checkify"
    error, out = jax.jit(checkify.checkify(fn))(*args)
    error.throw()
    return out


def checkify_error(fn, *args):
    """The checkify error message of `jax.jit(checkify.checkify(fn))(*args)`, or None."""
    error, _ = jax.jit(checkify.checkify(fn))(*args)
    return error.get()


def assert_rows(out, rows):
    """`out` holds TABLE's rows `rows` exactly, with None for an all-NaN row."""
    out = np.asarray(out, dtype=np.float32)
    chex.assert_shape(out, (len(rows), D))
    for got, row in zip(out, rows, strict=True):
        if row is None:
            assert np.isnan(got).all(), f"expected an all-NaN row, got {got}"
        else:
            np.testing.assert_array_equal(got, TABLE[row])


def assert_names_id(message, bad_id, input_dim=V):
    """The message names `bad_id` exactly (not a wrapped or clamped value) and the range."""
    assert message is not None
    assert re.search(rf"(?<![\w-]){re.escape(str(bad_id))}(?!\w)", message), message
    assert f"[0, {input_dim})" in message, message


@pytest.fixture
def x64():
    """`jax_enable_x64` on for one test, restored afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


class TestOutOfRangeContract:
    """The out-of-range policies, on every entry point, eager / jit / checkify."""

    IDS = np.array([-1, 0, 7, 6, 100], np.int32)  # NaN, 0, NaN, 6, NaN
    ONE_BAD = np.array([0, 9, 6, 2, 1], np.int32)  # 9 is the only bad id

    @pytest.mark.parametrize("bad_id", [-1, 7, 100])
    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_error_is_default_and_eager_raises_naming_the_id(self, entry, bad_id):
        with pytest.raises(IndexError, match=r"\bids\b") as info:
            lookup(entry)(np.array([0, bad_id, 1], np.int32))
        assert_names_id(str(info.value), bad_id)

    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_error_under_plain_jit_compiles_and_gives_nan_rows(self, entry):
        out = jax.jit(lookup(entry))(self.IDS)
        assert_rows(out, [None, 0, None, 6, None])

    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_error_under_checkify_names_the_id(self, entry):
        fn = lookup(entry)
        error, out = jax.jit(checkify.checkify(fn))(self.ONE_BAD)
        assert_names_id(error.get(), 9)
        with pytest.raises(checkify.JaxRuntimeError, match=r"\bids\b"):
            error.throw()
        # The output beside a reported error is not pinned down; the valid rows are.
        assert_rows(out[np.array([0, 2, 3, 4])], [0, 6, 2, 1])

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_error_valid_ids_give_exact_rows(self, entry, mode):
        assert_rows(run(mode, lookup(entry), self.ONE_BAD % V), [0, 2, 6, 2, 1])

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_fill_gives_nan_rows_minus_one_included(self, entry, mode):
        assert_rows(run(mode, lookup(entry, "fill"), self.IDS), [None, 0, None, 6, None])

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_clip_gives_the_nearest_row(self, entry, mode):
        assert_rows(run(mode, lookup(entry, "clip"), self.IDS), [0, 0, 6, 6, 6])

    @pytest.mark.parametrize("bad_id", [-1, 7])
    def test_check_in_range_eager_raises(self, bad_id):
        with pytest.raises(IndexError, match=r"\bids\b") as info:
            jaxembed.check_in_range(np.array([1, bad_id]), V)
        assert_names_id(str(info.value), bad_id)

    def test_check_in_range_under_plain_jit_is_a_no_op(self):
        def checked(ids):
            jaxembed.check_in_range(ids, V)
            return ids

        np.testing.assert_array_equal(jax.jit(checked)(self.ONE_BAD), self.ONE_BAD)

    def test_check_in_range_under_checkify_reports(self):
        assert_names_id(
            checkify_error(lambda ids: jaxembed.check_in_range(ids, V), self.ONE_BAD), 9
        )
        assert checkify_error(lambda ids: jaxembed.check_in_range(ids, V), self.ONE_BAD % V) is None


class _LinenRegressor(nn.Module):
    @nn.compact
    def __call__(self, ids):
        vectors = jaxembed.Embedding(1000, 64)(ids)
        return nn.Dense(1)(vectors.mean(axis=1))[..., 0]


class _NnxRegressor(nnx.Module):
    def __init__(self, rngs):
        self.embed = jaxembed.nnx.Embedding(1000, 64, rngs=rngs)
        self.head = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, ids):
        return self.head(self.embed(ids).mean(axis=1))[..., 0]


class TestDefaultsUnderTransformations:
    """`out_of_range="error"` (the default) inside jit, grad, scan and vmap: no checkify."""

    TRAIN_IDS = np.random.default_rng(0).integers(0, 1000, size=(8, 10)).astype(np.int32)
    TARGETS = np.random.default_rng(1).normal(size=(8,)).astype(np.float32)

    def test_linen_train_step_under_jit(self):
        model = _LinenRegressor()
        params = nn.unbox(model.init(KEY, self.TRAIN_IDS)["params"])
        tx = optax.adam(1e-2)

        @jax.jit
        def step(params, opt_state, ids, targets):
            def loss_fn(params):
                return jnp.mean((model.apply({"params": params}, ids) - targets) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        opt_state = tx.init(params)
        losses = []
        for _ in range(5):
            params, opt_state, loss = step(params, opt_state, self.TRAIN_IDS, self.TARGETS)
            losses.append(float(loss))
        assert np.isfinite(losses).all() and losses[-1] < losses[0], losses

    def test_nnx_train_step_under_nnx_jit(self):
        model = _NnxRegressor(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, ids, targets):
            def loss_fn(model):
                return jnp.mean((model(ids) - targets) ** 2)

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        losses = [float(step(model, optimizer, self.TRAIN_IDS, self.TARGETS)) for _ in range(5)]
        assert np.isfinite(losses).all() and losses[-1] < losses[0], losses

    def test_scan_over_a_batch_of_ids(self):
        ids = np.array([[0, 6], [3, 7], [-1, 2]], np.int32)

        def body(carry, row):
            return carry, jaxembed.apply(PARAMS, row)

        _, out = jax.lax.scan(body, None, ids)
        chex.assert_shape(out, (3, 2, D))
        assert_rows(out.reshape(-1, D), [0, 6, 3, None, None, 2])

    def test_vmap(self):
        ids = np.array([[0, 6], [3, 1]], np.int32)
        out = jax.vmap(functools.partial(jaxembed.apply, PARAMS))(ids)
        chex.assert_shape(out, (2, 2, D))
        assert_rows(out.reshape(-1, D), [0, 6, 3, 1])

    def test_vmap_under_jit_gives_nan_rows_for_bad_ids(self):
        ids = np.array([[0, 7], [-1, 1]], np.int32)
        out = jax.jit(jax.vmap(functools.partial(jaxembed.apply, PARAMS)))(ids)
        assert_rows(out.reshape(-1, D), [0, None, None, 1])

    def test_seed_example_under_jit(self):
        layer = jaxembed.Embedding(1000, 64)
        input_array = np.random.default_rng(0).integers(1000, size=(32, 10))
        variables = jax.jit(layer.init)(KEY, input_array)
        output_array = jax.jit(layer.apply)(variables, input_array)
        chex.assert_shape(output_array, (32, 10, 64))
        assert np.isfinite(output_array).all()

    def test_linen_module_under_nn_scan(self):
        class Steps(nn.Module):
            @nn.compact
            def __call__(self, carry, ids):
                return carry, jaxembed.Embedding(V, D, weights=TABLE)(ids)

        scan = nn.scan(Steps, variable_broadcast="params", split_rngs={"params": False})
        ids = np.array([[0, 6], [9, 2]], np.int32)
        variables = scan().init(KEY, None, ids)
        _, out = jax.jit(scan().apply)(variables, None, ids)
        assert_rows(out.reshape(-1, D), [0, 6, None, 2])

    def test_apply_inside_shard_map(self):
        mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        lookup = jax.shard_map(
            functools.partial(jaxembed.apply, PARAMS),
            mesh=mesh,
            in_specs=jax.P("data"),
            out_specs=jax.P("data"),
        )
        out = jax.jit(lookup)(np.array([1, 7], np.int32))
        assert_rows(out, [1, None])

    @pytest.mark.parametrize(
        ("policy", "reference"),
        [
            (
                "fill",
                lambda t, i: t.at[i].get(
                    mode="fill", fill_value=jnp.nan, wrap_negative_indices=False
                ),
            ),
            ("clip", lambda t, i: t.at[jnp.clip(i, 0, V - 1)].get(mode="promise_in_bounds")),
        ],
    )
    def test_fill_and_clip_cost_what_a_bare_gather_costs(self, policy, reference):
        # The policy machinery must compile away: no more flops or bytes than the bare gather.
        ids = np.zeros((64, 16), np.int32)

        def cost(fn):
            analysis = jax.jit(fn).lower(PARAMS["embeddings"], ids).compile().cost_analysis()
            return np.array([analysis["flops"], analysis["bytes accessed"]])

        ours = cost(lambda t, i: jaxembed.apply({"embeddings": t}, i, out_of_range=policy))
        assert (ours <= cost(reference)).all(), (ours, cost(reference))


class TestUnsignedIds:
    """uint8 / uint16 / uint32 / uint64 ids (the traced check overflowed on uint32, uint64)."""

    VALID = (0, 3, 6)

    @pytest.mark.parametrize(
        ("policy", "mode"),
        [
            *((policy, mode) for policy in POLICIES for mode in ("eager", "jit")),
            ("error", "checkify"),
        ],
    )
    @pytest.mark.parametrize("dtype", UNSIGNED, ids=lambda t: t.__name__)
    def test_valid_ids_give_the_rows(self, dtype, policy, mode):
        out = run(mode, lookup("apply", policy), np.array(self.VALID, dtype))
        assert_rows(out, self.VALID)

    @pytest.mark.parametrize("policy", POLICIES)
    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_valid_uint32_under_jit_on_every_entry_point(self, entry, policy):
        out = jax.jit(lookup(entry, policy))(np.array(self.VALID, np.uint32))
        assert_rows(out, self.VALID)

    @pytest.mark.parametrize("where", ["input_dim", "dtype_max"])
    @pytest.mark.parametrize("dtype", UNSIGNED, ids=lambda t: t.__name__)
    def test_out_of_range_eager(self, dtype, where):
        bad = V if where == "input_dim" else int(np.iinfo(dtype).max)
        ids = np.array([2, bad], dtype)
        with pytest.raises(IndexError, match=r"\bids\b") as info:
            jaxembed.apply(PARAMS, ids)
        assert_names_id(str(info.value), bad)
        assert_rows(jaxembed.apply(PARAMS, ids, out_of_range="fill"), [2, None])
        assert_rows(jaxembed.apply(PARAMS, ids, out_of_range="clip"), [2, V - 1])

    @pytest.mark.parametrize("policy", POLICIES)
    @pytest.mark.parametrize("dtype", UNSIGNED, ids=lambda t: t.__name__)
    def test_out_of_range_under_jit(self, dtype, policy):
        ids = np.array([2, V, int(np.iinfo(dtype).max)], dtype)
        out = jax.jit(lookup("apply", policy))(ids)
        assert_rows(out, [2, V - 1, V - 1] if policy == "clip" else [2, None, None])


# name: (ids, the offending id as given, the row 'clip' gives for it)
WIDE_IDS = {
    "int64_2**32+3": (np.array([1, 2**32 + 3], np.int64), 2**32 + 3, V - 1),
    "uint64_2**32+3": (np.array([1, 2**32 + 3], np.uint64), 2**32 + 3, V - 1),
    "int64_-2**63": (np.array([1, -(2**63)], np.int64), -(2**63), 0),
    "list_2**40": ([1, 2**40], 2**40, V - 1),
}


class TestWideIdsWithoutX64:
    """int64 / uint64 NumPy ids and big Python ints, eagerly, with jax_enable_x64 off: they
    must not wrap to 32 bits (2**32 + 3 became row 3)."""

    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    @pytest.mark.parametrize("case", WIDE_IDS)
    def test_error_names_the_true_id(self, case, entry):
        ids, bad, _ = WIDE_IDS[case]
        with pytest.raises(IndexError, match=r"\bids\b") as info:
            lookup(entry)(ids)
        assert_names_id(str(info.value), bad)

    @pytest.mark.parametrize("entry", ["apply", "linen", "nnx"])
    @pytest.mark.parametrize("case", WIDE_IDS)
    def test_fill_gives_a_nan_row(self, case, entry):
        ids, _, _ = WIDE_IDS[case]
        assert_rows(lookup(entry, "fill")(ids), [1, None])

    @pytest.mark.parametrize("entry", ["apply", "linen", "nnx"])
    @pytest.mark.parametrize("case", WIDE_IDS)
    def test_clip_gives_the_nearest_end(self, case, entry):
        ids, _, row = WIDE_IDS[case]
        assert_rows(lookup(entry, "clip")(ids), [1, row])

    def test_vocab_parallel_apply_fill_and_clip(self):
        # One call per policy: each eager vocab_parallel_apply compiles a shard_map.
        ids = np.array([1, 2**32 + 3, -(2**63), 2**40], np.int64)
        assert_rows(lookup("vocab_parallel_apply", "fill")(ids), [1, None, None, None])
        assert_rows(lookup("vocab_parallel_apply", "clip")(ids), [1, V - 1, 0, V - 1])

    def test_check_in_range_names_the_true_id(self):
        with pytest.raises(IndexError, match=r"\bids\b") as info:
            jaxembed.check_in_range(np.array([2**32 + 3], np.int64), V)
        assert_names_id(str(info.value), 2**32 + 3)


class TestWideIdsWithX64:
    """int64 / uint64 ids with jax_enable_x64 on, eager and jitted."""

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_fill_int64(self, x64, entry, mode):
        ids = jnp.array([2**32 + 3, -(2**63), 2], jnp.int64)
        assert_rows(run(mode, lookup(entry, "fill"), ids), [None, None, 2])

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_clip_int64(self, x64, entry, mode):
        ids = jnp.array([2**32 + 3, -(2**63), 2], jnp.int64)
        assert_rows(run(mode, lookup(entry, "clip"), ids), [V - 1, 0, 2])

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("policy", ["fill", "clip"])
    def test_uint64(self, x64, policy, mode):
        ids = jnp.array([2**40 + 5, 2], jnp.uint64)
        out = run(mode, lookup("apply", policy), ids)
        assert_rows(out, [V - 1 if policy == "clip" else None, 2])

    @pytest.mark.parametrize("bad", [2**32 + 3, -(2**63)])
    def test_error_eager_names_the_id(self, x64, bad):
        with pytest.raises(IndexError, match=r"\bids\b") as info:
            jaxembed.apply(PARAMS, jnp.array([2, bad], jnp.int64))
        assert_names_id(str(info.value), bad)

    def test_error_under_jit_and_checkify(self, x64):
        ids = jnp.array([2, 2**32 + 3], jnp.int64)
        assert_rows(jax.jit(lookup("apply"))(ids), [2, None])
        assert_names_id(checkify_error(lookup("apply"), ids), 2**32 + 3)


class TestEmptyIds:
    """Zero-size ids: the output is `ids.shape + (output_dim,)`, never an error."""

    SHAPES = ((0,), (0, 5), (5, 0))

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("policy", POLICIES)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_apply_shape(self, shape, policy, mode):
        out = run(mode, lookup("apply", policy), np.zeros(shape, np.int32))
        chex.assert_shape(out, (*shape, D))
        chex.assert_type(out, jnp.float32)

    # Fewer combinations: each vocab_parallel_apply call compiles a shard_map.
    @pytest.mark.parametrize(
        ("shape", "policy", "mode"),
        [
            ((0,), "error", "eager"),
            ((5, 0), "error", "eager"),
            ((0, 5), "error", "eager"),
            ((0, 5), "error", "jit"),
            ((0, 5), "error", "checkify"),
            ((0, 5), "fill", "jit"),
            ((0, 5), "clip", "jit"),
        ],
        ids=str,
    )
    def test_vocab_parallel_apply_shape(self, shape, policy, mode):
        out = run(mode, lookup("vocab_parallel_apply", policy), np.zeros(shape, np.int32))
        chex.assert_shape(out, (*shape, D))
        chex.assert_type(out, jnp.float32)

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_check_in_range_passes(self, shape, mode):
        def checked(ids):
            jaxembed.check_in_range(ids, V)
            return ids

        chex.assert_shape(run(mode, checked, np.zeros(shape, np.int32)), shape)


class TestHugeVocabulary:
    """input_dim >= 2**31 cannot be indexed with int32: refuse without x64, work with it."""

    HUGE = jax.ShapeDtypeStruct((2**31, 1), jnp.float32)

    @pytest.mark.parametrize("policy", POLICIES)
    def test_refused_without_x64(self, policy):
        ids = jax.ShapeDtypeStruct((4,), jnp.int32)
        with pytest.raises(ValueError, match=r"\binput_dim\b") as info:
            jax.eval_shape(
                lambda t, i: jaxembed.apply({"embeddings": t}, i, out_of_range=policy),
                self.HUGE,
                ids,
            )
        assert re.search(r"int64|jax_enable_x64", str(info.value)), str(info.value)

    @pytest.mark.parametrize("policy", POLICIES)
    def test_works_with_x64_and_int64_ids(self, x64, policy):
        ids = jax.ShapeDtypeStruct((4,), jnp.int64)
        out = jax.eval_shape(
            lambda t, i: jaxembed.apply({"embeddings": t}, i, out_of_range=policy),
            self.HUGE,
            ids,
        )
        assert isinstance(out, jax.ShapeDtypeStruct)
        assert out.shape == (4, 1)


class TestWeightsOverflowParamDtype:
    """Finite `weights` that become inf when cast to `param_dtype`."""

    CASES = ((1e5, jnp.float16), (1e300, jnp.float32), (1e39, jnp.bfloat16))

    @staticmethod
    def build(entry, weights, param_dtype):
        if entry == "init":
            return jaxembed.init(None, 2, 2, weights=weights, param_dtype=param_dtype)
        if entry == "linen":
            module = jaxembed.Embedding(2, 2, weights=weights, param_dtype=param_dtype)
            return module.init(KEY, np.zeros((1,), np.int32))
        assert entry == "nnx"
        return jaxembed.nnx.Embedding(
            2, 2, weights=weights, param_dtype=param_dtype, rngs=nnx.Rngs(0)
        )

    @pytest.mark.parametrize("entry", ["init", "linen", "nnx"])
    @pytest.mark.parametrize(
        ("value", "param_dtype"), CASES, ids=lambda v: getattr(v, "__name__", str(v))
    )
    def test_refused_naming_weights_and_dtype(self, entry, value, param_dtype):
        with pytest.raises(ValueError, match=r"\bweights\b") as info:
            self.build(entry, np.full((2, 2), value), param_dtype)
        assert jnp.dtype(param_dtype).name in str(info.value), str(info.value)


def _overflowing_adapter(dtype):
    """Params whose float32 merge is finite but overflows `dtype`: (params, table value)."""
    if dtype == jnp.float16:
        value, delta = 60000.0, 10000.0  # 70000 > float16 max 65504
    else:
        value = float(jnp.asarray(3.3e38, jnp.bfloat16))
        delta = float(np.float32(3.4e38) - np.float32(value))  # 3.4e38 > bfloat16 max
    assert np.isfinite(np.float32(value) + np.float32(delta))
    params = {
        "embeddings": jnp.full((2, 2), value, dtype),
        "lora_embeddings_a": jnp.ones((2, 1), jnp.float32),
        "lora_embeddings_b": jnp.full((1, 2), delta, jnp.float32),
    }
    return params, value


class TestMergeOverflowsTableDtype:
    """`merge_lora(safe_merge=True)`: finite in float32, infinite once cast back."""

    DTYPES = (jnp.float16, jnp.bfloat16)

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
    def test_pure_merge_refused(self, dtype):
        params, _ = _overflowing_adapter(dtype)
        with pytest.raises(ValueError, match=r"\bsafe_merge\b"):
            jaxembed.merge_lora(params, safe_merge=True)

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
    def test_pure_merge_under_checkify_reports(self, dtype):
        params, _ = _overflowing_adapter(dtype)
        merge = functools.partial(jaxembed.merge_lora, safe_merge=True)
        assert checkify_error(merge, params) is not None

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
    def test_nnx_merge_refused_and_layer_unchanged(self, dtype):
        params, value = _overflowing_adapter(dtype)
        layer = jaxembed.nnx.Embedding(
            2, 2, weights=params["embeddings"], param_dtype=dtype, rngs=nnx.Rngs(0)
        )
        layer.enable_lora(1, rngs=nnx.Rngs(1))
        layer.lora_embeddings_a[...] = params["lora_embeddings_a"]
        layer.lora_embeddings_b[...] = params["lora_embeddings_b"]
        with pytest.raises(ValueError, match=r"\bsafe_merge\b"):
            layer.merge_lora(safe_merge=True)
        assert layer.lora_rank == 1
        np.testing.assert_array_equal(np.asarray(layer.embeddings[...], np.float32), value)


class TestWeightsCopiedAtConstruction:
    """The caller's `weights` array mutated after construction must not reach the table."""

    @staticmethod
    def weights():
        return np.arange(6, dtype=np.float32).reshape(3, 2)

    def test_init(self):
        weights = self.weights()
        params = jaxembed.init(None, 3, 2, weights=weights)
        weights[:] = 7
        np.testing.assert_array_equal(params["embeddings"], self.weights())

    def test_linen(self):
        weights = self.weights()
        module = jaxembed.Embedding(3, 2, weights=weights)
        weights[:] = 7
        variables = nn.unbox(module.init(KEY, np.zeros((1,), np.int32)))
        np.testing.assert_array_equal(variables["params"]["embeddings"], self.weights())

    def test_nnx(self):
        weights = self.weights()
        layer = jaxembed.nnx.Embedding(3, 2, weights=weights, rngs=nnx.Rngs(0))
        weights[:] = 7
        np.testing.assert_array_equal(layer.embeddings[...], self.weights())


INT_TABLE_PARAMS = {"embeddings": jnp.ones((4, 2), jnp.int32)}
INT_TABLE_CALLS = {
    "apply": lambda p: jaxembed.apply(p, np.array([1], np.int32)),
    "vocab_parallel_apply": lambda p: lookup("vocab_parallel_apply", params=p)(
        np.array([1], np.int32)
    ),
    "attend": lambda p: jaxembed.attend(p, jnp.ones((1, 2))),
    "regularization_penalty": lambda p: jaxembed.regularization_penalty(p, "l2"),
    "apply_constraint": lambda p: jaxembed.apply_constraint(p, "max_norm"),
}


class TestIntegerTables:
    """An integer `embeddings` table is refused, naming it and asking for floating point."""

    @pytest.mark.parametrize("call", INT_TABLE_CALLS)
    def test_refused(self, call):
        with pytest.raises((TypeError, ValueError), match=r"\bembeddings\b") as info:
            INT_TABLE_CALLS[call](INT_TABLE_PARAMS)
        assert "floating" in str(info.value), str(info.value)


RANK_ZERO_PARAMS = {
    "embeddings": jnp.ones((4, 2)),
    "lora_embeddings_a": jnp.zeros((4, 0)),
    "lora_embeddings_b": jnp.zeros((0, 2)),
}
RANK_ZERO_CALLS = {
    "apply": lambda p, a: jaxembed.apply(p, np.array([1], np.int32), lora_alpha=a),
    "attend": lambda p, a: jaxembed.attend(p, jnp.ones((1, 2)), lora_alpha=a),
    "merge_lora": lambda p, a: jaxembed.merge_lora(p, lora_alpha=a),
}


class TestRankZeroAdapter:
    """A hand-built adapter of rank 0: a ValueError naming the rank, not ZeroDivisionError."""

    @pytest.mark.parametrize("lora_alpha", [None, 2.0])
    @pytest.mark.parametrize("call", RANK_ZERO_CALLS)
    def test_refused(self, call, lora_alpha):
        with pytest.raises(ValueError, match=r"\brank\b"):
            RANK_ZERO_CALLS[call](RANK_ZERO_PARAMS, lora_alpha)


BAD_REGULARIZERS = {"vector": lambda w: jnp.ones(3), "none": lambda w: None}
BAD_CONSTRAINTS = {
    "transposed": lambda w: w.T,
    "broadcasting": lambda w: w[:1],
    "none": lambda w: None,
}


class TestUserCallables:
    """Regularizers and constraints that return the wrong thing, eager and under jit."""

    IDS = np.array([1, 2], np.int32)

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("regularizer", BAD_REGULARIZERS)
    def test_regularization_penalty(self, regularizer, mode):
        fn = functools.partial(
            jaxembed.regularization_penalty, embeddings_regularizer=BAD_REGULARIZERS[regularizer]
        )
        with pytest.raises(ValueError, match=r"\bembeddings_regularizer\b"):
            run(mode, fn, PARAMS)

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("regularizer", BAD_REGULARIZERS)
    def test_linen_call_that_sows_the_penalty(self, regularizer, mode):
        with pytest.raises(ValueError, match=r"\bembeddings_regularizer\b"):
            module = jaxembed.Embedding(V, D, embeddings_regularizer=BAD_REGULARIZERS[regularizer])
            fn = functools.partial(module.apply, {"params": PARAMS}, mutable=["losses"])
            run(mode, fn, self.IDS)

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("regularizer", BAD_REGULARIZERS)
    def test_nnx_regularization_penalty(self, regularizer, mode):
        with pytest.raises(ValueError, match=r"\bembeddings_regularizer\b"):
            layer = jaxembed.nnx.Embedding(
                V,
                D,
                weights=TABLE,
                embeddings_regularizer=BAD_REGULARIZERS[regularizer],
                rngs=nnx.Rngs(0),
            )
            if mode == "eager":
                layer.regularization_penalty()
            else:
                nnx.jit(lambda layer: layer.regularization_penalty())(layer)

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("constraint", BAD_CONSTRAINTS)
    def test_apply_constraint(self, constraint, mode):
        fn = functools.partial(
            jaxembed.apply_constraint, embeddings_constraint=BAD_CONSTRAINTS[constraint]
        )
        with pytest.raises(ValueError, match=r"\bembeddings_constraint\b"):
            run(mode, fn, PARAMS)

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("constraint", BAD_CONSTRAINTS)
    def test_keep_embeddings_constrained_update(self, constraint, mode):
        tx = jaxembed.keep_embeddings_constrained(BAD_CONSTRAINTS[constraint])
        updates = jax.tree.map(jnp.zeros_like, PARAMS)

        def update(updates, params):
            return tx.update(updates, tx.init(params), params)[0]

        with pytest.raises(ValueError, match=r"\bembeddings_constraint\b"):
            run(mode, update, updates, PARAMS)


F16_PARAMS = {"embeddings": jnp.ones((70000, 2), jnp.float16)}


class TestFloat16Tables:
    """Norms and penalties of a float16 table whose sums overflow float16 (70000 ones)."""

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize(
        ("constraint", "norm"), [("max_norm", 2.0), ("unit_norm", 1.0), ("min_max_norm", 1.0)]
    )
    def test_norm_constraints_do_not_zero_the_table(self, constraint, norm, mode):
        fn = functools.partial(jaxembed.apply_constraint, embeddings_constraint=constraint)
        table = run(mode, fn, F16_PARAMS)["embeddings"]
        chex.assert_type(table, jnp.float16)
        table = np.asarray(table, np.float32)
        assert np.isfinite(table).all()
        column_norms = np.linalg.norm(table, axis=0)
        np.testing.assert_allclose(column_norms, norm, rtol=1e-2)

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize(("regularizer", "expected"), [("l1", 1400), ("l2", 1400)])
    def test_penalties_are_finite(self, regularizer, expected, mode):
        fn = functools.partial(jaxembed.regularization_penalty, embeddings_regularizer=regularizer)
        penalty = run(mode, fn, F16_PARAMS)
        chex.assert_shape(penalty, ())
        np.testing.assert_allclose(float(penalty), expected, rtol=1e-2)

    def test_l1_l2_penalty_is_finite(self):
        penalty = jaxembed.regularization_penalty(F16_PARAMS, "l1_l2")
        np.testing.assert_allclose(float(penalty), 2800, rtol=1e-2)


class TestOrthogonalRegularizerDegenerate:
    """A single row (no pairs) and an all-zero row: finite penalty, finite gradient."""

    @pytest.mark.parametrize(("mode", "shape"), [("rows", (1, 4)), ("columns", (4, 1))])
    def test_single_row_or_column_gives_zero(self, mode, shape):
        regularizer = jaxembed.regularizers.orthogonal_regularizer(mode=mode)
        penalty = jaxembed.regularization_penalty({"embeddings": jnp.ones(shape)}, regularizer)
        assert float(penalty) == 0.0

    def test_by_name(self):
        params = {"embeddings": jnp.ones((1, 4))}
        assert float(jaxembed.regularization_penalty(params, "orthogonal_regularizer")) == 0.0

    @pytest.mark.parametrize("mode", ["rows", "columns"])
    def test_zero_row_or_column_penalty_and_grad_are_finite(self, mode):
        table = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
        table = table if mode == "columns" else table.T  # a zero column / a zero row
        regularizer = jaxembed.regularizers.orthogonal_regularizer(mode=mode)

        def penalty(table):
            return jaxembed.regularization_penalty({"embeddings": table}, regularizer)

        value, grad = jax.jit(jax.value_and_grad(penalty))(table)
        assert np.isfinite(float(value)) and float(value) > 0
        assert np.isfinite(np.asarray(grad)).all(), grad


RAGGED_IDS = [[1, 2], [3]]
IDS_CALLS = {
    "apply": lambda ids: jaxembed.apply(PARAMS, ids),
    "vocab_parallel_apply": lambda ids: lookup("vocab_parallel_apply")(ids),
    "check_in_range": lambda ids: jaxembed.check_in_range(ids, V),
    "compute_mask": lambda ids: jaxembed.compute_mask(ids, mask_zero=True),
}


class TestMalformedContainers:
    """Ragged id lists, variables without a table, non-dict params, wide ids in messages."""

    @pytest.mark.parametrize("call", IDS_CALLS)
    def test_ragged_ids(self, call):
        with pytest.raises((TypeError, ValueError), match=r"\bids\b"):
            IDS_CALLS[call](RAGGED_IDS)

    @pytest.mark.parametrize("variables", [{"params": {}}, {}], ids=["params", "bare"])
    def test_from_linen_without_a_table(self, variables):
        module = jaxembed.Embedding(V, D)
        with pytest.raises(ValueError, match="embeddings"):
            jaxembed.nnx.Embedding.from_linen(module, variables)

    BIG = np.ones((100, 8), np.float32)  # printed in full by repr: 800 numbers

    @pytest.mark.parametrize("params", [(BIG,), BIG], ids=["tuple", "array"])
    def test_non_mapping_params_give_a_short_message(self, params):
        with pytest.raises((TypeError, ValueError), match=r"\bparams\b") as info:
            jaxembed.apply(params, np.array([1], np.int32))
        assert len(str(info.value)) < 500, str(info.value)

    def test_frozen_dict_params_work_or_give_a_short_message(self):
        # A flax FrozenDict is a read-only mapping: looking up in it is fine, and refusing
        # it is fine too, but not with a message that prints the whole table.
        params = flax.core.FrozenDict({"embeddings": self.BIG})
        try:
            out = jaxembed.apply(params, np.array([1], np.int32))
        except (TypeError, ValueError) as error:
            assert re.search(r"\bparams\b", str(error)), str(error)
            assert len(str(error)) < 500, str(error)
        else:
            np.testing.assert_array_equal(out, self.BIG[[1]])

    def test_uint64_id_reported_by_its_true_value(self):
        with pytest.raises(IndexError, match=r"\bids\b") as info:
            jaxembed.apply(PARAMS, np.array([2**40 + 5], np.uint64))
        assert_names_id(str(info.value), 1099511627781)


class TestImportSurface:
    """`import jaxembed` alone exposes every submodule (a fresh interpreter)."""

    def test_submodules_after_import_jaxembed(self):
        code = (
            "import jaxembed; jaxembed.nnx.Embedding; "
            "jaxembed.lora, jaxembed.sharding, jaxembed.linen"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr[-2000:]


Q_TABLE = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
Q_PARAMS = {"embeddings": jnp.asarray(Q_TABLE)}
Q_INT8 = jaxembed.quantize(Q_PARAMS, "int8")
Q_INT4_GROUPED = jaxembed.quantize(Q_PARAMS, "int4", block_size=4)  # scale, zero: (5, 2)
Q_IDS = np.array([1, 4], np.int32)
VALUE_KEYS = ("embeddings_int8", "embeddings_int4")


def quantize_fn(mode, **kwargs):
    """`params -> jaxembed.quantize(params, mode, **kwargs)`, the hyperparameters static."""
    return functools.partial(jaxembed.quantize, mode=mode, **kwargs)


def assert_names(message, *names):
    for name in names:
        assert name in message, (name, message)


Q_TWO_TABLES = {
    "float and int8": {**PARAMS, **Q_INT8},
    "int8 and int4": {**Q_INT8, "embeddings_int4": jnp.zeros((5, 4), jnp.int8)},
}

Q_TWO_TABLE_CALLS = {
    "apply": lambda p: jaxembed.apply(p, Q_IDS),
    "quantize": lambda p: jaxembed.quantize(p, "int8"),
    "dequantize": jaxembed.dequantize,
}

Q_MISSHAPEN = {
    "float values": (
        Q_INT8,
        {"embeddings_int8": Q_INT8["embeddings_int8"].astype(jnp.float32)},
        ValueError,
        ["params['embeddings_int8']", "int8", "float32"],
    ),
    "1-D values": (
        Q_INT8,
        {"embeddings_int8": jnp.zeros((40,), jnp.int8)},
        ValueError,
        ["params['embeddings_int8']", "2-D", "(40,)"],
    ),
    "scale too short": (
        Q_INT8,
        {"embeddings_scale": Q_INT8["embeddings_scale"][:-1]},
        ValueError,
        ["params['embeddings_scale']", "(5,)", "Received: shape (4,)"],
    ),
    "grouped scale on a per-row table": (
        Q_INT8,
        {"embeddings_scale": jnp.ones((5, 2))},
        ValueError,
        ["params['embeddings_scale']", "(5,)", "Received: shape (5, 2)"],
    ),
    "integer scale": (
        Q_INT8,
        {"embeddings_scale": jnp.ones((5,), jnp.int32)},
        TypeError,
        ["params['embeddings_scale']", "floating", "int32"],
    ),
    "zero of the wrong dtype": (
        Q_INT4_GROUPED,
        {"embeddings_zero": Q_INT4_GROUPED["embeddings_zero"].astype(jnp.int32)},
        ValueError,
        ["params['embeddings_zero']", "int8", "(5, 2)", "int32"],
    ),
    "zero of the wrong shape": (
        Q_INT4_GROUPED,
        {"embeddings_zero": jnp.zeros((5, 1), jnp.int8)},
        ValueError,
        ["params['embeddings_zero']", "(5, 2)", "(5, 1)"],
    ),
    "groups not dividing": (
        Q_INT4_GROUPED,
        {"embeddings_scale": jnp.ones((5, 3)), "embeddings_zero": jnp.zeros((5, 3), jnp.int8)},
        ValueError,
        ["params['embeddings_scale']", "output_dim=8", "3 groups"],
    ),
    "no groups": (
        Q_INT4_GROUPED,
        {"embeddings_scale": jnp.ones((5, 0)), "embeddings_zero": jnp.zeros((5, 0), jnp.int8)},
        ValueError,
        ["params['embeddings_scale']", "output_dim=8", "0 groups"],
    ),
    "scale rows differ from values rows": (
        Q_INT4_GROUPED,
        {"embeddings_scale": jnp.ones((4, 2)), "embeddings_zero": jnp.zeros((4, 2), jnp.int8)},
        ValueError,
        ["params['embeddings_scale']", "(5, groups)", "(4, 2)"],
    ),
}

# Every function reads params through the same check: two entry points suffice.
Q_MISSHAPEN_CALLS = {
    "apply": lambda p: jaxembed.apply(p, Q_IDS),
    "dequantize": jaxembed.dequantize,
}


class TestQuantize:
    """Quantizing and reading quantized params: every refusal names the argument (or the
    params key) and the value received, eagerly and under `jax.jit`."""

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize(
        ("quantization_mode", "shown"),
        [("int2", "'int2'"), (None, "None"), (8, "8"), ("INT8", "'INT8'")],
    )
    def test_unknown_mode(self, quantization_mode, shown, mode):
        with pytest.raises(ValueError, match=r"`mode`") as info:
            run(mode, quantize_fn(quantization_mode), Q_PARAMS)
        assert_names(str(info.value), f"mode={shown}", "'int8'", "'int4'")

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("params", [Q_INT8, Q_INT4_GROUPED], ids=["int8", "int4/4"])
    def test_quantizing_twice(self, params, mode):
        with pytest.raises(ValueError, match="already quantized") as info:
            run(mode, quantize_fn("int8"), params)
        assert_names(str(info.value), "`params`", "mode='int8'", "jaxembed.dequantize")

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize(
        ("quantization_mode", "block_size", "shown"),
        [
            ("int8", 0, "block_size=0"),
            ("int8", -1, "block_size=-1"),
            ("int4", 3.5, "block_size=3.5"),
            ("int4", True, "block_size=True"),
            ("int8", 4.0, "block_size=4.0"),
            ("int8", "4", "block_size='4'"),
            ("int8", 3, "block_size=3"),  # does not divide output_dim=8
            ("int4", 16, "block_size=16"),  # larger than output_dim=8
        ],
    )
    def test_bad_block_size(self, quantization_mode, block_size, shown, mode):
        with pytest.raises(ValueError, match=r"`block_size`") as info:
            run(mode, quantize_fn(quantization_mode, block_size=block_size), Q_PARAMS)
        assert_names(str(info.value), shown)

    def test_block_size_not_dividing_names_output_dim(self):
        with pytest.raises(ValueError, match="divide output_dim=8") as info:
            jaxembed.quantize(Q_PARAMS, "int8", block_size=3)
        assert_names(str(info.value), "block_size=3")

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("block_size", [None, 7])
    def test_int4_odd_output_dim(self, block_size, mode):
        params = {"embeddings": jnp.ones((3, 7))}
        with pytest.raises(ValueError) as info:
            run(mode, quantize_fn("int4", block_size=block_size), params)
        # a block of 7 divides output_dim=7; the odd output_dim is what int4 cannot pack
        assert_names(str(info.value), "output_dim=7", "Pad", "mode='int8'")
        # int8 takes an odd output_dim.
        assert jaxembed.quantize(params, "int8")["embeddings_int8"].shape == (3, 7)

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("params", [Q_INT8, Q_INT4_GROUPED], ids=["int8", "int4/4"])
    @pytest.mark.parametrize("constraint", ["max_norm", "non_neg"])
    def test_constraints_refused(self, params, constraint, mode):
        fn = functools.partial(jaxembed.apply_constraint, embeddings_constraint=constraint)
        with pytest.raises(ValueError, match="frozen") as info:
            run(mode, fn, params)
        assert_names(str(info.value), "apply_constraint", "embeddings_constraint")
        # With an adapter beside the table, the refusal stays.
        with pytest.raises(ValueError, match="frozen"):
            run(mode, fn, jaxembed.enable_lora(params, KEY, 2))

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    def test_dequantize_float_params(self, mode):
        with pytest.raises(ValueError, match="quantized table") as info:
            run(mode, jaxembed.dequantize, PARAMS)
        assert_names(str(info.value), "`params`", "['embeddings']")

    def test_dequantize_integer_dtype(self):
        with pytest.raises(ValueError, match=r"`dtype`") as info:
            jaxembed.dequantize(Q_INT8, dtype=jnp.int32)
        assert_names(str(info.value), "dtype=", "int32")

    def test_merge_lora_requantize_must_be_a_bool(self):
        params = jaxembed.enable_lora(Q_INT8, KEY, 2)
        with pytest.raises(ValueError, match=r"`requantize`") as info:
            jaxembed.merge_lora(params, requantize="yes")
        assert_names(str(info.value), "requantize='yes'")

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("call", Q_TWO_TABLE_CALLS)
    @pytest.mark.parametrize("params", Q_TWO_TABLES)
    def test_two_tables(self, params, call, mode):
        params = Q_TWO_TABLES[params]
        with pytest.raises(ValueError, match="one table") as info:
            run(mode, Q_TWO_TABLE_CALLS[call], params)
        tables = sorted(key for key in params if key in ("embeddings", *VALUE_KEYS))
        assert_names(str(info.value), "`params`", str(tables))

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("call", Q_MISSHAPEN_CALLS)
    @pytest.mark.parametrize("case", Q_MISSHAPEN)
    def test_misshapen_or_mistyped_arrays(self, case, call, mode):
        params, changes, error, names = Q_MISSHAPEN[case]
        with pytest.raises(error) as info:
            run(mode, Q_MISSHAPEN_CALLS[call], {**params, **changes})
        message = str(info.value)
        assert_names(message, *names)  # the received shape as a tuple, eager or traced
        assert len(message) < 500, message
        # A traced array is not a hyperparameter: no advice to make it static.
        assert "static" not in message, message

    def test_half_a_quantized_table(self):
        for params in [
            {"embeddings_int8": Q_INT8["embeddings_int8"]},
            {"embeddings_scale": Q_INT8["embeddings_scale"]},
        ]:
            with pytest.raises(ValueError, match="embeddings_scale") as info:
                jaxembed.apply(params, Q_IDS)
            assert_names(str(info.value), "`params`", str(sorted(params)))


# Trainable tokens and stacked adapters share the table above: tokens on rows 1 and 5 with a
# delta of ones, and three stacked adapters whose B differ (adapter j adds j + 1 per column
# times A's row sum, so each choice is visible in the output).
TOKEN_PARAMS = {
    **PARAMS,
    "trainable_tokens_ids": jnp.array([1, 5], jnp.int32),
    "trainable_tokens_delta": jnp.ones((2, D)),
}
STACKED_PARAMS = {
    **PARAMS,
    "lora_embeddings_a": jnp.ones((3, V, 2)),
    "lora_embeddings_b": jnp.stack([jnp.full((2, D), j + 1.0) for j in range(3)]),
}
TOKEN_ID_DTYPES = (np.int8, np.uint8, np.int32, np.uint32, np.int64, np.uint64)


class TestTrainableTokenIds:
    """`token_ids` of every integer dtype, as lists and arrays; bad ones refused by name."""

    @pytest.mark.parametrize("dtype", TOKEN_ID_DTYPES, ids=lambda t: t.__name__)
    def test_every_integer_dtype_gives_sorted_int32_ids(self, dtype):
        params = jaxembed.enable_trainable_tokens(PARAMS, np.array([5, 1], dtype))
        assert params["trainable_tokens_ids"].dtype == jnp.int32
        assert params["trainable_tokens_ids"].tolist() == [1, 5]

    @pytest.mark.parametrize(
        ("token_ids", "named"),
        [
            ([1, 1], "distinct"),
            ([-1], "-1"),
            ([V], str(V)),
            (np.array([2**32 + 1], np.int64), str(2**32 + 1)),
            (np.array([np.iinfo(np.uint64).max], np.uint64), str(np.iinfo(np.uint64).max)),
            ([], "at least one"),
            ([[1, 2]], "shape"),
            ([1.0, 2.0], "dtype float"),
            ([True, False], "dtype bool"),
            ("12", "token_ids"),
        ],
        ids=str,
    )
    def test_bad_token_ids_are_named(self, token_ids, named):
        with pytest.raises(ValueError, match=r"`token_ids`") as info:
            jaxembed.enable_trainable_tokens(PARAMS, token_ids)
        assert named in str(info.value)

    def test_traced_token_ids_are_refused(self):
        with pytest.raises(ValueError, match=r"`token_ids` must be concrete"):
            jax.jit(jaxembed.enable_trainable_tokens)(PARAMS, jnp.array([1]))

    @pytest.mark.parametrize("ids", [[5, 1], [1, 1], [1, V]], ids=str)
    def test_hand_made_params_with_bad_ids_are_refused_eagerly(self, ids):
        params = {**TOKEN_PARAMS, "trainable_tokens_ids": jnp.array(ids, jnp.int32)}
        with pytest.raises(ValueError, match="trainable_tokens_ids"):
            jaxembed.apply(params, np.array([1]))

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("dtype", (*UNSIGNED, np.int8, np.int64), ids=lambda t: t.__name__)
    def test_lookup_ids_of_every_dtype_find_the_tokens(self, dtype, mode):
        ids = np.array([0, 1, 5, V - 1], dtype)
        out = np.asarray(run(mode, jaxembed.apply, TOKEN_PARAMS, ids))
        np.testing.assert_array_equal(out, TABLE[[0, 1, 5, V - 1]] + np.array([[0], [1], [1], [0]]))

    @pytest.mark.parametrize("mode", MODES)
    def test_empty_ids(self, mode):
        out = run(mode, jaxembed.apply, TOKEN_PARAMS, np.zeros((0, 3), np.int32))
        chex.assert_shape(out, (0, 3, D))

    @pytest.mark.parametrize(
        ("change", "named"),
        [
            ({"trainable_tokens_delta": jnp.ones((3, D))}, "trainable_tokens_delta"),
            ({"trainable_tokens_delta": jnp.ones((2, D), jnp.int32)}, "trainable_tokens_delta"),
            ({"trainable_tokens_ids": jnp.array([1.0, 5.0])}, "trainable_tokens_ids"),
        ],
        ids=["rows", "int delta", "float ids"],
    )
    def test_misshapen_tokens_are_named(self, change, named):
        with pytest.raises(ValueError, match=named):
            jaxembed.apply({**TOKEN_PARAMS, **change}, np.array([1]))

    def test_half_a_pair_is_named(self):
        params = {k: v for k, v in TOKEN_PARAMS.items() if k != "trainable_tokens_ids"}
        with pytest.raises(ValueError, match="not its partner"):
            jaxembed.apply(params, np.array([1]))

    def test_user_params_are_not_mutated(self):
        before = {k: np.asarray(v).copy() for k, v in TOKEN_PARAMS.items()}
        jaxembed.merge_trainable_tokens(TOKEN_PARAMS)
        jaxembed.enable_trainable_tokens(PARAMS, np.array([2]))
        chex.assert_trees_all_equal({k: np.asarray(v) for k, v in TOKEN_PARAMS.items()}, before)


def stacked_apply(params, ids, adapter_ids):
    return jaxembed.apply(params, ids, adapter_ids=adapter_ids)


def stacked_reference(ids, adapter_ids):
    """Rows of STACKED_PARAMS by hand: row + (j + 1) * 2 for adapter j, the row for -1."""
    ids, adapter_ids = np.asarray(ids), np.asarray(adapter_ids).astype(np.int64)
    extra = np.where(adapter_ids >= 0, (adapter_ids + 1) * 2.0, 0.0)
    return TABLE[ids] + extra.reshape(*adapter_ids.shape, *(1,) * (ids.ndim - adapter_ids.ndim + 1))


class TestAdapterIds:
    """`adapter_ids` of every integer dtype, eager and jitted; out-of-range ones refused (eager)
    or NaN (jit), never wrapped onto another adapter or onto -1 (the base table)."""

    IDS = np.array([[0, 1], [2, 3], [4, 5]], np.int32)

    @pytest.mark.parametrize("mode", ["eager", "jit"])
    @pytest.mark.parametrize("dtype", TOKEN_ID_DTYPES, ids=lambda t: t.__name__)
    def test_every_integer_dtype(self, dtype, mode):
        adapter_ids = np.array([2, 0, 1], dtype)
        out = run(mode, stacked_apply, STACKED_PARAMS, self.IDS, adapter_ids)
        np.testing.assert_allclose(out, stacked_reference(self.IDS, adapter_ids))

    @pytest.mark.parametrize(
        "bad",
        [
            np.array([-2, 0, 0], np.int32),
            np.array([3, 0, 0], np.int8),
            np.array([255, 0, 0], np.uint8),
            np.array([2**32 - 1, 0, 0], np.uint32),
            np.array([2**32 + 1, 0, 0], np.int64),
        ],
        ids=lambda a: f"{a.dtype}_{a[0]}",
    )
    def test_out_of_range_eager_names_the_true_id(self, bad):
        with pytest.raises(IndexError, match=r"`adapter_ids`") as info:
            jaxembed.apply(STACKED_PARAMS, self.IDS, adapter_ids=bad)
        assert str(int(bad[0])) in str(info.value)

    @pytest.mark.parametrize(
        "bad",
        [np.array([-2, 0, 1], np.int32), np.array([2**32 - 1, 0, 1], np.uint32)],
        ids=lambda a: str(a.dtype),
    )
    def test_out_of_range_under_jit_gives_nan_rows_for_that_example_only(self, bad):
        out = np.asarray(jax.jit(stacked_apply)(STACKED_PARAMS, self.IDS, jnp.asarray(bad)))
        assert np.isnan(out[0]).all()
        np.testing.assert_allclose(out[1:], stacked_reference(self.IDS[1:], bad[1:]))
        message = checkify_error(stacked_apply, STACKED_PARAMS, self.IDS, jnp.asarray(bad))
        assert message is not None and "adapter_ids" in message

    @pytest.mark.parametrize(
        ("adapter_ids", "error"),
        [
            (np.array([0.0, 1.0, 2.0]), TypeError),
            (np.array([True, False, True]), TypeError),
            (np.array([0, 1]), ValueError),
            (np.zeros((3, 3), np.int32), ValueError),
        ],
        ids=["float", "bool", "short", "too long"],
    )
    def test_bad_dtype_or_shape_is_named(self, adapter_ids, error):
        with pytest.raises(error, match="adapter_ids"):
            jaxembed.apply(STACKED_PARAMS, self.IDS, adapter_ids=adapter_ids)

    def test_scalar_and_full_shape_adapter_ids(self):
        for adapter_ids in (np.int32(2), np.full(self.IDS.shape, 1, np.int32)):
            out = jaxembed.apply(STACKED_PARAMS, self.IDS, adapter_ids=adapter_ids)
            np.testing.assert_allclose(out, stacked_reference(self.IDS, adapter_ids))

    @pytest.mark.parametrize("mode", MODES)
    def test_empty_batch(self, mode):
        out = run(
            mode, stacked_apply, STACKED_PARAMS, np.zeros((0, 4), np.int32), np.zeros(0, np.int32)
        )
        chex.assert_shape(out, (0, 4, D))

    def test_missing_or_unexpected_adapter_ids(self):
        with pytest.raises(ValueError, match="pass `adapter_ids`"):
            jaxembed.apply(STACKED_PARAMS, self.IDS)
        with pytest.raises(ValueError, match="adapter_ids"):
            jaxembed.apply(PARAMS, self.IDS, adapter_ids=np.zeros(3, np.int32))
        with pytest.raises(ValueError, match="adapter_ids"):
            jaxembed.attend(PARAMS, np.ones((3, D), np.float32), adapter_ids=np.zeros(3, np.int32))


class TestMultihostArguments:
    """`jaxembed.multihost`: bad arguments are refused before any process starts, naming the
    argument and the value."""

    def launch(self, num_processes=1, **kwargs):
        import jaxembed.multihost

        return jaxembed.multihost.launch(["true"], num_processes, **kwargs)

    @pytest.mark.parametrize("command", ["python -c 1", [], ["python", 3], None])
    def test_command(self, command):
        import jaxembed.multihost

        with pytest.raises(ValueError, match=r"command must be a non-empty sequence of strings"):
            jaxembed.multihost.launch(command, 1)

    @pytest.mark.parametrize("value", [0, -1, True, 2.0, "2"])
    def test_num_processes(self, value):
        with pytest.raises(
            ValueError,
            match=rf"`num_processes` must be a positive integer. Received: num_processes={value!r}",
        ):
            self.launch(num_processes=value)

    @pytest.mark.parametrize("value", [0, -4, 1.5])
    def test_devices_per_process(self, value):
        with pytest.raises(
            ValueError, match=r"`devices_per_process` must be a positive integer. Received"
        ):
            self.launch(devices_per_process=value)

    @pytest.mark.parametrize("value", [0, -1.0, "60", True, float("nan")])
    def test_timeout(self, value):
        with pytest.raises(
            ValueError, match=r"`timeout` must be a finite positive number. Received"
        ):
            self.launch(timeout=value)

    @pytest.mark.parametrize("name", ["JAXEMBED_NUM_PROCESSES", "JAXEMBED_PROCESS_ID"])
    def test_environment_variables_of_initialize(self, name, monkeypatch):
        import jaxembed.multihost

        monkeypatch.setenv(name, "two")
        with pytest.raises(ValueError, match=rf"environment variable {name} must be an integer"):
            jaxembed.multihost.initialize("127.0.0.1:1")

    def test_local_rows_dim(self):
        import jaxembed.multihost

        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        for dim in (2, -1):
            with pytest.raises(
                ValueError, match=rf"dim must index global_shape \(8, 4\), got {dim}"
            ):
                jaxembed.multihost.local_rows(sharding, (8, 4), dim)
        assert jaxembed.multihost.local_rows(sharding, (8, 4), 1) == slice(0, 4)
