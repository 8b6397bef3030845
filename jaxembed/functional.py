"""The embedding layer as pure functions on a params dict: init, apply, compute_mask, attend.

Params are a plain dict: the `(input_dim, output_dim)` table under "embeddings" (LoRA adds
"lora_embeddings_a" and "lora_embeddings_b" beside it; `jaxembed._table` owns the layout).
Hyperparameters (`dtype`, `out_of_range`, ...) are static Python values; only arrays are
traced, so every function jit-compiles as is, defaults included, or with `functools.partial`
over its keyword arguments.

Example:
    >>> import jax, jax.numpy as jnp, jaxembed
    >>> params = jaxembed.init(jax.random.key(0), 1000, 64)
    >>> ids = jnp.zeros((32, 10), jnp.int32)
    >>> jaxembed.apply(params, ids).shape
    (32, 10, 64)
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxembed import (
    _checks,
    _mesh,
    _out_of_range,
    _table,
    initializers,
    lora,
    loss,
    trainable_tokens,
)
from jaxembed._table import Params

__all__ = [
    "Params",
    "apply",
    "attend",
    "check_in_range",
    "compute_mask",
    "init",
    "table_initializer",
]


def table_initializer(
    input_dim: int,
    output_dim: int,
    embeddings_initializer: initializers.InitializerLike = "uniform",
    weights: ArrayLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    padding_idx: int | None = None,
) -> initializers.Initializer:
    """The `(key, shape, dtype) -> table` function that `init` and the Flax modules call.

    With `weights` it ignores the key and returns the weights cast to dtype; otherwise it
    draws from `embeddings_initializer`, with row `padding_idx` (if any) zeroed, as torch.
    Arguments are validated here, once, and `weights` is copied here (in `param_dtype`, the
    dtype it will be asked for), so later changes to the caller's matrix change nothing.

    Returns:
        `init_fn(key, shape, dtype)`: a table of `shape` (the `(input_dim, output_dim)` one)
        in the floating `dtype`.

    Raises:
        ValueError: as `init` (checked here, once); `init_fn` raises it for a non-floating
            dtype, or a None key without `weights`.

    Example:
        >>> import jax, jaxembed
        >>> init_fn = jaxembed.functional.table_initializer(10, 4, "zeros")
        >>> init_fn(jax.random.key(0), (10, 4), "float32").sum().item()
        0.0
    """
    input_dim = _checks.positive_int("input_dim", input_dim)
    output_dim = _checks.positive_int("output_dim", output_dim)
    draw = initializers.get(embeddings_initializer)
    param_dtype = _checks.floating_dtype("param_dtype", param_dtype)
    padding_idx = check_padding_idx(padding_idx, input_dim)
    if weights is not None:
        weights = _table.validated_weights(weights, input_dim, output_dim, param_dtype)

    def init_fn(key: jax.Array | None, shape: tuple[int, ...], dtype: DTypeLike) -> jax.Array:
        dtype = _checks.floating_dtype("param_dtype", dtype)
        if weights is not None:
            return jnp.asarray(_table.validated_weights(weights, *shape, dtype))
        if key is None:
            raise ValueError(
                "`key` must be a JAX PRNG key (jax.random.key(seed)) unless `weights` is given. "
                "Received: key=None."
            )
        table = jnp.asarray(draw(key, tuple(shape), dtype), dtype)
        return table if padding_idx is None else table.at[padding_idx].set(0)

    return init_fn


def check_padding_idx(padding_idx: Any, input_dim: int) -> int | None:
    """`padding_idx` as a row in `[0, input_dim)` (a negative one counts from the end, as
    torch's), or None; else a ValueError naming it."""
    if padding_idx is None:
        return None
    if (
        isinstance(padding_idx, bool)
        or not isinstance(padding_idx, numbers.Integral)
        or not -input_dim <= padding_idx < input_dim
    ):
        raise ValueError(
            f"`padding_idx` must be None or an int in [-input_dim, input_dim) = "
            f"[{-input_dim}, {input_dim}). Received: padding_idx={_checks.describe(padding_idx)}."
        )
    return int(padding_idx) % input_dim


def init(
    key: jax.Array | None,
    input_dim: int,
    output_dim: int,
    *,
    embeddings_initializer: initializers.InitializerLike = "uniform",
    weights: ArrayLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    padding_idx: int | None = None,
) -> Params:
    """Creates the params of an embedding layer.

    Args:
        key: a JAX PRNG key; may be None when `weights` is given.
        input_dim: vocabulary size, i.e. the largest id + 1 (positive int).
        output_dim: embedding dimension (positive int).
        embeddings_initializer: Keras name ("uniform" = U(-0.05, 0.05), "glorot_normal", ...)
            or a JAX initializer `(key, shape, dtype) -> array`.
        weights: optional initial `(input_dim, output_dim)` matrix, any array-like of real
            numbers finite in `param_dtype` (a Keras-style `[matrix]` list too); copied,
            never modified.
        param_dtype: storage dtype of the table.
        padding_idx: torch's `nn.Embedding(padding_idx=)`: a drawn table has that row zeroed
            (`weights` are kept as given, as `nn.Embedding.from_pretrained`). Pass the same
            value to `apply` so that the row receives no gradient.

    Returns:
        `{"embeddings": table}`, table of shape `(input_dim, output_dim)` and `param_dtype`.

    Raises:
        ValueError: for a non-positive or non-int dimension, an unknown initializer, or
            `weights` of the wrong shape or with values that are not finite in `param_dtype`.

    Example:
        >>> import jax, jaxembed
        >>> jaxembed.init(jax.random.key(0), 1000, 64)["embeddings"].shape
        (1000, 64)
    """
    init_fn = table_initializer(
        input_dim, output_dim, embeddings_initializer, weights, param_dtype, padding_idx
    )
    return {_table.EMBEDDINGS: init_fn(key, (input_dim, output_dim), param_dtype)}


def check_in_range(ids: ArrayLike, input_dim: int) -> None:
    """Raises `IndexError` for an id outside [0, input_dim): at once for concrete ids; for
    traced ids through `checkify` when the function is checkified, and not at all under plain
    `jax.jit` (where `apply`'s default then gives NaN rows).

    Useful to check a dataset once, eagerly, before a jitted loop.

    Args:
        ids: integer array of any shape (64-bit and unsigned ids are compared exactly).
        input_dim: the vocabulary size.

    Raises:
        IndexError: an id outside [0, input_dim), for concrete ids.
        TypeError: non-integer ids.
        ValueError: a non-positive `input_dim`.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> jaxembed.check_in_range(jnp.array([0, 3]), 4)  # passes silently
        >>> jaxembed.check_in_range(jnp.array([0, 4]), 4)
        Traceback (most recent call last):
        ...
        IndexError: `ids` must lie in [0, input_dim) = [0, 4); got id 4. ...
    """
    _out_of_range.check(ids, _checks.positive_int("input_dim", input_dim))


def apply(
    params: Params,
    ids: ArrayLike,
    *,
    dtype: DTypeLike | None = None,
    out_of_range: str = "error",
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    padding_idx: int | None = None,
    adapter_ids: ArrayLike | None = None,
) -> jax.Array:
    """Looks up the embedding of every id, adding the LoRA delta when params hold an adapter
    and the trainable tokens' delta when they hold trainable tokens.

    With LoRA the output is `E[ids] + (lora_alpha / rank) * A[ids] @ B`: the rows of A are
    gathered first, so the `(input_dim, output_dim)` delta `A @ B` is never built. With
    stacked adapters (`enable_lora(..., num_adapters=n)`, `lora.stack_adapters`), example `i`
    uses adapter `adapter_ids[i]`: `E[ids] + scale * A[adapter, ids] @ B[adapter]`. Trainable
    tokens add `delta[k]` to the rows of ids equal to `token_ids[k]`. Sums are computed in at
    least float32 (adapters and deltas are float32), then cast to `dtype`.

    Out-of-range ids under the default "error": an `IndexError` in eager code; under
    `jax.jit` it compiles as is and gives NaN rows (checkify the function for the error).

    Args:
        params: from `init` (and `enable_lora`).
        ids: integer array of any shape, a scalar included; floats and bools are refused.
        dtype: output dtype (e.g. jnp.bfloat16 from float32 params); None keeps the table's.
        out_of_range: what ids outside [0, input_dim) give:
            "error" (default): an `IndexError` naming the id for concrete ids; for traced ids
            the same error through `jax.experimental.checkify.checkify`, and NaN rows under
            plain `jax.jit`, `vmap`, `scan`... "fill": NaN rows. "clip": the nearest valid row.
        lora_alpha: LoRA scale numerator; None means the rank (read from A's shape).
        use_rslora: scale by `lora_alpha / sqrt(rank)` (rank-stabilized LoRA, PEFT's
            `use_rslora`) instead of `lora_alpha / rank`.
        padding_idx: torch's padding row: looked up as stored, but the rows of the table (and
            of LoRA's A, and a trainable token's delta) at this id receive no gradient. Unlike
            `mask_zero`, nothing is masked.
        adapter_ids: with stacked adapters (required then), each example's adapter: integers
            in `[-1, n_adapters)` shaped as a prefix of `ids.shape` (e.g. `(batch,)` for
            `(batch, seq)` ids, broadcast over the sequence); -1 means the base table alone.
            An id out of range raises an IndexError when concrete, and gives NaN rows under
            plain jit (the error under `checkify`).

    Returns:
        Array of shape `ids.shape + (output_dim,)`.

    Raises:
        TypeError: non-integer ids.
        IndexError: an out-of-range id under "error", or an adapter id out of range (for
            concrete ids).
        ValueError: malformed params or a bad option; `adapter_ids` missing for stacked
            adapters, given without them, or misshapen.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 10, 3)
        >>> jaxembed.apply(params, jnp.array([[4], [7]])).shape
        (2, 1, 3)
        >>> bool(jnp.isnan(jaxembed.apply(params, -1, out_of_range="fill")).all())
        True
        >>> bool(jnp.isnan(jax.jit(jaxembed.apply)(params, jnp.array([10]))).all())
        True
    """
    table = _table.view(params)
    dtype = _checks.optional_floating_dtype("dtype", dtype) or table.dtype
    lora.check_alpha(lora_alpha)
    _checks.boolean("use_rslora", use_rslora)
    padding_idx = check_padding_idx(padding_idx, table.input_dim)
    indices = _out_of_range.prepare(ids, table.input_dim, out_of_range)
    frozen = None if padding_idx is None else (indices.ids == padding_idx)[..., None]

    def gathered(rows: jax.Array) -> jax.Array:
        # The padding row reads as stored; its gradient is cut (a select on the cotangent).
        return rows if frozen is None else jnp.where(frozen, jax.lax.stop_gradient(rows), rows)

    choice = _adapter_choice(table, adapter_ids, indices.ids.shape, "ids")
    rows = gathered(table.gather(indices))
    if table.adapter is not None:
        adapter = table.adapter
        lora_scale = lora.scale(adapter.rank, lora_alpha, use_rslora)
        if choice is None:
            a_rows = gathered(_table.take_rows(adapter.a, indices))
            sharding = _table.out_sharding(table, indices)
            rows = lora.add_delta(rows, a_rows, adapter.b, lora_scale, sharding)
        else:
            a_rows = gathered(_table.take_stacked_rows(adapter.a, choice.index, indices))
            rows = lora.add_stacked_delta(rows, a_rows, adapter, choice, lora_scale)
    if table.tokens is not None:
        delta = gathered(trainable_tokens.delta_rows(table.tokens, indices.ids))
        rows = rows.astype(jnp.promote_types(rows.dtype, delta.dtype)) + delta
    return rows.astype(dtype)


def _adapter_choice(
    table: _table.Table, adapter_ids: Any, shape: tuple[int, ...], of: str
) -> lora.AdapterChoice | None:
    """Prepared `adapter_ids` for stacked adapters; None for params without them (where
    passing `adapter_ids` is an error, as is omitting it for stacked adapters)."""
    count = None if table.adapter is None else table.adapter.count
    if count is None:
        if adapter_ids is not None:
            raise ValueError(
                "`adapter_ids` selects among stacked LoRA adapters, and params hold "
                f"{'one adapter' if table.adapter else 'no adapter'}. Received: adapter_ids "
                "given; drop it, or stack adapters (jaxembed.lora.stack_adapters)."
            )
        return None
    if adapter_ids is None:
        raise ValueError(
            f"params hold {count} stacked LoRA adapters: pass `adapter_ids` (one per example, "
            "-1 for the base table alone). Received: adapter_ids=None."
        )
    return lora.adapter_choice(adapter_ids, count, tuple(shape), of)


def compute_mask(ids: ArrayLike, mask_zero: bool) -> jax.Array | None:
    """Keras's padding mask: `ids != 0` when `mask_zero`, else None.

    Args:
        ids: integer array of any shape.
        mask_zero: whether id 0 is padding.

    Returns:
        A bool array shaped like `ids` (True = real token), or None when `mask_zero` is False.

    Raises:
        TypeError: non-integer ids.
        ValueError: a `mask_zero` that is not a bool.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> jaxembed.compute_mask(jnp.array([[3, 0]]), mask_zero=True).tolist()
        [[True, False]]
    """
    _checks.boolean("mask_zero", mask_zero)
    ids = _checks.integer_ids(ids)
    # Compared before any conversion: a NumPy int64 id 2**32 is not padding.
    return jnp.asarray(ids != 0) if mask_zero else None


def attend(
    params: Params,
    query: ArrayLike,
    *,
    dtype: DTypeLike | None = None,
    lora_alpha: float | None = None,
    logit_soft_cap: float | None = None,
    use_rslora: bool = False,
    adapter_ids: ArrayLike | None = None,
) -> jax.Array:
    """Tied-weights logits: the inner product of each query vector with every embedding.

    With LoRA, `query @ E.T + (lora_alpha / rank) * (query @ B.T) @ A.T`: two thin matmuls
    instead of building `E + scale * A @ B` (stacked adapters: each example's own A and B).
    Trainable tokens add `query @ delta.T` to their K columns.

    Args:
        params: from `init` (and `enable_lora`).
        query: floating array of shape `(..., output_dim)`.
        dtype: compute and output dtype; None promotes query and table (as flax's `attend`).
        lora_alpha: LoRA scale numerator; None means the rank.
        logit_soft_cap: `c * tanh(logits / c)` on the logits (Gemma 2); None: no capping.
        use_rslora: as `apply`'s.
        adapter_ids: as `apply`'s, shaped as a prefix of `query.shape[:-1]`.

    Returns:
        `query @ embeddings.T`, shape `(..., input_dim)`, in `dtype`.

    Raises:
        TypeError: a non-floating query.
        ValueError: malformed params, a query whose last dimension is not `output_dim`, a bad
            option, or `adapter_ids` as in `apply`.
        IndexError: an adapter id out of range (for concrete ids).

    For a cross-entropy loss over these logits, `jaxembed.attend_cross_entropy` computes the
    same numbers without ever holding the `(..., input_dim)` logits.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 1000, 64)
        >>> jaxembed.attend(params, jnp.ones((2, 5, 64))).shape
        (2, 5, 1000)
    """
    table = _table.view(params)
    query = _checks.floating_array("query", query)
    _checks.last_dim("query", query, table.output_dim, "output_dim")
    dtype = _checks.optional_floating_dtype("dtype", dtype) or jnp.result_type(query, table.dtype)
    lora.check_alpha(lora_alpha)
    _checks.boolean("use_rslora", use_rslora)
    if logit_soft_cap is not None:
        logit_soft_cap = _checks.positive_number("logit_soft_cap", logit_soft_cap)
    choice = _adapter_choice(table, adapter_ids, query.shape[:-1], "query[..., 0]")
    query = query.astype(dtype)
    shardings = _mesh.attend_shardings(query, table.leading)
    if shardings is not None:
        query = jax.sharding.reshard(query, shardings.query)
    logits = table.contract(query, shardings)
    # Per-example adapters and trainable tokens contract whole query rows (`whole_last_dim`).
    per_example = choice is not None or table.tokens is not None
    whole = _mesh.whole_last_dim(query) if per_example else query
    if table.adapter is not None:
        adapter = table.adapter
        lora_scale = lora.scale(adapter.rank, lora_alpha, use_rslora)
        if choice is None:
            logits = lora.add_to_logits(logits, query, adapter, lora_scale, shardings)
        else:
            logits = lora.add_stacked_to_logits(logits, whole, adapter, choice, lora_scale)
    if table.tokens is not None:
        logits = trainable_tokens.add_to_logits(logits, whole, table.tokens)
    return loss.soft_cap(logits, logit_soft_cap)
