"""Trainable tokens: K chosen rows of a frozen table train through a `(K, output_dim)` delta.

* `TestEnable`, `TestApply`, `TestAttend`, `TestFusedLoss`: every function against a plain
  reference, the dense table with `E.at[token_ids].add(delta)`: any id shape, scalars, empty
  ids, the out-of-range policies, id dtypes, LoRA beside the tokens, quantized tables,
  `padding_idx` on a token, bfloat16; the fused loss with token ids in the overlapping last
  chunk of its walk (input_dim 300, chunk 128: chunks start at 0, 128 and 172).
* `TestTraining`: only the delta (and LoRA's A and B) train; the gradient of the delta is the
  reference gradient of the table's rows `token_ids`; optimizer state is `(K, output_dim)`.
* `TestMerge`: merging writes `E[ids] += delta` into K rows and no other (float16, bfloat16,
  quantized tables, a LoRA adapter beside); removing; enabling twice.
* `TestMemory`: a jitted train step at V=65536, D=256, K=16 holds no `(V, D)` buffer.
* `TestTransforms`: jit, scan, vmap, and `resize` (grows with the tokens kept, refuses to drop
  one).
* `TestLinen`, `TestNNX`: the modules' `trainable_token_ids`, freezing, optimizers, merging,
  conversions.
* `TestBadInput`: bad token ids, bad params, and the functions that refuse tokens.
"""

import functools
import os

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
from strategies import SHAPES

import jaxembed
import jaxembed.nnx
from jaxembed import lora
from jaxembed.interop.peft import to_peft
from jaxembed.interop.torch import to_torch_state_dict
from jaxembed.trainable_tokens import has_trainable_tokens, remove_trainable_tokens

IDS_KEY, DELTA_KEY = "trainable_tokens_ids", "trainable_tokens_delta"
TOKEN_KEYS = {IDS_KEY, DELTA_KEY}
V, D, RANK, ALPHA = 300, 8, 4, 8.0
# Unsorted on purpose; 200 and 255 lie in the loss walk's overlap (rows 172..255 are read by
# the chunks at 128 and at 172), 256 and 299 in the last chunk alone, 0 in the first.
TOKENS = (200, 255, 256, 299, 0)
SORTED = np.sort(np.array(TOKENS, np.int32))
K = len(TOKENS)
CHUNK = 128
IDS = np.array([[200, 3, 255, 0], [299, 256, 200, 17]], np.int32)
TOL = {"rtol": 1e-5, "atol": 1e-5}
QUANTIZED = [("int8", None), ("int4", None), ("int4", 4)]
QUANTIZED_IDS = ["int8", "int4", "int4/4"]
QUANTIZED_ARRAYS = {"embeddings_int8", "embeddings_int4", "embeddings_scale", "embeddings_zero"}


# ----------------------------------------------------------------------------- helpers


@functools.cache
def _base(kind):
    """Params without tokens: "float32", "float16", "bfloat16", "lora", or a quantized format
    ("int8", "int4", "int4/4"; the table drawn as the float32 one)."""
    dtype = kind if kind in ("float32", "float16", "bfloat16") else "float32"
    params = jaxembed.init(
        jax.random.key(0), V, D, embeddings_initializer="normal", param_dtype=dtype
    )
    if kind == "lora":
        return jaxembed.enable_lora(params, jax.random.key(5), RANK, b_initializer="normal")
    if kind.startswith("int"):
        mode, _, block = kind.partition("/")
        return jaxembed.quantize(params, mode, block_size=int(block) if block else None)
    return params


def base(kind="float32"):
    return dict(_base(kind))


def with_tokens(kind="float32", token_ids=TOKENS, seed=1):
    """`base(kind)` with trainable tokens and a drawn (nonzero) delta."""
    params = jaxembed.enable_trainable_tokens(base(kind), token_ids)
    delta = jax.random.normal(jax.random.key(seed), params[DELTA_KEY].shape)
    return {**params, DELTA_KEY: delta}


def without_tokens(params):
    return {k: v for k, v in params.items() if k not in TOKEN_KEYS}


def dense_of(params, lora_alpha=None):
    """The float32 table params stand for, tokens left out: the stored table (dequantized),
    plus LoRA's `scale * A @ B`."""
    plain = without_tokens(params)
    plain = {k: v for k, v in plain.items() if not k.startswith("lora")}
    if "embeddings" not in plain:
        plain = jaxembed.dequantize(plain)
    table = plain["embeddings"].astype(jnp.float32)
    if "lora_embeddings_a" in params:
        a, b = params["lora_embeddings_a"], params["lora_embeddings_b"]
        scale = (lora_alpha or a.shape[-1]) / a.shape[-1]
        table = table + scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    return table


def reference(params, lora_alpha=None):
    """The dense float32 table with the tokens' delta written into its rows."""
    table = dense_of(params, lora_alpha)
    return table.at[params[IDS_KEY]].add(params[DELTA_KEY].astype(jnp.float32))


def reference_loss(table, query, labels, *, where=None, logit_soft_cap=None, label_smoothing=0.0):
    logits = query @ table.T
    if logit_soft_cap is not None:
        logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, table.shape[0]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    if where is None:
        return losses.mean()
    return jnp.sum(jnp.where(where, losses, 0.0)) / jnp.sum(where)


def query_and_labels(tokens=6, seed=2):
    query = jax.random.normal(jax.random.key(seed), (tokens, D))
    labels = jnp.array([200, 255, 256, 299, 0, 7][:tokens], jnp.int32)
    return query, labels


def token_heavy_ids(dtype=np.int32):
    """Id arrays of the shapes in `SHAPES`, about half of the ids token ids."""
    elements = st.one_of(st.sampled_from(TOKENS), st.integers(0, V - 1))
    return st.sampled_from(SHAPES).flatmap(
        lambda shape: hnp.arrays(dtype, shape, elements=elements)
    )


def assert_only_rows_changed(before, after, rows):
    """Rows `rows` of every array differ somewhere; every other row is bit-identical."""
    before, after = np.asarray(before), np.asarray(after)
    assert before.shape == after.shape and before.dtype == after.dtype
    others = np.setdiff1d(np.arange(before.shape[0]), rows)
    np.testing.assert_array_equal(after[others], before[others])
    changed = (after[rows] != before[rows]).reshape(len(rows), -1).any(axis=1)
    assert changed.all(), changed


# ----------------------------------------------------------------------------- values


class TestEnable:
    def test_adds_sorted_ids_and_a_zero_delta_and_changes_no_output(self):
        params = jaxembed.enable_trainable_tokens(base(), list(TOKENS))
        assert set(params) == {"embeddings", *TOKEN_KEYS}
        chex.assert_type(params[IDS_KEY], jnp.int32)
        chex.assert_shape(params[IDS_KEY], (K,))
        np.testing.assert_array_equal(params[IDS_KEY], SORTED)
        chex.assert_type(params[DELTA_KEY], jnp.float32)
        chex.assert_shape(params[DELTA_KEY], (K, D))
        np.testing.assert_array_equal(params[DELTA_KEY], 0.0)
        assert params["embeddings"] is _base("float32")["embeddings"]
        chex.assert_trees_all_equal(jaxembed.apply(params, IDS), jaxembed.apply(base(), IDS))
        query = query_and_labels()[0]
        chex.assert_trees_all_equal(jaxembed.attend(params, query), jaxembed.attend(base(), query))

    @pytest.mark.parametrize(
        "token_ids",
        [[5], np.array([9, 2], np.int64), jnp.array([299, 0], jnp.int32), (np.uint8(7), 3)],
        ids=["list", "numpy-int64", "jax", "tuple-uint8"],
    )
    def test_accepts_any_concrete_integer_sequence(self, token_ids):
        params = jaxembed.enable_trainable_tokens(base(), token_ids)
        np.testing.assert_array_equal(params[IDS_KEY], np.sort(np.asarray(token_ids)))
        chex.assert_type(params[IDS_KEY], jnp.int32)

    @pytest.mark.parametrize("kind", ["lora", "int4/4", "bfloat16"])
    def test_every_table_kind_keeps_its_arrays(self, kind):
        params = jaxembed.enable_trainable_tokens(base(kind), TOKENS)
        assert set(params) == set(base(kind)) | TOKEN_KEYS
        chex.assert_type(params[DELTA_KEY], jnp.float32)
        for key, value in base(kind).items():
            assert params[key] is value

    def test_has_trainable_tokens(self):
        assert not has_trainable_tokens(base())
        params = with_tokens()
        assert has_trainable_tokens(params)
        assert not has_trainable_tokens(jaxembed.merge_trainable_tokens(params))
        assert not has_trainable_tokens(remove_trainable_tokens(params))


