"""Many LoRA adapters in one batch: stacked adapters `(n, V, r)` / `(n, r, D)` and `adapter_ids`.

Every example must get exactly what running its adapter alone gives (`select_adapter`; the base
table alone for -1), in values and in gradients, with temp memory that does not grow with n
(`apply`; `attend` stops growing once n reaches the number of examples).
"""

import functools
import math
import tempfile

import chex
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify
from strategies import SHAPES

import jaxembed
import jaxembed.nnx
import jaxembed.sharding
from jaxembed import lora
from jaxembed.interop.peft import to_peft

V, D, RANK, N = 20, 6, 3, 4
A, B = "lora_embeddings_a", "lora_embeddings_b"
IDS = jnp.array([[3, 1, 3], [0, 19, 7], [5, 5, 2], [11, 0, 1], [4, 8, 12]])
ADAPTER_IDS = jnp.array([2, -1, 0, 2, 3])  # adapter 1 unused
QUERY = jax.random.normal(jax.random.key(3), (5, D))
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


@functools.cache
def stacked_params(n=N, param_dtype=jnp.float32):
    """A table with n stacked adapters whose B is nonzero (so every adapter matters)."""
    keys = jax.random.split(jax.random.key(0), 3)
    params = jaxembed.init(keys[0], V, D, embeddings_initializer="normal", param_dtype=param_dtype)
    return jaxembed.enable_lora(params, keys[1], RANK, num_adapters=n, b_initializer="normal")


def per_adapter(params):
    """{adapter id: the params running that adapter alone}, -1 the base table alone."""
    count = params[A].shape[0]
    singles = {i: lora.select_adapter(params, i) for i in range(count)}
    return {-1: lora.remove_lora(params), **singles}


def broadcast_prefix(adapter_ids, shape):
    """adapter_ids (a prefix of `shape`) broadcast over the rest of `shape`."""
    adapter_ids = np.asarray(adapter_ids)
    expanded = adapter_ids.reshape(adapter_ids.shape + (1,) * (len(shape) - adapter_ids.ndim))
    return np.broadcast_to(expanded, shape)


@functools.cache
def _jitted(function, options):
    return jax.jit(functools.partial(function, **dict(options)))


def alone(function, **options):
    """`function` (jaxembed.apply or attend) with static `options`, jitted once: the
    reference runs of single adapters (compiled once per shape, not op by op)."""
    return _jitted(function, tuple(sorted(options.items())))


def expected_apply(params, ids, adapter_ids, **options):
    """Each id's row from the params of its example's adapter alone."""
    which = broadcast_prefix(adapter_ids, np.shape(ids))[..., None]
    apply = alone(jaxembed.apply, **options)
    outputs = {i: np.asarray(apply(p, ids)) for i, p in per_adapter(params).items()}
    return np.select([which == i for i in outputs], list(outputs.values()), np.nan)


def expected_attend(params, query, adapter_ids, **options):
    which = broadcast_prefix(adapter_ids, np.shape(query)[:-1])[..., None]
    attend = alone(jaxembed.attend, **options)
    outputs = {i: np.asarray(attend(p, query)) for i, p in per_adapter(params).items()}
    return np.select([which == i for i in outputs], list(outputs.values()), np.nan)


@functools.cache
def _batched(function, jit, options):
    def call(params, inputs, adapter_ids):
        return function(params, inputs, adapter_ids=adapter_ids, **dict(options))

    return jax.jit(call) if jit else call


def batched(variant, function, **options):
    """`(params, ids or query, adapter_ids) -> function(..., adapter_ids=, **options)`, jitted
    when `variant` is `jax.jit`; cached, so tests of the same shapes share one compilation."""
    return _batched(function, variant is jax.jit, tuple(sorted(options.items())))


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    """NaN-aware (NaN equals NaN), in float32 whatever the dtype."""
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=atol
    )


@st.composite
def ids_and_adapter_ids(draw):
    """ids of a shape from SHAPES, adapter ids in [-1, N) shaped as a prefix of it."""
    shape = draw(st.sampled_from(SHAPES))
    ids = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, V - 1)))
    prefix = shape[: draw(st.integers(0, len(shape)))]
    adapter_ids = draw(hnp.arrays(np.int32, prefix, elements=st.integers(-1, N - 1)))
    return ids, adapter_ids


@st.composite
def query_and_adapter_ids(draw):
    batch = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    query = draw(hnp.arrays(np.float32, (*batch, D), elements=st.floats(-2, 2, width=32)))
    prefix = batch[: draw(st.integers(0, len(batch)))]
    adapter_ids = draw(hnp.arrays(np.int32, prefix, elements=st.integers(-1, N - 1)))
    return query, adapter_ids


