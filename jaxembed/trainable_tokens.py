"""Trainable tokens: fine-tune K chosen rows of a frozen table (new tokens, chat markers).

`enable_trainable_tokens(params, token_ids)` adds "trainable_tokens_ids" `(K,)` (sorted,
distinct, int32) and "trainable_tokens_delta" `(K, output_dim)` (float32 zeros) beside the
table, which is frozen from then on (PEFT's `TrainableTokens`, stored as a delta as LoRA
stores its update). `jaxembed.apply` adds `delta[k]` to the rows of ids equal to
`token_ids[k]`, found by a binary search over the K ids (gather first: no `(input_dim,
output_dim)` buffer), and `jaxembed.attend` adds `query @ delta.T` to the K logit columns.
Gradients, and optimizer state, are `(K, output_dim)`: the cost of a step does not grow with
the vocabulary. `merge_trainable_tokens` writes the K rows back with one index update.

Tokens compose with LoRA (the delta adds to the adapted rows) and with every table kind (a
quantized table's K rows are requantized on merge).

Example:
    >>> import jax, jax.numpy as jnp, jaxembed
    >>> params = jaxembed.init(jax.random.key(0), 1000, 8)
    >>> params = jaxembed.enable_trainable_tokens(params, [998, 999])
    >>> trainable, frozen = jaxembed.lora.split_trainable(params)
    >>> [name for name, leaf in trainable.items() if leaf is not None]
    ['trainable_tokens_delta']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxembed import _checks, _mesh, _table
from jaxembed._out_of_range import Indices
from jaxembed._table import TOKEN_DELTA, TOKEN_IDS, Params, Tokens

__all__ = [
    "check_token_ids",
    "enable_trainable_tokens",
    "has_trainable_tokens",
    "merge_trainable_tokens",
    "remove_trainable_tokens",
]

TOKEN_DTYPE = jnp.float32
"""The delta's dtype whatever the table's (as LoRA's adapter)."""


def check_token_ids(token_ids: Any, input_dim: int) -> np.ndarray:
    """`token_ids` as a sorted int32 NumPy array of distinct rows in `[0, input_dim)`, else a
    ValueError naming the argument, the bad value and what was expected.

    Raises:
        ValueError: traced ids, or ids that are not a non-empty 1-D sequence of distinct ints
            in `[0, input_dim)`.

    Example:
        >>> import jaxembed
        >>> jaxembed.trainable_tokens.check_token_ids([7, 3], 10).tolist()
        [3, 7]
    """
    expected = f"a 1-D sequence of distinct ints in [0, input_dim) = [0, {input_dim})"
    fixed_when = "which rows train is fixed before the training step is compiled"
    ids = _checks.concrete_array("token_ids", token_ids, expected, fixed_when)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(
            f"`token_ids` must be {expected}, at least one. Received: token_ids of shape "
            f"{tuple(ids.shape)} and dtype {ids.dtype}."
        )
    bad = (ids < 0) | (ids >= input_dim)
    if bad.any():
        raise ValueError(
            f"`token_ids` must lie in [0, input_dim) = [0, {input_dim}). Received: id "
            f"{int(ids[bad][0])}. Grow the table first (`jaxembed.resize`) to add new tokens."
        )
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"`token_ids` must be distinct. Received: id {int(unique[counts > 1][0])} "
            f"{int(counts.max())} times."
        )
    return unique.astype(np.int32)


def has_trainable_tokens(params: Params) -> bool:
    """True when params hold trainable tokens.

    Raises:
        ValueError: malformed params (half of the tokens, or a misshapen delta).

    Example:
        >>> import jax, jaxembed
        >>> jaxembed.trainable_tokens.has_trainable_tokens(jaxembed.init(jax.random.key(0), 9, 2))
        False
    """
    return _table.view(params).tokens is not None


def enable_trainable_tokens(params: Params, token_ids: ArrayLike | Sequence[int]) -> Params:
    """Makes rows `token_ids` of the table trainable, freezing the rest of it.

    Args:
        params: params without trainable tokens (any table kind, with or without LoRA).
        token_ids: the K distinct rows to train, in any order (a list or a 1-D integer array,
            concrete: it fixes the shapes of the step).

    Returns:
        A new dict: params plus "trainable_tokens_ids" `(K,)` int32 (sorted) and
        "trainable_tokens_delta" `(K, output_dim)` float32 zeros (the layer's output is
        unchanged until the delta trains).

    Raises:
        ValueError: ids that are not distinct ints in `[0, input_dim)`, or params that already
            hold trainable tokens.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_trainable_tokens(
        ...     jaxembed.init(jax.random.key(0), 100, 8), [99, 5])
        >>> params["trainable_tokens_ids"].tolist(), params["trainable_tokens_delta"].shape
        ([5, 99], (2, 8))
    """
    table = _table.view(params)
    if table.tokens is not None:
        raise ValueError(
            f"Trainable tokens are already enabled ({table.tokens.ids.shape[0]} ids). Merge "
            "them (merge_trainable_tokens) or remove them (remove_trainable_tokens) first."
        )
    ids = check_token_ids(token_ids, table.input_dim)
    delta = jnp.zeros((ids.size, table.output_dim), TOKEN_DTYPE)
    return {**params, TOKEN_IDS: jnp.asarray(ids), TOKEN_DELTA: delta}