class TestApplyVariants(chex.TestCase):
    """`apply` equals `reference(params)[ids]`, eagerly and under jit."""

    @chex.variants(with_jit=True, without_jit=True)
    @given(ids=token_heavy_ids())
    @settings(max_examples=6, deadline=None)
    def test_any_shape_equals_the_reference(self, ids):
        params = with_tokens()
        out = self.variant(jaxembed.apply)(params, ids)
        chex.assert_shape(out, (*ids.shape, D))
        chex.assert_type(out, jnp.float32)
        chex.assert_trees_all_equal(out, reference(params)[ids])

    # K fixed at 4: the shapes, and so the compilations, are the same in every example
    @given(token_ids=st.lists(st.integers(0, V - 1), min_size=4, max_size=4, unique=True))
    @settings(max_examples=6, deadline=None)
    def test_any_token_ids(self, token_ids):
        params = with_tokens(token_ids=token_ids)
        ids = np.array([*token_ids, 0, V - 1, 150], np.int32)
        expected = reference(params)[ids]
        chex.assert_trees_all_equal(jaxembed.apply(params, ids), expected)
        chex.assert_trees_all_equal(jax.jit(jaxembed.apply)(params, ids), expected)
        others = ~np.isin(np.arange(V), token_ids)  # every other row as the table's
        chex.assert_trees_all_equal(
            jaxembed.apply(params, np.arange(V))[others], base()["embeddings"][others]
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_scalar_ids(self):
        params = with_tokens()
        apply = self.variant(jaxembed.apply)
        for token in (0, 255, 299, 7):
            out = apply(params, jnp.int32(token))
            chex.assert_shape(out, (D,))
            chex.assert_trees_all_equal(out, reference(params)[token])
        chex.assert_trees_all_equal(jaxembed.apply(params, 256), reference(params)[256])

    @chex.variants(with_jit=True, without_jit=True)
    def test_empty_ids(self):
        params = with_tokens()
        for shape in [(0,), (2, 0)]:
            out = self.variant(jaxembed.apply)(params, jnp.zeros(shape, jnp.int32))
            chex.assert_shape(out, (*shape, D))
            chex.assert_type(out, jnp.float32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fill_gives_nan_rows_and_token_rows(self):
        params = with_tokens()
        ids = jnp.array([-1, 200, V, 5, 0, -V])
        out = self.variant(functools.partial(jaxembed.apply, out_of_range="fill"))(params, ids)
        bad = np.array([True, False, True, False, False, True])
        assert np.isnan(out[bad]).all()
        chex.assert_trees_all_equal(out[~bad], reference(params)[ids[~bad]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_clip_reads_the_nearest_row_with_its_delta(self):
        params = with_tokens()
        ids = jnp.array([-5, V, 10**6, 255, 1])
        out = self.variant(functools.partial(jaxembed.apply, out_of_range="clip"))(params, ids)
        chex.assert_trees_all_equal(out, reference(params)[jnp.array([0, 299, 299, 255, 1])])
        # the clamped ids are token rows: their delta is there
        assert not np.allclose(out[0], base()["embeddings"][0])


class TestApply:
    def test_error_policy(self):
        params = with_tokens()
        with pytest.raises(IndexError, match="got id 300"):
            jaxembed.apply(params, jnp.array([0, 300]))
        out = jax.jit(jaxembed.apply)(params, jnp.array([255, 300]))
        chex.assert_trees_all_equal(out[0], reference(params)[255])
        assert np.isnan(out[1]).all()

    @pytest.mark.parametrize(
        "ids",
        [
            np.array([0, 5, 127, -1], np.int8),
            np.array([0, 200, 255, 44], np.uint8),
            np.array([[299, 256], [200, 0]], np.int64),
        ],
        ids=["int8", "uint8", "int64"],
    )
    def test_id_dtypes(self, ids):
        params = with_tokens()
        out = jaxembed.apply(params, ids, out_of_range="fill")
        valid = (ids >= 0) & (ids < V)
        assert np.isnan(np.asarray(out)[~valid]).all()
        chex.assert_trees_all_equal(out[valid], reference(params)[ids[valid].astype(np.int64)])
        chex.assert_trees_all_equal(jax.jit(jaxembed.apply)(params, ids)[valid], out[valid])

    def test_int64_id_that_wraps_onto_a_token_stays_out_of_range(self):
        params = with_tokens()
        ids = np.array([2**32 + 200, 200], np.int64)
        out = jaxembed.apply(params, ids, out_of_range="fill")
        assert np.isnan(out[0]).all()
        chex.assert_trees_all_equal(out[1], reference(params)[200])
        with pytest.raises(IndexError, match=f"got id {2**32 + 200}"):
            jaxembed.apply(params, ids)

    def test_with_lora(self):
        params = with_tokens("lora")
        for alpha in (None, ALPHA):
            out = jaxembed.apply(params, IDS, lora_alpha=alpha)
            chex.assert_trees_all_close(out, reference(params, alpha)[IDS], **TOL)
        # the two deltas add: tokens alone, LoRA alone, and both
        both = jaxembed.apply(params, IDS)
        tokens_only = jaxembed.apply(lora.remove_lora(params), IDS)
        lora_only = jaxembed.apply(remove_trainable_tokens(params), IDS)
        chex.assert_trees_all_close(
            both, tokens_only + lora_only - base()["embeddings"][IDS], **TOL
        )
        # LoRA enabled after the tokens: the same layer
        later = jaxembed.enable_lora(
            {**base(), IDS_KEY: params[IDS_KEY], DELTA_KEY: params[DELTA_KEY]},
            jax.random.key(5),
            RANK,
            b_initializer="normal",
        )
        chex.assert_trees_all_close(jaxembed.apply(later, IDS), both, **TOL)

    @pytest.mark.parametrize("kind", QUANTIZED_IDS)
    def test_quantized(self, kind):
        params = with_tokens(kind)
        out = jaxembed.apply(params, IDS)
        chex.assert_type(out, jnp.float32)
        chex.assert_trees_all_equal(out, reference(params)[IDS])
        # the same as the dequantized table with the same tokens
        dequantized = jaxembed.dequantize(params)
        assert set(dequantized) == {"embeddings", *TOKEN_KEYS}
        chex.assert_trees_all_equal(out, jaxembed.apply(dequantized, IDS))

    def test_padding_idx_on_a_token_reads_its_delta(self):
        params = with_tokens()
        chex.assert_trees_all_equal(
            jaxembed.apply(params, IDS, padding_idx=255), reference(params)[IDS]
        )

    def test_bfloat16(self):
        params = with_tokens()
        out = jaxembed.apply(params, IDS, dtype=jnp.bfloat16)
        chex.assert_type(out, jnp.bfloat16)
        chex.assert_trees_all_equal(out, reference(params)[IDS].astype(jnp.bfloat16))
        # a bfloat16 table: the delta is added in float32, then the sum rounded once
        params = with_tokens("bfloat16")
        out = jaxembed.apply(params, IDS)
        chex.assert_type(out, jnp.bfloat16)
        chex.assert_trees_all_equal(out, reference(params)[IDS].astype(jnp.bfloat16))
        chex.assert_type(jaxembed.apply(params, IDS, dtype=jnp.float32), jnp.float32)


class TestAttendVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_any_query_shape(self):
        params = with_tokens()
        table = reference(params)
        for shape in [(D,), (2, 3, D)]:
            query = jax.random.normal(jax.random.key(len(shape)), shape)
            out = self.variant(jaxembed.attend)(params, query)
            chex.assert_shape(out, (*shape[:-1], V))
            chex.assert_type(out, jnp.float32)
            chex.assert_trees_all_close(out, query @ table.T, **TOL)


class TestAttend:
    def test_only_the_token_columns_change(self):
        params = with_tokens()
        query = query_and_labels()[0]
        with_delta = jaxembed.attend(params, query)
        plain = jaxembed.attend(base(), query)
        others = np.setdiff1d(np.arange(V), SORTED)
        chex.assert_trees_all_equal(with_delta[:, others], plain[:, others])
        expected = plain[:, SORTED] + query @ params[DELTA_KEY].T
        chex.assert_trees_all_close(with_delta[:, SORTED], expected, **TOL)

    def test_soft_cap(self):
        params = with_tokens()
        query = 3 * query_and_labels()[0]
        out = jaxembed.attend(params, query, logit_soft_cap=2.0)
        expected = 2.0 * jnp.tanh(query @ reference(params).T / 2.0)
        chex.assert_trees_all_close(out, expected, **TOL)
        assert np.abs(out).max() <= 2.0

    @pytest.mark.parametrize("kind", ["lora", *QUANTIZED_IDS])
    def test_lora_and_quantized(self, kind):
        params = with_tokens(kind)
        query = query_and_labels()[0]
        out = jaxembed.attend(params, query, lora_alpha=ALPHA)
        chex.assert_trees_all_close(out, query @ reference(params, ALPHA).T, **TOL)

    def test_bfloat16(self):
        params = with_tokens()
        query = query_and_labels()[0]
        out = jaxembed.attend(params, query, dtype=jnp.bfloat16)
        chex.assert_type(out, jnp.bfloat16)
        expected = query @ reference(params).T
        chex.assert_trees_all_close(out.astype(jnp.float32), expected, rtol=3e-2, atol=5e-2)
        out = jaxembed.attend(with_tokens("bfloat16"), query.astype(jnp.bfloat16))
        chex.assert_type(out, jnp.bfloat16)
        expected = query @ reference(with_tokens("bfloat16")).T
        chex.assert_trees_all_close(out.astype(jnp.float32), expected, rtol=3e-2, atol=5e-2)


ALL_OPTIONS = {
    "logit_soft_cap": 3.0,
    "label_smoothing": 0.2,
    "where": np.array([1, 1, 0, 1, 1, 0], bool),
}
# (Without options: TestTraining's test of the fused loss's gradient against the dense table.)
LOSS_CASES = [
    ("float32", ALL_OPTIONS),
    ("lora", {**ALL_OPTIONS, "z_loss": 1e-2}),
    ("int4/4", ALL_OPTIONS),
]
LOSS_IDS = ["cap-smoothing-where", "lora-z-loss", "int4/4"]


class TestFusedLoss:
    """`attend_cross_entropy` equals optax over `attend`, value and gradients, with the token
    columns in the overlapping last chunk of the walk."""

    @pytest.mark.parametrize("kind, options", LOSS_CASES, ids=LOSS_IDS)
    def test_value_and_gradients_equal_optax_over_attend(self, kind, options):
        params = with_tokens(kind)
        trainable, frozen = lora.split_trainable(params)
        query, labels = query_and_labels()
        where, z_loss = options.get("where"), options.get("z_loss", 0.0)
        cap, smoothing = options.get("logit_soft_cap"), options.get("label_smoothing", 0.0)
        lora_alpha = ALPHA if kind == "lora" else None

        def fused(trainable, query):
            return jaxembed.attend_cross_entropy(
                lora.combine(trainable, frozen),
                query,
                labels,
                chunk_size=CHUNK,
                lora_alpha=lora_alpha,
                **options,
            )

        def materialized(trainable, query):
            params = lora.combine(trainable, frozen)
            logits = jaxembed.attend(params, query, logit_soft_cap=cap, lora_alpha=lora_alpha)
            targets = optax.smooth_labels(jax.nn.one_hot(labels, V), smoothing)
            losses = optax.softmax_cross_entropy(logits, targets)
            losses += z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
            if where is None:
                return losses.mean()
            return jnp.sum(jnp.where(where, losses, 0.0)) / jnp.sum(where)

        value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(trainable, query)
        expected_value, expected_grads = jax.jit(jax.value_and_grad(materialized, (0, 1)))(
            trainable, query
        )
        np.testing.assert_allclose(value, expected_value, rtol=1e-5)
        chex.assert_trees_all_close(grads, expected_grads, rtol=1e-4, atol=1e-6)
        if not z_loss:  # and the dense reference table
            table = reference(params, lora_alpha)
            expected = reference_loss(
                table, query, labels, where=where, logit_soft_cap=cap, label_smoothing=smoothing
            )
            np.testing.assert_allclose(value, expected, rtol=1e-5)
        # every token column gets a gradient (softmax), tokens in the overlap included
        assert (np.abs(grads[0][DELTA_KEY]).sum(axis=1) > 0).all()

    def test_chunks_overlapping_all_but_one_row(self):
        params = with_tokens()
        query, labels = query_and_labels()
        out = jaxembed.attend_cross_entropy(params, query, labels, chunk_size=299, reduction="none")
        logits = query @ reference(params).T
        expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)

    def test_bfloat16(self):
        params = with_tokens()
        query, labels = query_and_labels()
        out = jaxembed.attend_cross_entropy(
            params, query, labels, chunk_size=CHUNK, dtype=jnp.bfloat16
        )
        logits = jaxembed.attend(params, query, dtype=jnp.bfloat16).astype(jnp.float32)
        expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        np.testing.assert_allclose(out, expected, rtol=2e-2)
        exact = reference_loss(reference(params), query, labels)
        np.testing.assert_allclose(out, exact, rtol=5e-2)


# ----------------------------------------------------------------------------- training


def trainable_names(tree):
    return {name for name, leaf in tree.items() if leaf is not None}


class TestTraining:
    @pytest.mark.parametrize("adapters_only", [False, True])
    @pytest.mark.parametrize(
        "kind, expected",
        [
            ("float32", {DELTA_KEY}),
            ("lora", {DELTA_KEY, "lora_embeddings_a", "lora_embeddings_b"}),
            ("int4/4", {DELTA_KEY}),
        ],
    )
    def test_split_trainable(self, kind, expected, adapters_only):
        params = with_tokens(kind)
        trainable, frozen = lora.split_trainable(params, adapters_only=adapters_only)
        assert trainable_names(trainable) == expected
        assert trainable_names(frozen) == set(params) - expected
        assert IDS_KEY in trainable_names(frozen)
        labels = lora.trainable_labels(params, adapters_only=adapters_only)
        assert {k for k, v in labels.items() if v == "trainable"} == expected

    @pytest.mark.parametrize("kind", ["float32", "lora", "int4"])
    def test_adam_loop_changes_only_the_delta_rows_of_ids_seen(self, kind):
        params = jaxembed.enable_trainable_tokens(base(kind), TOKENS)
        trainable, frozen = lora.split_trainable(params)
        ids = jnp.array([[200, 3, 0], [17, 200, 8]])  # tokens 200 and 0 occur, 255.. do not
        target = jax.random.normal(jax.random.key(9), (*ids.shape, D))
        tx = optax.adam(1e-2)

        def loss(trainable):
            rows = jaxembed.apply(lora.combine(trainable, frozen), ids, dtype=jnp.float32)
            return jnp.mean((rows - target) ** 2)

        @jax.jit
        def step(trainable, state):
            value, grads = jax.value_and_grad(loss)(trainable)
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state, value

        state = tx.init(trainable)
        values = []
        new = trainable
        for _ in range(5):
            new, state, value = step(new, state)
            values.append(float(value))
        assert values[-1] < values[0]
        after = lora.combine(new, frozen)
        for key in set(params) - {DELTA_KEY, "lora_embeddings_a", "lora_embeddings_b"}:
            chex.assert_trees_all_equal(after[key], params[key])  # table, quantized arrays, ids
        seen = np.isin(SORTED, [200, 0])
        delta = np.asarray(after[DELTA_KEY])
        assert (np.abs(delta[seen]) > 0).all()
        np.testing.assert_array_equal(delta[~seen], 0.0)

    @pytest.mark.parametrize("padding_idx", [None, 200])
    def test_apply_gradient_is_the_reference_gradient_of_the_token_rows(self, padding_idx):
        params = with_tokens()
        trainable, frozen = lora.split_trainable(params)
        weights = jax.random.normal(jax.random.key(4), (*IDS.shape, D))

        def loss(params):
            return jnp.sum(jaxembed.apply(params, IDS, padding_idx=padding_idx) * weights)

        grads = jax.jit(jax.grad(lambda t: loss(lora.combine(t, frozen))))(trainable)
        table_grads = jax.jit(jax.grad(lambda e: loss({"embeddings": e})))(reference(params))
        chex.assert_trees_all_close(grads[DELTA_KEY], table_grads[SORTED], **TOL)
        occurring = np.isin(SORTED, IDS) & (SORTED != (padding_idx or -1))
        assert (np.abs(grads[DELTA_KEY][occurring]).sum(axis=1) > 0).all()
        np.testing.assert_array_equal(grads[DELTA_KEY][~occurring], 0.0)

    def test_padding_token_gets_exactly_zero_gradient_in_every_layer_kind(self):
        for kind in ("lora", "int8"):
            params = with_tokens(kind)
            trainable, frozen = lora.split_trainable(params)
            grads = jax.jit(
                jax.grad(
                    lambda t, p=frozen: jnp.sum(
                        jaxembed.apply(lora.combine(t, p), IDS, padding_idx=255) ** 2
                    )
                )
            )(trainable)
            row = list(SORTED).index(255)
            np.testing.assert_array_equal(grads[DELTA_KEY][row], 0.0)
            assert (np.abs(grads[DELTA_KEY][list(SORTED).index(200)]) > 0).all()
            if kind == "lora":
                np.testing.assert_array_equal(grads["lora_embeddings_a"][255], 0.0)

    def test_attend_gradient_is_the_reference_gradient_of_the_token_rows(self):
        params = with_tokens()
        trainable, frozen = lora.split_trainable(params)
        query = query_and_labels()[0]
        weights = jax.random.normal(jax.random.key(4), (query.shape[0], V))

        def loss(params):
            return jnp.sum(jaxembed.attend(params, query, logit_soft_cap=4.0) * weights)

        grads = jax.jit(jax.grad(lambda t: loss(lora.combine(t, frozen))))(trainable)
        table_grads = jax.jit(jax.grad(lambda e: loss({"embeddings": e})))(reference(params))
        chex.assert_trees_all_close(grads[DELTA_KEY], table_grads[SORTED], **TOL)

    def test_fused_loss_gradient_is_the_reference_gradient_of_the_token_rows(self):
        params = with_tokens()
        trainable, frozen = lora.split_trainable(params)
        query, labels = query_and_labels()

        def fused(trainable, query):
            return jaxembed.attend_cross_entropy(
                lora.combine(trainable, frozen), query, labels, chunk_size=CHUNK
            )

        value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(trainable, query)
        expected, table_grads = jax.jit(jax.value_and_grad(reference_loss, argnums=(0, 1)))(
            reference(params), query, labels
        )
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        chex.assert_trees_all_close(grads[0][DELTA_KEY], table_grads[0][SORTED], **TOL)
        chex.assert_trees_all_close(grads[1], table_grads[1], **TOL)

    def test_regularization_penalizes_the_delta_not_the_frozen_table(self):
        params = with_tokens()
        penalty = jaxembed.regularization_penalty(params, "l2")
        np.testing.assert_allclose(penalty, 0.01 * jnp.sum(params[DELTA_KEY] ** 2), rtol=1e-6)
        zero = jaxembed.regularization_penalty(jaxembed.enable_trainable_tokens(base(), [1]), "l2")
        assert float(zero) == 0.0

    @pytest.mark.parametrize("kind", ["lora", "int4"])
    def test_optimizer_state_holds_only_the_trainable_leaves(self, kind):
        params = with_tokens(kind)
        tx = jaxembed.freeze_lora_base(optax.adam(1e-2))
        state = tx.init(params)
        trainable = K * D
        if kind == "lora":
            trainable += V * RANK + RANK * D
        # Adam's two moments and a step count
        assert sum(leaf.size for leaf in jax.tree.leaves(state)) == 2 * trainable + 1
        # one update: zero for every frozen leaf, the table and ids kept bit for bit
        train, frozen = lora.split_trainable(params)
        grads = jax.grad(lambda t: jnp.sum(jaxembed.apply(lora.combine(t, frozen), IDS) ** 2))(
            train
        )
        grads = lora.combine(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, _ = jax.jit(tx.update)(grads, state, params)
        new = optax.apply_updates(params, updates)
        for key in set(params) - {DELTA_KEY, "lora_embeddings_a", "lora_embeddings_b"}:
            chex.assert_trees_all_equal(new[key], params[key])
        assert not np.array_equal(new[DELTA_KEY], params[DELTA_KEY])


# ----------------------------------------------------------------------------- merging


class TestMerge:
    def test_equals_the_reference_and_changes_only_the_token_rows(self):
        params = with_tokens()
        merged = jaxembed.merge_trainable_tokens(params)
        assert set(merged) == {"embeddings"}
        chex.assert_trees_all_equal(merged["embeddings"], reference(params))
        assert_only_rows_changed(params["embeddings"], merged["embeddings"], SORTED)
        chex.assert_trees_all_equal(jaxembed.apply(merged, IDS), jaxembed.apply(params, IDS))
        chex.assert_trees_all_equal(jax.jit(jaxembed.merge_trainable_tokens)(params), merged)

    @given(
        token_ids=st.lists(st.integers(0, V - 1), min_size=4, max_size=4, unique=True),
        seed=st.integers(0, 2**16),
    )
    @settings(max_examples=6, deadline=None)
    def test_property_merged_table_is_the_reference(self, token_ids, seed):
        params = with_tokens(token_ids=token_ids, seed=seed)
        merged = jaxembed.merge_trainable_tokens(params)["embeddings"]
        chex.assert_trees_all_equal(merged, reference(params))
        assert_only_rows_changed(params["embeddings"], merged, np.sort(token_ids))

    @pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
    def test_half_precision_tables(self, dtype):
        params = with_tokens(np.dtype(dtype).name)
        merged = jaxembed.merge_trainable_tokens(params)
        chex.assert_type(merged["embeddings"], dtype)
        chex.assert_trees_all_equal(merged["embeddings"], reference(params).astype(dtype))
        assert_only_rows_changed(params["embeddings"], merged["embeddings"], SORTED)

    @pytest.mark.parametrize("kind", QUANTIZED_IDS)
    def test_quantized_requantizes_only_the_token_rows(self, kind):
        params = with_tokens(kind)
        merged = jaxembed.merge_trainable_tokens(params)
        stored = set(base(kind))
        assert set(merged) == stored
        mode, _, block = kind.partition("/")
        expected_rows = jaxembed.quantize(
            {"embeddings": reference(params)[SORTED]},
            mode,
            block_size=int(block) if block else None,
        )
        for key in stored:
            chex.assert_type(merged[key], params[key].dtype)
            others = np.setdiff1d(np.arange(V), SORTED)
            np.testing.assert_array_equal(merged[key][others], params[key][others])
            np.testing.assert_array_equal(merged[key][SORTED], expected_rows[key])
        changed = [key for key in stored if not np.array_equal(merged[key], params[key])]
        assert changed
        # within the format's error of the float merge
        dequantized = jaxembed.dequantize(merged)["embeddings"]
        step = np.abs(reference(params)).max() / (7 if mode == "int4" else 127)
        np.testing.assert_allclose(dequantized, reference(params), atol=step)

    def test_keeps_a_lora_adapter(self):
        params = with_tokens("lora")
        merged = jaxembed.merge_trainable_tokens(params)
        assert set(merged) == set(base("lora"))
        for key in ("lora_embeddings_a", "lora_embeddings_b"):
            assert merged[key] is params[key]
        expected = base()["embeddings"].at[params[IDS_KEY]].add(params[DELTA_KEY])
        chex.assert_trees_all_equal(merged["embeddings"], expected)
        chex.assert_trees_all_close(jaxembed.apply(merged, IDS), jaxembed.apply(params, IDS), **TOL)
        # LoRA merged afterwards, or first: the same table
        both = jaxembed.merge_lora(merged)
        other_order = jaxembed.merge_trainable_tokens(jaxembed.merge_lora(params))
        chex.assert_trees_all_close(both, other_order, **TOL)
        chex.assert_trees_all_close(both["embeddings"], reference(params), **TOL)

    def test_remove(self):
        params = with_tokens("lora")
        removed = remove_trainable_tokens(params)
        assert set(removed) == set(base("lora"))
        for key, value in removed.items():
            assert value is params[key]
        chex.assert_trees_all_equal(jaxembed.apply(removed, IDS), jaxembed.apply(base("lora"), IDS))

    def test_enable_twice_and_merge_or_remove_without_tokens_raise(self):
        params = with_tokens()
        with pytest.raises(ValueError, match="already enabled.*5 ids"):
            jaxembed.enable_trainable_tokens(params, [1])
        for function in (jaxembed.merge_trainable_tokens, remove_trainable_tokens):
            with pytest.raises(ValueError, match=f"{function.__name__} needs params holding"):
                function(base())


# ----------------------------------------------------------------------------- memory


class TestMemory:
    """At V=65536, D=256 (a 64 MiB float32 table) and K=16 the compiled train step holds no
    `(V, D)` buffer; controls that do hold one exceed the bound (shapes only)."""

    VOCAB, DIM, COUNT = 65536, 256, 16
    TABLE_BYTES = VOCAB * DIM * 4

    def shapes(self):
        frozen = {
            "embeddings": jax.ShapeDtypeStruct((self.VOCAB, self.DIM), jnp.float32),
            IDS_KEY: jax.ShapeDtypeStruct((self.COUNT,), jnp.int32),
        }
        delta = jax.ShapeDtypeStruct((self.COUNT, self.DIM), jnp.float32)
        ids = jax.ShapeDtypeStruct((16, 128), jnp.int32)
        query = jax.ShapeDtypeStruct((64, self.DIM), jnp.float32)
        labels = jax.ShapeDtypeStruct((64,), jnp.int32)
        return frozen, delta, ids, query, labels

    @staticmethod
    def temp_bytes(step, *args):
        return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes

    def test_train_step_holds_no_table_sized_buffer(self):
        frozen, delta, ids, query, labels = self.shapes()

        def loss(delta, frozen, ids, query, labels):
            params = {**frozen, DELTA_KEY: delta}
            rows = jaxembed.apply(params, ids)
            fused = jaxembed.attend_cross_entropy(params, query, labels)
            return jnp.mean(rows**2) + fused

        def step(delta, frozen, ids, query, labels):
            value, grad = jax.value_and_grad(loss)(delta, frozen, ids, query, labels)
            return delta - 0.1 * grad, value

        temp = self.temp_bytes(step, delta, frozen, ids, query, labels)
        # about 12 MiB: the fused loss's logits blocks (8 MiB by default)
        assert temp < self.TABLE_BYTES / 2, (temp, self.TABLE_BYTES)

        def apply_step(delta, frozen, ids):
            def loss(delta):
                return jnp.mean(jaxembed.apply({**frozen, DELTA_KEY: delta}, ids) ** 2)

            return jax.value_and_grad(loss)(delta)

        temp = self.temp_bytes(apply_step, delta, frozen, ids)
        # about 4 MiB: the (16, 128, 256) float32 rows and their cotangent
        assert temp < self.TABLE_BYTES / 8, (temp, self.TABLE_BYTES)

    def test_controls_exceed_the_bound(self):
        frozen, delta, ids, _, _ = self.shapes()

        def naive(delta, frozen, ids):  # the delta scattered into a (V, D) table first
            table = frozen["embeddings"].at[frozen[IDS_KEY]].add(delta)
            return jnp.mean(jnp.take(table, ids, axis=0) ** 2)

        def naive_step(delta, frozen, ids):
            return jax.grad(naive)(delta, frozen, ids)

        assert self.temp_bytes(naive_step, delta, frozen, ids) >= self.TABLE_BYTES

        def full_table_step(table, ids):  # the whole table trained: a (V, D) gradient
            grad = jax.grad(lambda t: jnp.mean(jaxembed.apply({"embeddings": t}, ids) ** 2))(table)
            return jnp.sum(grad * table)

        assert self.temp_bytes(full_table_step, frozen["embeddings"], ids) >= self.TABLE_BYTES


# ----------------------------------------------------------------------------- transforms


class TestTransforms:
    def test_jit_with_params_as_arguments(self):
        params = with_tokens()
        apply = jax.jit(functools.partial(jaxembed.apply, out_of_range="clip"))
        chex.assert_trees_all_equal(apply(params, IDS), reference(params)[IDS])
        # new delta values, same compiled function
        other = {**params, DELTA_KEY: params[DELTA_KEY] * 2}
        chex.assert_trees_all_equal(apply(other, IDS), reference(other)[IDS])

    def test_scan(self):
        params = with_tokens()
        batches = jnp.asarray(np.stack([IDS, IDS[::-1], (IDS + 1) % V]))

        def body(total, ids):
            rows = jaxembed.apply(params, ids)
            return total + rows.sum(), rows

        total, rows = jax.lax.scan(body, jnp.zeros(()), batches)
        chex.assert_trees_all_equal(rows, reference(params)[batches])
        np.testing.assert_allclose(total, reference(params)[batches].sum(), rtol=1e-5)

    def test_vmap_over_ids_and_over_deltas(self):
        params = with_tokens()
        out = jax.jit(jax.vmap(lambda ids: jaxembed.apply(params, ids)))(jnp.asarray(IDS))
        chex.assert_trees_all_equal(out, reference(params)[IDS])
        deltas = jnp.stack([params[DELTA_KEY], -params[DELTA_KEY]])
        out = jax.jit(jax.vmap(lambda d: jaxembed.apply({**params, DELTA_KEY: d}, IDS)))(deltas)
        chex.assert_trees_all_equal(out[1], reference({**params, DELTA_KEY: deltas[1]})[IDS])

    @pytest.mark.parametrize("kind", ["float32", "int8"])
    def test_resize_grows_with_the_tokens_kept(self, kind):
        params = with_tokens(kind)
        grown = jaxembed.resize(params, V + 20)
        chex.assert_trees_all_equal(grown[IDS_KEY], params[IDS_KEY])
        chex.assert_trees_all_equal(grown[DELTA_KEY], params[DELTA_KEY])
        chex.assert_trees_all_equal(jaxembed.apply(grown, SORTED), jaxembed.apply(params, SORTED))
        new_rows = jnp.arange(V, V + 20)
        chex.assert_trees_all_equal(
            jaxembed.apply(grown, new_rows),
            jaxembed.apply(remove_trainable_tokens(grown), new_rows),
        )
        if kind == "int8":
            jitted = jax.jit(jaxembed.resize, static_argnums=1)(params, V + 20)
            chex.assert_trees_all_equal(jitted, grown)

    def test_resize_shrinks_above_the_tokens_and_refuses_to_drop_one(self):
        params = with_tokens(token_ids=[5, 90])
        small = jaxembed.resize(params, 91, shrink=True)
        chex.assert_shape(small["embeddings"], (91, D))
        chex.assert_trees_all_equal(
            jaxembed.apply(small, jnp.array([5, 90])), jaxembed.apply(params, jnp.array([5, 90]))
        )
        with pytest.raises(ValueError, match="drop trainable token 90"):
            jaxembed.resize(params, 90, shrink=True)
        with pytest.raises(ValueError, match="drop trainable token 299"):
            jaxembed.resize(with_tokens(), 299, shrink=True)


# ----------------------------------------------------------------------------- modules


class TestLinen:
    MODULE_TOKENS = (299, 0, 200)

    def module(self, **kwargs):
        return jaxembed.Embedding(
            V, D, embeddings_initializer="normal", trainable_token_ids=self.MODULE_TOKENS, **kwargs
        )

    def variables(self, module):
        variables = nn.unbox(module.init(jax.random.key(0), IDS))
        delta = jax.random.normal(jax.random.key(1), (len(self.MODULE_TOKENS), D))
        return {**variables, "params": {**variables["params"], DELTA_KEY: delta}}

    def pure(self, params):
        return {**params, IDS_KEY: jnp.array(sorted(self.MODULE_TOKENS), jnp.int32)}

    def test_params_hold_the_delta_only_and_outputs_equal_the_pure_functions(self):
        module = self.module()
        assert module.trainable_token_ids == (0, 200, 299)
        boxed = module.init(jax.random.key(0), IDS)
        assert set(boxed) == {"params"}
        assert set(boxed["params"]) == {"embeddings", DELTA_KEY}
        assert boxed["params"][DELTA_KEY].names == (None, "embed")
        delta = nn.unbox(boxed)["params"][DELTA_KEY]
        chex.assert_shape(delta, (3, D))
        chex.assert_type(delta, jnp.float32)
        np.testing.assert_array_equal(delta, 0.0)
        variables = self.variables(module)
        pure = self.pure(variables["params"])
        chex.assert_trees_all_equal(module.apply(variables, IDS), jaxembed.apply(pure, IDS))
        query, labels = query_and_labels()
        chex.assert_trees_all_equal(
            module.apply(variables, query, method="attend"), jaxembed.attend(pure, query)
        )
        fused = module.apply(variables, query, labels, method="attend_cross_entropy")
        np.testing.assert_allclose(fused, reference_loss(reference(pure), query, labels), rtol=1e-5)

    def test_split_trainable_freezes_the_table(self):
        module = self.module()
        variables = nn.unbox(module.init(jax.random.key(0), IDS))
        labels = lora.trainable_labels(variables)
        assert labels == {"params": {"embeddings": "frozen", DELTA_KEY: "trainable"}}
        trainable, frozen = lora.split_trainable(variables)
        assert trainable["params"]["embeddings"] is None
        assert trainable["params"][DELTA_KEY] is not None
        tx = optax.adam(1e-2)

        @jax.jit
        def step(trainable, state):
            def loss(trainable):
                return jnp.sum(module.apply(lora.combine(trainable, frozen), IDS) ** 2)

            grads = jax.grad(loss)(trainable)
            updates, state = tx.update(grads, state)
            return optax.apply_updates(trainable, updates), state

        state = tx.init(trainable)
        new = trainable
        for _ in range(3):
            new, state = step(new, state)
        after = nn.unbox(lora.combine(new, frozen))["params"]
        chex.assert_trees_all_equal(after["embeddings"], variables["params"]["embeddings"])
        assert (np.abs(after[DELTA_KEY]) > 0).all()  # all three tokens occur in IDS
        assert sum(leaf.size for leaf in jax.tree.leaves(state)) == 2 * 3 * D + 1

    def test_quantize_and_resize_variables_keep_the_delta(self):
        module = self.module()
        variables = self.variables(module)
        quantized = jaxembed.linen.quantize_variables(variables, "int4", block_size=4)
        assert set(quantized["params"]) == {DELTA_KEY}
        chex.assert_trees_all_equal(quantized["params"][DELTA_KEY], variables["params"][DELTA_KEY])
        out = module.clone(quantization="int4/4").apply(quantized, IDS)
        expected = jaxembed.apply(self.pure({**quantized["quantized"], **quantized["params"]}), IDS)
        chex.assert_trees_all_equal(out, expected)

        grown = jaxembed.linen.resize_variables(variables, V + 12)
        chex.assert_trees_all_equal(grown["params"][DELTA_KEY], variables["params"][DELTA_KEY])
        chex.assert_shape(grown["params"]["embeddings"], (V + 12, D))
        out = module.clone(input_dim=V + 12).apply(grown, IDS)
        chex.assert_trees_all_equal(out, module.apply(variables, IDS))

    def test_boxed_variables(self):
        module = self.module()
        boxed = module.init(jax.random.key(0), IDS)
        quantized = jaxembed.linen.quantize_variables(boxed, "int8")
        delta = quantized["params"][DELTA_KEY]
        assert isinstance(delta, nn.LogicallyPartitioned) and delta.names == (None, "embed")
        chex.assert_trees_all_equal(
            module.clone(quantization="int8").apply(quantized, IDS),
            jaxembed.apply(self.pure(nn.unbox({**quantized["quantized"], DELTA_KEY: delta})), IDS),
        )
        grown = jaxembed.linen.resize_variables(boxed, V + 4)
        assert isinstance(grown["params"][DELTA_KEY], nn.LogicallyPartitioned)

    def test_shrinking_below_a_token_is_refused_by_the_module(self):
        # The ids live in the module, not in the variables: resize_variables cannot see them,
        # and the module of the smaller vocabulary refuses the token that no longer exists.
        module = self.module()
        small = jaxembed.linen.resize_variables(self.variables(module), 250, shrink=True)
        chex.assert_shape(small["params"]["embeddings"], (250, D))
        with pytest.raises(ValueError, match="`token_ids` must lie in .*Received: id 299"):
            module.clone(input_dim=250)

    def test_nnx_round_trip(self):
        module = self.module()
        variables = self.variables(module)
        layer = jaxembed.nnx.Embedding.from_linen(module, variables)
        assert layer.trainable_token_ids == (0, 200, 299)
        chex.assert_trees_all_equal(layer(IDS), module.apply(variables, IDS))
        again, again_variables = layer.to_linen()
        assert again.trainable_token_ids == module.trainable_token_ids
        chex.assert_trees_all_equal(again_variables["params"], variables["params"])


class TestNNX:
    def layer(self, **kwargs):
        return jaxembed.nnx.Embedding(
            V, D, embeddings_initializer="normal", rngs=nnx.Rngs(0), **kwargs
        )

    def set_delta(self, layer, seed=1):
        shape = layer.trainable_tokens_delta[...].shape
        layer.trainable_tokens_delta[...] = jax.random.normal(jax.random.key(seed), shape)

    def test_constructor_and_enable_make_the_same_layer(self):
        built = self.layer(trainable_token_ids=list(TOKENS))
        live = self.layer()
        live.enable_trainable_tokens(TOKENS)
        for layer in (built, live):
            assert type(layer.trainable_tokens_delta) is jaxembed.nnx.TrainableTokens
            assert isinstance(layer.trainable_tokens_delta, nnx.Param)
            assert type(layer.trainable_tokens_ids) is jaxembed.nnx.TokenIds
            assert not isinstance(layer.trainable_tokens_ids, nnx.Param)
            assert layer.trainable_token_ids == tuple(SORTED)
            self.set_delta(layer)
        chex.assert_trees_all_equal(built.params(), live.params())
        chex.assert_trees_all_equal(built(IDS), jaxembed.apply(built.params(), IDS))
        chex.assert_trees_all_equal(built(IDS), reference(built.params())[IDS])
        with pytest.raises(ValueError, match="already enabled"):
            live.enable_trainable_tokens([1])

    def test_filters_select_the_delta(self):
        layer = self.layer(trainable_token_ids=TOKENS)
        assert set(nnx.state(layer, jaxembed.nnx.TrainableTokens).keys()) == {DELTA_KEY}
        assert set(nnx.state(layer, jaxembed.nnx.trainable(layer)).keys()) == {DELTA_KEY}
        assert set(nnx.state(layer, nnx.Param).keys()) == {"embeddings", DELTA_KEY}
        assert set(nnx.state(layer, jaxembed.nnx.TokenIds).keys()) == {IDS_KEY}
        with_lora = self.layer(trainable_token_ids=TOKENS, lora_rank=RANK)
        assert set(nnx.state(with_lora, jaxembed.nnx.trainable(with_lora)).keys()) == {
            DELTA_KEY,
            "lora_embeddings_a",
            "lora_embeddings_b",
        }

    @pytest.mark.parametrize("quantization", [None, "int8"])
    def test_optimizer_trains_only_the_delta(self, quantization):
        layer = self.layer(trainable_token_ids=TOKENS, quantization=quantization)
        before = {k: np.asarray(v) for k, v in layer.params().items()}
        optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=jaxembed.nnx.TrainableTokens)
        target = jax.random.normal(jax.random.key(3), (*IDS.shape, D))
        ids = jnp.asarray(IDS)

        @nnx.jit
        def step(layer, optimizer):
            def loss(layer):
                return jnp.mean((layer(ids) - target) ** 2)

            grad_fn = nnx.value_and_grad(
                loss, argnums=nnx.DiffState(0, jaxembed.nnx.TrainableTokens)
            )
            value, grads = grad_fn(layer)
            optimizer.update(layer, grads)
            return value

        values = [float(step(layer, optimizer)) for _ in range(3)]
        assert values[-1] < values[0]
        after = layer.params()
        for key in set(before) - {DELTA_KEY}:
            np.testing.assert_array_equal(after[key], before[key])
        assert (np.abs(after[DELTA_KEY]) > 0).all()
        moments = jax.tree.leaves(nnx.state(optimizer, nnx.OptVariable))  # Adam's mu and nu
        assert [leaf.shape for leaf in moments] == [(K, D), (K, D)]

    @pytest.mark.parametrize("quantization", [None, "int4/4"])
    def test_merge_on_the_layer(self, quantization):
        layer = self.layer(trainable_token_ids=TOKENS, quantization=quantization)
        self.set_delta(layer)
        params = layer.params()
        expected = jaxembed.merge_trainable_tokens(params)
        out = layer(IDS)
        table = layer.embeddings if quantization is None else None
        layer.merge_trainable_tokens()
        assert layer.trainable_token_ids is None
        assert not hasattr(layer, DELTA_KEY) and not hasattr(layer, IDS_KEY)
        chex.assert_trees_all_equal(layer.params(), expected)
        if quantization is None:
            assert layer.embeddings is table  # the same variable, updated
            chex.assert_trees_all_equal(layer(IDS), out)
        else:  # the token rows requantized: within the format's step of the float sums
            chex.assert_trees_all_equal(layer(IDS), jaxembed.apply(expected, IDS))
            chex.assert_trees_all_close(layer(IDS), out, atol=float(np.abs(out).max()) / 7)
        assert set(nnx.state(layer, jaxembed.nnx.TrainableTokens).keys()) == set()

    @pytest.mark.parametrize("quantization", [None, "int8"])
    def test_to_linen_from_linen_round_trip(self, quantization):
        layer = self.layer(trainable_token_ids=TOKENS, quantization=quantization, lora_rank=2)
        self.set_delta(layer)
        module, variables = layer.to_linen()
        assert module.trainable_token_ids == tuple(SORTED)
        # the ids are the module's: no 1-D integer array among the variables
        leaves = jax.tree.leaves(variables)
        assert not any(jnp.issubdtype(x.dtype, jnp.integer) and x.ndim == 1 for x in leaves)
        assert DELTA_KEY in variables["params"]
        chex.assert_trees_all_equal(module.apply(variables, IDS), layer(IDS))
        back = jaxembed.nnx.Embedding.from_linen(module, variables)
        chex.assert_trees_all_equal(back.params(), layer.params())
        chex.assert_trees_all_equal(back(IDS), layer(IDS))
        query = query_and_labels()[0]
        chex.assert_trees_all_equal(back.attend(query), layer.attend(query))

    def test_resize_keeps_the_tokens(self):
        layer = self.layer(trainable_token_ids=TOKENS)
        self.set_delta(layer)
        out = layer(IDS)
        layer.resize(V + 4)
        chex.assert_trees_all_equal(layer(IDS), out)
        assert layer.trainable_token_ids == tuple(SORTED)
        with pytest.raises(ValueError, match="drop trainable token 299"):
            layer.resize(V - 1, shrink=True)


# ----------------------------------------------------------------------------- bad input


class TestBadInput:
    @pytest.mark.parametrize(
        "token_ids, match",
        [
            ([3, 5, 3], r"`token_ids` must be distinct\. Received: id 3 2 times"),
            ([0, -1], r"`token_ids` must lie in \[0, input_dim\) = \[0, 300\)\. Received: id -1"),
            ([299, 300], r"`token_ids` must lie in .*Received: id 300"),
            ([], r"`token_ids` must be .*at least one.*shape \(0,\)"),
            ([[1, 2]], r"`token_ids` must be .*shape \(1, 2\)"),
            ([1.0, 2.0], r"`token_ids` must be .*dtype float"),
            ([True, False], r"`token_ids` must be .*dtype bool"),
            ("ab", r"`token_ids` must be .*dtype <U2"),
            ([[1], [2, 3]], r"`token_ids` must be .*not array-like"),
        ],
        ids=["duplicate", "negative", "too-large", "empty", "2d", "float", "bool", "str", "ragged"],
    )
    def test_bad_token_ids(self, token_ids, match):
        with pytest.raises(ValueError, match=match):
            jaxembed.enable_trainable_tokens(base(), token_ids)
        with pytest.raises(ValueError, match=match):
            jaxembed.Embedding(V, D, trainable_token_ids=token_ids)
        with pytest.raises(ValueError, match=match):
            jaxembed.nnx.Embedding(V, D, trainable_token_ids=token_ids, rngs=nnx.Rngs(0))
        layer = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=match):
            layer.enable_trainable_tokens(token_ids)
        assert not hasattr(layer, DELTA_KEY)

    def test_traced_token_ids(self):
        with pytest.raises(ValueError, match="`token_ids` must be concrete.*not traced"):
            jax.jit(lambda t: jaxembed.enable_trainable_tokens(base(), t))(jnp.array([1, 2]))

    @pytest.mark.parametrize(
        "ids, match",
        [
            ([5, 3], r"\[5, 3\]"),
            ([3, 3], r"\[3, 3\]"),
            ([-1, 3], r"\[-1, 3\]"),
            ([3, 300], r"\[3, 300\]"),
        ],
        ids=["unsorted", "repeated", "negative", "too-large"],
    )
    def test_params_with_bad_ids(self, ids, match):
        params = {
            **base(),
            IDS_KEY: jnp.array(ids, jnp.int32),
            DELTA_KEY: jnp.zeros((2, D)),
        }
        pattern = rf"params\['trainable_tokens_ids'\] must be sorted, distinct.*{match}"
        with pytest.raises(ValueError, match=pattern):
            jaxembed.apply(params, IDS)
        with pytest.raises(ValueError, match=pattern):
            jaxembed.attend(params, jnp.ones((D,)))
        with pytest.raises(ValueError, match=pattern):
            jaxembed.merge_trainable_tokens(params)

    @pytest.mark.parametrize(
        "change, match",
        [
            ({DELTA_KEY: jnp.zeros((K, D + 1))}, r"trainable_tokens_delta.*\(5, 8\).*\(5, 9\)"),
            ({DELTA_KEY: jnp.zeros((K + 1, D))}, r"trainable_tokens_delta.*\(5, 8\).*\(6, 8\)"),
            ({DELTA_KEY: jnp.zeros((K, D), jnp.int32)}, r"trainable_tokens_delta.*int32"),
            ({IDS_KEY: jnp.zeros((K, 1), jnp.int32)}, r"trainable_tokens_ids.*1-D integer"),
            ({IDS_KEY: jnp.asarray(SORTED, jnp.float32)}, r"trainable_tokens_ids.*float32"),
        ],
        ids=["delta-width", "delta-rows", "delta-int", "ids-2d", "ids-float"],
    )
    def test_params_with_misshapen_tokens(self, change, match):
        params = {**with_tokens(), **change}
        with pytest.raises(ValueError, match=match):
            jaxembed.apply(params, IDS)
        with pytest.raises(ValueError, match=match):
            jax.jit(jaxembed.apply)(params, IDS)

    @pytest.mark.parametrize("present", [IDS_KEY, DELTA_KEY])
    def test_half_the_tokens(self, present):
        params = {**base(), present: with_tokens()[present]}
        with pytest.raises(ValueError, match=f"params hold '{present}' but not its partner"):
            jaxembed.apply(params, IDS)

    def test_functions_that_refuse_tokens(self, tmp_path):
        params = with_tokens()
        refusal = r"does not support trainable tokens; params hold 5\. Merge them first"
        mesh = jax.make_mesh((1,), ("model",))
        with pytest.raises(ValueError, match="vocab_parallel_apply " + refusal):
            jaxembed.sharding.vocab_parallel_apply(params, IDS, vocab_axis="model", mesh=mesh)
        query, labels = query_and_labels()
        with pytest.raises(ValueError, match="vocab_parallel_attend_cross_entropy " + refusal):
            jaxembed.sharding.vocab_parallel_attend_cross_entropy(
                params, query, labels, vocab_axis="model", mesh=mesh
            )
        with pytest.raises(ValueError, match="to_torch_state_dict " + refusal):
            to_torch_state_dict(params, os.path.join(tmp_path, "embed.safetensors"))
        assert not os.listdir(tmp_path)
        with pytest.raises(ValueError, match="apply_constraint.*trainable tokens"):
            jaxembed.apply_constraint(params, "non_neg")
        tx = jaxembed.keep_embeddings_constrained("non_neg")
        with pytest.raises(ValueError, match="keep_embeddings_constrained.*trainable tokens"):
            tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        with pytest.raises(ValueError, match="Embedding.*trainable tokens"):
            jaxembed.Embedding(V, D, trainable_token_ids=[1], embeddings_constraint="non_neg")
        layer = jaxembed.nnx.Embedding(V, D, embeddings_constraint="non_neg", rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="enable_trainable_tokens.*trainable tokens"):
            layer.enable_trainable_tokens([1])

    def test_to_peft_refuses_tokens_beside_an_adapter_without_a_table(self, tmp_path):
        # With the table present to_peft refuses the tokens; without it, the trained delta
        # must not be dropped silently either (a PEFT LoRA adapter has no place for it).
        params = with_tokens("lora")
        refusal = r"to_peft does not support trainable tokens; params hold 5\. Merge them first"
        with pytest.raises(ValueError, match=refusal):
            to_peft(params, tmp_path / "with-table")
        adapter_and_tokens = {k: v for k, v in params.items() if k != "embeddings"}
        with pytest.raises(ValueError, match="trainable tokens"):
            to_peft(adapter_and_tokens, tmp_path / "without-table")


class TestRowSparseTraining:
    """Row-sparse training updates a table's rows; with trainable tokens the table is frozen."""

    def test_value_and_row_grads_refuses_tokens(self):
        with pytest.raises(ValueError, match="value_and_row_grads.*trainable tokens"):
            jaxembed.sparse.value_and_row_grads(
                lambda rows: jnp.sum(rows), with_tokens(), jnp.array([1, 2])
            )

    def test_linen_split_tables_leaves_a_table_with_tokens_in_the_rest(self):
        module = jaxembed.Embedding(V, D, trainable_token_ids=(3,))
        params = module.init(jax.random.key(0), jnp.array([1]))["params"]
        tables, rest = jaxembed.sparse.split_tables(params)
        assert tables == {}
        assert rest["embeddings"] is not None

    def test_nnx_tables_skip_a_layer_with_tokens(self):
        plain = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0))
        tokens = jaxembed.nnx.Embedding(V, D, trainable_token_ids=[3], rngs=nnx.Rngs(0))
        assert len(nnx.state(plain, jaxembed.sparse.nnx_tables(plain))) == 1
        assert len(nnx.state(tokens, jaxembed.sparse.nnx_tables(tokens))) == 0

    def test_nnx_attend_under_nnx_jit(self):
        # The layer asks whether its table trains on every attend: without reading the ids'
        # values, which nnx.jit traces.
        layer = jaxembed.nnx.Embedding(V, D, trainable_token_ids=[3], rngs=nnx.Rngs(0))
        query = jnp.ones((2, D))
        got = nnx.jit(lambda layer, query: layer.attend(query))(layer, query)
        chex.assert_trees_all_close(got, layer.attend(query))