class TestEqualsEachAdapterAlone:
    def test_each_example_equals_its_adapter_alone(self, variant):
        params = stacked_params()
        out = batched(variant, jaxembed.apply)(params, IDS, ADAPTER_IDS)
        logits = batched(variant, jaxembed.attend)(params, QUERY, ADAPTER_IDS)
        apply, attend, singles = alone(jaxembed.apply), alone(jaxembed.attend), per_adapter(params)
        for example, adapter in enumerate(ADAPTER_IDS.tolist()):
            single = singles[adapter]
            chex.assert_trees_all_close(out[example], apply(single, IDS[example]), **TIGHT)
            chex.assert_trees_all_close(logits[example], attend(single, QUERY[example]), **TIGHT)
        # The adapters really differ: an example run with another adapter would not match.
        assert not np.allclose(out[0], apply(singles[0], IDS[0]))
        assert not np.allclose(out[1], apply(singles[2], IDS[1]))

    @given(case=ids_and_adapter_ids())
    @settings(max_examples=12, deadline=None)
    def test_apply_any_prefix_shape(self, case):
        """Under jit (compiled once per shape); eagerly, every prefix kind is tested above
        and below with the `variant` fixture."""
        ids, adapter_ids = case
        out = batched(jax.jit, jaxembed.apply)(stacked_params(), ids, adapter_ids)
        assert out.shape == (*ids.shape, D)
        assert_close(out, expected_apply(stacked_params(), ids, adapter_ids))

    @given(case=query_and_adapter_ids())
    @settings(max_examples=12, deadline=None)
    def test_attend_any_prefix_of_query_batch(self, case):
        query, adapter_ids = case
        out = batched(jax.jit, jaxembed.attend)(stacked_params(), query, adapter_ids)
        assert out.shape == (*query.shape[:-1], V)
        assert_close(out, expected_attend(stacked_params(), query, adapter_ids), atol=1e-5)

    @pytest.mark.parametrize("adapter_ids", [2, -1, np.int32(0)])
    def test_scalar_adapter_id_applies_to_every_id(self, variant, adapter_ids):
        params = stacked_params()
        ids = IDS.reshape(3, 5)
        out = variant(lambda p, i: jaxembed.apply(p, i, adapter_ids=adapter_ids))(params, ids)
        single = per_adapter(params)[int(adapter_ids)]
        chex.assert_trees_all_close(out, alone(jaxembed.apply)(single, ids), **TIGHT)
        logits = jaxembed.attend(params, QUERY, adapter_ids=adapter_ids)
        chex.assert_trees_all_close(logits, alone(jaxembed.attend)(single, QUERY), **TIGHT)

    def test_full_ids_shape_picks_per_token(self, variant):
        params = stacked_params()
        per_token = jnp.array([[0, 1, -1], [3, 3, 2], [-1, -1, 0], [1, 2, 3], [0, 0, 0]])
        out = batched(variant, jaxembed.apply)(params, IDS, per_token)
        singles, apply = per_adapter(params), alone(jaxembed.apply)
        for (e, t), adapter in np.ndenumerate(np.asarray(per_token)):
            chex.assert_trees_all_close(out[e, t], apply(singles[int(adapter)], IDS[e, t]), **TIGHT)

    @pytest.mark.parametrize(
        "options",
        [
            {"lora_alpha": 8.0},
            {"lora_alpha": 8.0, "use_rslora": True},
            {"use_rslora": True},
        ],
    )
    def test_scale_options(self, options):
        params = stacked_params()
        apply = batched(jax.jit, jaxembed.apply, **options)
        attend = batched(jax.jit, jaxembed.attend, **options)
        assert_close(
            apply(params, IDS, ADAPTER_IDS), expected_apply(params, IDS, ADAPTER_IDS, **options)
        )
        assert_close(
            attend(params, QUERY, ADAPTER_IDS),
            expected_attend(params, QUERY, ADAPTER_IDS, **options),
            atol=1e-5,
        )
        # The scale is really applied: without the options the answer differs.
        assert not np.allclose(
            apply(params, IDS, ADAPTER_IDS), expected_apply(params, IDS, ADAPTER_IDS)
        )

    def test_bfloat16(self):
        params = stacked_params(param_dtype=jnp.bfloat16)
        out = batched(jax.jit, jaxembed.apply, dtype=jnp.bfloat16)(params, IDS, ADAPTER_IDS)
        chex.assert_type(out, jnp.bfloat16)
        expected = expected_apply(params, IDS, ADAPTER_IDS, dtype=jnp.bfloat16)
        assert_close(out, expected, rtol=1e-2, atol=1e-2)
        logits = jaxembed.attend(params, QUERY.astype(jnp.bfloat16), adapter_ids=ADAPTER_IDS)
        chex.assert_type(logits, jnp.bfloat16)
        expected = expected_attend(params, QUERY.astype(jnp.bfloat16), ADAPTER_IDS)
        assert_close(logits, expected, rtol=2e-2, atol=5e-2)

    def test_padding_idx(self):
        params = stacked_params()
        apply = batched(jax.jit, jaxembed.apply, padding_idx=3)
        expected = expected_apply(params, IDS, ADAPTER_IDS, padding_idx=3)
        assert_close(apply(params, IDS, ADAPTER_IDS), expected)

    @pytest.mark.parametrize("out_of_range", ["fill", "clip"])
    def test_out_of_range_ids(self, variant, out_of_range):
        params = stacked_params()
        ids = IDS.at[0, 1].set(V).at[3, 2].set(-1).at[1, 0].set(V + 7)
        apply = batched(variant, jaxembed.apply, out_of_range=out_of_range)
        out = apply(params, ids, ADAPTER_IDS)
        assert_close(out, expected_apply(params, ids, ADAPTER_IDS, out_of_range=out_of_range))
        bad = np.zeros(ids.shape, bool)
        bad[0, 1] = bad[3, 2] = bad[1, 0] = True
        nan_rows = np.isnan(np.asarray(out)).all(-1)
        np.testing.assert_array_equal(nan_rows, bad if out_of_range == "fill" else False)

    @pytest.mark.parametrize(
        ("mode", "block_size", "jit"),
        [("int8", None, False), ("int8", None, True), ("int4", None, True), ("int4", 2, True)],
    )
    def test_quantized_table(self, mode, block_size, jit):
        params = jaxembed.quantize(stacked_params(), mode, block_size=block_size)
        assert params[A].shape == (N, V, RANK)
        variant = jax.jit if jit else (lambda f: f)
        apply = batched(variant, jaxembed.apply)
        attend = batched(variant, jaxembed.attend)
        assert_close(apply(params, IDS, ADAPTER_IDS), expected_apply(params, IDS, ADAPTER_IDS))
        assert_close(
            attend(params, QUERY, ADAPTER_IDS),
            expected_attend(params, QUERY, ADAPTER_IDS),
            atol=1e-5,
        )

    def test_with_trainable_tokens(self):
        params = jaxembed.enable_trainable_tokens(stacked_params(), [1, 7, 12])
        delta = jax.random.normal(jax.random.key(9), params["trainable_tokens_delta"].shape)
        params = {**params, "trainable_tokens_delta": delta}
        apply = batched(jax.jit, jaxembed.apply)
        attend = batched(jax.jit, jaxembed.attend)
        out = apply(params, IDS, ADAPTER_IDS)
        assert_close(out, expected_apply(params, IDS, ADAPTER_IDS))
        assert_close(
            attend(params, QUERY, ADAPTER_IDS),
            expected_attend(params, QUERY, ADAPTER_IDS),
            atol=1e-5,
        )
        # The tokens' delta is in there: without it row 7 (example 1, base table) differs.
        without = jaxembed.apply(stacked_params(), IDS, adapter_ids=ADAPTER_IDS)
        assert not np.allclose(out[1, 2], without[1, 2])

    @pytest.mark.parametrize(
        ("function", "shape", "adapter_shape"),
        [
            ("apply", (0, 5), (0,)),
            ("apply", (3, 0), (3, 0)),  # one adapter id per (absent) token
            ("attend", (0, D), (0,)),
            ("attend", (2, 0, D), (2,)),
        ],
    )
    def test_empty_batch(self, variant, function, shape, adapter_shape):
        adapter_ids = jnp.zeros(adapter_shape, jnp.int32)
        if function == "apply":
            inputs, out_shape = jnp.zeros(shape, jnp.int32), (*shape, D)
        else:
            inputs, out_shape = jnp.zeros(shape), (*shape[:-1], V)
        out = batched(variant, getattr(jaxembed, function))(stacked_params(), inputs, adapter_ids)
        assert out.shape == out_shape
        assert out.dtype == jnp.float32


