"""The embedding layer as pure functions on a params dict: init, apply, compute_mask, attend.

Params are a plain dict: the `(input_dim, output_dim)` table under "embeddings" (LoRA adds
"lora_embeddings_a" and "lora_embeddings_b" beside it). Hyperparameters (`dtype`,
`out_of_range`, ...) are static Python values; only arrays are traced, so every function
jit-compiles as is or with `functools.partial` over its keyword arguments.

Example:
    >>> import jax, jax.numpy as jnp, jaxembed
    >>> params = jaxembed.init(jax.random.key(0), 1000, 64)
    >>> ids = jnp.zeros((32, 10), jnp.int32)
    >>> jaxembed.apply(params, ids).shape
    (32, 10, 64)
"""

from __future__ import annotations

from typing import TypeAlias

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.typing import ArrayLike, DTypeLike

from jaxembed import _checks, _mesh, initializers

Params: TypeAlias = dict[str, jax.Array]
"""{"embeddings": (input_dim, output_dim) table}, plus LoRA weights when enabled."""


def table_initializer(
    input_dim: int,
    output_dim: int,
    embeddings_initializer: initializers.InitializerLike = "uniform",
    weights: ArrayLike | None = None,
) -> initializers.Initializer:
    """The `(key, shape, dtype) -> table` function that `init` and the Flax modules call.

    With `weights` it ignores the key and returns a validated copy of `weights` cast to dtype;
    otherwise it draws from `embeddings_initializer`. Arguments are validated here, once.

    Example:
        >>> import jax, jaxembed
        >>> init_fn = jaxembed.functional.table_initializer(10, 4, "zeros")
        >>> init_fn(jax.random.key(0), (10, 4), "float32").sum().item()
        0.0
    """
    input_dim = _checks.positive_int("input_dim", input_dim)
    output_dim = _checks.positive_int("output_dim", output_dim)
    draw = initializers.get(embeddings_initializer)
    if weights is not None:
        weights = _checks.weights_matrix(weights, input_dim, output_dim)

    def init_fn(key: jax.Array | None, shape: tuple[int, ...], dtype: DTypeLike) -> jax.Array:
        dtype = _checks.floating_dtype("param_dtype", dtype)
        if weights is not None:
            return jnp.array(weights, dtype=dtype)  # a copy: the caller's matrix stays intact
        if key is None:
            raise ValueError(
                "`key` must be a JAX PRNG key (jax.random.key(seed)) unless `weights` is given. "
                "Received: key=None."
            )
        return jnp.asarray(draw(key, tuple(shape), dtype), dtype)

    return init_fn


def init(
    key: jax.Array | None,
    input_dim: int,
    output_dim: int,
    *,
    embeddings_initializer: initializers.InitializerLike = "uniform",
    weights: ArrayLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
) -> Params:
    """Creates the params of an embedding layer.

    Args:
        key: a JAX PRNG key; may be None when `weights` is given.
        input_dim: vocabulary size, i.e. the largest id + 1 (positive int).
        output_dim: embedding dimension (positive int).
        embeddings_initializer: Keras name ("uniform" = U(-0.05, 0.05), "glorot_normal", ...)
            or a JAX initializer `(key, shape, dtype) -> array`.
        weights: optional initial `(input_dim, output_dim)` matrix, any array-like of finite
            real numbers (a Keras-style `[matrix]` list too); copied, never modified.
        param_dtype: storage dtype of the table.

    Returns:
        `{"embeddings": table}`, table of shape `(input_dim, output_dim)` and `param_dtype`.

    Raises:
        ValueError: for a non-positive or non-int dimension, an unknown initializer, or
            `weights` of the wrong shape or with non-finite values.

    Example:
        >>> import jax, jaxembed
        >>> jaxembed.init(jax.random.key(0), 1000, 64)["embeddings"].shape
        (1000, 64)
    """
    init_fn = table_initializer(input_dim, output_dim, embeddings_initializer, weights)
    return {"embeddings": init_fn(key, (input_dim, output_dim), param_dtype)}


