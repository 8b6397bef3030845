"""The table layer seam (`jaxembed._table`): a second table kind, defined here and nowhere
else, goes through `apply`, `attend`, LoRA, regularization and the vocab-parallel `shard_map`
with no edit outside `_table.py`.

The test double stores int8 rows with one float32 scale per row, `(rows, scale)`; its dense
equivalent is `{"embeddings": rows * scale[:, None]}`, and every function must agree with it.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from kind_checks import check_lookup_matches_dense

import jaxembed
from jaxembed import _table
from jaxembed._out_of_range import Indices

ROWS = "double_rows"
SCALE = "double_scale"  # not jaxembed's own quantized keys
INPUT_DIM, OUTPUT_DIM, RANK = 8, 4, 2
ALPHA = 4.0
IDS = jnp.array([[0, 7], [3, 3]])
BAD_IDS = jnp.array([-1, 2, 8])  # rows: NaN (or clipped to 0), row 2, NaN (or clipped to 7)
BAD = np.array([True, False, True])


class ScaledTable(_table.TableKind):
    """int8 rows `(input_dim, output_dim)` and float32 per-row scales `(input_dim,)`."""

    keys = (ROWS, SCALE)  # the first is (input_dim, ...) and decides the output's sharding

    def shape(self, arrays):
        rows, scale = arrays[ROWS], arrays[SCALE]
        if getattr(rows, "ndim", None) != 2 or getattr(rows, "dtype", None) != jnp.int8:
            raise ValueError(f"{ROWS} must be a 2-D int8 array.")
        if getattr(scale, "shape", None) != rows.shape[:1] or scale.dtype != jnp.float32:
            raise ValueError(f"{SCALE} must be float32 of shape (input_dim,) = {rows.shape[:1]}.")
        return tuple(rows.shape)

    def dtype(self, arrays):
        return np.dtype(np.float32)

    def gather(self, arrays, indices):
        rows, scale = jnp.asarray(arrays[ROWS]), jnp.asarray(arrays[SCALE])
        # int8 has no NaN: gather clipped rows; the scale, gathered with the NaN fill, masks
        # the rows of out-of-range ids (NaN * q = NaN).
        clipped = Indices(jnp.clip(indices.ids, 0, rows.shape[0] - 1), fill=False)
        q = _table.take_rows(rows, clipped)
        return q.astype(jnp.float32) * _table.take_rows(scale, indices)[..., None]

    def dense(self, arrays):
        return jnp.asarray(arrays[ROWS]).astype(jnp.float32) * jnp.asarray(arrays[SCALE])[:, None]


@pytest.fixture
def scaled_kind(monkeypatch):
    """Registers `ScaledTable` for one test only."""
    kind = ScaledTable()
    monkeypatch.setattr(_table, "KINDS", [*_table.KINDS, kind])
    return kind


@pytest.fixture
def scaled(scaled_kind):
    rng = np.random.default_rng(0)
    rows = rng.integers(-127, 128, (INPUT_DIM, OUTPUT_DIM), np.int8)
    scale = rng.uniform(0.01, 0.1, INPUT_DIM).astype(np.float32)
    return {ROWS: jnp.asarray(rows), SCALE: jnp.asarray(scale)}


def dense_of(params):
    """The dense equivalent: the same table under "embeddings", other entries kept."""
    rest = {key: value for key, value in params.items() if key not in (ROWS, SCALE)}
    dense = params[ROWS].astype(jnp.float32) * params[SCALE][:, None]
    return {_table.EMBEDDINGS: dense, **rest}


def with_adapter(params):
    """params plus a rank-2 adapter whose B is nonzero (so the adapter matters)."""
    return jaxembed.enable_lora(params, jax.random.key(1), RANK, b_initializer="uniform")


def test_view_reads_and_checks_the_scaled_kind(scaled):
    assert _table.kind_of(scaled) is not None
    assert isinstance(_table.view(scaled).kind, ScaledTable)
    assert (_table.view(scaled).input_dim, _table.view(scaled).output_dim) == (8, 4)
    with pytest.raises(ValueError, match=SCALE):
        _table.view({**scaled, SCALE: scaled[SCALE][:-1]})


def test_unregistered_kind_is_refused():
    with pytest.raises(ValueError, match="must be a dict holding the table"):
        jaxembed.apply({ROWS: jnp.zeros((2, 2), jnp.int8), SCALE: jnp.ones(2)}, IDS)


@pytest.mark.parametrize("out_of_range", ["error", "fill", "clip"])
def test_apply_matches_dense(scaled, variant, out_of_range):
    apply = variant(functools.partial(jaxembed.apply, out_of_range=out_of_range))
    eager_error = out_of_range == "error" and variant is not jax.jit
    out = check_lookup_matches_dense(
        apply, scaled, dense_of(scaled), IDS, BAD_IDS, BAD, eager_error=eager_error
    )
    if out_of_range == "clip":
        chex.assert_tree_all_finite(out)
    elif not eager_error:
        assert np.isnan(out).any()


def test_apply_dtype_and_scalar_id(scaled):
    out = jaxembed.apply(scaled, 5, dtype=jnp.bfloat16)
    chex.assert_shape(out, (OUTPUT_DIM,))
    chex.assert_type(out, jnp.bfloat16)
    chex.assert_trees_all_equal(out, jaxembed.apply(dense_of(scaled), 5, dtype=jnp.bfloat16))


def test_attend_matches_dense(scaled, variant):
    query = jax.random.normal(jax.random.key(2), (3, OUTPUT_DIM))
    logits = variant(jaxembed.attend)(scaled, query)
    chex.assert_shape(logits, (3, INPUT_DIM))
    chex.assert_type(logits, jnp.float32)
    chex.assert_trees_all_close(logits, jaxembed.attend(dense_of(scaled), query), rtol=1e-6)


def test_lora_apply_attend_merge_match_dense(scaled):
    params = with_adapter(scaled)
    dense = dense_of(params)
    assert set(params) == {ROWS, SCALE, *_table.LORA_KEYS}
    assert jaxembed.lora.has_lora(params)

    apply = functools.partial(jaxembed.apply, lora_alpha=ALPHA, out_of_range="fill")
    chex.assert_trees_all_close(apply(params, BAD_IDS), apply(dense, BAD_IDS), rtol=1e-6)
    query = jax.random.normal(jax.random.key(2), (3, OUTPUT_DIM))
    chex.assert_trees_all_close(
        jaxembed.attend(params, query, lora_alpha=ALPHA),
        jaxembed.attend(dense, query, lora_alpha=ALPHA),
        rtol=1e-5,
    )

    merged = jaxembed.merge_lora(params, lora_alpha=ALPHA)
    assert set(merged) == {_table.EMBEDDINGS}  # a merged table is a dense one
    chex.assert_type(merged[_table.EMBEDDINGS], jnp.float32)
    a, b = params[_table.LORA_A], params[_table.LORA_B]
    expected = dense[_table.EMBEDDINGS] + ALPHA / RANK * (a @ b)
    chex.assert_trees_all_close(merged[_table.EMBEDDINGS], expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(merged, jaxembed.merge_lora(dense, lora_alpha=ALPHA))

    assert jaxembed.lora.remove_lora(params).keys() == scaled.keys()


def test_lora_freezes_both_scaled_keys(scaled):
    labels = jaxembed.lora.trainable_labels(with_adapter(scaled))
    assert labels == {
        ROWS: "frozen",
        SCALE: "frozen",
        _table.LORA_A: "trainable",
        _table.LORA_B: "trainable",
    }
    assert jaxembed.lora.trainable_labels(scaled) == {ROWS: "trainable", SCALE: "trainable"}
    nested = jaxembed.lora.trainable_labels({"encoder": {"tokens": with_adapter(scaled)}})
    assert nested["encoder"]["tokens"][SCALE] == "frozen"


def test_regularization_penalty_is_the_dense_tables(scaled):
    for params in (scaled, with_adapter(scaled)):  # the table, then A and B under LoRA
        penalty = jaxembed.regularization_penalty(params, "l2")
        chex.assert_shape(penalty, ())
        chex.assert_trees_all_close(
            penalty, jaxembed.regularization_penalty(dense_of(params), "l2"), rtol=1e-6
        )


@pytest.mark.parametrize("lora", [False, True], ids=["table", "lora"])
def test_vocab_parallel_apply_matches_apply(scaled, lora):
    params = with_adapter(scaled) if lora else scaled
    mesh = jax.make_mesh((1,), ("model",))
    for out_of_range, ids in [("error", IDS), ("fill", BAD_IDS), ("clip", BAD_IDS)]:
        kwargs = {"out_of_range": out_of_range, "lora_alpha": ALPHA}
        lookup = functools.partial(
            jaxembed.sharding.vocab_parallel_apply, mesh=mesh, vocab_axis="model", **kwargs
        )
        out = jax.jit(lookup)(params, ids)  # eager shard_map dispatches op by op: slower
        chex.assert_shape(out, (*ids.shape, OUTPUT_DIM))
        chex.assert_trees_all_close(out, jaxembed.apply(params, ids, **kwargs), rtol=1e-6)
        chex.assert_trees_all_close(out, jaxembed.apply(dense_of(params), ids, **kwargs), rtol=1e-6)


def test_every_array_is_split_by_rows(scaled):
    """A kind's arrays all have the vocabulary first: the 1-D scale is split by rows like the
    int8 matrix, on an Explicit mesh, and the lookup and the logits follow them."""
    mesh = jax.make_mesh((1,), ("model",))
    placed = {
        ROWS: jax.device_put(scaled[ROWS], NamedSharding(mesh, PartitionSpec("model", None))),
        SCALE: jax.device_put(scaled[SCALE], NamedSharding(mesh, PartitionSpec("model"))),
    }
    assert jax.typeof(placed[SCALE]).sharding.spec == PartitionSpec("model")
    query = jnp.ones((2, OUTPUT_DIM))

    @jax.jit
    def lookups(params):
        # No mesh argument: it comes from the params' types.
        return (
            jaxembed.sharding.vocab_parallel_apply(
                params, BAD_IDS, vocab_axis="model", out_of_range="fill"
            ),
            jaxembed.apply(params, BAD_IDS, out_of_range="fill"),
            jaxembed.attend(params, query),
        )

    with jax.set_mesh(mesh):
        vocab_parallel, applied, logits = lookups(placed)
    expected = jaxembed.apply(scaled, BAD_IDS, out_of_range="fill")
    chex.assert_trees_all_equal(vocab_parallel, expected)
    chex.assert_trees_all_equal(applied, expected)
    chex.assert_trees_all_close(logits, jaxembed.attend(scaled, query), rtol=1e-6)


def test_grad_wrt_scale_and_adapter_under_jit(scaled):
    """Gradients flow to the float leaves (scale, A) through both lookups, under jit, and
    equal the dense table's gradient pulled back through `dense = rows * scale`."""
    params = with_adapter(scaled)
    mesh = jax.make_mesh((1,), ("model",))
    lookups = {
        "apply": jaxembed.apply,
        "vocab_parallel": functools.partial(
            jaxembed.sharding.vocab_parallel_apply, mesh=mesh, vocab_axis="model"
        ),
    }

    def loss(lookup, float_leaves, frozen):
        out = lookup({**frozen, **float_leaves}, IDS, out_of_range="clip", lora_alpha=ALPHA)
        return jnp.sum(jnp.sin(out))

    dense = dense_of(params)
    dense_grads = jax.grad(functools.partial(loss, jaxembed.apply))(
        {key: dense[key] for key in (_table.EMBEDDINGS, _table.LORA_A)},
        {_table.LORA_B: dense[_table.LORA_B]},
    )
    expected_scale = jnp.sum(dense_grads[_table.EMBEDDINGS] * params[ROWS], axis=1)
    trainable = {key: params[key] for key in (SCALE, _table.LORA_A)}
    frozen = {key: params[key] for key in (ROWS, _table.LORA_B)}
    for lookup in lookups.values():
        grads = jax.jit(jax.grad(functools.partial(loss, lookup)))(trainable, frozen)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, trainable)
        chex.assert_trees_all_close(grads[SCALE], expected_scale, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(
            grads[_table.LORA_A], dense_grads[_table.LORA_A], rtol=1e-5, atol=1e-6
        )
    assert float(jnp.abs(expected_scale).sum()) > 0