class TestStackAndSelect:
    def test_stack_separately_made_adapters_round_trips(self):
        made = [
            lora.init_lora(jax.random.key(i), V, D, RANK, b_initializer="normal") for i in range(3)
        ]
        stacked = lora.stack_adapters(made)
        reference = lora.init_lora(jax.random.key(0), V, D, RANK, num_adapters=3)
        chex.assert_trees_all_equal_shapes_and_dtypes(stacked, reference)
        assert lora.adapter_shapes(V, D, RANK, num_adapters=3) == {
            A: (3, V, RANK),
            B: (3, RANK, D),
        }
        params = {**jaxembed.init(jax.random.key(5), V, D), **stacked}
        for i, adapter in enumerate(made):
            selected = lora.select_adapter(params, i)
            chex.assert_trees_all_equal({k: selected[k] for k in (A, B)}, adapter)
            np.testing.assert_array_equal(selected["embeddings"], params["embeddings"])
        # Stacked params run adapter i exactly as params holding adapter i alone.
        out = batched(jax.jit, jaxembed.apply)(params, IDS[:3], jnp.array([2, 0, 1]))
        for example, i in enumerate([2, 0, 1]):
            single = {"embeddings": params["embeddings"], **made[i]}
            chex.assert_trees_all_close(
                out[example], alone(jaxembed.apply)(single, IDS[example]), **TIGHT
            )

    def test_select_then_stack_is_identity(self):
        params = stacked_params()
        selected = [lora.select_adapter(params, i) for i in range(N)]
        chex.assert_trees_all_equal(lora.stack_adapters(selected), {k: params[k] for k in (A, B)})
        # Extra keys (the table) are ignored; a tuple is a sequence too.
        assert lora.stack_adapters(tuple(selected[:2]))[A].shape == (2, V, RANK)

    def test_init_draws_independent_he_uniform_adapters(self):
        input_dim, n = 2000, 4
        adapters = lora.init_lora(jax.random.key(0), input_dim, D, 8, num_adapters=n)
        a = np.asarray(adapters[A])
        np.testing.assert_array_equal(adapters[B], 0.0)
        bound = math.sqrt(6 / input_dim)  # he_uniform, fan_in = input_dim, per adapter
        for i in range(n):
            assert np.abs(a[i]).max() <= bound
            # 16000 draws of U(-bound, bound): the max is within 0.1% of the bound, and the
            # standard deviation is bound / sqrt(3) (a fan_in of n * input_dim would shrink both).
            assert np.abs(a[i]).max() > 0.99 * bound
            np.testing.assert_allclose(a[i].std(), bound / math.sqrt(3), rtol=0.03)
        flat = a.reshape(n, -1)
        correlation = np.corrcoef(flat)[~np.eye(n, dtype=bool)]
        assert np.abs(correlation).max() < 0.05  # independent draws, not copies
        # enable_lora draws the same way.
        params = jaxembed.enable_lora(
            jaxembed.init(jax.random.key(1), input_dim, D), jax.random.key(2), 8, num_adapters=n
        )
        assert params[A].shape == (n, input_dim, 8) and params[B].shape == (n, 8, D)
        assert np.abs(np.asarray(params[A])).max() > 0.99 * bound

    def test_adapter_initializers_draw_each_adapter_separately(self):
        stacked = lora.adapter_initializers(num_adapters=3)[A]
        single = lora.adapter_initializers()[A]
        key = jax.random.key(4)
        drawn = stacked(key, (3, V, RANK))
        assert drawn.shape == (3, V, RANK) and drawn.dtype == jnp.float32
        expected = jnp.stack([single(k, (V, RANK)) for k in jax.random.split(key, 3)])
        np.testing.assert_array_equal(drawn, expected)

    @pytest.mark.parametrize(
        ("adapters", "match"),
        [
            ([], "non-empty list"),
            ({A: np.ones((V, RANK)), B: np.ones((RANK, D))}, "non-empty list"),
            ("ab", r"adapters\[0\].*dict with"),  # a str is a sequence, of str
            ([{A: np.ones((V, RANK))}], r"adapters\[0\].*dict with"),
            (
                [
                    {A: np.ones((V, 2)), B: np.ones((2, D))},
                    {A: np.ones((V, 3)), B: np.ones((3, D))},
                ],
                "same shapes",
            ),
            (
                [
                    {A: np.ones((V, 2)), B: np.ones((2, D))},
                    {A: np.ones((V + 1, 2)), B: np.ones((2, D))},
                ],
                "same shapes",
            ),
            ([{A: np.ones((V, 2)), B: np.ones((3, D))}], "one adapter"),
            ([{A: np.ones((2, V, 2)), B: np.ones((2, 2, D))}], "one adapter"),
        ],
    )
    def test_stack_adapters_refuses(self, adapters, match):
        with pytest.raises(ValueError, match=match):
            lora.stack_adapters(adapters)

    @pytest.mark.parametrize("index", [-1, N, True, 1.0, "0", None])
    def test_select_adapter_refuses_bad_index(self, index):
        with pytest.raises(ValueError, match=r"`index` must be an int in \[0, n_adapters\)"):
            lora.select_adapter(stacked_params(), index)

    def test_select_adapter_needs_stacked_adapters(self):
        one = lora.select_adapter(stacked_params(), 0)
        with pytest.raises(ValueError, match="needs stacked adapters"):
            lora.select_adapter(one, 0)
        with pytest.raises(ValueError, match="needs params holding a LoRA adapter"):
            lora.select_adapter(lora.remove_lora(one), 0)

    def test_select_adapter_takes_numpy_integers(self):
        params = stacked_params()
        for i in np.arange(N):
            selected = lora.select_adapter(params, i)
            np.testing.assert_array_equal(selected[A], params[A][int(i)])

    def test_enable_lora_refuses_params_with_stacked_adapters(self):
        with pytest.raises(ValueError, match="already enabled"):
            jaxembed.enable_lora(stacked_params(), jax.random.key(0), RANK, num_adapters=2)

    @pytest.mark.parametrize("num_adapters", [0, -1, 2.0, True])
    def test_bad_num_adapters(self, num_adapters):
        with pytest.raises(ValueError, match="`num_adapters` must be a positive integer"):
            lora.init_lora(jax.random.key(0), V, D, RANK, num_adapters=num_adapters)
        with pytest.raises(ValueError, match="`num_adapters` must be a positive integer"):
            lora.adapter_shapes(V, D, RANK, num_adapters=num_adapters)
        with pytest.raises(ValueError, match="`num_adapters` must be a positive integer"):
            jaxembed.enable_lora(
                jaxembed.init(jax.random.key(0), V, D),
                jax.random.key(1),
                RANK,
                num_adapters=num_adapters,
            )


