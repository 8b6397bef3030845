"""`attend_cross_entropy` is a drop-in replacement for the materialized loss.

The reference is optax on the full logits: `softmax_cross_entropy_with_integer_labels(
attend(params, query), labels)`, with the soft cap `c * tanh(logits / c)` applied to the logits,
`optax.smooth_labels` + `softmax_cross_entropy` for label smoothing, `z * logsumexp**2` for the
z-loss and `where` as the mask. Loss and gradients (query, table, LoRA's A and B) must match,
whatever the chunking; and the compiled fused gradient must hold no `(tokens, input_dim)` buffer.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import jaxembed

V, D = 300, 16  # 300 = 2 * 128 + 44: chunks of 128 leave a ragged last chunk
SHAPE = (2, 6)  # T = 12 positions
MASK = np.array([[True, True, False, True, True, True], [False, True, True, True, False, True]])
F32_TOL = {"rtol": 1e-5, "atol": 1e-6}


RNG = np.random.default_rng(0)
TABLE = RNG.standard_normal((V, D), np.float32)  # logits of std ~2: the soft cap bites
QUERY = 0.5 * RNG.standard_normal((*SHAPE, D), np.float32)
LABELS = RNG.integers(0, V, SHAPE).astype(np.int32)


@functools.cache
def make_params(lora=False, dtype=jnp.float32):
    if dtype != jnp.float32:  # the same values, rounded (on the host: nothing to compile)
        params = make_params(lora)
        return {**params, "embeddings": jnp.asarray(np.asarray(params["embeddings"], dtype))}
    params = jaxembed.init(None, V, D, weights=TABLE)
    if lora:  # B drawn "normal", not zeros, so the adapter changes the logits
        params = jaxembed.enable_lora(params, jax.random.key(1), rank=4, b_initializer="normal")
    return params


def make_query(shape=SHAPE, dtype=jnp.float32):
    """The first positions of QUERY, shaped `shape + (D,)`."""
    return jnp.asarray(QUERY.reshape(-1, D)[: math.prod(shape)].reshape(*shape, D), dtype)


def make_labels(shape=SHAPE):
    return LABELS.reshape(-1)[: math.prod(shape)].reshape(shape)


def reference(
    params,
    query,
    labels,
    *,
    where=None,
    lora_alpha=None,
    logit_soft_cap=None,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="mean",
    dtype=None,
):
    """The materialized path: full logits, then optax."""
    logits = jaxembed.attend(params, query, lora_alpha=lora_alpha, dtype=dtype)
    if logit_soft_cap is not None:
        logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
    if label_smoothing:
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, V, dtype=logits.dtype), label_smoothing
        )
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if z_loss:
        losses = losses + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    losses = losses.astype(jnp.float32)
    if where is not None:
        losses = jnp.where(where, losses, 0.0)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    count = losses.size if where is None else jnp.sum(where)
    return jnp.where(count > 0, losses.sum() / jnp.maximum(count, 1), 0.0)


def value_and_grad_fn(loss_fn, shape, **kwargs):
    """`(params, query, labels, where) -> (loss, grads w.r.t. params (table, A, B) and query)`;
    "none" is summed with position weights so that every position's gradient is checked."""
    weights = np.linspace(0.5, 1.5, math.prod(shape), dtype=np.float32).reshape(shape)

    def scalar(params, query, labels, where):
        out = loss_fn(params, query, labels, where=where, **kwargs)
        return (out * weights).sum() if kwargs.get("reduction") == "none" else out, out

    def value_and_grads(*args):
        (_, out), grads = jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True)(*args)
        return out, grads

    return value_and_grads