def _tokens(params: Params, function: str) -> tuple[_table.Table, Tokens]:
    table = _table.view(params)
    if table.tokens is None:
        raise ValueError(
            f"{function} needs params holding trainable tokens ({TOKEN_IDS!r}, "
            f"{TOKEN_DELTA!r}). Received: params with keys {sorted(params)}."
        )
    return table, table.tokens


def merge_trainable_tokens(params: Params) -> Params:
    """Writes the trained rows into the table: `E[ids] += delta` (in float32, then stored as
    the table is: cast, or quantized per row in its format), the tokens removed. One index
    update: no other row changes (a LoRA adapter beside stays as it is).

    Returns:
        The params without the tokens, the table in its shape and dtype (or format).

    Raises:
        ValueError: params without trainable tokens.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = jaxembed.enable_trainable_tokens(
        ...     jaxembed.init(jax.random.key(0), 10, 4), [3])
        >>> params["trainable_tokens_delta"] = jnp.ones((1, 4))
        >>> merged = jaxembed.merge_trainable_tokens(params)
        >>> ids = jnp.arange(10)
        >>> bool(jnp.allclose(jaxembed.apply(merged, ids), jaxembed.apply(params, ids)))
        True
    """
    table, tokens = _tokens(params, "merge_trainable_tokens")
    indices = Indices(jnp.asarray(tokens.ids, jnp.int32), fill=False)
    rows = table.gather(indices).astype(jnp.float32) + tokens.delta.astype(jnp.float32)
    return _table.with_rows(_table.without_tokens(params), table, indices.ids, rows)


def remove_trainable_tokens(params: Params) -> Params:
    """Takes the trainable tokens off, discarding the delta.

    Raises:
        ValueError: params without trainable tokens.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_trainable_tokens(jaxembed.init(jax.random.key(0), 9, 2), [1])
        >>> sorted(jaxembed.trainable_tokens.remove_trainable_tokens(params))
        ['embeddings']
    """
    _tokens(params, "remove_trainable_tokens")
    return _table.without_tokens(params)


def delta_rows(tokens: Tokens, ids: jax.Array) -> jax.Array:
    """`(ids.shape + (output_dim,))` float32: `delta[k]` where `ids == token_ids[k]`, else 0.

    A binary search over the K sorted ids finds each id's candidate; gathering those rows of
    the `(K, D)` delta is all the step reads (its gradient is a scatter-add into K rows).
    """
    token_ids = tokens.ids.astype(ids.dtype)
    position = _search(token_ids, ids)
    hit = _take(token_ids, position) == ids
    rows = _table.take_rows(tokens.delta.astype(TOKEN_DTYPE), Indices(position, fill=False))
    return jnp.where(hit[..., None], rows, 0.0)


def _take(values: jax.Array, position: jax.Array) -> jax.Array:
    """`values[position]` for a small replicated 1-D array, sharded as `position`."""
    return _table.take_rows(values[:, None], Indices(position, fill=False))[..., 0]


def _search(sorted_ids: jax.Array, ids: jax.Array) -> jax.Array:
    """For each id, the index of the first of `sorted_ids` not below it, clipped to the last:
    a branch-free binary search of `ceil(log2(K))` elementwise steps, so the result keeps the
    ids' sharding (`jnp.searchsorted` fails on ids sharded over an Explicit mesh)."""
    count = sorted_ids.shape[0]
    below = jnp.zeros_like(ids, jnp.int32)  # how many sorted ids are below each id (sharded alike)
    step = 1 << max(count - 1, 0).bit_length()
    while step:
        candidate = below + step
        inside = candidate <= count
        go = inside & (_take(sorted_ids, jnp.minimum(candidate, count) - 1) < ids)
        below = jnp.where(go, candidate, below)
        step >>= 1
    return jnp.minimum(below, count - 1)


def add_to_logits(logits: jax.Array, query: jax.Array, tokens: Tokens) -> jax.Array:
    """`logits[..., token_ids] += query @ delta.T`: K columns, never a `(V, D)` table."""
    columns = jnp.einsum("...d,kd->...k", query, tokens.delta.astype(query.dtype))
    return add_columns(logits, tokens.ids, columns, unique=True)


def add_columns(
    logits: jax.Array, columns: jax.Array, values: jax.Array, *, unique: bool
) -> jax.Array:
    """`logits[..., columns] += values`, sharded as `logits` (`unique`: no column twice)."""
    return logits.at[..., columns].add(
        values.astype(logits.dtype),
        indices_are_sorted=unique,
        unique_indices=unique,
        mode="promise_in_bounds",
        out_sharding=_mesh.own_sharding(logits),
    )


def take_columns(logits: jax.Array, columns: jax.Array) -> jax.Array:
    """`logits[..., columns]`, batch dimensions sharded as `logits`."""
    sharding = _mesh.own_sharding(logits)
    if sharding is not None:
        spec = (*sharding.spec, *(None,) * logits.ndim)[: logits.ndim - 1]
        sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*spec, None)
        )
    return logits.at[..., columns].get(mode="promise_in_bounds", out_sharding=sharding)