def squared_error(out, target):
    return jnp.sum((out - target) ** 2)


class TestGradients:
    TARGET = jax.random.normal(jax.random.key(7), (*IDS.shape, D))
    LOGIT_TARGET = jax.random.normal(jax.random.key(8), (QUERY.shape[0], V))

    def stacked_grads(self, fn, **options):
        params = stacked_params()
        trainable, frozen = lora.split_trainable(params)
        assert trainable["embeddings"] is None and frozen["embeddings"] is not None

        def loss(trainable, adapter_ids):
            return fn(lora.combine(trainable, frozen), adapter_ids, **options)

        # adapter_ids as an argument: closed over, it trips the bug in
        # TestBadInput.test_concrete_adapter_ids_inside_jit.
        return jax.jit(jax.grad(loss))(trainable, ADAPTER_IDS)

    def check_per_adapter(self, grads, alone_loss, inputs, target):
        """Adapter j's gradient is the gradient of running adapter j alone on its examples
        (`alone_loss(single_params, inputs[examples], target[examples])`)."""
        params = stacked_params()
        alone_grad = jax.jit(jax.grad(lambda t, f, x, y: alone_loss(lora.combine(t, f), x, y)))
        assert grads["embeddings"] is None  # the table is frozen: no gradient at all
        for j in range(N):
            examples = np.flatnonzero(np.asarray(ADAPTER_IDS) == j)
            if examples.size == 0:
                np.testing.assert_array_equal(grads[A][j], 0.0)
                np.testing.assert_array_equal(grads[B][j], 0.0)
                continue
            single = lora.select_adapter(params, j)
            trainable, frozen = lora.split_trainable(single)
            expected = alone_grad(trainable, frozen, inputs[examples], target[examples])
            chex.assert_trees_all_close(grads[A][j], expected[A], rtol=1e-5, atol=1e-5)
            chex.assert_trees_all_close(grads[B][j], expected[B], rtol=1e-5, atol=1e-5)
            assert np.abs(np.asarray(grads[B][j])).max() > 0  # used: a real gradient

    def test_apply_gradient_per_adapter(self):
        def stacked_loss(params, adapter_ids):
            return squared_error(jaxembed.apply(params, IDS, adapter_ids=adapter_ids), self.TARGET)

        def alone_loss(single, ids, target):
            return squared_error(jaxembed.apply(single, ids), target)

        self.check_per_adapter(self.stacked_grads(stacked_loss), alone_loss, IDS, self.TARGET)

    def test_attend_gradient_per_adapter(self):
        def stacked_loss(params, adapter_ids):
            logits = jaxembed.attend(params, QUERY, adapter_ids=adapter_ids)
            return squared_error(logits, self.LOGIT_TARGET)

        def alone_loss(single, query, target):
            return squared_error(jaxembed.attend(single, query), target)

        grads = self.stacked_grads(stacked_loss)
        self.check_per_adapter(grads, alone_loss, QUERY, self.LOGIT_TARGET)

    def test_base_table_examples_give_no_adapter_gradient(self):
        """Examples with -1 touch no adapter, adapter 0 (their clipped index) included."""

        def loss(adapters, adapter_ids):
            params = {**stacked_params(), **adapters}
            out = jaxembed.apply(params, IDS, adapter_ids=adapter_ids)
            logits = jaxembed.attend(params, QUERY, adapter_ids=adapter_ids)
            return squared_error(out, self.TARGET) + squared_error(logits, self.LOGIT_TARGET)

        adapters = {k: stacked_params()[k] for k in (A, B)}
        grads = jax.jit(jax.grad(loss))(adapters, -jnp.ones(5, jnp.int32))
        chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, adapters))

    def test_padding_row_of_every_adapter_gets_no_gradient(self):
        def loss(adapters, adapter_ids, padding_idx):
            params = {**stacked_params(), **adapters}
            out = jaxembed.apply(params, IDS, adapter_ids=adapter_ids, padding_idx=padding_idx)
            return squared_error(out, self.TARGET)

        grad = jax.jit(jax.grad(loss), static_argnums=2)
        adapters = {k: stacked_params()[k] for k in (A, B)}
        grads = grad(adapters, ADAPTER_IDS, 3)
        np.testing.assert_array_equal(grads[A][:, 3], 0.0)
        assert np.abs(np.asarray(grads[A][2, 1])).max() > 0  # id 1 with adapter 2: trained
        # Control: without padding_idx, id 3 (examples 0 and 2, adapters 2 and 0) trains.
        control = grad(adapters, ADAPTER_IDS, None)
        assert np.abs(np.asarray(control[A][2, 3])).max() > 0

    def test_sgd_step_trains_only_used_adapters(self):
        params = stacked_params()
        trainable, frozen = lora.split_trainable(params)
        assert lora.trainable_labels(params) == {
            "embeddings": "frozen",
            A: "trainable",
            B: "trainable",
        }
        tx = optax.adam(1e-2)

        @jax.jit
        def step(trainable, state, adapter_ids):
            def loss(trainable):
                out = jaxembed.apply(lora.combine(trainable, frozen), IDS, adapter_ids=adapter_ids)
                return squared_error(out, self.TARGET)

            grads = jax.grad(loss)(trainable)
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state

        new, _ = step(trainable, tx.init(trainable), ADAPTER_IDS)
        assert new["embeddings"] is None
        np.testing.assert_array_equal(new[A][1], params[A][1])  # adapter 1 unused
        np.testing.assert_array_equal(new[B][1], params[B][1])
        for j in (0, 2, 3):
            assert not np.array_equal(new[B][j], params[B][j])


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


