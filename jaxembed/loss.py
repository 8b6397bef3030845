"""Tied-logits cross-entropy that never materializes the logits.

`attend_cross_entropy(params, query, labels)` equals
`optax.softmax_cross_entropy_with_integer_labels(jaxembed.attend(params, query), labels)`
(reduced), but walks the vocabulary in chunks of `chunk_size` rows with an online logsumexp
(Cut Cross-Entropy, Wijmans et al. 2024; Liger Kernel's fused linear cross-entropy): forward
and backward hold one `(tokens, chunk_size)` block of logits at a time, never the
`(tokens, input_dim)` logits or their gradient. The backward pass recomputes each chunk's
logits (a `jax.custom_vjp`) and produces the gradients of the query, the table and LoRA's A
and B. Sums run in float32 whatever the input dtypes.

Example:
    >>> import jax, jax.numpy as jnp, optax, jaxembed
    >>> params = jaxembed.init(jax.random.key(0), 1000, 16)
    >>> query = jax.random.normal(jax.random.key(1), (4, 16))
    >>> labels = jnp.array([1, 2, 999, 0])
    >>> fused = jaxembed.attend_cross_entropy(params, query, labels, chunk_size=128)
    >>> dense = optax.softmax_cross_entropy_with_integer_labels(
    ...     jaxembed.attend(params, query), labels).mean()
    >>> bool(jnp.allclose(fused, dense, rtol=1e-5))
    True
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxembed import _checks, _mesh, _out_of_range, _table, lora, trainable_tokens

__all__ = ["attend_cross_entropy", "soft_cap"]

_CHUNK_BYTES = 8 * 2**20
"""Default chunk: about this many bytes of float32 logits per (tokens, chunk) block, and of
float32 rows per chunk."""


def soft_cap(logits: jax.Array, logit_soft_cap: float | None) -> jax.Array:
    """`c * tanh(logits / c)` (Gemma 2's logit soft-capping), or `logits` when `c` is None.

    Elementwise: the output has the shape and dtype of the floating `logits`. The value is not
    checked here (`attend` and `attend_cross_entropy` refuse a non-positive `c`).

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> capped = jaxembed.loss.soft_cap(jnp.array([0.0, 1e6]), 30.0)
        >>> capped.tolist()
        [0.0, 30.0]
    """
    if logit_soft_cap is None:
        return logits
    return logit_soft_cap * jnp.tanh(logits / logit_soft_cap)


def _default_chunk(tokens: int, input_dim: int, output_dim: int) -> int:
    """About `_CHUNK_BYTES` of logits per chunk, and no more of float32 rows (few tokens
    against wide rows would otherwise read 100+ MiB chunks); a multiple of 128 rows."""
    rows = _CHUNK_BYTES // (4 * max(tokens, output_dim, 1))
    rows = max(128, rows // 128 * 128)
    return min(rows, input_dim)


class _Chunk(NamedTuple):
    """One block of the vocabulary walk: its rows, their raw logits, and which are new."""

    rows: jax.Array
    """`(chunk, output_dim)` float32 rows of the table."""
    a_rows: jax.Array | None
    """`(chunk, rank)` float32 rows of LoRA's A, or None."""
    raw: jax.Array
    """`(tokens, chunk)` float32 logits before the soft cap."""
    new: jax.Array
    """`(chunk,)` bool: rows not counted by an earlier chunk (the last chunk overlaps)."""


class _FrozenRows(NamedTuple):
    """How the walk reads a frozen (quantized) table: the kind's arrays are sliced and only
    the chunk is dequantized, so no float copy of the table exists, and it gets no gradient."""

    kind: _table.TableKind
    dtype: Any
    """The logits' input dtype, which rows are rounded through (as `attend` casts them)."""

    def read(self, arrays: dict[str, jax.Array], start: jax.Array, chunk: int) -> jax.Array:
        sliced = {k: jax.lax.dynamic_slice_in_dim(v, start, chunk) for k, v in arrays.items()}
        return self.kind.dense(sliced).astype(self.dtype)


def frozen_rows(table: _table.Table, dtype: Any) -> _FrozenRows | None:
    """How the walk reads a frozen table's own arrays; None for a table it differentiates."""
    return _FrozenRows(table.kind, np.dtype(dtype)) if table.kind.frozen else None


def walk_input(table: _table.Table, dtype: Any) -> tuple[Any, _FrozenRows | None]:
    """What the walk reads the table from: a float matrix in `dtype` (differentiable), or a
    frozen table's own arrays with the `_FrozenRows` that reads them."""
    frozen = frozen_rows(table, dtype)
    return (table.arrays if frozen else table.dense().astype(dtype)), frozen


def _read_chunk(q, low_rank, table, a, start, first, chunk, scale, frozen, columns) -> _Chunk:
    if frozen is None:
        rows = jax.lax.dynamic_slice_in_dim(table, start, chunk)
    else:
        rows = frozen.read(table, start, chunk)
    rows = rows.astype(jnp.float32)
    raw = jnp.einsum("td,cd->tc", q, rows, precision=jax.lax.Precision.HIGHEST)
    a_rows = None
    if a is not None:
        a_rows = jax.lax.dynamic_slice_in_dim(a, start, chunk).astype(jnp.float32)
        raw = raw + scale * jnp.einsum(
            "tr,cr->tc", low_rank, a_rows, precision=jax.lax.Precision.HIGHEST
        )
    if columns is not None:  # trainable tokens: their `q @ delta.T` into their columns here
        local, inside = _token_columns(columns.ids, start, chunk)
        raw = trainable_tokens.add_columns(
            raw, local, jnp.where(inside, columns.logits, 0.0), unique=False
        )
    new = (start + jnp.arange(chunk, dtype=jnp.int32)) >= first
    return _Chunk(rows, a_rows, raw, new)


class _TokenColumns(NamedTuple):
    """Trainable tokens in the walk: their row ids `(K,)` and logits `q @ delta.T` `(tokens,
    K)`, added to the columns of the chunk that holds each id."""

    ids: jax.Array
    logits: jax.Array


def _token_columns(ids: jax.Array, start: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(column of each token id in the chunk from `start`, clipped; whether it is inside)."""
    local = ids.astype(jnp.int32) - start
    inside = (local >= 0) & (local < chunk)
    return jnp.clip(local, 0, chunk - 1), inside


def _columns(q: jax.Array, tokens: Any) -> _TokenColumns | None:
    if tokens is None:
        return None
    ids, delta = tokens
    logits = jnp.einsum(
        "td,kd->tk", q, delta.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return _TokenColumns(ids, logits)


def _add_rows(buffer: jax.Array, start: jax.Array, rows: jax.Array) -> jax.Array:
    """`buffer[start:start + len(rows)] += rows`, in place inside the walk's loop."""
    current = jax.lax.dynamic_slice_in_dim(buffer, start, rows.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(
        buffer, current + rows.astype(buffer.dtype), start, 0
    )


def _starts(input_dim: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(start, first new row) of every chunk; the last chunk ends at `input_dim`, overlapping
    its predecessor instead of reading past the table (no padded copy of the table)."""
    count = -(-input_dim // chunk)
    firsts = np.arange(count) * chunk
    starts = np.minimum(firsts, input_dim - chunk)
    return jnp.asarray(starts, jnp.int32), jnp.asarray(firsts, jnp.int32)


def _mask(where: Any, shape: tuple[int, ...]) -> jax.Array | None:
    if where is None:
        return None
    mask = jnp.asarray(_checks.dense("where", where))
    if mask.dtype != jnp.bool_ or mask.shape != shape:
        raise ValueError(
            f"`where` must be a bool array of shape query.shape[:-1] = {shape}. Received: "
            f"where of shape {tuple(mask.shape)} and dtype {mask.dtype}."
        )
    return mask


def attend_cross_entropy(
    params: _table.Params,
    query: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    lora_alpha: float | None = None,
    logit_soft_cap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    out_of_range: str = "error",
    dtype: DTypeLike | None = None,
    use_rslora: bool = False,
) -> jax.Array:
    """Softmax cross-entropy of the tied logits `attend(params, query)`, never materialized.

    Equals `optax.softmax_cross_entropy_with_integer_labels(jaxembed.attend(params, query,
    lora_alpha=..., logit_soft_cap=...), labels)`, with optional label smoothing and z-loss,
    reduced over the positions where `where` is True. Memory: one `(tokens, chunk_size)`
    float32 block of logits at a time, forward and backward.

    On a mesh with Explicit axes, a table split by rows (or by rows and columns) or a query
    split by its first dimension is read from the arrays' types, and each device walks its
    own rows for its own tokens: `jaxembed.sharding.vocab_parallel_attend_cross_entropy`,
    called with those axes, which moves per-token statistics only.

    Args:
        params: from `init` (LoRA adapters included, as `attend` computes them).
        query: floating `(..., output_dim)`.
        labels: integer `query.shape[:-1]`; at unmasked positions an id outside
            `[0, input_dim)` follows `out_of_range` as `apply`'s ids do ("error": an error
            where one can be raised, a NaN loss under plain jit; "fill": NaN loss; "clip": the
            nearest class). Labels at masked positions are ignored, whatever their value.
        where: bool `query.shape[:-1]` (e.g. `compute_mask(ids, True)`), True = counted.
        lora_alpha: as `attend`.
        logit_soft_cap: `c * tanh(logits / c)` before everything else (Gemma 2).
        label_smoothing: `a`: targets `(1 - a) * onehot + a / input_dim` (as optax).
        z_loss: adds `z_loss * logsumexp**2` per position (PaLM).
        reduction: "mean" over counted positions (0 when there are none), "sum", or "none"
            (per-position losses, 0 where masked).
        chunk_size: vocabulary rows per chunk; None picks about 8 MiB of logits per chunk.
        out_of_range: the policy for labels, as `apply`'s for ids.
        use_rslora: as `attend`'s.
        dtype: dtype of the logits' inputs (query and table are cast to it before the
            float32 accumulation); None promotes query and table, as `attend`.

    Returns:
        A float32 scalar, or `query.shape[:-1]` losses with reduction="none".

    Raises:
        TypeError: a non-floating query, or non-integer labels.
        ValueError: malformed params or stacked adapters, a query whose last dimension is not
            `output_dim`, labels or `where` not shaped `query.shape[:-1]`, or a bad option;
            on Explicit axes, a table split by columns alone, or trainable tokens with any
            split (and what `vocab_parallel_attend_cross_entropy` raises).
        IndexError: an out-of-range label under "error", for concrete labels.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 5000, 8)
        >>> query = jnp.ones((2, 3, 8))
        >>> labels = jnp.array([[1, 2, 0], [4, 0, 0]])
        >>> mask = jaxembed.compute_mask(labels, mask_zero=True)  # 0 = padding
        >>> jaxembed.attend_cross_entropy(params, query, labels, where=mask).shape
        ()
    """
    options = _options(locals())
    setup = _setup(params, query, labels, **options)
    table, adapter = setup.table, setup.table.adapter
    if (split := _explicit_split(table, setup.query)) is not None:
        # On an Explicit mesh, a walk of the whole table by every device would gather a
        # vocab-split table and has no sharding for data-parallel tokens' gradients: each
        # device walks its own rows for its own tokens instead (a shard_map).
        from jaxembed import sharding

        vocab_axis, batch_axes = split
        return sharding.vocab_parallel_attend_cross_entropy(
            params, query, labels, vocab_axis=vocab_axis, batch_axes=batch_axes, **options
        )
    tokens = setup.query.shape[0]
    table_input, frozen = walk_input(table, setup.dtype)
    static = (setup.chunk(tokens, table.input_dim), setup.logit_soft_cap, setup.scale, frozen)
    statistics = _whole_table_statistics(
        static,
        setup.query,
        table_input,
        None if adapter is None else adapter.a,
        None if adapter is None else adapter.b,
        None if table.tokens is None else tuple(table.tokens),
        setup.labels,
    )
    losses = _losses_from_statistics(*statistics, setup.smoothing, setup.z_loss, table.input_dim)
    return setup.reduce(losses)


def _explicit_split(table: _table.Table, query: jax.Array) -> tuple[Any, Any] | None:
    """`(vocab_axis, batch_axes)` when an Explicit mesh splits the table's rows or the
    tokens (`query`, flattened), else None (`_mesh.vocab_parallel_axes`).

    A table split by rows and columns (FSDP-style) is walked by rows, each row shard's
    columns gathered first, as FSDP gathers every weight before use. A table split by
    columns alone is refused: every chunk of logits would be summed across devices.
    """
    caller = "attend_cross_entropy on an Explicit mesh"
    split = _mesh.vocab_parallel_axes(table.leading, query, caller)
    columns = _mesh.explicit_column_axes(table.leading)
    if split is None and columns is None:
        return None
    _table.refuse(table, caller)
    if (split is None or split[0] is None) and columns is not None:
        raise ValueError(
            f"{caller} walks the vocabulary by rows; a table split by columns alone "
            f"({jax.typeof(table.leading).sharding.spec}) would need every chunk of logits "
            "summed across devices, traffic as large as the logits themselves. Split the "
            "table by rows (`P(vocab_axis, None)`, vocab-parallel) or keep it whole."
        )
    return split


# The walk: a table (the whole one, or a shard of it in
# `jaxembed.sharding.vocab_parallel_attend_cross_entropy`) yields per-token statistics, which
# become losses (after per-token collectives across shards) and are reduced.


def _partial_forward(static, q, table, a, b, tokens, labels):
    """Per-token `(logsumexp, label logit, logit sum)` over the rows of `table` (a shard).

    `labels` are row indices into `table`; one outside `[0, rows)` names no row here (its
    label logit is 0). `static` is `(chunk, logit_soft_cap, lora_scale, frozen)`, `frozen` a
    `_FrozenRows` when `table` is a frozen table's arrays, else None (`table` is a matrix).
    `tokens` is trainable tokens' `(ids, delta)`, or None.
    """
    chunk, cap, scale, frozen = static
    tokens_count = q.shape[0]
    low_rank = None if b is None else q @ b.astype(jnp.float32).T
    columns = _columns(q, tokens)
    starts, firsts = _starts(_rows_of(table), chunk)

    def body(carry, start_first):
        running_max, running_sum, logit_sum, label_logit = carry
        start, first = start_first
        block = _read_chunk(q, low_rank, table, a, start, first, chunk, scale, frozen, columns)
        logits, new = soft_cap(block.raw, cap), block.new
        masked = jnp.where(new, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, masked.max(axis=1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(
            masked - new_max[:, None]
        ).sum(axis=1)
        logit_sum = logit_sum + jnp.where(new, logits, 0.0).sum(axis=1)
        local = labels - start
        hit = (local >= 0) & (local < chunk) & (labels >= first)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[:, None], axis=1)
        label_logit = label_logit + jnp.where(hit, picked[:, 0], 0.0)
        return (new_max, running_sum, logit_sum, label_logit), None

    # `*_like(q)`: inside shard_map the carries vary over the mesh axes the inputs vary over.
    zeros = jnp.zeros_like(q, jnp.float32, shape=(tokens_count,))
    init = (jnp.full_like(q, -jnp.inf, jnp.float32, shape=(tokens_count,)), zeros, zeros, zeros)
    (running_max, running_sum, logit_sum, label_logit), _ = jax.lax.scan(
        body, init, (starts, firsts)
    )
    return running_max + jnp.log(running_sum), label_logit, logit_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _partial_statistics(static, q, table, a, b, tokens, labels):
    """`_partial_forward`, differentiable: the backward pass recomputes each chunk's logits, so
    forward and backward hold one `(tokens, chunk)` block at a time, never the logits."""
    return _partial_forward(static, q, table, a, b, tokens, labels)


def _partial_statistics_fwd(static, q, table, a, b, tokens, labels):
    lse, label_logit, logit_sum = _partial_forward(static, q, table, a, b, tokens, labels)
    return (lse, label_logit, logit_sum), (q, table, a, b, tokens, labels, lse)


def _partial_statistics_bwd(static, residuals, cotangents):
    chunk, cap, scale, frozen = static
    q, table, a, b, tokens, labels, lse = residuals
    g_lse, g_label, g_sum = cotangents  # per token
    b32 = None if b is None else b.astype(jnp.float32)
    low_rank = None if b is None else q @ b32.T
    token_columns = _columns(q, tokens)
    starts, firsts = _starts(_rows_of(table), chunk)
    columns = jnp.arange(chunk, dtype=jnp.int32)

    def body(carry, start_first):
        dq, d_table, d_a, d_low_rank, d_token_logits = carry
        start, first = start_first
        rows, a_rows, raw, new = _read_chunk(
            q, low_rank, table, a, start, first, chunk, scale, frozen, token_columns
        )
        logits = soft_cap(raw, cap)
        probs = jnp.where(new, jnp.exp(logits - lse[:, None]), 0.0)
        onehot = (labels[:, None] == start + columns) & new
        d_logits = (
            g_lse[:, None] * probs
            + jnp.where(onehot, g_label[:, None], 0.0)
            + jnp.where(new, g_sum[:, None], 0.0)
        )
        if cap is not None:
            d_logits = d_logits * (1 - jnp.square(jnp.tanh(raw / cap)))
        dq = dq + d_logits @ rows
        if frozen is None:
            d_table = _add_rows(d_table, start, jnp.where(new[:, None], d_logits.T @ q, 0.0))
        if a_rows is not None:
            d_low_rank = d_low_rank + scale * (d_logits @ a_rows)
            d_a_rows = jnp.where(new[:, None], scale * (d_logits.T @ low_rank), 0.0)
            d_a = _add_rows(d_a, start, d_a_rows)
        if token_columns is not None:  # d_logits is 0 at columns an earlier chunk counted
            local, inside = _token_columns(token_columns.ids, start, chunk)
            picked = trainable_tokens.take_columns(d_logits, local)
            d_token_logits = d_token_logits + jnp.where(inside, picked, 0.0)
        return (dq, d_table, d_a, d_low_rank, d_token_logits), None

    rank = 0 if b is None else b.shape[0]
    count = 0 if tokens is None else tokens[0].shape[0]
    init = (
        jnp.zeros_like(q),
        None if frozen else jnp.zeros_like(table, jnp.float32),
        None if a is None else jnp.zeros_like(a, jnp.float32),
        jnp.zeros_like(q, jnp.float32, shape=(q.shape[0], rank)),
        jnp.zeros_like(q, jnp.float32, shape=(q.shape[0], count)),
    )
    (dq, d_table, d_a, d_low_rank, d_token_logits), _ = jax.lax.scan(body, init, (starts, firsts))
    d_b = None
    if b is not None:
        dq = dq + d_low_rank @ b32
        d_b = (d_low_rank.T @ q).astype(b.dtype)
        d_a = d_a.astype(a.dtype)
    d_tokens = None
    if tokens is not None:
        ids, delta = tokens
        dq = dq + d_token_logits @ delta.astype(jnp.float32)
        d_tokens = (_zero_cotangent(ids), (d_token_logits.T @ q).astype(delta.dtype))
    labels_cotangent = np.zeros(labels.shape, jax.dtypes.float0)
    if frozen is None:
        d_table = d_table.astype(table.dtype)
    else:  # a frozen table: zero cotangents (float0 for its integer arrays)
        d_table = jax.tree.map(_zero_cotangent, table)
    return dq, d_table, d_a, d_b, d_tokens, labels_cotangent


def _rows_of(table: Any) -> int:
    """Rows of the walked table: a matrix, or a frozen table's arrays (vocabulary first)."""
    return jax.tree.leaves(table)[0].shape[0]


def _zero_cotangent(array: jax.Array) -> Any:
    if jnp.issubdtype(array.dtype, jnp.inexact):
        return jnp.zeros_like(array)
    return np.zeros(array.shape, jax.dtypes.float0)


_partial_statistics.defvjp(_partial_statistics_fwd, _partial_statistics_bwd)

# Jitted once per shape and settings: an eager call would otherwise retrace the chunk loop.
_whole_table_statistics = jax.jit(_partial_statistics, static_argnums=0)


def _losses_from_statistics(lse, label_logit, logit_sum, smoothing, z_loss, input_dim):
    """Per-token losses from whole-vocabulary statistics: logsumexp minus the (smoothed) target
    logit, plus the z-loss."""
    loss = lse - (1 - smoothing) * label_logit - smoothing * logit_sum / input_dim
    return loss + z_loss * jnp.square(lse)


class _Setup(NamedTuple):
    """`attend_cross_entropy`'s checked arguments, flattened to `tokens` positions."""

    table: _table.Table
    positions: tuple[int, ...]
    mask: jax.Array | None
    indices: _out_of_range.Indices
    query: jax.Array
    """`(tokens, output_dim)` float32, rounded through `dtype` first."""
    labels: jax.Array
    """`(tokens,)`, clipped into `[0, input_dim)` (bad ones are handled by `reduce`)."""
    dtype: Any
    reduction: str
    smoothing: float
    z_loss: float
    logit_soft_cap: float | None
    scale: float
    chunk_size: int | None

    def chunk(self, tokens: int, rows: int) -> int:
        """Rows per chunk for `tokens` positions against `rows` rows of the table."""
        if self.chunk_size is None:
            return _default_chunk(tokens, rows, self.table.output_dim)
        return min(self.chunk_size, rows)

    def reduce(self, losses: jax.Array) -> jax.Array:
        """Per-token losses `(tokens,)` -> the loss `attend_cross_entropy` returns."""
        input_dim = self.table.input_dim
        tokens = losses.shape[0]
        if self.indices.fill:  # a label outside the table: NaN, never a silent wrong loss
            valid = self.indices.valid(input_dim).reshape(tokens)
            losses = jnp.where(valid, losses, jnp.nan)
        losses = losses.reshape(self.positions)
        if self.mask is not None:
            losses = jnp.where(self.mask, losses, 0.0)
        if self.reduction == "none":
            return losses
        total = jnp.sum(losses)
        if self.reduction == "sum":
            return total
        count = losses.size if self.mask is None else jnp.sum(self.mask)
        return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


_OPTIONS = (
    "where",
    "lora_alpha",
    "logit_soft_cap",
    "label_smoothing",
    "z_loss",
    "reduction",
    "chunk_size",
    "out_of_range",
    "dtype",
    "use_rslora",
)
"""The keyword options of `attend_cross_entropy` (and of its vocab-parallel form)."""


def _options(namespace: dict[str, Any]) -> dict[str, Any]:
    """The loss's keyword options out of a caller's `locals()`, to forward to `_setup`."""
    return {name: namespace[name] for name in _OPTIONS}


def _setup(
    params: _table.Params,
    query: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None,
    lora_alpha: float | None,
    logit_soft_cap: float | None,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    chunk_size: int | None,
    out_of_range: str,
    dtype: DTypeLike | None,
    use_rslora: bool,
) -> _Setup:
    """The checks and preparation of `attend_cross_entropy`, in its order and words."""
    table = _table.view(params)
    _table.refuse(table, "attend_cross_entropy", tokens=False)
    query = _checks.floating_array("query", query)
    _checks.last_dim("query", query, table.output_dim, "output_dim")
    positions = tuple(query.shape[:-1])
    mask = _mask(where, positions)
    labels = _checks.integer_ids(labels, "labels")
    if tuple(labels.shape) != positions:
        raise ValueError(
            f"`labels` must have shape query.shape[:-1] = {positions}. "
            f"Received: labels of shape {tuple(labels.shape)}."
        )
    if mask is not None:  # masked labels are ignored: never checked, never looked up
        if isinstance(labels, np.ndarray) and not _checks.is_traced(mask):
            labels = np.where(np.asarray(mask), labels, 0)  # exact, before any narrowing
        elif isinstance(labels, np.ndarray):
            # A traced mask needs device labels: narrow host labels so that an out-of-range
            # one stays out of range (an int64 2**32 + 3 must not become row 3).
            index_dtype = _out_of_range.index_dtype(table.input_dim)
            labels = jnp.where(
                mask, _out_of_range._representable(labels, table.input_dim, index_dtype), 0
            )
        else:
            labels = jnp.where(mask, labels, 0)
    indices = _out_of_range.prepare(labels, table.input_dim, out_of_range)
    _checks.one_of("reduction", reduction, ("mean", "sum", "none"))
    smoothing = _checks.non_negative_float("label_smoothing", label_smoothing)
    if smoothing > 1:
        raise ValueError(
            f"`label_smoothing` must lie in [0, 1]. Received: label_smoothing={label_smoothing}."
        )
    z_loss = _checks.non_negative_float("z_loss", z_loss)
    if logit_soft_cap is not None:
        logit_soft_cap = _checks.positive_number("logit_soft_cap", logit_soft_cap)
    lora.check_alpha(lora_alpha)
    _checks.boolean("use_rslora", use_rslora)
    dtype = _checks.optional_floating_dtype("dtype", dtype) or jnp.result_type(query, table.dtype)
    if chunk_size is not None:
        chunk_size = _checks.positive_int("chunk_size", chunk_size)
    tokens = int(np.prod(positions, dtype=np.int64))
    adapter = table.adapter
    return _Setup(
        table=table,
        positions=positions,
        mask=mask,
        indices=indices,
        query=query.reshape(tokens, table.output_dim).astype(dtype).astype(jnp.float32),
        labels=jnp.clip(indices.ids.reshape(tokens), 0, table.input_dim - 1),
        dtype=dtype,
        reduction=reduction,
        smoothing=smoothing,
        z_loss=z_loss,
        logit_soft_cap=logit_soft_cap,
        scale=0.0 if adapter is None else lora.scale(adapter.rank, lora_alpha, use_rslora),
        chunk_size=chunk_size,
    )
