"""Quantized tables: Keras parity, round-trip error bounds, every function against the
dequantized table, QLoRA, memory and parameter bytes.

* `TestKerasParity`: the stored integers, scales and zero points are those of
  `keras.layers.Embedding.quantize` (Keras 3.15), and so are the outputs, with and without
  LoRA, and the merged-and-requantized tables of Keras's save path; the penalty follows
  difference 16 in docs/guides/keras.md.
* `TestRoundTrip`: `dequantize(quantize(x))` lies within half a quantization step of `x`
  (hypothesis over shapes, block sizes and rows: constant, zero, one-signed, tiny).
* `TestSameAsDequantized`: apply, attend (its three chunking paths), LoRA, penalties and
  merges on quantized params equal the same functions on `jaxembed.dequantize(params)`.
* `TestQLoRA`: only the float adapter trains; the quantized arrays stay bit-identical.
* `TestMemory`, `TestParameterBytes`: compiled temp bytes at V=262144, D=1024 (shapes only),
  with controls that do build a float table; bytes of the stored arrays.

Bad input (unknown modes, bad block sizes, misshapen arrays) is in
tests/test_bad_input.py, class `TestQuantize`.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kind_checks import check_lookup_matches_dense

import jaxembed
from jaxembed import _table, lora
from jaxembed.quantization import is_quantized, quantization_format

assert keras.backend.backend() == "jax", (
    "keras was imported with another backend before this module; run with KERAS_BACKEND=jax"
)

KEY = jax.random.key(0)
VALUES_KEY = {"int8": "embeddings_int8", "int4": "embeddings_int4"}
QUANTIZED_KEYS = {"embeddings_int8", "embeddings_int4", "embeddings_scale", "embeddings_zero"}
# (mode, block_size) at output_dim 8; "int8", 4 is jaxembed's own (Keras groups int4 only).
SMALL_FORMATS = [("int8", None), ("int4", None), ("int4", 4), ("int8", 4)]
SMALL_IDS = [f"{mode}/{block}" if block else mode for mode, block in SMALL_FORMATS]


def format_name(mode, block_size):
    return mode if block_size is None else f"{mode}/{block_size}"


def special_table(input_dim, output_dim, seed=0):
    """A float32 table with rows of very different norms, plus special rows: all zero, large,
    tiny, constant, negative-only and positive-only."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(input_dim, output_dim))
    table *= rng.uniform(0.01, 5.0, size=(input_dim, 1))
    table[1] = 0.0
    table[2] *= 1e4
    table[3] *= 1e-5
    table[4] = 1.5
    table[5] = -np.abs(table[5]) - 0.1
    table[6] = np.abs(table[6]) + 0.1
    return table.astype(np.float32)


def integers(values, mode):
    """The stored integers of `values`, unpacked (int4: even columns in the low nibble)."""
    values = np.asarray(values).astype(np.int32)
    if mode == "int8":
        return values
    low = ((values & 0xF) ^ 8) - 8
    high = values >> 4
    return np.stack([low, high], axis=-1).reshape(*values.shape[:-1], -1)


def half_step(params, mode, block_size):
    """Half a quantization step per element of the dequantized table, from params's scales."""
    scale = np.asarray(params["embeddings_scale"], np.float64)
    if block_size is None:
        return 0.5 / scale[:, None]
    return 0.5 * np.repeat(scale, block_size, axis=1)