class TestMemory:
    """Compiled temp bytes: `apply`'s never depend on the number of adapters n; `attend`'s
    are at most each example's own A (`min(examples, n) * input_dim * rank`)."""

    BIG_V, BIG_D, BIG_R, BATCH, SEQ = 1000, 64, 8, 16, 32

    def params(self, n):
        base = jaxembed.init(jax.random.key(0), self.BIG_V, self.BIG_D)
        return jaxembed.enable_lora(base, jax.random.key(1), self.BIG_R, num_adapters=n)

    def adapter_ids(self, n):
        return jnp.arange(self.BATCH) % (n + 1) - 1

    @staticmethod
    def flat(temp_1, temp_n):
        return temp_n <= 1.1 * temp_1 + 16 * 1024

    def test_apply(self):
        ids = jnp.zeros((self.BATCH, self.SEQ), jnp.int32)

        def stacked(params, ids, adapter_ids):
            return jaxembed.apply(params, ids, adapter_ids=adapter_ids)

        def naive(params, ids, adapter_ids):
            """Every adapter's delta for every example, then pick: n times the rows."""
            a = params[A][:, ids]
            deltas = jnp.einsum("nbtr,nrd->nbtd", a, params[B])
            pick = jax.nn.one_hot(adapter_ids, params[A].shape[0])
            return params["embeddings"][ids] + jnp.einsum("bn,nbtd->btd", pick, deltas)

        temps = {
            n: (
                temp_bytes(stacked, self.params(n), ids, self.adapter_ids(n)),
                temp_bytes(naive, self.params(n), ids, self.adapter_ids(n)),
            )
            for n in (1, 16)
        }
        assert self.flat(temps[1][0], temps[16][0]), temps
        assert temps[16][1] >= 8 * temps[1][1], temps  # the control does grow ~n-fold
        assert temps[16][0] < temps[16][1] / 8, temps

    def test_attend(self):
        """Each example needs at most its adapter's A: temp memory is bounded by
        `min(examples, n) * input_dim * rank` beside the logits (the docstring's promise), so
        it stops growing once n reaches the batch; the naive control keeps growing."""
        query = jnp.ones((self.BATCH, self.BIG_D))

        def stacked(params, query, adapter_ids):
            return jaxembed.attend(params, query, adapter_ids=adapter_ids)

        def naive(params, query, adapter_ids):
            low_rank = jnp.einsum("bd,nrd->nbr", query, params[B])
            every = jnp.einsum("nbr,nvr->nbv", low_rank, params[A])
            pick = jax.nn.one_hot(adapter_ids, params[A].shape[0])
            return query @ params["embeddings"].T + jnp.einsum("bn,nbv->bv", pick, every)

        temps = {
            n: (
                temp_bytes(stacked, self.params(n), query, self.adapter_ids(n)),
                temp_bytes(naive, self.params(n), query, self.adapter_ids(n)),
            )
            for n in (1, 16, 64)
        }
        per_example_a = self.BATCH * self.BIG_V * self.BIG_R * 4
        logits = self.BATCH * self.BIG_V * 4
        for n, (temp, _) in temps.items():
            assert temp <= 1.25 * (per_example_a + logits), (n, temps)
        assert self.flat(temps[16][0], temps[64][0]), temps
        assert temps[64][1] >= 3 * temps[16][1] >= 3 * 8 * temps[1][1], temps
        assert temps[64][0] < temps[64][1] / 4, temps


