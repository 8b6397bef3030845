"""Adapting a pretrained vocabulary: growing or shrinking the table.

`resize(params, new_input_dim)` appends rows for new tokens (initialized as the mean of the
existing rows, as transformers does, or with noise from their covariance, or from any
initializer) or drops the last rows, for every table kind (float or quantized) and LoRA's A
alike. The old rows are kept bit for bit, so a tied model's logits for the old tokens (over
the old vocabulary) are unchanged by construction.

Example:
    >>> import jax, jax.numpy as jnp, jaxembed
    >>> params = jaxembed.init(jax.random.key(0), 1000, 16)
    >>> grown = jaxembed.resize(params, 1003, pad_to_multiple_of=8)
    >>> grown["embeddings"].shape
    (1008, 16)
    >>> bool((grown["embeddings"][:1000] == params["embeddings"]).all())
    True
    >>> bool(jnp.allclose(grown["embeddings"][1000], params["embeddings"].mean(0)))
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxembed import _checks, _mesh, _table, initializers
from jaxembed._table import LORA_A, Params

__all__ = ["INITS", "resize"]

INITS = ("mean", "covariance")
"""The named ways of initializing new rows besides an initializer (see `resize`)."""

COVARIANCE_SCALE = 1e-5
"""transformers' `mean_resizing`: new rows ~ N(mean, 1e-5 * covariance of the rows)."""


def _new_rows(
    table: jax.Array, count: int, init: Any, key: jax.Array | None, dtype: Any
) -> jax.Array:
    """`(count, output_dim)` float32 rows for new tokens."""
    rows = table.astype(jnp.float32)
    if init in INITS:
        mean = rows.mean(axis=0)
        if init == "mean":
            return jnp.broadcast_to(mean, (count, rows.shape[1]))
        _require_key(key, init)
        centered = rows - mean
        covariance = centered.T @ centered / max(rows.shape[0] - 1, 1)
        # eigh: the covariance of fewer rows than columns is singular (Cholesky would NaN).
        return jax.random.multivariate_normal(
            key, mean, COVARIANCE_SCALE * covariance, (count,), method="eigh"
        )
    draw = initializers.get(init)
    _require_key(key, init)
    return jnp.asarray(draw(key, (count, rows.shape[1]), dtype), jnp.float32)


def _require_key(key: Any, init: Any) -> None:
    if key is None:
        raise ValueError(
            f"`key` must be a JAX PRNG key to draw new rows with init={init!r}. Received: "
            "key=None (init='mean' needs none)."
        )


def resize(
    params: Params,
    new_input_dim: int,
    *,
    key: jax.Array | None = None,
    init: Any = "mean",
    pad_to_multiple_of: int | None = None,
    shrink: bool = False,
) -> Params:
    """Grows or shrinks the vocabulary: rows appended for new ids, or the last rows dropped.

    Every array of the table (a float table, or a quantized table's values, scales and zero
    points: new rows are quantized in its format) and LoRA's A (each of stacked adapters')
    change together; new rows of A are zeros, so new tokens start without an adapter delta.
    Trainable tokens are kept (shrinking refuses to drop one). Old rows are kept bit for bit.
    Works under `jax.jit` with `new_input_dim` static, and on a vocab-sharded table: the mean
    is a reduction over the rows, never a gather of the table (on an Explicit mesh the new
    size must divide over the vocab axis: use `pad_to_multiple_of`).

    Args:
        params: from `init` (with `enable_lora`, `quantize`).
        new_input_dim: the new vocabulary size (positive int).
        key: PRNG key, for `init="covariance"` and initializers.
        init: new rows: "mean" (the mean of the existing rows, as transformers), "covariance"
            (the mean plus noise from `1e-5` times the rows' covariance, transformers'
            `mean_resizing`), or a Keras initializer name / JAX initializer.
        pad_to_multiple_of: round the new size up to a multiple (sharding, hardware tiles).
        shrink: allow dropping rows (ids >= the new size no longer exist).

    Returns:
        New params of `new_input_dim` (rounded up) rows.

    Raises:
        ValueError: a size that is not a positive int, shrinking without `shrink=True`, or an
            initializer that needs a key without one.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.quantize(jaxembed.init(jax.random.key(0), 100, 8), "int8")
        >>> jaxembed.resize(params, 104)["embeddings_int8"].shape
        (104, 8)
    """
    table = _table.view(params)
    size = _checks.positive_int("new_input_dim", new_input_dim)
    if pad_to_multiple_of is not None:
        multiple = _checks.positive_int("pad_to_multiple_of", pad_to_multiple_of)
        size = -(-size // multiple) * multiple
    _checks.boolean("shrink", shrink)
    if init not in INITS:
        initializers.get(init)  # an unknown name fails here, before anything is built
    old = table.input_dim
    if size < old and not shrink:
        raise ValueError(
            f"resize would drop rows {size}..{old - 1} (input_dim {old} -> {size}): pass "
            f"shrink=True to drop them. Received: new_input_dim={new_input_dim}"
            + (f", pad_to_multiple_of={pad_to_multiple_of}." if pad_to_multiple_of else ".")
        )
    if size < old and table.tokens is not None:
        _keep_tokens(table.tokens, size)
    resized = dict(params)
    adapter = table.adapter
    # Stacked adapters' A is (n, input_dim, rank): its vocabulary is the second axis.
    a_axis = 0 if adapter is None or adapter.count is None else 1
    if size <= old:
        for name in table.kind.keys:
            resized[name] = jnp.asarray(params[name])[:size]
        if adapter is not None:
            resized[LORA_A] = jax.lax.slice_in_dim(adapter.a, 0, size, axis=a_axis)
        return resized
    rows = _new_rows(table.dense(), size - old, init, key, table.dtype)
    appended = table.kind.encode(table.arrays, rows)
    for name in table.kind.keys:
        resized[name] = _append(jnp.asarray(params[name]), appended[name])
    if adapter is not None:
        zeros = jnp.zeros((*adapter.a.shape[:a_axis], size - old, adapter.rank), adapter.a.dtype)
        resized[LORA_A] = _append(adapter.a, zeros, axis=a_axis)
    return resized


def _keep_tokens(tokens: _table.Tokens, size: int) -> None:
    """Shrinking must not drop a trainable token's row."""
    if _checks.is_traced(tokens.ids):
        raise ValueError(
            "resize cannot shrink params holding trainable tokens under jit (their ids are "
            "traced, so it cannot check that they survive). Shrink outside jit, or merge or "
            "remove the tokens first."
        )
    largest = int(jnp.max(tokens.ids))
    if largest >= size:
        raise ValueError(
            f"resize would drop trainable token {largest} (new input_dim {size}). Merge or "
            "remove the trainable tokens first (merge_trainable_tokens), or keep their rows."
        )


def _append(array: jax.Array, rows: jax.Array, axis: int = 0) -> jax.Array:
    """`array` with `rows` appended along `axis`, sharded as `array` (padding then writing
    keeps a vocab-sharded array split over its rows; concatenating would want equal
    shardings)."""
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, rows.shape[axis])
    padded = jnp.pad(array, widths)
    sharding = _mesh.own_sharding(padded)
    where = (slice(None),) * axis + (slice(array.shape[axis], None),)
    return padded.at[where].set(rows.astype(array.dtype), out_sharding=sharding)