def assert_close(actual, expected, rtol, atol):
    chex.assert_trees_all_equal_shapes_and_dtypes(actual[1], expected[1])
    np.testing.assert_allclose(actual[0], expected[0], rtol=rtol, atol=atol)
    for got, want in zip(jax.tree.leaves(actual[1]), jax.tree.leaves(expected[1]), strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.isfinite(got).all()
        # gradients relative to their own scale (small entries carry rounding of the big ones)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1, np.abs(want).max()))


FEATURES = {"logit_soft_cap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3}

# (query shape, LoRA, mask, keyword arguments): every feature, reduction and chunking.
CASES = {
    "defaults": (SHAPE, False, False, {}),
    "mask_soft_cap_ragged_chunks": (SHAPE, False, True, {"chunk_size": 128, "logit_soft_cap": 3.0}),
    "smoothing_z_loss_sum_chunk_1": (
        SHAPE,
        False,
        True,
        {"chunk_size": 1, "label_smoothing": 0.2, "z_loss": 1e-2, "reduction": "sum"},
    ),
    "none_chunk_over_input_dim": (
        SHAPE,
        False,
        True,
        {"chunk_size": 512, "reduction": "none", **FEATURES},
    ),
    "lora_everything": (SHAPE, True, True, {"chunk_size": 7, "lora_alpha": 32.0, **FEATURES}),
    "rank_1_lora_none": ((), True, True, {"chunk_size": 100, "reduction": "none", **FEATURES}),
}


def run_case(case, dtype):
    """(fused, materialized) losses and gradients, both from one compilation."""
    shape, lora, masked, kwargs = CASES[case]
    params = make_params(lora, dtype)
    query, labels = make_query(shape, dtype), make_labels(shape)
    where = (MASK if shape else np.array(True)) if masked else None
    fused = value_and_grad_fn(jaxembed.attend_cross_entropy, shape, **kwargs)
    dense_kwargs = {name: value for name, value in kwargs.items() if name != "chunk_size"}
    dense = value_and_grad_fn(reference, shape, **dense_kwargs)
    both = jax.jit(lambda *args: (fused(*args), dense(*args)))
    return (*both(params, query, labels, where), where)


class TestMatchesMaterialized:
    @pytest.mark.parametrize("case", list(CASES))
    def test_float32(self, case):
        fused, dense, where = run_case(case, jnp.float32)
        chex.assert_type(fused[0], jnp.float32)
        assert_close(fused, dense, **F32_TOL)
        if CASES[case][3].get("reduction") == "none" and where is not None:
            np.testing.assert_array_equal(np.asarray(fused[0])[~where], 0.0)

    @pytest.mark.parametrize("case", ["lora_everything", "rank_1_lora_none"])
    def test_bfloat16(self, case):  # bfloat16 query and table (A and B stay float32)
        fused, dense, _ = run_case(case, jnp.bfloat16)
        chex.assert_type(fused[0], jnp.float32)  # sums run in float32 whatever the inputs
        assert_close(fused, dense, rtol=2e-2, atol=2e-2)

    def test_no_positions_at_all(self):
        @jax.jit
        def losses(params, query, labels):
            mean = jaxembed.attend_cross_entropy(params, query, labels)
            return mean, jaxembed.attend_cross_entropy(params, query, labels, reduction="none")

        mean, none = losses(make_params(), jnp.zeros((0, D)), jnp.zeros((0,), jnp.int32))
        assert mean == 0.0
        chex.assert_shape(none, (0,))


@pytest.fixture(scope="module")
def setup():
    """params, 4 query vectors, a mask, valid labels and their masked reference losses."""
    params, query = make_params(), make_query((4,))
    where = np.array([True, False, True, False])
    good = np.array([1, 2, 299, 0])
    expected = reference(params, query, good, where=where, reduction="none")
    return params, query, where, good, expected


# Jitted functions shared by the tests below, so that they share compilations (an eager call
# traces and compiles the chunk loop anew each time).
losses_jit = jax.jit(
    functools.partial(jaxembed.attend_cross_entropy, reduction="none"),
    static_argnames="out_of_range",
)
mean_and_grads_jit = jax.jit(jax.value_and_grad(jaxembed.attend_cross_entropy, argnums=(0, 1)))


class TestLabels:
    """Masked labels are ignored; unmasked out-of-range labels follow `out_of_range`."""

    @pytest.mark.parametrize(
        "masked_values",
        [(-100, -100), (10**9, -1), (2**40, 2**63 - 1)],
        ids=["minus_100", "huge", "int64"],
    )
    def test_masked_labels_any_value(self, setup, masked_values):
        params, query, where, good, expected = setup
        labels = good.astype(np.int64)
        labels[~where] = masked_values
        out = jaxembed.attend_cross_entropy(params, query, labels, where=where, reduction="none")
        np.testing.assert_allclose(out, expected, **F32_TOL)
        if labels.max() <= np.iinfo(np.int32).max:
            labels = jnp.asarray(labels, jnp.int32)  # device labels, traced mask, every policy
            for policy in ("error", "fill", "clip"):  # no NaN, nothing clipped
                out = losses_jit(params, query, labels, where=where, out_of_range=policy)
                np.testing.assert_allclose(out, expected, **F32_TOL)
        else:  # host labels that do not fit int32 (not passed through jit), traced mask
            out = jax.jit(
                lambda q, w: jaxembed.attend_cross_entropy(
                    params, q, labels, where=w, reduction="none"
                )
            )(query, where)
            np.testing.assert_allclose(out, expected, **F32_TOL)

    def test_masked_labels_change_no_gradient(self, setup):
        params, query, where, good, _ = setup
        bad = jnp.asarray(good).at[~where].set(-100)
        chex.assert_trees_all_close(
            mean_and_grads_jit(params, query, bad, where=where),
            mean_and_grads_jit(params, query, jnp.asarray(good), where=where),
        )

    def test_mean_over_no_counted_position_is_zero_with_zero_gradient(self, setup):
        params, query, _, good, _ = setup
        nowhere = np.zeros(4, bool)
        loss, grads = mean_and_grads_jit(params, query, jnp.asarray(good), where=nowhere)
        assert loss == 0.0
        for leaf in jax.tree.leaves(grads):
            np.testing.assert_array_equal(leaf, 0.0)

    @pytest.mark.parametrize("bad", [300, -1, 2**40], ids=["input_dim", "negative", "int64"])
    def test_error_eager_raises_naming_the_label(self, setup, bad):
        params, query, where, good, _ = setup
        labels = good.astype(np.int64)
        labels[2] = bad
        with pytest.raises(IndexError, match=rf"\[0, 300\); got id {bad}\b"):
            jaxembed.attend_cross_entropy(params, query, labels)
        with pytest.raises(IndexError, match=rf"got id {bad}\b"):  # a mask that counts it
            jaxembed.attend_cross_entropy(params, query, labels, where=where)
        if bad != 2**40:
            with pytest.raises(IndexError, match=rf"got id {bad}\b"):
                jaxembed.attend_cross_entropy(params, query, jnp.asarray(labels, jnp.int32))

    def test_error_under_jit_nan_and_under_checkify_names_the_label(self, setup):
        params, query, _, good, _ = setup
        labels = jnp.asarray(good).at[2].set(300)
        out = losses_jit(params, query, labels)
        assert np.isnan(out[2]) and np.isfinite(np.delete(np.asarray(out), 2)).all()
        assert np.isnan(jax.jit(jaxembed.attend_cross_entropy)(params, query, labels))
        checked = jax.jit(checkify.checkify(losses_jit))
        error, _ = checked(params, query, labels)
        with pytest.raises(checkify.JaxRuntimeError, match=r"\[0, 300\); got id 300"):
            error.throw()
        error, out = checked(params, query, jnp.asarray(good))
        error.throw()
        np.testing.assert_allclose(out, losses_jit(params, query, jnp.asarray(good)))

    def test_fill_gives_nan(self, setup):
        params, query, _, good, _ = setup
        labels = good.copy()
        labels[[0, 2]] = [-1, 300]
        nan = [True, False, True, False]
        out = jaxembed.attend_cross_entropy(params, query, labels, out_of_range="fill")
        assert np.isnan(out)
        out = losses_jit(params, query, jnp.asarray(labels), out_of_range="fill")
        np.testing.assert_array_equal(np.isnan(out), nan)

    def test_clip_uses_the_nearest_class(self, setup):
        params, query, _, good, _ = setup
        labels = good.astype(np.int64)
        labels[[0, 2]] = [-5, 2**40]
        expected = reference(params, query, np.array([0, 2, 299, 0]), reduction="none")
        out = jaxembed.attend_cross_entropy(
            params, query, labels, out_of_range="clip", reduction="none"
        )
        np.testing.assert_allclose(out, expected, **F32_TOL)
        device_labels = jnp.asarray(good).at[0].set(-5).at[2].set(10**9)
        out = losses_jit(params, query, device_labels, out_of_range="clip")
        np.testing.assert_allclose(out, expected, **F32_TOL)

    def test_host_int64_labels_stay_out_of_range_under_a_traced_mask(self, setup):
        # 2**32 + 3 must not wrap to class 3 when host labels meet a traced mask
        params, query, _, good, _ = setup
        labels = good.astype(np.int64)
        labels[0] = 2**32 + 3
        where = np.array([True, True, True, False])

        @functools.partial(jax.jit, static_argnames="policy")
        def losses(query, where, policy):  # `labels` reach the loss as a host array
            return jaxembed.attend_cross_entropy(
                params, query, labels, where=where, out_of_range=policy, reduction="none"
            )

        assert np.isnan(losses(query, where, "error")[0])
        assert np.isnan(losses(query, where, "fill")[0])
        clipped = np.array([299, *good[1:]])
        expected = reference(params, query, clipped, where=where, reduction="none")
        np.testing.assert_allclose(losses(query, where, "clip"), expected, **F32_TOL)


BAD_INPUT = [
    ("labels_shape", {"labels": np.zeros(5, np.int32)}, ValueError, r"`labels` must have shape"),
    ("labels_float", {"labels": np.zeros(4, np.float32)}, TypeError, r"`labels` must hold int"),
    ("where_shape", {"where": np.ones((2, 2), bool)}, ValueError, r"`where` must be a bool array"),
    ("where_dtype", {"where": np.ones(4, np.int32)}, ValueError, r"`where`.*dtype int32"),
    ("reduction", {"reduction": "avg"}, ValueError, r"`reduction` must be one of.*'avg'"),
    ("smoothing_over_1", {"label_smoothing": 1.5}, ValueError, r"`label_smoothing` must lie in"),
    ("smoothing_negative", {"label_smoothing": -0.1}, ValueError, r"`label_smoothing` must be"),
    ("z_loss_negative", {"z_loss": -1e-4}, ValueError, r"`z_loss` must be a finite non-negative"),
    ("soft_cap_zero", {"logit_soft_cap": 0.0}, ValueError, r"`logit_soft_cap` must be a finite"),
    ("soft_cap_negative", {"logit_soft_cap": -30.0}, ValueError, r"`logit_soft_cap` must be"),
    ("chunk_size_zero", {"chunk_size": 0}, ValueError, r"`chunk_size` must be a positive int"),
    ("out_of_range", {"out_of_range": "wrap"}, ValueError, r"`out_of_range` must be one of"),
    ("lora_alpha", {"lora_alpha": -1.0}, ValueError, r"`lora_alpha` must be a finite positive"),
    ("query_dim", {"query": jnp.ones((4, 5))}, ValueError, r"`query` must have last dimension"),
    ("query_int", {"query": jnp.ones((4, D), jnp.int32)}, TypeError, r"`query` must be a float"),
]


class TestBadInput:
    @pytest.mark.parametrize(
        ("change", "error", "match"),
        [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUT],
    )
    def test_clear_error_naming_the_argument(self, setup, change, error, match):
        params, query, _, labels, _ = setup
        kwargs = {"query": query, "labels": labels, **change}
        with pytest.raises(error, match=match):
            jaxembed.attend_cross_entropy(params, **kwargs)


def _logits_bytes(tokens, input_dim):
    return tokens * input_dim * np.dtype(np.float32).itemsize


class TestCompiledMemory:
    TOKENS, VOCAB, DIM = 2048, 65536, 64

    def temp_bytes(self, loss_fn):
        params = {"embeddings": jax.ShapeDtypeStruct((self.VOCAB, self.DIM), jnp.float32)}
        query = jax.ShapeDtypeStruct((self.TOKENS, self.DIM), jnp.float32)
        labels = jax.ShapeDtypeStruct((self.TOKENS,), jnp.int32)
        lowered = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(params, query, labels)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    def test_fused_gradient_never_holds_the_logits(self):
        # 5% of one (tokens, vocab) float32 logits buffer (512 MiB here): about 26 MiB
        bound = 0.05 * _logits_bytes(self.TOKENS, self.VOCAB)
        fused = self.temp_bytes(jaxembed.attend_cross_entropy)
        assert fused < bound, (fused, bound)
        # control: the materialized path's temporaries exceed the bound (the check can fail)
        dense = self.temp_bytes(
            lambda p, q, y: optax.softmax_cross_entropy_with_integer_labels(
                jaxembed.attend(p, q), y
            ).mean()
        )
        assert dense > bound, (dense, bound)


QUANTIZED_FORMATS = [("int8", None), ("int4", None), ("int4", 8)]


class TestQuantizedTables:
    """A quantized table is walked chunk by chunk from its stored arrays (never a float copy
    of the table), gets no gradient, and gives the materialized loss of its dequantized rows."""

    @pytest.mark.parametrize("mode, block_size", QUANTIZED_FORMATS)
    @pytest.mark.parametrize("lora", [False, True], ids=["plain", "qlora"])
    def test_matches_materialized_and_trains_only_the_adapter(self, mode, block_size, lora):
        params = jaxembed.quantize(make_params(), mode, block_size=block_size)
        if lora:
            params = jaxembed.enable_lora(params, jax.random.key(1), 4, b_initializer="normal")
        trainable, frozen = jaxembed.lora.split_trainable(params)
        kwargs = {"lora_alpha": 8.0, "logit_soft_cap": 3.0, "where": MASK}

        def loss(trainable, query, loss_fn):
            return loss_fn(jaxembed.lora.combine(trainable, frozen), query, LABELS, **kwargs)

        fused_fn = functools.partial(
            jaxembed.attend_cross_entropy, chunk_size=128
        )  # 300 rows: a ragged last chunk
        fused = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
        value, grads = fused(trainable, make_query(), fused_fn)
        expected_value, expected_grads = jax.value_and_grad(loss, argnums=(0, 1))(
            trainable, make_query(), reference
        )
        np.testing.assert_allclose(value, expected_value, **F32_TOL)
        chex.assert_trees_all_close(grads, expected_grads, **F32_TOL)
        assert {k for k, v in grads[0].items() if v is not None} <= set(jaxembed._table.LORA_KEYS)

    def test_compiled_memory_below_one_float_copy_of_the_table(self):
        vocab, dim, tokens = 262144, 1024, 64
        table_bytes = 4 * vocab * dim  # one float32 copy: 1 GiB
        params = {
            "embeddings_int4": jax.ShapeDtypeStruct((vocab, dim // 2), jnp.int8),
            "embeddings_scale": jax.ShapeDtypeStruct((vocab,), jnp.float32),
        }
        query = jax.ShapeDtypeStruct((tokens, dim), jnp.float32)
        labels = jax.ShapeDtypeStruct((tokens,), jnp.int32)

        def temp_bytes(loss_fn):
            lowered = jax.jit(jax.value_and_grad(loss_fn, argnums=1)).lower(params, query, labels)
            return lowered.compile().memory_analysis().temp_size_in_bytes

        fused = temp_bytes(jaxembed.attend_cross_entropy)
        assert fused < 0.05 * table_bytes, fused
        # control: dequantizing first holds a float copy of the table
        naive = temp_bytes(
            lambda p, q, y: jaxembed.attend_cross_entropy(jaxembed.dequantize(p), q, y)
        )
        assert naive > table_bytes, naive


class TestTransforms:
    def test_jit_with_defaults_and_grad(self, setup):
        params, query, _, labels, _ = setup
        expected = reference(params, query, labels)
        jitted = jax.jit(jaxembed.attend_cross_entropy)(params, query, jnp.asarray(labels))
        np.testing.assert_allclose(jitted, expected, **F32_TOL)
        # plain jax.grad, not jitted, equals jit(value_and_grad) (itself checked against optax)
        grads = jax.grad(jaxembed.attend_cross_entropy, argnums=(0, 1))(params, query, labels)
        loss, jitted_grads = mean_and_grads_jit(params, query, jnp.asarray(labels))
        np.testing.assert_allclose(loss, expected, **F32_TOL)
        chex.assert_trees_all_close(grads, jitted_grads, **F32_TOL)

    def test_optax_training_loop_lowers_the_loss(self):
        params, query, labels = make_params(), make_query(), make_labels()
        where = jnp.asarray(MASK)
        loss_fn = functools.partial(
            jaxembed.attend_cross_entropy, where=where, chunk_size=128, logit_soft_cap=10.0
        )
        optimizer = optax.adam(0.05)
        state = (params, query), optimizer.init((params, query))

        @jax.jit
        def step(state):
            trainable, opt_state = state
            loss, grads = jax.value_and_grad(lambda t: loss_fn(*t, labels))(trainable)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), loss

        losses = []
        for _ in range(30):
            state, loss = step(state)
            losses.append(float(loss))
        assert np.isfinite(losses).all()
        assert losses[-1] < 0.5 * losses[0], losses