class TestBadInput:
    @pytest.mark.parametrize("bad", [-2, N, [0, N, 1, 0, 0], np.array([0, 1, -2, 0, 0])])
    def test_concrete_out_of_range_raises(self, bad):
        with pytest.raises(IndexError, match=r"`adapter_ids` must lie in \[-1, n_adapters\)"):
            jaxembed.apply(stacked_params(), IDS, adapter_ids=bad)
        with pytest.raises(IndexError, match="`adapter_ids`"):
            jaxembed.attend(stacked_params(), QUERY, adapter_ids=bad)

    def test_concrete_out_of_range_names_the_id(self):
        with pytest.raises(IndexError, match="got -7"):
            jaxembed.apply(stacked_params(), IDS, adapter_ids=jnp.array([0, -7, 1, 0, 0]))
        with pytest.raises(IndexError, match=f"got {N + 3}"):
            jaxembed.apply(stacked_params(), IDS, adapter_ids=np.array([0, N + 3, 1, 0, 0]))

    def test_traced_out_of_range_gives_nan_rows_for_those_examples_only(self):
        params = stacked_params()
        bad_ids = jnp.array([2, N, -1, -2, 3])
        out = batched(jax.jit, jaxembed.apply)(params, IDS, bad_ids)
        logits = batched(jax.jit, jaxembed.attend)(params, QUERY, bad_ids)
        bad = np.array([False, True, False, True, False])
        good_ids = np.where(bad, 0, bad_ids)
        for result, expected in (
            (out, expected_apply(params, IDS, good_ids)),
            (logits, expected_attend(params, QUERY, good_ids)),
        ):
            result = np.asarray(result)
            assert np.isnan(result[bad]).all()
            assert np.isfinite(result[~bad]).all()
            assert_close(result[~bad], expected[~bad], atol=1e-5)

    def test_traced_out_of_range_under_checkify(self):
        checked = checkify.checkify(batched(jax.jit, jaxembed.apply), errors=checkify.user_checks)
        error, _ = checked(stacked_params(), IDS, jnp.array([2, 0, N + 2, 1, -1]))
        with pytest.raises(checkify.JaxRuntimeError, match=f"`adapter_ids` must lie.*got {N + 2}"):
            error.throw()
        error, out = checked(stacked_params(), IDS, ADAPTER_IDS)
        error.throw()  # in range: no error
        assert np.isfinite(np.asarray(out)).all()

    @pytest.mark.parametrize("dtype", [jnp.uint32, jnp.int8])
    def test_adapter_ids_compared_in_their_own_dtype(self, dtype):
        """2**32 - 1 as uint32 is out of range, not -1 (the base table) after a cast."""
        top = np.iinfo(dtype).max
        wrapped = jnp.array([0, top, 1, 0, 0], dtype)
        with pytest.raises(IndexError, match=f"got {top}"):
            jaxembed.apply(stacked_params(), IDS, adapter_ids=wrapped)
        out = batched(jax.jit, jaxembed.apply)(stacked_params(), IDS, wrapped)
        assert np.isnan(np.asarray(out[1])).all()
        assert np.isfinite(np.asarray(out)[[0, 2, 3, 4]]).all()
        good = jnp.array([0, 3, 1, 0, 2], dtype)
        assert_close(
            jaxembed.apply(stacked_params(), IDS, adapter_ids=good),
            expected_apply(stacked_params(), IDS, np.asarray(good)),
        )

    @pytest.mark.parametrize("function", ["apply", "attend"])
    def test_concrete_adapter_ids_inside_jit(self, function):
        params = stacked_params()
        if function == "apply":
            out = jax.jit(lambda p: jaxembed.apply(p, IDS, adapter_ids=ADAPTER_IDS))(params)
            expected = expected_apply(params, IDS, ADAPTER_IDS)
        else:
            out = jax.jit(lambda p: jaxembed.attend(p, QUERY, adapter_ids=ADAPTER_IDS))(params)
            expected = expected_attend(params, QUERY, ADAPTER_IDS)
        assert_close(out, expected, atol=1e-5)

    @pytest.mark.parametrize("adapter_ids", [np.asarray(ADAPTER_IDS), ADAPTER_IDS.tolist(), 2])
    def test_host_adapter_ids_inside_jit(self, adapter_ids):
        """NumPy, list and int adapter ids closed over in jit work (a JAX int32 array does
        not: see above)."""
        params = stacked_params()
        out = jax.jit(lambda p: jaxembed.apply(p, IDS, adapter_ids=adapter_ids))(params)
        assert_close(out, expected_apply(params, IDS, adapter_ids))

    @pytest.mark.parametrize(
        "bad",
        [
            jnp.array([0.0, 1.0, 0.0, 0.0, 1.0]),
            np.array([True, False, True, True, False]),
            [0, 1.5, 0, 0, 0],
            1.0,
            True,
        ],
    )
    def test_float_or_bool_adapter_ids(self, bad):
        with pytest.raises(TypeError, match="`adapter_ids` must hold integers"):
            jaxembed.apply(stacked_params(), IDS, adapter_ids=bad)
        with pytest.raises(TypeError, match="`adapter_ids` must hold integers"):
            jaxembed.attend(stacked_params(), QUERY, adapter_ids=bad)

    def test_ragged_adapter_ids(self):
        with pytest.raises(TypeError, match="adapter_ids"):
            jaxembed.apply(stacked_params(), IDS, adapter_ids=[[0], [1, 2]])

    @pytest.mark.parametrize("shape", [(3,), (4,), (5, 2), (5, 3, 1), (1, 3), (3, 5)])
    def test_wrong_shape(self, shape):
        adapter_ids = jnp.zeros(shape, jnp.int32)
        with pytest.raises(ValueError, match=r"`adapter_ids` must have a shape that ids"):
            jaxembed.apply(stacked_params(), IDS, adapter_ids=adapter_ids)

    @pytest.mark.parametrize("shape", [(4,), (5, 6), (5, 1)])
    def test_wrong_shape_attend(self, shape):
        adapter_ids = jnp.zeros(shape, jnp.int32)
        with pytest.raises(ValueError, match=r"`adapter_ids` must have a shape that query"):
            jaxembed.attend(stacked_params(), QUERY, adapter_ids=adapter_ids)

    def test_missing_adapter_ids(self):
        with pytest.raises(ValueError, match="4 stacked LoRA adapters: pass `adapter_ids`"):
            jaxembed.apply(stacked_params(), IDS)
        with pytest.raises(ValueError, match="pass `adapter_ids`"):
            jax.jit(jaxembed.attend)(stacked_params(), QUERY)

    @pytest.mark.parametrize("adapter", ["one", "no"])
    def test_adapter_ids_without_stacked_adapters(self, adapter):
        params = lora.select_adapter(stacked_params(), 0)
        if adapter == "no":
            params = lora.remove_lora(params)
        with pytest.raises(ValueError, match=f"params hold {adapter} adapter"):
            jaxembed.apply(params, IDS, adapter_ids=ADAPTER_IDS)
        with pytest.raises(ValueError, match="`adapter_ids` selects among stacked"):
            jaxembed.attend(params, QUERY, adapter_ids=ADAPTER_IDS)

    @pytest.mark.parametrize(
        "call",
        [
            pytest.param(lambda p: jaxembed.merge_lora(p), id="merge_lora"),
            pytest.param(
                lambda p: lora.unmerge_lora(lora.remove_lora(p), {k: p[k] for k in (A, B)}),
                id="unmerge_lora",
            ),
            pytest.param(
                lambda p: jaxembed.attend_cross_entropy(p, QUERY, jnp.arange(5)),
                id="attend_cross_entropy",
            ),
            pytest.param(
                lambda p: jaxembed.sharding.vocab_parallel_apply(
                    p, IDS, mesh=jax.make_mesh((1,), ("model",)), vocab_axis="model"
                ),
                id="vocab_parallel_apply",
            ),
            pytest.param(
                lambda p: jaxembed.sharding.vocab_parallel_attend_cross_entropy(
                    p,
                    QUERY,
                    jnp.arange(5),
                    mesh=jax.make_mesh((1,), ("model",)),
                    vocab_axis="model",
                ),
                id="vocab_parallel_attend_cross_entropy",
            ),
        ],
    )
    def test_single_adapter_functions_point_at_select_adapter(self, call):
        with pytest.raises(ValueError, match=r"4 stacked adapters.*select_adapter"):
            call(stacked_params())
        # One adapter is fine (traced only: the refusal above happens before any tracing).
        jax.eval_shape(call, lora.select_adapter(stacked_params(), 1))

    def test_to_peft_refuses_stacked_adapters(self):
        with tempfile.TemporaryDirectory() as tmp:
            with pytest.raises(ValueError, match=r"to_peft takes one.*4 stacked.*select_adapter"):
                to_peft(stacked_params(), tmp)
            with pytest.raises(ValueError, match="to_peft takes one.*select_adapter"):
                to_peft({k: stacked_params()[k] for k in (A, B)}, tmp)
            to_peft(lora.select_adapter(stacked_params(), 3), tmp)  # one adapter: fine

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"num_lora_adapters": 2}, "`num_lora_adapters` stacks LoRA adapters: it needs"),
            ({"lora_rank": 2, "num_lora_adapters": 0}, "`num_lora_adapters` must be a positive"),
            ({"lora_rank": 2, "num_lora_adapters": -3}, "`num_lora_adapters` must be a positive"),
            ({"lora_rank": 2, "num_lora_adapters": 2.0}, "`num_lora_adapters` must be a positive"),
        ],
    )
    def test_module_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            jaxembed.Embedding(V, D, **kwargs)
        with pytest.raises(ValueError, match=match):
            jaxembed.nnx.Embedding(V, D, **kwargs, rngs=nnx.Rngs(0))

    def test_stacked_adapter_shapes_are_checked(self):
        params = stacked_params()
        with pytest.raises(ValueError, match="stacked adapters'"):
            jaxembed.apply({**params, B: params[B][:2]}, IDS, adapter_ids=ADAPTER_IDS)
        with pytest.raises(ValueError, match="stacked adapters'"):
            jaxembed.apply({**params, A: params[A][:, :-1]}, IDS, adapter_ids=ADAPTER_IDS)


