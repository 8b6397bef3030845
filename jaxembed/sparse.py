"""Row-wise optimizers: train a full table at a cost that does not grow with the vocabulary.

A dense step pays for every row: the lookup's gradient is an `(input_dim, output_dim)` scatter
into zeros, and a dense optax optimizer reads and writes every row of the table and its
moments. These optimizers take the gradient with respect to the looked-up rows instead
(`row_grads`, shape `ids.shape + (output_dim,)`), sum duplicate ids as the dense gradient
would, and read and write only the rows the batch touched, in the table and in the state:

    >>> import jax, jax.numpy as jnp, jaxembed
    >>> optimizer = jaxembed.sparse.adagrad(0.1)
    >>> table = jaxembed.init(jax.random.key(0), 1000, 8)["embeddings"]
    >>> state = optimizer.init(table)
    >>> ids = jnp.array([[3, 5], [5, 999]])
    >>> row_grads = jnp.ones(ids.shape + (8,))
    >>> new_table, state = jax.jit(optimizer.update)(table, state, ids, row_grads)
    >>> changed = jnp.any(new_table != table, axis=1)
    >>> jnp.flatnonzero(changed).tolist()  # only the touched rows moved
    [3, 5, 999]

Jit `update` with `donate_argnums=(0, 1)` so that XLA writes the rows in place instead of
copying the table and the state every step.

The optimizers (state sizes per table):

* `sgd(learning_rate)`: a step count; `optax.sgd` exactly.
* `adagrad(learning_rate, initial_accumulator_value=0.1, eps=1e-7)`: `(input_dim, output_dim)`;
  `optax.adagrad` exactly (an untouched row neither moves nor changes its accumulator).
* `rowwise_adagrad(learning_rate, initial_accumulator_value=0.0, eps=1e-8)`: `(input_dim,)`;
  torchrec / FBGEMM's exact row-wise Adagrad.
* `lazy_adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)`: two `(input_dim, output_dim)`
  moments; TensorFlow's LazyAdam, which is not dense Adam (see `lazy_adam`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from jaxembed import _checks, _mesh, _out_of_range, _paths, _table, functional

__all__ = [
    "RowwiseOptimizer",
    "RowwiseState",
    "adagrad",
    "init_tables",
    "lazy_adam",
    "linen_value_and_grad",
    "merge_tables",
    "nnx_init_tables",
    "nnx_tables",
    "nnx_update_tables",
    "nnx_value_and_grad",
    "rowwise_adagrad",
    "sgd",
    "split_tables",
    "update_tables",
    "value_and_row_grads",
]


class RowwiseState(NamedTuple):
    """A row-wise optimizer's state: the step count and arrays indexed by row (first dim
    `input_dim`); an untouched row's entries never change.

    `count` is an int32 scalar; `rows` holds float32 arrays (`(input_dim, output_dim)` or
    `(input_dim,)`). For a table on a mesh (a `NamedSharding`, or an Explicit mesh under jit),
    `init` places the rows like the table's rows and the count replicated on that mesh.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> state = jaxembed.sparse.adagrad(0.1).init(jnp.zeros((10, 4)))
        >>> int(state.count), [row.shape for row in state.rows]
        (0, [(10, 4)])
    """

    count: jax.Array
    rows: tuple[jax.Array, ...]


class RowwiseOptimizer(NamedTuple):
    """A row-wise optimizer, in optax's style: a pair of pure functions.

    `init(table) -> state`; `update(table, state, ids, row_grads, *, out_of_range="error")
    -> (new_table, new_state)`: the table is a float `(input_dim, output_dim)` matrix (the new
    one keeps its dtype), `ids` integers of any shape and `row_grads` floating
    `ids.shape + (output_dim,)`. An id outside `[0, input_dim)` writes nothing under every
    policy; "error" also raises, as `jaxembed.apply` does.

    On a mesh with Explicit axes, `update` of a table split by rows, or of ids split over the
    batch, runs `jaxembed.sharding.vocab_parallel_update` with the axes read from the arrays'
    types: each device updates its own rows from every id of the step, and the table and
    state come back in the layouts they came in.

    `init` and `update` raise `TypeError` for a non-floating table, non-integer ids or
    non-floating row_grads; `ValueError` for a table that is not 2-D, a state from another
    optimizer or table, misshapen row_grads or an unknown policy; `IndexError` for an
    out-of-range id under "error", for concrete ids.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> optimizer = jaxembed.sparse.sgd(1.0)
        >>> table = jnp.zeros((3, 2))
        >>> table, state = optimizer.update(table, optimizer.init(table), jnp.array([2]),
        ...                                 jnp.ones((1, 2)))
        >>> table.tolist(), int(state.count)
        ([[0.0, 0.0], [0.0, 0.0], [-1.0, -1.0]], 1)
    """

    init: Callable[[jax.Array], RowwiseState]
    update: Callable[..., tuple[jax.Array, RowwiseState]]


# (rows, state rows, summed grads, learning rate, step count before this one)
#   -> (new rows, new state rows); every array is (touched, ...) in float32.
RowStep = Callable[
    [jax.Array, tuple[jax.Array, ...], jax.Array, jax.Array, jax.Array],
    tuple[jax.Array, tuple[jax.Array, ...]],
]


def check_table(table: Any) -> jax.Array:
    """`table` as a 2-D floating JAX array, else an error naming `table`."""
    table = _checks.floating_array("table", table)
    if table.ndim != 2:
        raise ValueError(
            "`table` must be a 2-D (input_dim, output_dim) array. "
            f"Received: table of shape {tuple(table.shape)}."
        )
    return table


def _learning_rate(learning_rate: float | optax.Schedule) -> Callable[[jax.Array], jax.Array]:
    if callable(learning_rate):
        return learning_rate
    if isinstance(learning_rate, jax.Array) and learning_rate.ndim == 0:
        return lambda count: learning_rate  # a JAX scalar, as optax accepts
    rate = _checks.non_negative_float("learning_rate", learning_rate)
    return lambda count: jnp.asarray(rate, jnp.float32)


def _touched_rows(
    ids: ArrayLike, row_grads: ArrayLike, input_dim: int, output_dim: int, out_of_range: str
) -> tuple[jax.Array, jax.Array]:
    """(unique row ids, summed gradients), both of static length `ids.size`.

    Duplicate ids are summed, as the dense gradient sums them. Ids outside the table (and the
    padding of the unique list) become `input_dim`, a row that reads as zeros and is never
    written (`mode="drop"`): under every policy a bad id writes nothing. "error" also raises,
    as `apply` does (eagerly, or through checkify; nothing under plain jit).
    """
    policy = _out_of_range.policy(out_of_range)
    indices = _out_of_range.prepare(ids, input_dim, "error" if policy == "error" else "fill")
    row_grads = _checks.floating_array("row_grads", row_grads)
    expected = (*indices.ids.shape, output_dim)
    if row_grads.shape != expected:
        raise ValueError(
            f"`row_grads` must have shape ids.shape + (output_dim,) = {expected}. "
            f"Received: row_grads of shape {tuple(row_grads.shape)}."
        )
    flat_ids = jnp.where(indices.valid(input_dim), indices.ids, input_dim).reshape(-1)
    flat_grads = row_grads.reshape(-1, output_dim).astype(jnp.float32)
    unique, inverse = jnp.unique(
        flat_ids, size=flat_ids.size, fill_value=input_dim, return_inverse=True
    )
    summed = jnp.zeros_like(flat_grads).at[inverse.reshape(-1)].add(flat_grads)
    return unique, summed


def _check_state(
    state: Any, state_rows: Callable[[jax.Array], tuple[jax.Array, ...]], table: jax.Array
) -> None:
    """Raises unless `state` has the rows this optimizer's `init(table)` makes: a state from
    another optimizer or from a table of another size would otherwise be read and written
    silently wrong (out-of-bounds rows read as zeros and are dropped)."""
    abstract = jax.ShapeDtypeStruct(table.shape, table.dtype)
    expected = [array.shape for array in jax.eval_shape(state_rows, abstract)]
    rows = getattr(state, "rows", None)
    received = None if rows is None else [tuple(jnp.shape(array)) for array in rows]
    if received != expected or not hasattr(state, "count"):
        raise ValueError(
            "`state` must come from this optimizer's `init(table)` for a table of shape "
            f"{tuple(table.shape)}: a RowwiseState whose rows have shapes {expected}. "
            f"Received: state with rows of shapes {received}."
        )


def _placed_like(table: jax.Array, count: jax.Array, rows: tuple[jax.Array, ...]) -> RowwiseState:
    """The state placed on the table's mesh: rows split like the table's rows (a vocab-sharded
    table gets vocab-sharded state, so that a donated, sharded step needs no resharding), the
    count replicated: a global array, as a multi-host checkpoint needs (an eager scalar would
    live on one device of one process)."""
    if _checks.is_traced(table):
        # Under jit, an Explicit mesh carries the table's sharding in its type; on Auto axes
        # jit's shardings decide.
        if _mesh.explicit_mesh(table) is None:
            return RowwiseState(count, rows)
        sharding, put = jax.typeof(table).sharding, jax.sharding.reshard
    else:
        sharding, put = getattr(table, "sharding", None), jax.device_put
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return RowwiseState(count, rows)

    def place(array: jax.Array, *spec: Any) -> jax.Array:
        return put(
            array, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
        )

    rows_spec = tuple(sharding.spec)[:1]
    return RowwiseState(
        place(count),
        tuple(place(array, *rows_spec, *(None,) * (array.ndim - 1)) for array in rows),
    )


def _rowwise(
    learning_rate: float | optax.Schedule,
    state_rows: Callable[[jax.Array], tuple[jax.Array, ...]],
    step: RowStep,
) -> RowwiseOptimizer:
    """The shared machinery: `step` sees only the touched rows; this gathers and scatters."""
    schedule = _learning_rate(learning_rate)

    def init(table: ArrayLike) -> RowwiseState:
        table = check_table(table)
        return _placed_like(table, jnp.zeros((), jnp.int32), state_rows(table))

    def update(
        table: ArrayLike,
        state: RowwiseState,
        ids: ArrayLike,
        row_grads: ArrayLike,
        *,
        out_of_range: str = "error",
    ) -> tuple[jax.Array, RowwiseState]:
        table = check_table(table)
        caller = "A row-wise update on an Explicit mesh"
        if (split := _mesh.vocab_parallel_axes(table, ids, caller)) is not None:
            # On an Explicit mesh a global `jnp.unique` of sharded ids has no sharding, and a
            # vocab-split table has rows to touch on every device: each device updates its
            # own rows from every id of the step instead (a shard_map).
            from jaxembed import sharding

            new_table, new_state = sharding.vocab_parallel_update(
                RowwiseOptimizer(init, update),
                table,
                state,
                ids,
                row_grads,
                vocab_axis=split[0],
                batch_axes=split[1],
                out_of_range=out_of_range,
            )
            # Back to the layouts passed in (a table also split by columns, say): a step's
            # outputs must take its inputs' places.
            return jax.tree.map(_mesh.like, (new_table, new_state), (table, state))
        input_dim, output_dim = table.shape
        _check_state(state, state_rows, table)
        unique, summed = _touched_rows(ids, row_grads, input_dim, output_dim, out_of_range)

        def read(array: jax.Array) -> jax.Array:
            return array.at[unique].get(mode="fill", fill_value=0).astype(jnp.float32)

        def write(array: jax.Array, new: jax.Array) -> jax.Array:
            return array.at[unique].set(new.astype(array.dtype), mode="drop")

        rows, slices = step(
            read(table),
            tuple(read(array) for array in state.rows),
            summed,
            jnp.asarray(schedule(state.count), jnp.float32),
            state.count,
        )
        new_state = RowwiseState(
            optax.safe_increment(state.count),
            tuple(write(array, new) for array, new in zip(state.rows, slices, strict=True)),
        )
        return write(table, rows), new_state

    return RowwiseOptimizer(init, update)


def sgd(learning_rate: float | optax.Schedule) -> RowwiseOptimizer:
    """`row -= learning_rate * g` on the touched rows: `optax.sgd(learning_rate)` exactly.

    Returns a `RowwiseOptimizer` (its `update`'s shapes and errors are documented there), as
    every optimizer here.

    Raises:
        ValueError: a negative or non-finite learning rate (a schedule is taken as it is), as
            every optimizer here for its own hyperparameters.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> optimizer = jaxembed.sparse.sgd(0.5)
        >>> table = jnp.zeros((4, 2))
        >>> table, _ = optimizer.update(table, optimizer.init(table), jnp.array([1, 1]),
        ...                             jnp.ones((2, 2)))
        >>> table[:, 0].tolist()  # duplicates summed: 0 - 0.5 * 2
        [0.0, -1.0, 0.0, 0.0]
    """

    def step(rows, slices, grads, rate, count):
        return rows - rate * grads, slices

    return _rowwise(learning_rate, lambda table: (), step)


def adagrad(
    learning_rate: float | optax.Schedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
) -> RowwiseOptimizer:
    """`optax.adagrad` on the touched rows only, with the same numbers.

    An untouched row has a zero gradient, so dense Adagrad neither moves it nor changes its
    accumulator: skipping it changes nothing.

    Raises:
        ValueError: a negative or non-finite learning rate, accumulator value or eps.

    Example:
        >>> import jax.numpy as jnp, optax, jaxembed
        >>> table, ids, grads = jnp.ones((5, 2)), jnp.array([0, 3]), jnp.ones((2, 2))
        >>> optimizer = jaxembed.sparse.adagrad(0.1)
        >>> sparse, _ = optimizer.update(table, optimizer.init(table), ids, grads)
        >>> dense_tx = optax.adagrad(0.1)
        >>> dense_grads = jnp.zeros((5, 2)).at[ids].add(grads)
        >>> updates, _ = dense_tx.update(dense_grads, dense_tx.init(table))
        >>> bool(jnp.all(sparse == optax.apply_updates(table, updates)))
        True
    """
    initial = _checks.non_negative_float("initial_accumulator_value", initial_accumulator_value)
    eps = _checks.non_negative_float("eps", eps)

    def state_rows(table: jax.Array) -> tuple[jax.Array, ...]:
        return (jnp.full(table.shape, initial, jnp.float32),)

    def step(rows, slices, grads, rate, count):
        (sum_of_squares,) = slices
        sum_of_squares = sum_of_squares + jnp.square(grads)
        # optax.scale_by_rss, term for term.
        scale = jnp.where(sum_of_squares > 0, jax.lax.rsqrt(sum_of_squares + eps), 0.0)
        return rows - rate * (scale * grads), (sum_of_squares,)

    return _rowwise(learning_rate, state_rows, step)


def rowwise_adagrad(
    learning_rate: float | optax.Schedule,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-8,
) -> RowwiseOptimizer:
    """Row-wise Adagrad (torchrec / FBGEMM's exact row-wise Adagrad): one accumulator per row.

    `accumulator += mean(g**2)` over the row, then `row -= learning_rate * g /
    (sqrt(accumulator) + eps)`. The state is `input_dim` floats instead of `input_dim *
    output_dim`: the usual choice for very large tables.

    Raises:
        ValueError: a negative or non-finite learning rate, accumulator value or eps.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> optimizer = jaxembed.sparse.rowwise_adagrad(1.0)
        >>> table = jnp.zeros((1000, 64))
        >>> optimizer.init(table).rows[0].shape  # one float per row
        (1000,)
    """
    initial = _checks.non_negative_float("initial_accumulator_value", initial_accumulator_value)
    eps = _checks.non_negative_float("eps", eps)

    def state_rows(table: jax.Array) -> tuple[jax.Array, ...]:
        return (jnp.full(table.shape[:1], initial, jnp.float32),)

    def step(rows, slices, grads, rate, count):
        (accumulator,) = slices
        accumulator = accumulator + jnp.mean(jnp.square(grads), axis=-1)
        multiplier = rate / (jnp.sqrt(accumulator) + eps)
        return rows - multiplier[:, None] * grads, (accumulator,)

    return _rowwise(learning_rate, state_rows, step)


def _decay_rate(name: str, value: Any) -> float:
    """A moment decay rate in [0, 1) (1 would divide by zero in the bias correction)."""
    rate = _checks.non_negative_float(name, value)
    if rate >= 1:
        raise ValueError(f"`{name}` must lie in [0, 1). Received: {name}={value!r}.")
    return rate


def lazy_adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> RowwiseOptimizer:
    """TensorFlow's LazyAdam: Adam on the touched rows, moments of the others left alone.

    With `t` the global step (1 on the first update, counted over all updates, not per row):
    `m = b1 * m + (1 - b1) * g`, `v = b2 * v + (1 - b2) * g**2`, and
    `row -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)` (TensorFlow's epsilon
    placement: outside the square root, after the bias correction folded into the rate).

    How it differs from dense Adam (`optax.adam`): dense Adam keeps moving a row whose
    gradient is zero this step, on the momentum of earlier steps, and decays its moments;
    LazyAdam leaves such a row and its moments untouched until its id comes back. For rows
    seen in every step (small vocabularies, frequent tokens) the two agree up to the epsilon
    placement; for rare ids LazyAdam takes fewer, larger steps. That is what large sparse
    tables want (TensorFlow, torch's SparseAdam and TPU embeddings do the same); use dense
    optax Adam when every row is touched every step anyway.

    Raises:
        ValueError: a negative or non-finite learning rate or eps, or `b1`, `b2` outside
            [0, 1).

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> optimizer = jaxembed.sparse.lazy_adam(0.1)
        >>> table = jnp.zeros((3, 1))
        >>> table, state = optimizer.update(table, optimizer.init(table), jnp.array([2]),
        ...                                 jnp.ones((1, 1)))
        >>> [round(x, 4) for x in table[:, 0].tolist()]  # first step: -lr * sign(g)
        [0.0, 0.0, -0.1]
    """
    b1 = _decay_rate("b1", b1)
    b2 = _decay_rate("b2", b2)
    eps = _checks.non_negative_float("eps", eps)

    def state_rows(table: jax.Array) -> tuple[jax.Array, ...]:
        return (jnp.zeros(table.shape, jnp.float32), jnp.zeros(table.shape, jnp.float32))

    def step(rows, slices, grads, rate, count):
        mu, nu = slices
        t = (count + 1).astype(jnp.float32)
        mu = b1 * mu + (1 - b1) * grads
        nu = b2 * nu + (1 - b2) * jnp.square(grads)
        corrected = rate * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        return rows - corrected * mu / (jnp.sqrt(nu) + eps), (mu, nu)

    return _rowwise(learning_rate, state_rows, step)


def value_and_row_grads(
    loss_fn: Callable[..., jax.Array],
    params: functional.Params,
    ids: ArrayLike,
    *args: Any,
    has_aux: bool = False,
    out_of_range: str = "error",
) -> tuple[Any, jax.Array]:
    """The loss and its gradient with respect to the looked-up rows, never the table's.

    Looks up `rows = jaxembed.apply(params, ids, out_of_range=...)`, then differentiates
    `loss_fn(rows, *args)` with respect to `rows` only: no `(input_dim, output_dim)` gradient
    is built. Feed the result to a row-wise optimizer's `update` with the same ids.

    Returns:
        `(loss, row_grads)` (`((loss, aux), row_grads)` with `has_aux`); `row_grads` has shape
        `ids.shape + (output_dim,)` and the table's dtype.

    Raises:
        ValueError: params with stacked adapters or trainable tokens; otherwise what
            `jaxembed.apply` raises for these params and ids.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 100, 4)
        >>> ids = jnp.array([[1, 2, 2]])
        >>> loss, row_grads = jaxembed.sparse.value_and_row_grads(
        ...     lambda rows: jnp.sum(rows**2), params, ids)
        >>> row_grads.shape
        (1, 3, 4)
    """
    # Trainable tokens freeze the table: their rows' gradient belongs to the delta.
    _table.refuse(_table.view(params), "sparse.value_and_row_grads")
    rows = functional.apply(params, ids, out_of_range=out_of_range)
    return jax.value_and_grad(loss_fn, has_aux=has_aux)(rows, *args)


# --- Whole Flax models: row-sparse tables beside densely trained layers -------------------

Tables = dict[str, jax.Array]
"""Trainable tables of a model by their params path, e.g. {"Embed_0/embeddings": table}."""

RowBatches = dict[str, tuple[jax.Array, jax.Array]]
"""Per table path: (ids, row_grads) of every lookup the step made, flattened and joined."""

_SEPARATOR = "/"


def split_tables(params: Any) -> tuple[Tables, Any]:
    """Splits a model's params into its trainable jaxembed tables and everything else.

    A table is a leaf named "embeddings" without a LoRA adapter beside it (tables under LoRA
    are frozen and stay in the rest). The rest keeps the params' structure with `None` where
    a table was (optax and `jax.grad` skip `None`); `merge_tables` joins the two again.

    Args:
        params: a linen model's `variables["params"]` (flax's partitioning boxes may stay:
            the tables are taken out of them and put back by `merge_tables`).

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = {"tokens": {"embeddings": jnp.ones((10, 4))}, "head": {"kernel": jnp.ones(4)}}
        >>> tables, rest = jaxembed.sparse.split_tables(params)
        >>> list(tables), rest["tokens"]["embeddings"] is None
        (['tokens/embeddings'], True)
    """
    frozen = _paths.frozen_tables(params)
    tables: Tables = {}

    def take(path: tuple[Any, ...], leaf: Any) -> Any:
        names = _paths.names(path)
        if names and names[-1] in _table.table_keys() and names not in frozen:
            tables[_SEPARATOR.join(names)] = leaf
            return None
        return leaf

    rest = jax.tree_util.tree_map_with_path(take, params)
    return tables, rest


def merge_tables(tables: Tables, rest: Any) -> Any:
    """Inverse of `split_tables`: the model's params with every table back in its place.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> params = {"tokens": {"embeddings": jnp.ones((10, 4))}, "head": {"kernel": jnp.ones(4)}}
        >>> merged = jaxembed.sparse.merge_tables(*jaxembed.sparse.split_tables(params))
        >>> merged["tokens"]["embeddings"] is params["tokens"]["embeddings"]
        True
    """

    def put(path: tuple[Any, ...], leaf: Any) -> Any:
        if leaf is None:
            return tables.get(_SEPARATOR.join(_paths.names(path)), leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(put, rest, is_leaf=lambda leaf: leaf is None)


def init_tables(optimizer: RowwiseOptimizer, tables: Tables) -> dict[str, RowwiseState]:
    """`optimizer.init` for every table of `split_tables`, by the same paths.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> tables = {"tokens/embeddings": jnp.ones((10, 4))}
        >>> states = jaxembed.sparse.init_tables(jaxembed.sparse.adagrad(0.1), tables)
        >>> states["tokens/embeddings"].rows[0].shape
        (10, 4)
    """
    return {path: optimizer.init(table) for path, table in tables.items()}


def update_tables(
    optimizer: RowwiseOptimizer,
    tables: Tables,
    states: dict[str, RowwiseState],
    rows: RowBatches,
) -> tuple[Tables, dict[str, RowwiseState]]:
    """`optimizer.update` for every table the step looked up (`linen_value_and_grad`'s rows);
    tables it did not look up are returned as they are.

    Args:
        optimizer: a `RowwiseOptimizer`.
        tables: `split_tables`'s tables, `(input_dim, output_dim)` float matrices by path.
        states: `init_tables(optimizer, tables)`.
        rows: per path, flat int ids `(n,)` and their row gradients `(n, output_dim)`.

    Returns:
        `(new_tables, new_states)`, by the same paths.

    Raises:
        KeyError: a path of `rows` missing from `tables` or `states`.
        ValueError, TypeError: as the optimizer's `update`.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> optimizer, tables = jaxembed.sparse.sgd(1.0), {"embeddings": jnp.zeros((3, 1))}
        >>> rows = {"embeddings": (jnp.array([1]), jnp.ones((1, 1)))}
        >>> tables, states = jaxembed.sparse.update_tables(
        ...     optimizer, tables, jaxembed.sparse.init_tables(optimizer, tables), rows)
        >>> tables["embeddings"].ravel().tolist()
        [0.0, -1.0, 0.0]
    """
    tables, states = dict(tables), dict(states)
    for path, (ids, row_grads) in rows.items():
        # Ids were already checked (or clamped) by the lookup's own policy; any id still
        # outside the table must write nothing.
        tables[path], states[path] = optimizer.update(
            tables[path], states[path], ids, row_grads, out_of_range="fill"
        )
    return tables, states


def linen_value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any, RowBatches]]:
    """`jax.value_and_grad` for a linen model whose jaxembed tables train row-sparsely.

    `loss_fn(params, *args)` is an ordinary loss that calls `model.apply({"params": params},
    ...)`. The returned function takes `(tables, rest, *args)` from `split_tables` and gives
    `(loss, rest_grads, rows)`: the gradient of every other param (dense, for optax), and per
    table the ids it looked up with the gradient of the loss with respect to those rows, for
    `update_tables`. No `(input_dim, output_dim)` gradient is built: every lookup of a
    jaxembed `Embedding` is perturbed by a zero of its rows' shape (flax's method
    interceptors; the modules need no argument), and the tables are constants of the loss.

    A tied table (`attend`) gets a dense gradient from the logits by nature: it is refused
    here with an error rather than silently losing that gradient; train such a model densely.

    Raises:
        ValueError: a `has_aux` that is not a bool; when called, a tied table among `tables`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxembed
        >>> model = jaxembed.Embedding(1000, 4)
        >>> ids = jnp.array([[1, 2, 2]])
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> tables, rest = jaxembed.sparse.split_tables(params)
        >>> loss_fn = lambda p, ids: jnp.sum(model.apply({"params": p}, ids) ** 2)
        >>> loss, rest_grads, rows = jaxembed.sparse.linen_value_and_grad(loss_fn)(
        ...     tables, rest, ids)
        >>> ids_seen, row_grads = rows["embeddings"]
        >>> ids_seen.tolist(), row_grads.shape
        ([1, 2, 2], (3, 4))
    """
    import flax.linen as nn

    from jaxembed.linen import Embedding

    _checks.boolean("has_aux", has_aux)

    def table_path(context: Any, tables: Tables) -> str | None:
        """The path of the trainable table a jaxembed module call reads, if any."""
        if not isinstance(context.module, Embedding):
            return None
        suffix = (*context.module.path, _table.EMBEDDINGS)
        for path in tables:
            names = tuple(path.split(_SEPARATOR))
            if names[-len(suffix) :] == suffix:
                return path
        return None

    def value_and_grad(tables: Tables, rest: Any, *args: Any) -> tuple[Any, Any, RowBatches]:
        constants = {path: jax.lax.stop_gradient(table) for path, table in tables.items()}

        def run(interceptor: Any, rest: Any) -> Any:
            with nn.intercept_methods(interceptor):
                return loss_fn(merge_tables(constants, rest), *args)

        shapes: dict[str, list[jax.ShapeDtypeStruct]] = {}

        def record(next_fun, call_args, call_kwargs, context):
            rows = next_fun(*call_args, **call_kwargs)
            path = table_path(context, tables)
            if path is not None and context.method_name == "__call__":
                shapes.setdefault(path, []).append(jax.ShapeDtypeStruct(rows.shape, rows.dtype))
            return rows

        jax.eval_shape(lambda: run(record, rest))  # shapes of every lookup, at trace time only
        zeros = {
            path: [jnp.zeros(s.shape, s.dtype) for s in found] for path, found in shapes.items()
        }

        def inner(rest: Any, perturbations: dict[str, list[jax.Array]]) -> Any:
            seen: dict[str, list[jax.Array]] = {path: [] for path in perturbations}

            def perturb(next_fun, call_args, call_kwargs, context):
                path = table_path(context, tables)
                if path is not None and context.method_name.startswith("attend"):
                    raise ValueError(
                        f"linen_value_and_grad: the table {path!r} is tied (`attend`): the "
                        "logits give it a dense gradient, which a row-sparse update would "
                        "drop. Train tied tables densely (leave them out of `split_tables`'s "
                        "tables) or untie them."
                    )
                rows = next_fun(*call_args, **call_kwargs)
                if path is None or context.method_name != "__call__":
                    return rows
                module = context.module
                ids = _out_of_range.update_ids(
                    call_args[0], module.input_dim, module.out_of_range, module.padding_idx
                )
                perturbation = perturbations[path][len(seen[path])]
                seen[path].append(ids)
                return rows + perturbation

            result = run(perturb, rest)
            loss, aux = result if has_aux else (result, None)
            return loss, (aux, seen)

        (loss, (aux, seen)), (rest_grads, row_grads) = jax.value_and_grad(
            inner, argnums=(0, 1), has_aux=True
        )(rest, zeros)
        rows = {
            path: (
                jnp.concatenate([ids.reshape(-1) for ids in seen[path]]),
                jnp.concatenate([_flat_rows(g) for g in row_grads[path]]),
            )
            for path in seen
        }
        return ((loss, aux) if has_aux else loss), rest_grads, rows

    return value_and_grad


def _nnx_sparse_layers(model: Any) -> dict[str, Any]:
    """Every jaxembed NNX layer in `model` whose table trains (no LoRA adapter, no trainable
    tokens, not quantized), by path."""
    from flax import nnx

    from jaxembed.nnx import Embedding

    return {
        _SEPARATOR.join(map(str, path)): module
        for path, module in nnx.iter_graph(model)
        if isinstance(module, Embedding) and module._table_trains()
    }


def nnx_tables(model: Any) -> Any:
    """An NNX filter for the tables `nnx_value_and_grad` trains row-sparsely; combine it with
    `nnx.Not` to give every other param to an `nnx.Optimizer`.

    Example:
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
        >>> list(nnx.state(layer, jaxembed.sparse.nnx_tables(layer)).keys())
        ['embeddings']
    """
    layers = _nnx_sparse_layers(model)

    def is_table(path: tuple[Any, ...], value: Any) -> bool:
        names = tuple(map(str, path))
        return (
            bool(names)
            and names[-1] == _table.EMBEDDINGS
            and (_SEPARATOR.join(names[:-1]) in layers)
        )

    return is_table


def nnx_init_tables(optimizer: RowwiseOptimizer, model: Any) -> dict[str, RowwiseState]:
    """`optimizer.init` for every table `nnx_tables` selects, by layer path.

    Example:
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
        >>> states = jaxembed.sparse.nnx_init_tables(jaxembed.sparse.sgd(0.1), layer)
        >>> list(states), int(states[""].count)  # the layer is the model: its path is ""
        ([''], 0)
    """
    return {
        path: optimizer.init(layer.embeddings[...])
        for path, layer in _nnx_sparse_layers(model).items()
    }


def nnx_update_tables(
    optimizer: RowwiseOptimizer,
    model: Any,
    states: dict[str, RowwiseState],
    rows: RowBatches,
) -> dict[str, RowwiseState]:
    """Updates the looked-up tables of `model` in place (`nnx_value_and_grad`'s rows) and
    returns the new optimizer states.

    Raises:
        KeyError: a path of `rows` that is not a row-sparse layer of `model` or has no state.
        ValueError, TypeError: as the optimizer's `update`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(10, 4, weights=jnp.zeros((10, 4)), rngs=nnx.Rngs(0))
        >>> optimizer = jaxembed.sparse.sgd(1.0)
        >>> states = jaxembed.sparse.nnx_init_tables(optimizer, layer)
        >>> rows = {"": (jnp.array([2]), jnp.ones((1, 4)))}
        >>> states = jaxembed.sparse.nnx_update_tables(optimizer, layer, states, rows)
        >>> layer.embeddings[2].tolist(), int(states[""].count)
        ([-1.0, -1.0, -1.0, -1.0], 1)
    """
    layers, states = _nnx_sparse_layers(model), dict(states)
    for path, (ids, row_grads) in rows.items():
        layer = layers[path]
        table, states[path] = optimizer.update(
            layer.embeddings[...], states[path], ids, row_grads, out_of_range="fill"
        )
        layer.embeddings[...] = table
    return states


def _flat_rows(row_grads: jax.Array) -> jax.Array:
    return row_grads.reshape(-1, row_grads.shape[-1])


def nnx_value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any, RowBatches]]:
    """`nnx.value_and_grad` for an NNX model whose jaxembed tables train row-sparsely.

    `loss_fn(model, *args)` is an ordinary loss. The returned function takes `(model, *args)`
    and gives `(loss, grads, rows)`: `grads` for every `nnx.Param` except the tables
    (`nnx_tables`), for an `nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param,
    nnx.Not(jaxembed.sparse.nnx_tables(model))))`, and per layer path the ids it looked up
    with the gradient of the loss with respect to those rows, for `nnx_update_tables`. The
    layers record ids and rows through flax's `nnx.capture` (`jaxembed.nnx.RowIds`,
    `jaxembed.nnx.RowGradient`); call each layer once per step. Tied tables (`attend`) get a
    dense gradient from the logits: leave them out (give them LoRA or train densely).

    Raises:
        ValueError: a `has_aux` that is not a bool; when called, a row-sparse table that the
            loss also uses through `attend`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(100, 4, rngs=nnx.Rngs(0))
        >>> loss, grads, rows = jaxembed.sparse.nnx_value_and_grad(
        ...     lambda layer, ids: jnp.sum(layer(ids) ** 2))(layer, jnp.array([3, 3, 7]))
        >>> ids, row_grads = rows[""]  # the layer is the model: its path is empty
        >>> ids.tolist(), row_grads.shape
        ([3, 3, 7], (3, 4))
    """
    from flax import nnx

    from jaxembed.nnx import RowGradient, RowIds

    _checks.boolean("has_aux", has_aux)

    def value_and_grad(model: Any, *args: Any) -> tuple[Any, Any, RowBatches]:
        tables = nnx_tables(model)
        shapes = nnx.eval_shape(
            lambda model: nnx.capture(loss_fn, RowGradient)(model, *args)[1], model
        )
        perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def inner(model: Any, perturbations: Any) -> Any:
            result, ids = nnx.capture(loss_fn, RowIds, init=perturbations)(model, *args)
            loss, aux = result if has_aux else (result, None)
            return loss, (aux, ids)

        wrt = nnx.DiffState(0, nnx.All(nnx.Param, nnx.Not(tables)))
        (loss, (aux, ids)), (grads, row_grads) = nnx.value_and_grad(
            inner, argnums=(wrt, 1), has_aux=True
        )(model, perturbations)
        found_ids = {
            _SEPARATOR.join(map(str, path[:-1])): variable
            for path, variable in nnx.to_flat_state(ids)
        }
        found_grads = {
            _SEPARATOR.join(map(str, path[:-1])): variable
            for path, variable in nnx.to_flat_state(row_grads)
        }
        rows = {
            path: (
                jnp.concatenate([i.reshape(-1) for i in found_ids[path].get_value()]),
                _flat_rows(found_grads[path][...]),
            )
            for path in found_grads
        }
        return ((loss, aux) if has_aux else loss), grads, rows

    return value_and_grad