def check_in_range(ids: ArrayLike, input_dim: int) -> None:
    """Raises `IndexError` for an id outside [0, input_dim): at once for concrete ids, and
    through `checkify` for traced ones (the jitted function must then be checkified).

    Useful to check a dataset once, eagerly, before a jitted loop that looks up with
    `out_of_range="clip"`.

    Args:
        ids: integer array of any shape.
        input_dim: the vocabulary size.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> jaxembed.check_in_range(jnp.array([0, 3]), 4)  # passes silently
    """
    ids = _checks.integer_ids(ids)
    input_dim = _checks.positive_int("input_dim", input_dim)
    if not _checks.is_traced(ids):
        bad_id = _checks.first_out_of_range(ids, input_dim)
        if bad_id is not None:
            raise IndexError(_checks.out_of_range_message(input_dim, bad_id))
        return
    valid = (ids >= 0) & (ids < input_dim)
    # A reduction rather than indexing at argmin: it also compiles for ids sharded over an
    # Explicit mesh. It names the smallest offending id.
    smallest_bad = jnp.min(jnp.where(valid, jnp.iinfo(ids.dtype).max, ids))
    # Under plain jax.jit this check fails at compile time with JAX's "Cannot abstractly
    # evaluate a checkify.check which was not functionalized": the user must checkify the
    # jitted function or pick another policy (README, "Out-of-range ids").
    checkify.check(
        jnp.all(valid),
        _checks.out_of_range_message(input_dim, "{bad_id}"),
        bad_id=smallest_bad,
    )


def prepare_ids(ids: jax.Array, input_dim: int, out_of_range: str) -> tuple[jax.Array, str]:
    """Applies the out-of-range policy to validated integer ids, once for every gathered matrix.

    Returns the ids to gather with and the gather mode: "fill" keeps the ids and gathers with
    NaN fill (negative ids included: plain `jnp.take` would wrap -1 to the last row); "clip"
    clamps; "error" checks, then clamps so that the gather never reads out of bounds.
    """
    if out_of_range == "fill":
        return ids, "fill"
    if out_of_range == "error":
        check_in_range(ids, input_dim)
    return jnp.clip(ids, 0, input_dim - 1), "promise_in_bounds"


def take_rows(matrix: jax.Array, ids: jax.Array, mode: str) -> jax.Array:
    """`matrix[ids]` with ids and mode from `prepare_ids`: shape `ids.shape + matrix.shape[1:]`.

    On an Explicit mesh the output sharding is derived from the operands (the batch follows
    the ids, the features the matrix's columns); plain `jnp.take` would be refused there.
    """
    fill_value = jnp.nan if mode == "fill" else None
    return matrix.at[ids].get(
        mode=mode,
        fill_value=fill_value,
        wrap_negative_indices=False,
        out_sharding=_mesh.gather_sharding(matrix, ids),
    )


def lora_scale(rank: int, lora_alpha: float | None) -> float:
    """`lora_alpha / rank`, with alpha defaulting to the rank (a scale of 1), as Keras."""
    if lora_alpha is None:
        return 1.0
    return _checks.positive_number("lora_alpha", lora_alpha) / rank