class TestLinen:
    def module(self, **kwargs):
        return jaxembed.Embedding(V, D, lora_rank=RANK, num_lora_adapters=N, **kwargs)

    def test_params_axes_and_outputs(self):
        module = self.module(lora_alpha=6.0)
        variables = module.init(jax.random.key(0), IDS, ADAPTER_IDS)
        boxed = variables["params"]
        assert boxed[A].names == (None, "vocab", None)
        assert boxed[B].names == (None, None, "embed")
        params = nn.unbox(variables)["params"]
        assert params[A].shape == (N, V, RANK) and params[B].shape == (N, RANK, D)
        np.testing.assert_array_equal(params[B], 0.0)
        assert not np.array_equal(params[A][0], params[A][1])  # each adapter drawn apart
        params = {**params, B: jax.random.normal(jax.random.key(1), (N, RANK, D))}
        out = jax.jit(module.apply)({"params": params}, IDS, ADAPTER_IDS)
        assert_close(out, expected_apply(params, IDS, ADAPTER_IDS, lora_alpha=6.0))
        logits = module.apply({"params": params}, QUERY, ADAPTER_IDS, method="attend")
        assert_close(logits, expected_attend(params, QUERY, ADAPTER_IDS, lora_alpha=6.0), atol=1e-5)
        capped = module.apply(
            {"params": params}, QUERY, ADAPTER_IDS, method="attend", logit_soft_cap=0.5
        )
        assert np.abs(np.asarray(capped)).max() <= 0.5
        with pytest.raises(ValueError, match="pass `adapter_ids`"):
            module.apply({"params": params}, IDS)

    def test_resize_variables_keeps_stacked_adapters(self):
        module = self.module()
        variables = module.init(jax.random.key(0), IDS, ADAPTER_IDS)
        grown = jaxembed.linen.resize_variables(variables, V + 4)
        a = nn.unbox(grown)["params"][A]
        assert a.shape == (N, V + 4, RANK)
        np.testing.assert_array_equal(a[:, :V], nn.unbox(variables)["params"][A])
        np.testing.assert_array_equal(a[:, V:], 0.0)
        assert grown["params"][A].names == (None, "vocab", None)
        out = module.clone(input_dim=V + 4).apply(grown, jnp.array([[V + 3]]), jnp.array([1]))
        assert out.shape == (1, 1, D)