def block_magnitude(table, block_size):
    """max |x| over each element's row (per-row formats) or block (grouped), per element."""
    table = np.abs(np.asarray(table, np.float64))
    rows, columns = table.shape
    if block_size is None:
        return np.broadcast_to(table.max(axis=1, keepdims=True), table.shape)
    blocks = table.reshape(rows, columns // block_size, block_size).max(axis=-1)
    return np.repeat(blocks, block_size, axis=1)


def assert_within_half_step(approx, exact, quantized, mode, block_size):
    """|approx - exact| <= half a step of `quantized`'s scales, plus float rounding."""
    error = np.abs(np.asarray(approx, np.float64) - np.asarray(exact, np.float64))
    bound = half_step(quantized, mode, block_size) + 1e-6 * block_magnitude(exact, block_size)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert (error <= bound).all(), (
        f"error {error[worst]:.6g} > bound {bound[worst]:.6g} at {worst}: "
        f"x={np.asarray(exact)[worst]}, back={np.asarray(approx)[worst]}"
    )


def keras_quantized(table, mode, block_size, **kwargs):
    layer = keras.layers.Embedding(*table.shape, weights=table, **kwargs)
    if mode == "int8":
        layer.quantize("int8")
    else:
        layer.quantize(
            "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=block_size)
        )
    return layer


def keras_arrays(layer):
    arrays = {"values": layer._embeddings, "scale": layer.embeddings_scale}
    if getattr(layer, "embeddings_zero", None) is not None:
        arrays["zero"] = layer.embeddings_zero
    return {name: np.asarray(variable.value) for name, variable in arrays.items()}


def jaxembed_arrays(params, mode):
    arrays = {"values": params[VALUES_KEY[mode]], "scale": params["embeddings_scale"]}
    if "embeddings_zero" in params:
        arrays["zero"] = params["embeddings_zero"]
    return {name: np.asarray(array) for name, array in arrays.items()}


KERAS_FORMATS = [("int8", None), ("int4", None), ("int4", 128)]
KERAS_IDS = ["int8", "int4", "int4/128"]
KERAS_V, KERAS_D, KERAS_RANK = 20, 256, 4
KERAS_TABLE = special_table(KERAS_V, KERAS_D)
KERAS_LOOKUP = np.array([[0, 1, 2, 3], [4, 5, 6, 19]], np.int32)


def random_adapter(input_dim, output_dim, rank, seed=1, size=0.1):
    keys = jax.random.split(jax.random.key(seed))
    return {
        "lora_embeddings_a": size * jax.random.normal(keys[0], (input_dim, rank)),
        "lora_embeddings_b": size * jax.random.normal(keys[1], (rank, output_dim)),
    }


def keras_315_rows(table, block_size):
    """Rows on which Keras 3.15 and jaxembed store the same integers: all rows per row; for
    grouped formats the rows whose every block holds both signs (docs/guides/keras.md,
    difference 17: jaxembed widens a one-signed block's range to include 0, as Keras did after
    3.15)."""
    if block_size is None:
        return np.ones(len(table), bool)
    blocks = np.asarray(table).reshape(len(table), -1, block_size)
    return ((blocks.min(axis=-1) <= 0) & (blocks.max(axis=-1) >= 0)).all(axis=1)


ONE_SIGNED_ROWS = np.array([4, 5, 6])  # special_table's constant, negative, positive rows


class TestKerasParity:
    @pytest.mark.parametrize(("mode", "block_size"), KERAS_FORMATS, ids=KERAS_IDS)
    def test_stored_arrays_and_outputs_equal_keras(self, mode, block_size):
        layer = keras_quantized(KERAS_TABLE, mode, block_size)
        params = jaxembed.quantize({"embeddings": KERAS_TABLE}, mode, block_size=block_size)
        expected = keras_arrays(layer)
        got = jaxembed_arrays(params, mode)
        assert got.keys() == expected.keys()
        rows = keras_315_rows(KERAS_TABLE, block_size)
        assert rows.sum() == KERAS_V - (0 if block_size is None else len(ONE_SIGNED_ROWS))
        for name in expected:
            assert got[name].dtype == expected[name].dtype, name
            np.testing.assert_array_equal(got[name][rows], expected[name][rows], err_msg=name)
        if block_size is not None:
            # one-signed blocks: Keras 3.15 clips them (a row of 1.5s comes back ~0); jaxembed
            # stays within half a step, and so differs from Keras 3.15 there
            assert not np.array_equal(got["values"][~rows], expected["values"][~rows])
            back = jaxembed.dequantize(params)["embeddings"]
            assert_within_half_step(back, KERAS_TABLE, params, mode, block_size)
            lookup = KERAS_LOOKUP[np.isin(KERAS_LOOKUP, np.flatnonzero(rows))]
        else:
            lookup = KERAS_LOOKUP
        if block_size is not None:
            assert layer.dtype_policy.name.startswith(quantization_format(params) + "_")

        quantize = jax.jit(functools.partial(jaxembed.quantize, mode=mode, block_size=block_size))
        chex.assert_trees_all_equal(quantize({"embeddings": KERAS_TABLE}), params)

        expected_out = np.asarray(layer(lookup))
        np.testing.assert_array_equal(jaxembed.apply(params, lookup), expected_out)
        np.testing.assert_array_equal(jax.jit(jaxembed.apply)(params, lookup), expected_out)

    def test_rounding_ties_round_as_keras(self):
        """Values whose quotient by the block's step is exactly k + 0.5, planted where a
        multiplication by the step's reciprocal (XLA's rewrite of a division by a broadcast)
        would round the other way: the integers still equal Keras's NumPy division."""
        rows, columns, block = 64, 256, 128
        table = np.random.default_rng(3).normal(size=(rows, columns)).astype(np.float32)
        blocks = table.reshape(rows, -1, block)
        low, high = blocks.min(-1), blocks.max(-1)
        step = ((high - low) + np.float32(1e-7)) / np.float32(15)
        planted = 0
        for index in np.ndindex(blocks.shape):
            x, s = blocks[index], step[index[:2]]
            if x in (low[index[:2]], high[index[:2]]):
                continue
            tie = np.float32((np.floor(x / s) + 0.5) * s)
            if tie / s == np.floor(x / s) + 0.5 and np.float32(tie * np.float32(1 / s)) != (
                tie / s
            ):
                blocks[index] = tie
                planted += 1
        assert planted > 100
        layer = keras_quantized(table, "int4", block)
        params = jaxembed.quantize({"embeddings": table}, "int4", block_size=block)
        chex.assert_trees_all_equal(jaxembed_arrays(params, "int4"), keras_arrays(layer))

    def test_bare_keras_int4_is_grouped_by_128(self):
        """Keras 3.15's `layer.quantize("int4")` without a config quantizes in blocks of 128
        (Int4QuantizationConfig's default); jaxembed's `quantize(params, "int4")` is per row.
        The Keras layer equals `block_size=128`."""
        layer = keras.layers.Embedding(KERAS_V, KERAS_D, weights=KERAS_TABLE)
        layer.quantize("int4")
        grouped = jaxembed.quantize({"embeddings": KERAS_TABLE}, "int4", block_size=128)
        rows = keras_315_rows(KERAS_TABLE, 128)
        chex.assert_trees_all_equal(
            {k: v[rows] for k, v in keras_arrays(layer).items()},
            {k: v[rows] for k, v in jaxembed_arrays(grouped, "int4").items()},
        )
        per_row = jaxembed.quantize({"embeddings": KERAS_TABLE}, "int4")
        assert per_row["embeddings_scale"].shape == (KERAS_V,)

    @pytest.mark.parametrize(
        ("mode", "block_size", "lora_alpha"),
        [("int8", None, 8.0), ("int4", None, None), ("int4", 128, 8.0)],
        ids=["int8-alpha8", "int4-alpha_rank", "int4/128-alpha8"],
    )
    def test_lora_output_and_merged_save_path_equal_keras(self, mode, block_size, lora_alpha):
        layer = keras_quantized(KERAS_TABLE, mode, block_size)
        layer.enable_lora(KERAS_RANK, lora_alpha=lora_alpha)
        adapter = random_adapter(KERAS_V, KERAS_D, KERAS_RANK)
        layer.lora_embeddings_a.assign(adapter["lora_embeddings_a"])
        layer.lora_embeddings_b.assign(adapter["lora_embeddings_b"])
        quantized = jaxembed.quantize({"embeddings": KERAS_TABLE}, mode, block_size=block_size)
        params = {**quantized, **adapter}

        rows = keras_315_rows(KERAS_TABLE, block_size)
        lookup = KERAS_LOOKUP[np.isin(KERAS_LOOKUP, np.flatnonzero(rows))]
        expected = np.asarray(layer(lookup))
        apply = functools.partial(jaxembed.apply, lora_alpha=lora_alpha)
        np.testing.assert_array_equal(apply(params, lookup), expected)
        # Under jit XLA fuses the sum (one rounding instead of two): within an ulp or so.
        np.testing.assert_allclose(jax.jit(apply)(params, lookup), expected, rtol=1e-6, atol=1e-6)

        # Keras's save path dequantizes, adds the delta and requantizes: the same integers
        # (on the rows whose blocks hold both signs, before and after the merge).
        values, scale, zero = layer._get_embeddings_with_merged_lora()
        merged = jaxembed.merge_lora(params, lora_alpha=lora_alpha)
        assert set(merged) == set(quantized)
        float_merge = jaxembed.merge_lora(params, lora_alpha=lora_alpha, requantize=False)
        rows = rows & keras_315_rows(np.asarray(float_merge["embeddings"]), block_size)
        np.testing.assert_array_equal(
            integers(merged[VALUES_KEY[mode]], mode)[rows], integers(values, mode)[rows]
        )
        np.testing.assert_array_equal(merged["embeddings_scale"][rows], np.asarray(scale)[rows])
        if block_size is None:
            assert zero is None
        else:
            np.testing.assert_array_equal(merged["embeddings_zero"][rows], np.asarray(zero)[rows])
        # The merge changed the table: the comparison is not between two unmerged copies.
        assert not np.array_equal(merged["embeddings_scale"], quantized["embeddings_scale"])

    @pytest.mark.parametrize(
        ("mode", "block_size"), [KERAS_FORMATS[0], KERAS_FORMATS[2]], ids=["int8", "int4/128"]
    )
    def test_regularization_penalty(self, mode, block_size):
        """Keras's quantized table has no regularizer; jaxembed penalizes the dequantized
        values (docs/guides/keras.md, difference 16: a constant). Under LoRA both penalize A
        and B alone."""
        layer = keras_quantized(KERAS_TABLE, mode, block_size, embeddings_regularizer="l2")
        layer(KERAS_LOOKUP)
        assert layer.losses == []
        params = jaxembed.quantize({"embeddings": KERAS_TABLE}, mode, block_size=block_size)
        dequantized = np.asarray(jaxembed.dequantize(params)["embeddings"], np.float64)
        np.testing.assert_allclose(
            float(jaxembed.regularization_penalty(params, "l2")),
            0.01 * np.sum(dequantized**2),
            rtol=1e-5,
        )

        layer.enable_lora(KERAS_RANK)
        adapter = random_adapter(KERAS_V, KERAS_D, KERAS_RANK)
        layer.lora_embeddings_a.assign(adapter["lora_embeddings_a"])
        layer.lora_embeddings_b.assign(adapter["lora_embeddings_b"])
        layer(KERAS_LOOKUP)
        np.testing.assert_allclose(
            float(jaxembed.regularization_penalty({**params, **adapter}, "l2")),
            float(sum(layer.losses, 0.0)),
            rtol=1e-6,
        )


# Fixed shapes (JAX compiles once per shape): (input_dim, output_dim, block sizes that
# divide output_dim). Odd blocks work for int4 too (a byte may straddle two blocks).
ROUND_TRIP_SHAPES = [(1, 2, (2,)), (7, 8, (1, 2, 4, 8)), (40, 16, (4, 16)), (5, 24, (3, 6, 12))]
ROW_KINDS = ("free", "zero", "constant", "negative", "positive", "tiny")


@functools.cache
def round_trip(mode, block_size):
    """Jitted `table -> (quantized params, dequantized table)`, one compilation per shape."""

    def run(table):
        quantized = jaxembed.quantize({"embeddings": table}, mode, block_size=block_size)
        return quantized, jaxembed.dequantize(quantized)["embeddings"]

    return jax.jit(run)


def shape_row_kinds_and_values():
    def for_shape(case):
        input_dim, output_dim, blocks = case
        return st.tuples(
            st.just(case),
            st.lists(st.sampled_from(ROW_KINDS), min_size=input_dim, max_size=input_dim),
            hnp.arrays(
                np.float32,
                (input_dim, output_dim),
                elements=st.floats(-1e4, 1e4, width=32),
            ),
            st.sampled_from(blocks),
        )

    return st.sampled_from(ROUND_TRIP_SHAPES).flatmap(for_shape)


def shape_rows(kinds, values):
    table = values.copy()
    for row, kind in enumerate(kinds):
        if kind == "zero":
            table[row] = 0.0
        elif kind == "constant":
            table[row] = table[row, 0]
        elif kind == "negative":
            table[row] = -np.abs(table[row])
        elif kind == "positive":
            table[row] = np.abs(table[row])
        elif kind == "tiny":
            table[row] *= np.float32(1e-6)
    return table


class TestRoundTrip:
    @given(case=shape_row_kinds_and_values(), mode=st.sampled_from(["int8", "int4"]))
    @settings(max_examples=30, deadline=None)
    def test_property_per_row_within_half_a_step(self, case, mode):
        (input_dim, output_dim, _), kinds, values, _ = case
        table = shape_rows(kinds, values)
        quantized, back = round_trip(mode, None)(table)
        chex.assert_shape(back, (input_dim, output_dim))
        chex.assert_type(back, jnp.float32)
        assert quantization_format(quantized) == mode
        stored = integers(quantized[VALUES_KEY[mode]], mode)
        low = -127 if mode == "int8" else -8
        assert stored.min() >= low and stored.max() <= (127 if mode == "int8" else 7)
        assert_within_half_step(back, table, quantized, mode, None)
        # An all-zero row comes back exactly zero (the epsilon keeps its scale finite).
        zero_rows = np.array([kind == "zero" for kind in kinds])
        np.testing.assert_array_equal(np.asarray(back)[zero_rows], 0.0)

    @given(case=shape_row_kinds_and_values(), mode=st.sampled_from(["int8", "int4"]))
    @settings(max_examples=30, deadline=None)
    def test_property_grouped_within_half_a_step_for_blocks_holding_zero(self, case, mode):
        (input_dim, output_dim, _), kinds, values, block_size = case
        table = shape_rows(kinds, values)
        # The half-step bound needs every block's [min, max] to include 0 (see
        # test_grouped_one_signed_blocks_within_half_a_step for blocks that do not).
        table.reshape(input_dim, -1, block_size)[..., 0] = 0.0
        quantized, back = round_trip(mode, block_size)(table)
        assert quantization_format(quantized) == f"{mode}/{block_size}"
        chex.assert_shape(quantized["embeddings_zero"], (input_dim, output_dim // block_size))
        assert_within_half_step(back, table, quantized, mode, block_size)
        np.testing.assert_array_equal(np.asarray(back)[..., ::block_size], 0.0)

    @pytest.mark.parametrize(("mode", "block_size"), [("int4", 4), ("int8", 4), ("int4", 128)])
    def test_grouped_one_signed_blocks_within_half_a_step(self, mode, block_size):
        """quantization.py documents `|error| <= 0.5 * scale` for grouped formats. Blocks whose
        values are all positive or all negative (a constant row, a negative-only row) keep it
        because each block's range includes 0; Keras 3.15's formula clipped their zero point
        and codes (docs/guides/keras.md, difference 17)."""
        rows = np.array(
            [[1.0, 1.5, 1.25, 1.1], [-2.0, -1.0, -1.5, -1.2], [1.5, 1.5, 1.5, 1.5]], np.float32
        )
        table = np.tile(rows, (1, block_size // 4))
        quantized = jaxembed.quantize({"embeddings": table}, mode, block_size=block_size)
        back = jaxembed.dequantize(quantized)["embeddings"]
        assert_within_half_step(back, table, quantized, mode, block_size)

    @pytest.mark.parametrize(("mode", "block_size"), SMALL_FORMATS, ids=SMALL_IDS)
    def test_narrow_float_tables_quantize_as_their_float32_values(self, mode, block_size):
        table = special_table(8, 8)
        for dtype in (jnp.bfloat16, jnp.float16):
            narrow = jnp.asarray(table, dtype)
            chex.assert_trees_all_equal(
                jaxembed.quantize({"embeddings": narrow}, mode, block_size=block_size),
                jaxembed.quantize(
                    {"embeddings": narrow.astype(jnp.float32)}, mode, block_size=block_size
                ),
            )

    @pytest.mark.parametrize(("mode", "block_size"), SMALL_FORMATS, ids=SMALL_IDS)
    def test_dequantize_dtype_and_format(self, mode, block_size):
        table = special_table(8, 8)
        quantized = jaxembed.quantize({"embeddings": table}, mode, block_size=block_size)
        assert is_quantized(quantized)
        assert not is_quantized({"embeddings": table})
        assert quantization_format({"embeddings": table}) is None
        assert quantization_format(quantized) == format_name(mode, block_size)
        back = jaxembed.dequantize(quantized)
        assert set(back) == {"embeddings"}
        chex.assert_type(back["embeddings"], jnp.float32)
        narrow = jaxembed.dequantize(quantized, dtype=jnp.bfloat16)
        chex.assert_type(narrow["embeddings"], jnp.bfloat16)
        chex.assert_trees_all_equal(narrow["embeddings"], back["embeddings"].astype(jnp.bfloat16))
        chex.assert_trees_all_equal(jax.jit(jaxembed.dequantize)(quantized), back)


INPUT_DIM, OUTPUT_DIM, RANK, ALPHA = 12, 8, 2, 4.0
IDS = np.array([[0, 11, 3], [3, 1, 7]], np.int32)
BAD_IDS = np.array([-1, 2, 12, 11], np.int32)
BAD = np.array([True, False, True, False])


@pytest.fixture(params=SMALL_FORMATS[:3], ids=SMALL_IDS[:3])
def quantized(request):
    """The table in each format with a kind of its own in `_table.KINDS` but "int8/4" (the
    grouped int8 kind shares grouped int4's code; the round-trip and merge tests cover it)."""
    mode, block_size = request.param
    table = special_table(INPUT_DIM, OUTPUT_DIM)
    return jaxembed.quantize({"embeddings": table}, mode, block_size=block_size)


def with_adapter(params, input_dim=INPUT_DIM, output_dim=OUTPUT_DIM):
    return {**params, **random_adapter(input_dim, output_dim, RANK)}


def attend_path(attend, params, query):
    """Which path `attend` takes on quantized params: "single" (no loop over chunks),
    "strided" (the stored arrays reshaped to `(V / n, n, ...)`) or "contiguous"."""
    jaxpr = str(jax.make_jaxpr(attend)(params, query))
    if "scan[" not in jaxpr and "while[" not in jaxpr:
        return "single"
    input_dim = params["embeddings_scale"].shape[0]
    output_dim = query.shape[-1]
    count = _table._strided_chunk_count(input_dim, output_dim)
    if count and f"new_sizes=({input_dim // count}, {count}," in jaxpr:
        return "strided"
    return "contiguous"


class TestSameAsDequantized:
    @pytest.mark.parametrize("out_of_range", ["error", "fill", "clip"])
    def test_apply(self, quantized, variant, out_of_range):
        apply = variant(functools.partial(jaxembed.apply, out_of_range=out_of_range))
        dense = jaxembed.dequantize(quantized)
        eager_error = out_of_range == "error" and variant is not jax.jit
        out = check_lookup_matches_dense(
            apply, quantized, dense, IDS, BAD_IDS, BAD, eager_error=eager_error
        )
        if out_of_range == "clip":
            chex.assert_tree_all_finite(out)
            chex.assert_trees_all_equal(out, dense["embeddings"][np.clip(BAD_IDS, 0, 11)])
        elif not eager_error:
            assert np.isnan(out).any()

    def test_apply_dtype_scalar_empty_and_id_dtypes(self, quantized, variant):
        dense = jaxembed.dequantize(quantized)
        table = np.asarray(dense["embeddings"])
        apply = variant(functools.partial(jaxembed.apply, dtype=jnp.bfloat16))
        out = apply(quantized, np.int32(5))
        chex.assert_shape(out, (OUTPUT_DIM,))
        chex.assert_type(out, jnp.bfloat16)
        chex.assert_trees_all_equal(out, jnp.asarray(table[5], jnp.bfloat16))
        for dtype in (np.uint8, np.int64, np.int16):
            ids = IDS.astype(dtype)
            np.testing.assert_array_equal(variant(jaxembed.apply)(quantized, ids), table[IDS])
        np.testing.assert_array_equal(
            jaxembed.compute_mask(np.asarray(IDS, np.uint8), mask_zero=True), IDS != 0
        )

    @pytest.mark.parametrize("shape", [(0,), (2, 0)])
    def test_apply_empty_ids(self, quantized, variant, shape):
        empty = variant(jaxembed.apply)(quantized, np.zeros(shape, np.int32))
        chex.assert_shape(empty, (*shape, OUTPUT_DIM))
        chex.assert_type(empty, jnp.float32)

    def test_vocab_parallel_apply(self, quantized):
        mesh = jax.make_mesh((1,), ("model",))
        lookup = functools.partial(
            jaxembed.sharding.vocab_parallel_apply,
            mesh=mesh,
            vocab_axis="model",
            out_of_range="fill",
            lora_alpha=ALPHA,
        )
        for params in (quantized, with_adapter(quantized)):
            out = jax.jit(lookup)(params, BAD_IDS)
            expected = jaxembed.apply(
                jaxembed.dequantize(params), BAD_IDS, out_of_range="fill", lora_alpha=ALPHA
            )
            chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)

    def test_attend(self, quantized, variant):
        dense = jaxembed.dequantize(quantized)
        for query in (
            jax.random.normal(KEY, (OUTPUT_DIM,)),
            jax.random.normal(KEY, (2, 3, OUTPUT_DIM)),
        ):
            logits = variant(jaxembed.attend)(quantized, query)
            chex.assert_shape(logits, (*query.shape[:-1], INPUT_DIM))
            chex.assert_type(logits, jnp.float32)
            chex.assert_trees_all_close(logits, jaxembed.attend(dense, query), rtol=1e-6, atol=1e-5)
        attend = variant(functools.partial(jaxembed.attend, dtype=jnp.bfloat16))
        logits = attend(quantized, query)
        chex.assert_type(logits, jnp.bfloat16)
        chex.assert_trees_all_close(
            logits.astype(jnp.float32),
            attend(dense, query).astype(jnp.float32),
            rtol=2e-2,
            atol=2e-2,
        )

    @pytest.mark.parametrize(
        ("path", "input_dim", "chunk_rows", "several_devices"),
        [
            ("single", 64, None, False),  # the default chunk holds the whole table
            ("contiguous", 64, 10, False),  # one device: contiguous though 8 divides 64
            ("contiguous", 61, 25, False),  # rows 0, 25 and 36 on (the last overlaps)
            ("strided", 64, 10, True),  # 8 chunks of 8 rows: rows i, i + 8, ...
            ("strided", 61, 1, True),  # one row per chunk: 61 strided chunks
            ("contiguous", 61, 10, True),  # no divisor of 61 near 7 chunks: contiguous
        ],
    )
    def test_attend_chunk_paths(self, monkeypatch, path, input_dim, chunk_rows, several_devices):
        if chunk_rows is not None:
            monkeypatch.setattr(_table, "_CHUNK_BYTES", 4 * OUTPUT_DIM * chunk_rows)
        # The strided path runs where the table may be split over devices; on this one
        # device, pretend it may (the multidevice tests run it on a real 8-device mesh).
        monkeypatch.setattr(_table, "_on_several_devices", lambda array: several_devices)
        table = special_table(input_dim, OUTPUT_DIM)
        query = jax.random.normal(KEY, (3, OUTPUT_DIM))
        # int8 alone; grouped int4 with an adapter and a soft cap. (Eager attend traces its
        # loop as jit does: one variant is enough.)
        for mode, block_size, kwargs in [
            ("int8", None, {}),
            ("int4", 4, {"lora_alpha": ALPHA, "logit_soft_cap": 5.0}),
        ]:
            params = jaxembed.quantize({"embeddings": table}, mode, block_size=block_size)
            if kwargs:
                params = with_adapter(params, input_dim)
            attend = functools.partial(jaxembed.attend, **kwargs)
            assert attend_path(attend, params, query) == path
            dense = jaxembed.dequantize(params)
            # A fresh partial per call: a cached compilation would hide the patched chunks.
            logits = jax.jit(attend)(params, query)
            chex.assert_shape(logits, (3, input_dim))
            expected = jaxembed.attend(dense, query, **kwargs)
            chex.assert_trees_all_close(logits, expected, rtol=1e-5, atol=1e-5)
            if kwargs:
                assert float(jnp.abs(logits).max()) <= 5.0

    def test_lora(self, quantized, variant):
        params = jaxembed.enable_lora(quantized, jax.random.key(1), RANK)
        assert set(params) == set(quantized) | set(lora.LORA_KEYS)
        for key, shape in [
            ("lora_embeddings_a", (INPUT_DIM, RANK)),
            ("lora_embeddings_b", (RANK, OUTPUT_DIM)),
        ]:
            chex.assert_shape(params[key], shape)
            chex.assert_type(params[key], jnp.float32)
        # B starts at zero: a fresh adapter changes nothing.
        chex.assert_trees_all_equal(
            jaxembed.apply(params, IDS, lora_alpha=ALPHA), jaxembed.apply(quantized, IDS)
        )

        params = with_adapter(quantized)
        dense = jaxembed.dequantize(params)
        assert set(dense) == {"embeddings", *lora.LORA_KEYS}
        apply = variant(functools.partial(jaxembed.apply, lora_alpha=ALPHA, out_of_range="fill"))
        # Under jit XLA fuses the dequantizing into the sum: equal up to float rounding.
        chex.assert_trees_all_close(apply(params, BAD_IDS), apply(dense, BAD_IDS), rtol=1e-6)
        query = jax.random.normal(KEY, (3, OUTPUT_DIM))
        attend = variant(functools.partial(jaxembed.attend, lora_alpha=ALPHA))
        chex.assert_trees_all_close(
            attend(params, query), attend(dense, query), rtol=1e-5, atol=1e-5
        )
        chex.assert_trees_all_equal(
            jaxembed.regularization_penalty(params, "l2"),
            jaxembed.regularization_penalty(dense, "l2"),
        )
        chex.assert_trees_all_equal(
            jaxembed.merge_lora(params, lora_alpha=ALPHA, requantize=False),
            jaxembed.merge_lora(dense, lora_alpha=ALPHA),
        )
        assert lora.remove_lora(params).keys() == quantized.keys()


class TestQLoRA:
    @pytest.mark.parametrize(("mode", "block_size"), SMALL_FORMATS, ids=SMALL_IDS)
    def test_labels_and_split(self, mode, block_size):
        quantized = jaxembed.quantize(
            {"embeddings": special_table(INPUT_DIM, OUTPUT_DIM)}, mode, block_size=block_size
        )
        # Quantized arrays are frozen even without an adapter, at any depth.
        assert set(lora.trainable_labels(quantized).values()) == {"frozen"}
        nested = lora.trainable_labels({"encoder": {"tokens": quantized}, "bias": jnp.ones(2)})
        assert set(nested["encoder"]["tokens"].values()) == {"frozen"}
        assert nested["bias"] == "trainable"

        params = jaxembed.enable_lora(quantized, jax.random.key(1), RANK)
        trainable, frozen = lora.split_trainable(params)
        assert {k for k, v in trainable.items() if v is not None} == set(lora.LORA_KEYS)
        assert {k for k, v in frozen.items() if v is not None} == set(quantized)
        chex.assert_trees_all_equal(lora.combine(trainable, frozen), params)

        tx = jaxembed.freeze_lora_base(optax.adam(1e-3))
        state_sizes = [leaf.size for leaf in jax.tree.leaves(tx.init(params))]
        # Adam's two moments for A and B and a step count: nothing for the quantized arrays.
        assert sum(state_sizes) == 2 * (INPUT_DIM * RANK + RANK * OUTPUT_DIM) + 1, state_sizes

    @pytest.mark.parametrize(("mode", "block_size"), [("int8", None), ("int4", 8)])
    def test_training_moves_only_the_adapter(self, mode, block_size):
        input_dim, output_dim, rank = 32, 16, 4
        base = jaxembed.init(KEY, input_dim, output_dim, embeddings_initializer="normal")
        params = jaxembed.enable_lora(
            jaxembed.quantize(base, mode, block_size=block_size), jax.random.key(1), rank
        )
        ids = jax.random.randint(jax.random.key(2), (8, 6), 0, input_dim)
        target = jax.random.normal(jax.random.key(3), (8, 6, output_dim))
        trainable, frozen = lora.split_trainable(params)
        tx = optax.adam(3e-2)

        def loss_fn(trainable, frozen):
            out = jaxembed.apply(lora.combine(trainable, frozen), ids, lora_alpha=8.0)
            return jnp.mean((out - target) ** 2)

        @jax.jit
        def step(trainable, frozen, opt_state):
            loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss

        opt_state = tx.init(trainable)
        losses = []
        for _ in range(20):
            trainable, opt_state, loss = step(trainable, frozen, opt_state)
            losses.append(float(loss))
        assert losses[-1] < 0.9 * losses[0], losses
        trained = lora.combine(trainable, frozen)
        for key in set(params) - set(lora.LORA_KEYS):
            assert trained[key].dtype == params[key].dtype, key
            np.testing.assert_array_equal(trained[key], params[key], err_msg=key)
        assert not np.array_equal(trained["lora_embeddings_b"], params["lora_embeddings_b"])
        chex.assert_type((trained["lora_embeddings_a"], trained["lora_embeddings_b"]), jnp.float32)

    @pytest.mark.parametrize(
        ("mode", "block_size"), [*SMALL_FORMATS[:2], ("int4", 16), ("int8", 16)]
    )
    def test_merge_requantizes_in_the_same_format(self, mode, block_size):
        input_dim, output_dim = 24, 32
        table = np.random.default_rng(0).normal(size=(input_dim, output_dim)).astype(np.float32)
        quantized = jaxembed.quantize({"embeddings": table}, mode, block_size=block_size)
        params = {**quantized, **random_adapter(input_dim, output_dim, RANK, size=0.5)}
        merged = jaxembed.merge_lora(params, lora_alpha=ALPHA)
        float_merge = jaxembed.merge_lora(params, lora_alpha=ALPHA, requantize=False)

        assert set(merged) == set(quantized)
        assert quantization_format(merged) == quantization_format(quantized)
        chex.assert_trees_all_equal_shapes_and_dtypes(merged, quantized)
        assert set(float_merge) == {"embeddings"}
        chex.assert_type(float_merge["embeddings"], jnp.float32)
        a, b = params["lora_embeddings_a"], params["lora_embeddings_b"]
        expected = jaxembed.dequantize(quantized)["embeddings"] + ALPHA / RANK * (a @ b)
        chex.assert_trees_all_close(float_merge["embeddings"], expected, rtol=1e-5, atol=1e-5)

        merged_float = np.asarray(float_merge["embeddings"])
        if block_size is not None:  # the merged blocks all hold 0: the half step applies
            blocks = merged_float.reshape(input_dim, -1, block_size)
            assert ((blocks.min(-1) < 0) & (blocks.max(-1) > 0)).all()
        back = jaxembed.dequantize(merged)["embeddings"]
        assert_within_half_step(back, merged_float, merged, mode, block_size)
        # Requantizing is quantizing the float merge.
        chex.assert_trees_all_equal(
            merged, jaxembed.quantize(float_merge, mode, block_size=block_size)
        )
        # Under jit the float sum may round differently (fused): scales within float
        # rounding, integers within one unit.
        jitted = jax.jit(functools.partial(jaxembed.merge_lora, lora_alpha=ALPHA))(params)
        chex.assert_trees_all_close(
            jitted["embeddings_scale"], merged["embeddings_scale"], rtol=1e-6
        )
        key = VALUES_KEY[mode]
        difference = integers(jitted[key], mode) - integers(merged[key], mode)
        assert np.abs(difference).max() <= 1


V_BIG, D_BIG = 262144, 1024
BIG_FORMATS = [("int8", None), ("int4", None), ("int4", 128)]


def big_quantized(mode, block_size):
    table = jax.ShapeDtypeStruct((V_BIG, D_BIG), jnp.float32)
    return jax.eval_shape(
        functools.partial(jaxembed.quantize, mode=mode, block_size=block_size),
        {"embeddings": table},
    )


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


class TestMemory:
    """Compiled temp bytes at V=262144, D=1024 (a 1 GiB float32 table), from shapes only."""

    @pytest.mark.parametrize(("mode", "block_size"), BIG_FORMATS, ids=KERAS_IDS)
    def test_apply_gathers_before_dequantizing(self, mode, block_size):
        params = big_quantized(mode, block_size)
        ids = jax.ShapeDtypeStruct((4096,), jnp.int32)
        temp = temp_bytes(jaxembed.apply, params, ids)
        assert temp < V_BIG * D_BIG
        assert temp <= 4096 * D_BIG * 4  # at most one float32 copy of the gathered rows

        # XLA fuses a plain dequantize-then-gather into the gather; a table that is also read
        # a second time must be materialized: this control does hold a float32 copy.
        def dequantize_then_gather(params, ids):
            table = jaxembed.dequantize(params)["embeddings"]
            return table[ids] * jnp.sum(table)

        assert temp_bytes(dequantize_then_gather, params, ids) >= 4 * V_BIG * D_BIG

    @pytest.mark.parametrize(("mode", "block_size"), BIG_FORMATS, ids=KERAS_IDS)
    def test_attend_never_builds_a_float_table(self, mode, block_size):
        params = big_quantized(mode, block_size)
        query = jax.ShapeDtypeStruct((16, D_BIG), jnp.float32)
        temp = temp_bytes(jaxembed.attend, params, query)
        assert temp < V_BIG * D_BIG  # a quarter of one float32 copy

        def naive(params, query):
            return query @ jaxembed.dequantize(params)["embeddings"].T

        assert temp_bytes(naive, params, query) >= 4 * V_BIG * D_BIG


class TestParameterBytes:
    @pytest.mark.parametrize(
        ("mode", "block_size", "ratio"),
        [("int8", None, 0.26), ("int4", None, 0.14), ("int4", 128, 0.14)],
        ids=KERAS_IDS,
    )
    def test_stored_bytes(self, mode, block_size, ratio):
        params = jaxembed.init(KEY, 4096, 1024)
        quantized = jaxembed.quantize(params, mode, block_size=block_size)
        stored = sum(array.nbytes for array in quantized.values())
        assert stored <= ratio * params["embeddings"].nbytes, stored / params["embeddings"].nbytes
        assert set(quantized) <= QUANTIZED_KEYS