def apply(
    params: Params,
    ids: ArrayLike,
    *,
    dtype: DTypeLike | None = None,
    out_of_range: str = "error",
    lora_alpha: float | None = None,
) -> jax.Array:
    """Looks up the embedding of every id, adding the LoRA delta when params hold an adapter.

    With LoRA the output is `E[ids] + (lora_alpha / rank) * A[ids] @ B`: the rows of A are
    gathered first, so the `(input_dim, output_dim)` delta `A @ B` is never built. The sum is
    computed in at least float32 (A and B are float32), then cast to `dtype`.

    Args:
        params: from `init` (and `enable_lora`).
        ids: integer array of any shape, a scalar included; floats and bools are refused.
        dtype: output dtype (e.g. jnp.bfloat16 from float32 params); None keeps the table's.
        out_of_range: what ids outside [0, input_dim) give:
            "error" (default): an `IndexError` naming the id, at once for concrete ids; under
            `jax.jit` the function must be wrapped in `jax.experimental.checkify.checkify`.
            "fill": NaN rows. "clip": the nearest valid row.
        lora_alpha: LoRA scale numerator; None means the rank (read from A's shape).

    Returns:
        Array of shape `ids.shape + (output_dim,)`.

    Raises:
        TypeError: non-integer ids. IndexError: an out-of-range id under "error".

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 10, 3)
        >>> jaxembed.apply(params, jnp.array([[4], [7]])).shape
        (2, 1, 3)
        >>> bool(jnp.isnan(jaxembed.apply(params, -1, out_of_range="fill")).all())
        True
    """
    table = _checks.embeddings_table(params)
    adapter = _checks.lora_weights(params)
    ids = _checks.integer_ids(ids)
    out_of_range = _checks.out_of_range_policy(out_of_range)
    dtype = _checks.optional_floating_dtype("dtype", dtype) or table.dtype
    ids, mode = prepare_ids(ids, table.shape[0], out_of_range)
    rows = take_rows(table, ids, mode)
    if adapter is None:
        return rows.astype(dtype)
    a, b = adapter
    scale = lora_scale(a.shape[1], lora_alpha)
    delta = jnp.einsum(
        "...r,rd->...d", take_rows(a, ids, mode), b, out_sharding=_mesh.gather_sharding(table, ids)
    )
    return (rows.astype(delta.dtype) + scale * delta).astype(dtype)


def compute_mask(ids: ArrayLike, mask_zero: bool) -> jax.Array | None:
    """Keras's padding mask: `ids != 0` when `mask_zero`, else None.

    Args:
        ids: integer array of any shape.
        mask_zero: whether id 0 is padding.

    Returns:
        A bool array shaped like `ids` (True = real token), or None when `mask_zero` is False.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> jaxembed.compute_mask(jnp.array([[3, 0]]), mask_zero=True).tolist()
        [[True, False]]
    """
    _checks.one_of("mask_zero", mask_zero, (True, False))
    ids = _checks.integer_ids(ids)
    return jnp.not_equal(ids, 0) if mask_zero else None


def attend(
    params: Params,
    query: ArrayLike,
    *,
    dtype: DTypeLike | None = None,
    lora_alpha: float | None = None,
) -> jax.Array:
    """Tied-weights logits: the inner product of each query vector with every embedding.

    With LoRA, `query @ E.T + (lora_alpha / rank) * (query @ B.T) @ A.T`: two thin matmuls
    instead of building `E + scale * A @ B`.

    Args:
        params: from `init` (and `enable_lora`).
        query: floating array of shape `(..., output_dim)`.
        dtype: compute and output dtype; None promotes query and table (as flax's `attend`).
        lora_alpha: LoRA scale numerator; None means the rank.

    Returns:
        `query @ embeddings.T`, shape `(..., input_dim)`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 1000, 64)
        >>> jaxembed.attend(params, jnp.ones((2, 5, 64))).shape
        (2, 5, 1000)
    """
    table = _checks.embeddings_table(params)
    adapter = _checks.lora_weights(params)
    query = _checks.floating_array("query", query)
    _checks.last_dim("query", query, table.shape[1], "output_dim")
    dtype = _checks.optional_floating_dtype("dtype", dtype) or jnp.result_type(query, table)
    query = query.astype(dtype)
    shardings = _mesh.attend_shardings(query, table)
    if shardings is not None:
        query = jax.sharding.reshard(query, shardings.query)
        if shardings.table is not None:
            table = jax.sharding.reshard(table, shardings.table)
    logits = jnp.einsum(
        "...d,vd->...v",
        query,
        table.astype(dtype),
        out_sharding=shardings and shardings.logits,
    )
    if adapter is None:
        return logits
    a, b = adapter
    scale = lora_scale(a.shape[1], lora_alpha)
    if shardings is not None:
        a = jax.sharding.reshard(a, shardings.lora_a)
    low_rank = jnp.einsum(
        "...d,rd->...r", query, b.astype(dtype), out_sharding=shardings and shardings.low_rank
    )
    return logits + scale * jnp.einsum(
        "...r,vr->...v", low_rank, a.astype(dtype), out_sharding=shardings and shardings.logits
    )