class TestNNX:
    def layer(self, **kwargs):
        return jaxembed.nnx.Embedding(
            V,
            D,
            lora_rank=RANK,
            num_lora_adapters=N,
            embeddings_initializer="normal",
            rngs=nnx.Rngs(0),
            **kwargs,
        )

    def with_nonzero_b(self, layer):
        layer.lora_embeddings_b[...] = jax.random.normal(jax.random.key(1), (N, RANK, D))
        return layer

    def test_variables_and_outputs(self):
        layer = self.with_nonzero_b(self.layer(lora_alpha=6.0))
        assert type(layer.lora_embeddings_a) is nnx.LoRAParam
        assert type(layer.lora_embeddings_b) is nnx.LoRAParam
        assert layer.lora_embeddings_a.shape == (N, V, RANK)
        assert layer.lora_embeddings_b.shape == (N, RANK, D)
        assert layer.num_lora_adapters == N and layer.lora_rank == RANK
        assert layer.lora_embeddings_a.out_sharding == (None, "vocab", None)
        params = layer.params()
        out = nnx.jit(lambda m, i, a: m(i, a))(layer, IDS, ADAPTER_IDS)
        assert_close(out, expected_apply(params, IDS, ADAPTER_IDS, lora_alpha=6.0))
        assert_close(
            layer.attend(QUERY, ADAPTER_IDS),
            expected_attend(params, QUERY, ADAPTER_IDS, lora_alpha=6.0),
            atol=1e-5,
        )
        with pytest.raises(ValueError, match="pass `adapter_ids`"):
            layer(IDS)
        with pytest.raises(ValueError, match="select_adapter"):
            layer.merge_lora()

    def test_enable_lora_with_num_adapters(self):
        layer = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0))
        assert layer.num_lora_adapters is None
        layer.enable_lora(RANK, num_adapters=3, rngs=nnx.Rngs(1))
        assert layer.num_lora_adapters == 3
        assert layer.lora_embeddings_a.shape == (3, V, RANK)
        assert type(layer.lora_embeddings_b) is nnx.LoRAParam
        # A fresh adapter (B = 0) leaves the output unchanged, whichever adapter is used.
        base = jaxembed.apply(lora.remove_lora(layer.params()), IDS)
        np.testing.assert_array_equal(layer(IDS, jnp.array([0, 1, 2, -1, 0])), base)
        one = jaxembed.nnx.Embedding(V, D, lora_rank=RANK, rngs=nnx.Rngs(0))
        assert one.num_lora_adapters is None

    def test_optimizer_trains_only_used_adapters(self):
        layer = self.with_nonzero_b(self.layer())
        before = {k: np.array(v) for k, v in layer.params().items()}
        optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.LoRAParam)
        target = jax.random.normal(jax.random.key(7), (*IDS.shape, D))

        @nnx.jit
        def step(layer, optimizer, adapter_ids):
            def loss_fn(layer):
                return squared_error(layer(IDS, adapter_ids), target)

            loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(
                layer
            )
            optimizer.update(layer, grads)
            return loss

        losses = [float(step(layer, optimizer, ADAPTER_IDS)) for _ in range(3)]
        assert losses[-1] < losses[0]
        after = layer.params()
        np.testing.assert_array_equal(after["embeddings"], before["embeddings"])
        np.testing.assert_array_equal(after[A][1], before[A][1])  # adapter 1 unused
        np.testing.assert_array_equal(after[B][1], before[B][1])
        for j in (0, 2, 3):
            assert not np.array_equal(after[A][j], before[A][j])
            assert not np.array_equal(after[B][j], before[B][j])
        sizes = {leaf.size for leaf in jax.tree.leaves(nnx.state(optimizer, nnx.OptState))}
        assert V * D not in sizes  # no optimizer state for the table

    def test_to_linen_and_back(self):
        layer = self.with_nonzero_b(self.layer(lora_alpha=2.0, use_rslora=True))
        module, variables = layer.to_linen()
        assert module.num_lora_adapters == N and module.lora_rank == RANK
        assert variables["params"][A].shape == (N, V, RANK)
        np.testing.assert_array_equal(
            module.apply(variables, IDS, ADAPTER_IDS), layer(IDS, ADAPTER_IDS)
        )
        back = jaxembed.nnx.Embedding.from_linen(module, variables)
        assert back.num_lora_adapters == N and type(back.lora_embeddings_a) is nnx.LoRAParam
        np.testing.assert_array_equal(back(IDS, ADAPTER_IDS), layer(IDS, ADAPTER_IDS))
        np.testing.assert_array_equal(
            back.attend(QUERY, ADAPTER_IDS), layer.attend(QUERY, ADAPTER_IDS)
        )
        linen_variables = module.init(jax.random.key(5), IDS, ADAPTER_IDS)
        from_init = jaxembed.nnx.Embedding.from_linen(module, linen_variables)
        np.testing.assert_array_equal(
            from_init.lora_embeddings_a[...], nn.unbox(linen_variables)["params"][A]
        )

    def test_resize_keeps_stacked_adapters(self):
        layer = self.with_nonzero_b(self.layer())
        before = layer(IDS, ADAPTER_IDS)
        a, b = np.array(layer.lora_embeddings_a[...]), np.array(layer.lora_embeddings_b[...])
        layer.resize(V + 5)
        assert layer.input_dim == V + 5 and layer.num_lora_adapters == N
        assert type(layer.lora_embeddings_a) is nnx.LoRAParam
        np.testing.assert_array_equal(layer.lora_embeddings_a[...][:, :V], a)
        np.testing.assert_array_equal(layer.lora_embeddings_a[...][:, V:], 0.0)
        np.testing.assert_array_equal(layer.lora_embeddings_b[...], b)
        np.testing.assert_array_equal(layer(IDS, ADAPTER_IDS), before)
        new = layer(jnp.array([[V + 4]]), jnp.array([2]))
        np.testing.assert_array_equal(new, layer.embeddings[...][None, V + 4 : V + 5])
        layer.resize(V - 2, shrink=True)
        assert layer.lora_embeddings_a.shape == (N, V - 2, RANK)
