"""LoRA on a params dict: enable, merge, unmerge, remove, and freezing the base table.

LoRA adds "lora_embeddings_a" `(input_dim, rank)` and "lora_embeddings_b" `(rank, output_dim)`
beside the frozen "embeddings" table; `jaxembed.apply` and `jaxembed.attend` then add
`(lora_alpha / rank) * A[ids] @ B` without ever building the `(input_dim, output_dim)` delta.
`lora_alpha` is a static hyperparameter passed where it is used (apply, attend, merge), not a
param: nothing in the params pytree is a number that must not be trained.

Training only the adapter, with no gradient or optimizer state for the table:

    >>> import jax, jax.numpy as jnp, optax, jaxembed
    >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 100, 8),
    ...                               jax.random.key(1), rank=2)
    >>> trainable, frozen = jaxembed.lora.split_trainable(params)
    >>> sorted(name for name, leaf in trainable.items() if leaf is not None)
    ['lora_embeddings_a', 'lora_embeddings_b']
    >>> loss = lambda t: jnp.sum(jaxembed.apply(jaxembed.lora.combine(t, frozen),
    ...                                         jnp.array([1, 2])) ** 2)
    >>> grads = jax.grad(loss)(trainable)  # A and B only; the table gets no gradient
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxembed import _checks, _mesh, _out_of_range, _paths, _table, initializers
from jaxembed._table import LORA_A, LORA_B, LORA_DTYPE, LORA_KEYS, Adapter, Params

__all__ = [
    "adapter_initializers",
    "adapter_shapes",
    "combine",
    "enable_lora",
    "has_lora",
    "init_lora",
    "merge_lora",
    "remove_lora",
    "select_adapter",
    "split_trainable",
    "stack_adapters",
    "trainable_labels",
    "unmerge_lora",
]

TRAINABLE = "trainable"
FROZEN = "frozen"
_ADAPTER_KEYS = (*LORA_KEYS, _table.TOKEN_DELTA)
"""What `adapters_only=True` trains: LoRA's matrices and trainable tokens' deltas."""


def check_rank(name: str, rank: Any) -> int:
    """Returns `rank` if it is a positive int, else raises naming `name`."""
    return _checks.positive_int(name, rank)


def check_alpha(lora_alpha: Any) -> float | None:
    """Returns `lora_alpha` (None, or a finite positive number), else raises."""
    return None if lora_alpha is None else _checks.positive_number("lora_alpha", lora_alpha)


def scale(rank: int, lora_alpha: float | None, use_rslora: bool = False) -> float:
    """`lora_alpha / rank`, with alpha defaulting to the rank (a scale of 1), as Keras; with
    `use_rslora`, rank-stabilized LoRA's `lora_alpha / sqrt(rank)` (PEFT's `use_rslora`).

    Example:
        >>> import jaxembed
        >>> jaxembed.lora.scale(4, 8.0), jaxembed.lora.scale(4, 8.0, use_rslora=True)
        (2.0, 4.0)
    """
    lora_alpha = check_alpha(lora_alpha)
    _checks.boolean("use_rslora", use_rslora)
    alpha = rank if lora_alpha is None else lora_alpha
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def refuse_constraint(function: str) -> ValueError:
    """Keras refuses LoRA together with an embeddings constraint; so do we (and trainable
    tokens, which freeze the table too)."""
    return ValueError(
        f"{function}: LoRA is incompatible with embedding constraints (as in Keras): the table "
        "is frozen under LoRA (and under trainable tokens). Remove the `embeddings_constraint`, "
        "or merge the adapter (or the tokens) first."
    )


def add_delta(
    rows: jax.Array, a_rows: jax.Array, b: jax.Array, lora_scale: float, sharding: Any = None
) -> jax.Array:
    """`rows + lora_scale * a_rows @ B` in at least float32, for gathered rows of A (`scale`
    gives `lora_scale`).

    Gathering the rows of A first means the `(input_dim, output_dim)` delta `A @ B` is never
    built: the step costs `O(len(ids) * rank * output_dim)` whatever the vocabulary.
    """
    if sharding is None:
        # One 2-D matmul: with several batch axes XLA:CPU differentiates the einsum into a
        # transposed copy and a slow dot (5-15x slower for (batch, seq) ids).
        flat = a_rows.reshape(math.prod(a_rows.shape[:-1]), a_rows.shape[-1])
        delta = (flat @ b).reshape(*a_rows.shape[:-1], b.shape[-1])
    else:
        delta = jnp.einsum("...r,rd->...d", a_rows, b, out_sharding=sharding)
    return rows.astype(delta.dtype) + lora_scale * delta


def add_to_logits(
    logits: jax.Array,
    query: jax.Array,
    adapter: Adapter,
    lora_scale: float,
    shardings: Any = None,
) -> jax.Array:
    """`logits + lora_scale * (query @ B.T) @ A.T`: two thin matmuls instead of building
    `E + scale * A @ B`. `shardings` from `_mesh.attend_shardings` (or None)."""
    a = adapter.a
    if shardings is not None:
        a = jax.sharding.reshard(a, shardings.lora_a)
    dtype = query.dtype
    low_rank = jnp.einsum(
        "...d,rd->...r",
        query,
        adapter.b.astype(dtype),
        out_sharding=shardings and shardings.low_rank,
    )
    return logits + lora_scale * jnp.einsum(
        "...r,vr->...v", low_rank, a.astype(dtype), out_sharding=shardings and shardings.logits
    )


class AdapterChoice(NamedTuple):
    """Which stacked adapter each example uses, prepared by `adapter_choice`."""

    index: jax.Array
    """`prefix` int32 in `[0, n)` (clipped: read `use` and `valid` too)."""
    use: jax.Array
    """`prefix` bool: an adapter applies (False for -1, the base table alone)."""
    valid: jax.Array
    """`prefix` bool: the id names an adapter or -1 (False: the example's rows are NaN)."""


def adapter_choice(adapter_ids: Any, count: int, shape: tuple[int, ...], of: str) -> AdapterChoice:
    """Checks `adapter_ids` (integers in `[-1, count)`, shaped as a prefix of `shape`, the
    shape of `of`) and prepares them. Concrete ids out of range raise an IndexError; traced
    ones give NaN rows (and the error under `checkify`), as the "error" policy of ids."""
    ids = _checks.integer_ids(adapter_ids, "adapter_ids")
    prefix = tuple(ids.shape)
    if prefix != tuple(shape[: len(prefix)]):
        raise ValueError(
            f"`adapter_ids` must have a shape that {of}'s shape {tuple(shape)} starts with "
            f"(one id per example, e.g. ({shape[0] if shape else ''},)). Received: "
            f"adapter_ids of shape {prefix}."
        )

    def describe(bad_id: Any) -> str:
        return (
            f"`adapter_ids` must lie in [-1, n_adapters) = [-1, {count}) (-1: the base table "
            f"alone); got {bad_id}."
        )

    # The range check of ids, with -1 allowed: compared in the ids' own dtype (a uint32
    # 2**32 - 1 must not wrap to -1, the base), exact host values before any narrowing cast.
    if isinstance(ids, np.ndarray):
        _out_of_range.host_check(ids, count, describe, low=-1)
        ids = jnp.asarray(ids.astype(np.int32))
    valid = _out_of_range.device_valid(ids, count, low=-1)
    _out_of_range.device_check(ids, valid, describe)
    use = valid & (ids >= 0) if np.iinfo(ids.dtype).min < 0 else valid
    index = jnp.where(use, ids, 0).astype(jnp.int32)
    return AdapterChoice(index, use, valid)


def add_stacked_delta(
    rows: jax.Array,
    a_rows: jax.Array,
    adapter: Adapter,
    choice: AdapterChoice,
    lora_scale: float,
) -> jax.Array:
    """`rows + lora_scale * A[adapter, ids] @ B[adapter]` per example, for gathered rows of the
    stacked A (`a_rows`, `ids.shape + (rank,)`). Each example's B is gathered once: the step
    reads `examples * rank * output_dim` of B, whatever the number of adapters."""
    prefix = choice.index.shape
    examples = math.prod(prefix)
    b = jnp.where(choice.use[..., None, None], _take(adapter.b, choice.index), 0.0)
    positions = math.prod(a_rows.shape[len(prefix) : -1])  # no -1: the batch may be empty
    per_example = a_rows.reshape(examples, positions, adapter.rank)
    delta = jnp.einsum("ptr,prd->ptd", per_example, b.reshape(examples, *b.shape[-2:]))
    delta = delta.reshape(*rows.shape[:-1], delta.shape[-1])
    bad = ~choice.valid.reshape(*prefix, *(1,) * (rows.ndim - len(prefix)))
    return jnp.where(bad, jnp.nan, rows.astype(delta.dtype) + lora_scale * delta)


def add_stacked_to_logits(
    logits: jax.Array, query: jax.Array, adapter: Adapter, choice: AdapterChoice, lora_scale: float
) -> jax.Array:
    """`logits + lora_scale * (query @ B[adapter].T) @ A[adapter].T` per example.

    Each example gathers its adapter's B `(rank, output_dim)`. For A, with fewer examples than
    adapters each example gathers its `(input_dim, rank)`; otherwise each example's rank-r
    projection is spread one-hot over the `n * rank` columns of all adapters and contracted
    with the stacked A once. Either way temp memory is `min(examples, n) * input_dim * rank`
    at most, beside the logits, and compute is one extra `min(examples, n) * rank`-wide matmul.
    """
    prefix = choice.index.shape
    examples, count = math.prod(prefix), adapter.count
    dtype = query.dtype
    use = choice.use.reshape(examples, 1, 1)
    rank, (input_dim, output_dim) = adapter.rank, (adapter.a.shape[1], adapter.b.shape[2])
    b = jnp.where(use, _take(adapter.b, choice.index).reshape(examples, rank, output_dim), 0.0)
    positions = math.prod(query.shape[len(prefix) : -1])  # no -1: the batch may be empty
    q = query.reshape(examples, positions, output_dim)
    low_rank = jnp.einsum("ptd,prd->ptr", q, b.astype(dtype))
    if examples < count:
        a = jnp.where(use, _take(adapter.a, choice.index).reshape(examples, input_dim, rank), 0)
        delta = jnp.einsum("ptr,pvr->ptv", low_rank, a.astype(dtype))
    else:
        onehot = jax.nn.one_hot(choice.index.reshape(examples), count, dtype=dtype)
        spread = low_rank[:, :, None, :] * onehot[:, None, :, None]  # (p, t, n, r)
        delta = jnp.einsum("ptnr,nvr->ptv", spread, adapter.a.astype(dtype))
    bad = ~choice.valid.reshape(*prefix, *(1,) * (logits.ndim - len(prefix)))
    return jnp.where(bad, jnp.nan, logits + lora_scale * delta.reshape(logits.shape))


def _take(stacked: jax.Array, index: jax.Array) -> jax.Array:
    """`stacked[index]`: each example's adapter matrix (sharded on an Explicit mesh as the
    index's batch and the matrix's own dimensions)."""
    return stacked.at[index].get(
        mode="promise_in_bounds", out_sharding=_mesh.gather_sharding(stacked, index)
    )


def has_lora(params: Params) -> bool:
    """True when params hold a LoRA adapter (both A and B, checked against the table).

    Raises:
        ValueError: malformed params (half an adapter, or A and B not matching the table).

    Example:
        >>> import jax, jaxembed
        >>> jaxembed.lora.has_lora(jaxembed.init(jax.random.key(0), 10, 4))
        False
    """
    return _table.view(params).adapter is not None


def adapter_shapes(
    input_dim: int, output_dim: int, rank: int, *, num_adapters: int | None = None
) -> dict[str, tuple[int, ...]]:
    """{"lora_embeddings_a": (input_dim, rank), "lora_embeddings_b": (rank, output_dim)}, with
    a leading `num_adapters` axis for stacked adapters.

    Raises:
        ValueError: a dimension, rank or `num_adapters` that is not a positive int.

    Example:
        >>> import jaxembed
        >>> jaxembed.lora.adapter_shapes(100, 8, rank=4)["lora_embeddings_a"]
        (100, 4)
    """
    input_dim = _checks.positive_int("input_dim", input_dim)
    output_dim = _checks.positive_int("output_dim", output_dim)
    rank = check_rank("rank", rank)
    shapes = {LORA_A: (input_dim, rank), LORA_B: (rank, output_dim)}
    if num_adapters is None:
        return shapes
    count = _checks.positive_int("num_adapters", num_adapters)
    return {name: (count, *shape) for name, shape in shapes.items()}


def adapter_initializers(
    a_initializer: initializers.InitializerLike = "he_uniform",
    b_initializer: initializers.InitializerLike = "zeros",
    *,
    num_adapters: int | None = None,
) -> dict[str, initializers.Initializer]:
    """{name: (key, shape, dtype) -> matrix} for A and B, Keras's defaults. With
    `num_adapters=n` the shapes have a leading adapter axis and each adapter is drawn
    separately (so "he_uniform" keeps fan_in = input_dim).

    Raises:
        ValueError: an unknown initializer name, or a `num_adapters` that is not a positive
            int.

    Example:
        >>> import jax, jaxembed
        >>> draws = jaxembed.lora.adapter_initializers()
        >>> float(draws["lora_embeddings_b"](jax.random.key(0), (2, 3)).sum())
        0.0
    """
    draws = {LORA_A: initializers.get(a_initializer), LORA_B: initializers.get(b_initializer)}
    if num_adapters is None:
        return draws
    count = _checks.positive_int("num_adapters", num_adapters)

    def stacked(draw: initializers.Initializer) -> initializers.Initializer:
        def init_fn(key: jax.Array, shape: Sequence[int], dtype: Any = LORA_DTYPE) -> jax.Array:
            keys = jax.random.split(key, count)
            return jnp.stack([draw(k, tuple(shape[1:]), dtype) for k in keys])

        return init_fn

    return {name: stacked(draw) for name, draw in draws.items()}


def init_lora(
    key: jax.Array,
    input_dim: int,
    output_dim: int,
    rank: int,
    *,
    a_initializer: initializers.InitializerLike = "he_uniform",
    b_initializer: initializers.InitializerLike = "zeros",
    num_adapters: int | None = None,
) -> Params:
    """A fresh adapter: {"lora_embeddings_a": (input_dim, rank), "lora_embeddings_b": (rank,
    output_dim)}, both float32 whatever the table's dtype; with `num_adapters=n`, n stacked
    adapters `(n, input_dim, rank)` and `(n, rank, output_dim)`, each drawn independently.

    A's default "he_uniform" has fan_in = input_dim and B starts at zero, so a fresh adapter
    leaves the layer's output unchanged.

    Raises:
        ValueError: as `adapter_shapes` and `adapter_initializers`.

    Example:
        >>> import jax, jaxembed
        >>> adapter = jaxembed.lora.init_lora(jax.random.key(0), 100, 8, rank=4)
        >>> adapter["lora_embeddings_a"].shape, adapter["lora_embeddings_b"].shape
        ((100, 4), (4, 8))
        >>> jaxembed.lora.init_lora(jax.random.key(0), 100, 8, 4, num_adapters=3)[
        ...     "lora_embeddings_b"].shape
        (3, 4, 8)
    """
    shapes = adapter_shapes(input_dim, output_dim, rank, num_adapters=num_adapters)
    draws = adapter_initializers(a_initializer, b_initializer, num_adapters=num_adapters)
    keys = dict(zip(LORA_KEYS, jax.random.split(key), strict=True))
    return {name: draws[name](keys[name], shapes[name], LORA_DTYPE) for name in LORA_KEYS}


def stack_adapters(adapters: Sequence[Params]) -> Params:
    """Stacks n ordinary adapters of one rank (separately trained, e.g. one per customer) into
    `(n, input_dim, rank)` and `(n, rank, output_dim)`, for serving them in one batch with
    `apply(..., adapter_ids=)` and `attend(..., adapter_ids=)`.

    Args:
        adapters: dicts holding "lora_embeddings_a" and "lora_embeddings_b" (other keys, such
            as the table, are ignored), all of the same shapes.

    Returns:
        {"lora_embeddings_a": (n, input_dim, rank), "lora_embeddings_b": (n, rank,
        output_dim)}; merge it into params with `{**params, **stacked}`.

    Raises:
        ValueError: an empty list, an entry without A and B (or not one 2-D adapter), or
            adapters of different shapes.

    Example:
        >>> import jax, jaxembed
        >>> one = jaxembed.lora.init_lora(jax.random.key(0), 100, 8, rank=2)
        >>> two = jaxembed.lora.init_lora(jax.random.key(1), 100, 8, rank=2)
        >>> jaxembed.lora.stack_adapters([one, two])["lora_embeddings_a"].shape
        (2, 100, 2)
    """
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(
            "`adapters` must be a non-empty list of adapter dicts (each with "
            f"{LORA_A!r} and {LORA_B!r}). Received: adapters={_checks.describe(adapters)}."
        )
    shapes = set()
    for position, adapter in enumerate(adapters):
        if not isinstance(adapter, Mapping) or any(key not in adapter for key in LORA_KEYS):
            raise ValueError(
                f"`adapters[{position}]` must be a dict with {LORA_A!r} and {LORA_B!r}. "
                f"Received: {_checks.describe(adapter)}."
            )
        a, b = (jnp.asarray(adapter[key]) for key in LORA_KEYS)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(
                f"`adapters[{position}]` must hold one adapter, A (input_dim, rank) and B "
                f"(rank, output_dim). Received: {tuple(a.shape)} and {tuple(b.shape)}."
            )
        shapes.add((a.shape, b.shape))
    if len(shapes) > 1:
        raise ValueError(
            "`adapters` must all have the same shapes (one rank, one table) to be stacked. "
            f"Received: shapes {sorted(shapes)}."
        )
    return {key: jnp.stack([jnp.asarray(a[key]) for a in adapters]) for key in LORA_KEYS}


def select_adapter(params: Params, index: int) -> Params:
    """Params with stacked adapters reduced to adapter `index` (an ordinary adapter), e.g. to
    merge it or export it.

    Raises:
        ValueError: params without stacked adapters, or `index` not an int in
            `[0, n_adapters)`.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2, num_adapters=3)
        >>> jaxembed.lora.select_adapter(params, 2)["lora_embeddings_a"].shape
        (10, 2)
    """
    adapter = _adapter(_table.view(params), params, "select_adapter")
    if adapter.count is None:
        raise ValueError(
            "select_adapter needs stacked adapters (A of shape (n, input_dim, rank)); params "
            f"hold one adapter, A of shape {tuple(adapter.a.shape)}."
        )
    if (
        isinstance(index, (bool, np.bool_))
        or not isinstance(index, numbers.Integral)
        or not 0 <= index < adapter.count
    ):
        raise ValueError(
            f"`index` must be an int in [0, n_adapters) = [0, {adapter.count}). Received: "
            f"index={_checks.describe(index)}."
        )
    index = int(index)
    return {**params, LORA_A: adapter.a[index], LORA_B: adapter.b[index]}


def enable_lora(
    params: Params,
    key: jax.Array,
    rank: int,
    *,
    a_initializer: initializers.InitializerLike = "he_uniform",
    b_initializer: initializers.InitializerLike = "zeros",
    num_adapters: int | None = None,
) -> Params:
    """Adds a LoRA adapter of `rank` to existing params (pretrained, loaded, `weights=`...).

    Args:
        params: params without an adapter, table `(input_dim, output_dim)`.
        key: PRNG key for A's initializer.
        rank: positive int.
        a_initializer, b_initializer: Keras names or JAX initializers (Keras's defaults).
        num_adapters: n stacked adapters (A `(n, input_dim, rank)`, B `(n, rank,
            output_dim)`), one per example's `adapter_ids` in `apply` and `attend`; None:
            one ordinary adapter.

    Returns:
        A new dict: the same table plus "lora_embeddings_a" and "lora_embeddings_b".

    Raises:
        ValueError: bad rank, or params that already hold an adapter.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 100, 8)
        >>> sorted(jaxembed.enable_lora(params, jax.random.key(1), rank=4))
        ['embeddings', 'lora_embeddings_a', 'lora_embeddings_b']
    """
    table = _table.view(params)
    rank = check_rank("rank", rank)
    if table.adapter is not None:
        raise ValueError(
            f"LoRA is already enabled: params hold an adapter of rank {table.adapter.rank}. "
            "Merge it (merge_lora) or remove it (remove_lora) before enabling another. "
            f"Received: rank={rank}."
        )
    adapter = init_lora(
        key,
        table.input_dim,
        table.output_dim,
        rank,
        a_initializer=a_initializer,
        b_initializer=b_initializer,
        num_adapters=num_adapters,
    )
    return {**params, **adapter}


def _adapter(table: _table.Table, params: Params, function: str) -> Adapter:
    if table.adapter is None:
        raise ValueError(
            f"{function} needs params holding a LoRA adapter ({LORA_A!r}, {LORA_B!r}). "
            f"Received: params with keys {sorted(params)}."
        )
    return table.adapter


def dense_delta(adapter: Adapter, lora_scale: float) -> jax.Array:
    """The full `(input_dim, output_dim)` float32 delta: built only when merging, never in a
    training or inference step."""
    # Merging happens once: full float32 precision, not TF32 / bf16 passes on GPU and TPU.
    product = jnp.matmul(
        adapter.a.astype(jnp.float32),
        adapter.b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return lora_scale * product


def merge_lora(
    params: Params,
    *,
    lora_alpha: float | None = None,
    safe_merge: bool = False,
    requantize: bool = True,
    use_rslora: bool = False,
) -> Params:
    """Folds the adapter into the table: `E + (lora_alpha / rank) * A @ B`, adapter removed.

    The sum is computed in float32 and cast back to the table's dtype. A quantized table is
    dequantized, merged in float32 and quantized again in its format (mode and block size),
    so the merged table is within the format's quantization error of the float merge.

    Args:
        params: params holding an adapter.
        lora_alpha: the alpha used in training; None means the rank.
        safe_merge: refuse a merged table with NaN or infinite values once cast back to the
            table's dtype (as peft's `safe_merge`, and stricter: a sum finite in float32 can
            overflow a float16 table): a `ValueError` for concrete params, a `checkify` error
            under jit.
        requantize: for a quantized table, False returns the float32 merged table instead
            (`{"embeddings": ...}`); no effect on float tables.
        use_rslora: the scale is `lora_alpha / sqrt(rank)` (rank-stabilized LoRA), as in
            training.

    Returns:
        The merged table, stored as the input's (or float32 with `requantize=False`), plus any
        other entries of params, without the adapter.

    Raises:
        ValueError: params without an adapter, with stacked adapters (pick one with
            `select_adapter`), or (`safe_merge`, concrete params) a non-finite merged table.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> ids = jnp.arange(10)
        >>> merged = jaxembed.merge_lora(params)
        >>> bool(jnp.allclose(jaxembed.apply(merged, ids), jaxembed.apply(params, ids)))
        True
    """
    table = _table.view(params)
    adapter = _adapter(table, params, "merge_lora")
    _table.refuse(table, "merge_lora", tokens=False)
    _checks.boolean("safe_merge", safe_merge)
    _checks.boolean("requantize", requantize)
    lora_scale = scale(adapter.rank, lora_alpha, use_rslora)
    merged = table.dense().astype(jnp.float32) + dense_delta(adapter, lora_scale)
    if safe_merge:
        # Checked in the stored dtype (a float16 table can overflow); a quantized table's
        # integers are always finite, so its float sum is checked.
        stored = merged.astype(table.dtype)
        _check_finite_merge(stored)
    return _table.with_dense(_table.without_adapter(params), table, merged, as_float=not requantize)


def _check_finite_merge(merged: jax.Array) -> None:
    message = "merge_lora(safe_merge=True): the merged table has {count} NaN or infinite values."
    count = jnp.sum(~jnp.isfinite(merged))
    if _checks.is_traced(merged):
        checkify.check(count == 0, message, count=count)
    elif int(count):
        raise ValueError(
            message.format(count=int(count))
            + f" (in the table's dtype {merged.dtype}; values beyond its range overflow)"
        )


def unmerge_lora(
    params: Params,
    adapter: Params,
    *,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
) -> Params:
    """Takes a merged adapter out again: `E - (lora_alpha / rank) * A @ B`, adapter re-attached.

    Exact up to float rounding of the merge (and of the table's dtype, if narrower than f32).

    Args:
        params: merged params, without an adapter.
        adapter: the {"lora_embeddings_a", "lora_embeddings_b"} that were merged.
        lora_alpha, use_rslora: the scale they were merged with.

    Returns:
        The table as before the merge, in its dtype (a quantized table requantized), with the
        adapter beside it.

    Raises:
        ValueError: params that still hold an adapter, or an `adapter` without A and B or not
            matching the table.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> base = jaxembed.init(jax.random.key(0), 10, 4)
        >>> adapter = jaxembed.lora.init_lora(jax.random.key(1), 10, 4, rank=2,
        ...                                   b_initializer="ones")
        >>> merged = jaxembed.merge_lora({**base, **adapter})
        >>> restored = jaxembed.lora.unmerge_lora(merged, adapter)
        >>> bool(jnp.allclose(restored["embeddings"], base["embeddings"], atol=1e-6))
        True
    """
    if _table.view(params).adapter is not None:
        raise ValueError(
            "unmerge_lora needs merged params without an adapter; these still hold one. "
            f"Received: params with keys {sorted(params)}."
        )
    with_adapter = {**params, **adapter}
    table = _table.view(with_adapter)
    merged = _adapter(table, with_adapter, "unmerge_lora")
    _table.refuse(table, "unmerge_lora", tokens=False)
    delta = dense_delta(merged, scale(merged.rank, lora_alpha, use_rslora))
    unmerged = _table.with_dense(params, table, table.dense().astype(jnp.float32) - delta)
    return {**unmerged, LORA_A: table.adapter.a, LORA_B: table.adapter.b}


def remove_lora(params: Params) -> Params:
    """Takes an unmerged adapter off, discarding it: the base params as before `enable_lora`.

    Raises:
        ValueError: params without an adapter.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> sorted(jaxembed.lora.remove_lora(params))
        ['embeddings']
    """
    _adapter(_table.view(params), params, "remove_lora")
    return _table.without_adapter(params)


def trainable_labels(tree: Any, *, adapters_only: bool = False) -> Any:
    """Labels each leaf "trainable" or "frozen", for `optax.partition` (or `freeze_lora_base`).

    By default, as Keras: "frozen" for every table that has a LoRA adapter beside it and for
    every array of a quantized table, "trainable" for everything else. With
    `adapters_only=True`, only the LoRA matrices and trainable tokens' deltas are "trainable"
    and every other leaf of the model is "frozen" (classic LoRA fine-tuning). Trainable tokens'
    ids are always "frozen", and so is a table with trainable tokens beside it.

    Works on any params pytree: one jaxembed layer's dict, or a whole Flax model (linen
    variables, boxed or not, or an `nnx.State`) holding jaxembed layers beside other layers.

    Returns:
        A pytree of `tree`'s structure with a string label for each leaf.

    Raises:
        ValueError: an `adapters_only` that is not a bool.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> jaxembed.lora.trainable_labels(params)["embeddings"]
        'frozen'
    """
    _checks.boolean("adapters_only", adapters_only)
    frozen = _paths.frozen_tables(tree)

    def label(path: tuple[Any, ...], _: Any) -> str:
        names = _paths.names(path)
        if adapters_only:
            return TRAINABLE if names and names[-1] in _ADAPTER_KEYS else FROZEN
        return FROZEN if names in frozen else TRAINABLE

    return jax.tree_util.tree_map_with_path(label, tree)


def split_trainable(tree: Any, *, adapters_only: bool = False) -> tuple[Any, Any]:
    """Splits params into (trainable, frozen) pytrees of the same structure, with `None`
    where the other half holds a leaf; `combine` joins them again. Labels as
    `trainable_labels` (`adapters_only=True`: train the LoRA matrices alone).

    Differentiate and optimize only the trainable half: the frozen leaves then get no
    gradient and no optimizer state at all.

    Raises:
        ValueError: an `adapters_only` that is not a bool.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> trainable, frozen = jaxembed.lora.split_trainable(params)
        >>> trainable["embeddings"] is None, frozen["lora_embeddings_a"] is None
        (True, True)
    """
    labels = trainable_labels(tree, adapters_only=adapters_only)
    trainable = jax.tree.map(lambda x, label: x if label == TRAINABLE else None, tree, labels)
    frozen = jax.tree.map(lambda x, label: x if label == FROZEN else None, tree, labels)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split_trainable`: takes each leaf from whichever half holds it.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> joined = jaxembed.lora.combine(*jaxembed.lora.split_trainable(params))
        >>> all(joined[key] is params[key] for key in params)
        True
    """
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )
