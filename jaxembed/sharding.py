"""Embedding tables on device meshes: output shardings for Explicit meshes, and a
vocab-parallel lookup under `jax.shard_map`.

Example:
    >>> import jax, jax.numpy as jnp, jaxembed
    >>> mesh = jax.make_mesh((1,), ("model",))  # one device here; ("model",) splits the rows
    >>> params, ids = jaxembed.init(jax.random.key(0), 8, 2), jnp.array([[1, 7]])
    >>> out = jaxembed.sharding.vocab_parallel_apply(params, ids, mesh=mesh, vocab_axis="model")
    >>> bool((out == jaxembed.apply(params, ids)).all())
    True

JAX's SPMD partitioner does the work in both of its modes:

* **Auto** axes: the partitioner picks shardings; a gather from a row-sharded table compiles
  to a masked local gather plus an all-reduce of the output, never an all-gather of the table.
* **Explicit** axes (the `jax.make_mesh` default): shardings are part of the types and a
  gather whose output sharding is ambiguous is refused (plain `jnp.take` on a row-sharded
  table raises). `jaxembed.apply` and `jaxembed.attend` derive the output sharding from the
  ids' (or query's) and the table's, so they need no extra argument on either kind of mesh.

`vocab_parallel_apply` spells the vocab-parallel lookup out with `jax.shard_map` (each shard
gathers the ids it owns, zeros elsewhere, one `psum`). Measured against what the partitioner
emits for `jaxembed.apply` (benchmarks/RESULTS.md), it moves the same collectives for a
vocab-parallel table, LoRA included, and more for other layouts: `apply` therefore keeps the
partitioner's lookup, and `vocab_parallel_apply` is the building block for code that is
already inside `shard_map` or wants the communication spelled out.

`vocab_parallel_update` is the training side for the row-wise optimizers of `jaxembed.sparse`
on a vocab-sharded table: each shard updates only the rows it owns, and only id- and row-sized
arrays cross devices (two all-gathers over the batch axes: the ids and the row gradients).
On Explicit axes `optimizer.update` calls it by itself (the axes read from the arrays' types;
a global `jnp.unique` of ids sharded over the batch has no sharding there); on Auto axes
plain `jax.jit(optimizer.update)` moves row-sized arrays too but more of them (all-reduces of
the touched rows of the table and of the state over the vocab axis).

`vocab_parallel_attend_cross_entropy` is `jaxembed.attend_cross_entropy` on a vocab-sharded
table: each shard walks its own rows for its own tokens and only per-token statistics cross
devices (a partial logsumexp, the label's logit, the logits' sum). On Explicit axes
`attend_cross_entropy` calls it by itself (the axes read from the arrays' types); on Auto
axes plain `jax.jit` of `attend_cross_entropy` all-gathers the whole table forward and
backward (JAX 0.10).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jax.typing import ArrayLike, DTypeLike

from jaxembed import _checks, _mesh, _out_of_range, _table, lora, loss, sparse
from jaxembed._mesh import SpecEntry, attend_shardings, gather_sharding

__all__ = [
    "attend_shardings",
    "gather_sharding",
    "vocab_parallel_apply",
    "vocab_parallel_attend_cross_entropy",
    "vocab_parallel_update",
]


def _context_mesh(caller: str = "vocab_parallel_apply", arrays: str = "the params or ids") -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(
            f"{caller} needs a mesh: pass `mesh=`, place {arrays} on a mesh "
            "with Explicit axes, or set one with `jax.set_mesh`. Received: mesh=None."
        )
    return mesh


def _without_trivial_axes(mesh: Any, axes: SpecEntry) -> SpecEntry:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(name for name in names if mesh.shape[name] > 1)
    return kept[0] if len(kept) == 1 else (kept or None)


def _vocab_axis_size(
    mesh: Any, vocab_axis: str, input_dim: int, caller: str = "vocab_parallel_apply"
) -> int:
    if vocab_axis not in mesh.axis_names:
        raise ValueError(
            f"`vocab_axis` must be an axis of the mesh {tuple(mesh.axis_names)}. "
            f"Received: vocab_axis={vocab_axis!r}."
        )
    size = mesh.shape[vocab_axis]
    if input_dim % size:
        raise ValueError(
            f"{caller} needs input_dim divisible by the size of mesh axis "
            f"{vocab_axis!r} ({size}). Received: input_dim={input_dim}; pad the vocabulary to "
            f"{-(-input_dim // size) * size}."
        )
    return size


def vocab_parallel_apply(
    params: _table.Params,
    ids: ArrayLike,
    *,
    vocab_axis: str,
    mesh: jax.sharding.Mesh | None = None,
    batch_axes: SpecEntry = None,
    dtype: DTypeLike | None = None,
    out_of_range: str = "error",
    lora_alpha: float | None = None,
    use_rslora: bool = False,
) -> jax.Array:
    """`jaxembed.apply` as an explicit vocab-parallel `jax.shard_map`.

    The table (and LoRA's A) is split by rows over `vocab_axis`; each shard gathers the ids it
    owns, writes zeros for the others, and one `psum` over `vocab_axis` completes every row.
    With LoRA the psum carries the rank-r rows of A, not output_dim-wide rows of the delta
    (as `jaxembed.apply`'s gather-first LoRA does under the partitioner).

    Args:
        params: from `init` / `enable_lora`; input_dim divisible by the `vocab_axis` size.
        ids: integer array of rank >= 1; its first dimension is split over `batch_axes`.
        vocab_axis: mesh axis that splits the vocabulary.
        mesh: the device mesh (Auto or Explicit axes); None takes the mesh in the params' or
            ids' types, else the one set with `jax.set_mesh`.
        batch_axes: mesh axis (or axes) that split the ids' first dimension, or None.
        dtype, out_of_range, lora_alpha, use_rslora: as `jaxembed.apply`; "fill" gives NaN
            rows here too.

    Returns:
        `ids.shape + (output_dim,)` in `dtype` (None: the table's), first dimension split over
        `batch_axes`.

    Raises:
        TypeError: non-integer ids.
        ValueError: malformed params, stacked adapters or trainable tokens, scalar ids, no
            mesh, a `vocab_axis` not in the mesh or whose size does not divide `input_dim`,
            or a bad option.
        IndexError: an out-of-range id under "error", for concrete ids.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> params = jaxembed.init(jax.random.key(0), 8, 2)
        >>> out = jaxembed.sharding.vocab_parallel_apply(
        ...     params, jnp.array([[1, 7]]), mesh=mesh, vocab_axis="model")
        >>> bool((out == jaxembed.apply(params, jnp.array([[1, 7]]))).all())
        True
    """
    table = _table.view(params)
    _table.refuse(table, "vocab_parallel_apply")
    ids = _checks.integer_ids(ids)
    if ids.ndim == 0:
        raise ValueError(
            "vocab_parallel_apply needs ids of rank >= 1 (their first dimension is split over "
            "`batch_axes`). Received: a scalar id; use `jaxembed.apply` or `ids[None]`."
        )
    dtype = _checks.optional_floating_dtype("dtype", dtype) or table.dtype
    lora.check_alpha(lora_alpha)
    _checks.boolean("use_rslora", use_rslora)
    adapter = table.adapter
    lora_scale = None if adapter is None else lora.scale(adapter.rank, lora_alpha, use_rslora)
    input_dim = table.input_dim
    mesh = mesh or _mesh.explicit_mesh(table.leading, ids) or _context_mesh()
    _vocab_axis_size(mesh, vocab_axis, input_dim)
    indices = _out_of_range.prepare(ids, input_dim, out_of_range)
    kind = table.kind

    def owned_rows(shard_rows: int, global_ids: jax.Array, gather: Any) -> jax.Array:
        """Rows of the ids this shard owns, zeros for the others, summed over the shards."""
        local = global_ids - jax.lax.axis_index(vocab_axis) * shard_rows
        owned = (local >= 0) & (local < shard_rows)
        rows = gather(_out_of_range.Indices(jnp.clip(local, 0, shard_rows - 1), fill=False))
        return jax.lax.psum(jnp.where(owned[..., None], rows, 0), vocab_axis)

    def local_lookup(table_shards, global_ids, adapter_shards):
        shard_rows = table_shards[kind.keys[0]].shape[0]
        rows = owned_rows(shard_rows, global_ids, lambda at: kind.gather(table_shards, at))
        if adapter_shards:
            a_shard, b = adapter_shards
            # The psum carries A's rank-r rows; the delta is formed after it, as in `apply`.
            a_rows = owned_rows(shard_rows, global_ids, lambda at: _table.take_rows(a_shard, at))
            rows = lora.add_delta(rows, a_rows, b, lora_scale)
        if indices.fill:
            valid = _out_of_range.Indices(global_ids, fill=True).valid(input_dim)
            rows = jnp.where(valid[..., None], rows, jnp.nan)
        return rows.astype(dtype)

    def split_rows(array: Any) -> PartitionSpec:
        return PartitionSpec(vocab_axis, *(None,) * (np.ndim(array) - 1))

    # A mesh axis of size 1 splits nothing, but shard_map's transpose would still all-reduce
    # the table's gradient over it.
    ids_spec = PartitionSpec(_without_trivial_axes(mesh, batch_axes))
    adapter = tuple(table.adapter or ())
    arrays = (table.arrays, indices.ids, adapter)
    specs = (
        {key: split_rows(array) for key, array in table.arrays.items()},
        ids_spec,
        (split_rows(adapter[0]), PartitionSpec(None, None)) if adapter else (),
    )
    if AxisType.Explicit in mesh.axis_types:
        # On Explicit axes shard_map takes inputs whose types already carry its in_specs.
        arrays = jax.tree.map(
            lambda array, spec: jax.sharding.reshard(array, NamedSharding(mesh, spec)),
            arrays,
            specs,
        )
    return _compiled(local_lookup, mesh, specs, ids_spec)(*arrays)


def vocab_parallel_update(
    optimizer: sparse.RowwiseOptimizer,
    table: ArrayLike,
    state: sparse.RowwiseState,
    ids: ArrayLike,
    row_grads: ArrayLike,
    *,
    vocab_axis: str | None,
    mesh: jax.sharding.Mesh | None = None,
    batch_axes: SpecEntry = None,
    out_of_range: str = "error",
) -> tuple[jax.Array, sparse.RowwiseState]:
    """`optimizer.update` (a `jaxembed.sparse` optimizer) on a vocab-sharded table, as a
    `jax.shard_map` in which each shard updates only the rows it owns.

    The table and the state's rows are split by rows over `vocab_axis`; ids and row_grads are
    split over `batch_axes`. Each device all-gathers the ids and row_grads over `batch_axes`
    (id- and row-sized traffic, nothing else crosses devices), maps the ids it owns to rows of
    its shard and drops the others, then runs `optimizer.update` on its shard of the table and
    of the state. Every device thus sees every id of the step: duplicates are summed across
    the whole batch, and the result equals the unsharded `optimizer.update`. The step count is
    replicated.

    Args:
        optimizer: a row-wise optimizer (`jaxembed.sparse.sgd`, `adagrad`, ...).
        table: `(input_dim, output_dim)`, input_dim divisible by the `vocab_axis` size;
            best placed as `P(vocab_axis, None)` already (else it is moved there).
        state: `optimizer.init(table)`, its rows placed like the table (their first dimension
            split over `vocab_axis`, as `init` places them for a table already split so), its
            count replicated; the returned state is placed so.
        ids: integer array of rank >= 1; its first dimension is split over `batch_axes`.
        row_grads: `ids.shape + (output_dim,)`, the gradient with respect to the looked-up
            rows (`jaxembed.sparse.value_and_row_grads`), split like the ids.
        vocab_axis: mesh axis that splits the vocabulary; None: the table is whole on
            every device (data parallelism alone: each device applies every id's update).
        mesh: the device mesh (Auto or Explicit axes); None takes the mesh in the arrays'
            types, else the one set with `jax.set_mesh`.
        batch_axes: mesh axis (or axes) that split the ids' first dimension, or None.
        out_of_range: as `optimizer.update`: an id outside `[0, input_dim)` writes nothing
            under every policy; "error" also raises (eagerly, or through checkify), checked
            once on the global ids.

    Returns:
        `(new_table, new_state)`: the table and the state's rows split by rows over
        `vocab_axis`, the count replicated. Jit with `donate_argnums` on the table and the
        state to update them in place.

    Raises:
        TypeError: non-integer ids, or a non-floating table or row_grads.
        ValueError: a table that is not 2-D, scalar ids, misshapen row_grads
            or state, no mesh, a `vocab_axis` not in the mesh or whose size does not divide
            `input_dim`, or an unknown `out_of_range`.
        IndexError: an out-of-range id under "error", for concrete ids.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> optimizer = jaxembed.sparse.adagrad(0.1)
        >>> table = jaxembed.init(jax.random.key(0), 8, 2)["embeddings"]
        >>> ids, row_grads = jnp.array([[1, 7, 1]]), jnp.ones((1, 3, 2))
        >>> new_table, state = jaxembed.sharding.vocab_parallel_update(
        ...     optimizer, table, optimizer.init(table), ids, row_grads,
        ...     mesh=mesh, vocab_axis="model")
        >>> expected, _ = optimizer.update(table, optimizer.init(table), ids, row_grads)
        >>> bool(jnp.allclose(new_table, expected))
        True
    """
    caller = "vocab_parallel_update"
    table = sparse.check_table(table)
    input_dim, output_dim = table.shape
    ids = _checks.integer_ids(ids)
    if ids.ndim == 0:
        raise ValueError(
            f"{caller} needs ids of rank >= 1 (their first dimension is split over "
            "`batch_axes`). Received: a scalar id; use `optimizer.update` or `ids[None]`."
        )
    row_grads = _checks.floating_array("row_grads", row_grads)
    if row_grads.shape != (*ids.shape, output_dim):
        raise ValueError(
            f"`row_grads` must have shape ids.shape + (output_dim,) = "
            f"{(*ids.shape, output_dim)}. Received: row_grads of shape {tuple(row_grads.shape)}."
        )
    state = sparse.RowwiseState(jnp.asarray(state.count), tuple(state.rows))
    for array in state.rows:
        if np.ndim(array) == 0 or np.shape(array)[0] != input_dim:
            raise ValueError(
                f"`state` must come from `optimizer.init(table)`: every array of state.rows "
                f"has first dimension input_dim={input_dim}. Received: state.rows of shapes "
                f"{[tuple(np.shape(a)) for a in state.rows]}."
            )
    mesh = (
        mesh
        or _mesh.explicit_mesh(table, ids, row_grads)
        or _context_mesh(caller, "the table or ids")
    )
    if vocab_axis is not None:
        _vocab_axis_size(mesh, vocab_axis, input_dim, caller)
    policy = _out_of_range.policy(out_of_range)
    # The policy's check, once, on the global ids ("error" raises or reports through
    # checkify); then every bad id is one no shard owns, as in `optimizer.update`.
    indices = _out_of_range.prepare(ids, input_dim, "error" if policy == "error" else "fill")
    gather_axes = _without_trivial_axes(mesh, batch_axes)

    def local_update(table_shard, state_shard, batch_ids, batch_grads):
        if gather_axes is not None:
            # Every shard needs every id of the step: its rows may be named by any of them.
            batch_ids, batch_grads = (
                jax.lax.all_gather(x, gather_axes, axis=0, tiled=True, to="invarying")
                for x in (batch_ids, batch_grads)
            )
        shard_rows = table_shard.shape[0]
        first_row = 0 if vocab_axis is None else jax.lax.axis_index(vocab_axis) * shard_rows
        local = batch_ids - first_row
        owned = _out_of_range.Indices(batch_ids, fill=True).valid(input_dim)
        owned &= (local >= 0) & (local < shard_rows)
        local = jnp.where(owned, local, -1)  # not this shard's: dropped by "fill"
        return optimizer.update(table_shard, state_shard, local, batch_grads, out_of_range="fill")

    def split_rows(array: Any) -> PartitionSpec:
        return PartitionSpec(vocab_axis, *(None,) * (np.ndim(array) - 1))

    table_spec = split_rows(table)
    state_specs = sparse.RowwiseState(PartitionSpec(), tuple(map(split_rows, state.rows)))
    batch_specs = (
        PartitionSpec(gather_axes),
        PartitionSpec(gather_axes, *(None,) * (row_grads.ndim - 1)),
    )
    arrays = (table, state, indices.ids, row_grads)
    specs = (table_spec, state_specs, *batch_specs)
    if AxisType.Explicit in mesh.axis_types:
        # On Explicit axes shard_map takes inputs whose types already carry its in_specs.
        arrays = jax.tree.map(
            lambda array, spec: jax.sharding.reshard(array, NamedSharding(mesh, spec)),
            arrays,
            specs,
        )
    return _compiled(local_update, mesh, specs, (table_spec, state_specs))(*arrays)


def _compiled(body: Any, mesh: Any, in_specs: Any, out_specs: Any) -> Any:
    """`jax.shard_map(body, ...)` under `jax.jit`: inside a jitted step the two are one program,
    and an eager call compiles once instead of running every op of the body one by one (a
    small eager update took 5 s)."""
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def _varying_alike(*arrays: Any) -> tuple[Any, ...]:
    """`arrays` (pytrees; None kept), each leaf made varying over every mesh axis any of them
    varies over.

    Inside `shard_map` a `custom_vjp` must return cotangents typed like its inputs; casting
    the inputs first lets shard_map's transpose sum each gradient over the axes its input was
    replicated on (the table's over the batch axes, the query's over the vocab axis).
    """

    def varying(x: Any) -> frozenset[str]:
        aval = jax.typeof(x)  # `.vma` before JAX 0.10, `.manual_axis_type.varying` since
        return aval.manual_axis_type.varying if hasattr(aval, "manual_axis_type") else aval.vma

    axes = set().union(*(varying(x) for x in jax.tree.leaves(arrays)))

    def cast(x: Any) -> Any:
        missing = tuple(sorted(axes - varying(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return tuple(jax.tree.map(cast, x) for x in arrays)


def vocab_parallel_attend_cross_entropy(
    params: _table.Params,
    query: ArrayLike,
    labels: ArrayLike,
    *,
    vocab_axis: str | None,
    mesh: jax.sharding.Mesh | None = None,
    batch_axes: SpecEntry = None,
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
    """`jaxembed.attend_cross_entropy` on a vocab-sharded table, as a `jax.shard_map` that
    moves only per-token statistics between devices.

    The table (and LoRA's A) is split by rows over `vocab_axis`; the query, labels and `where`
    are split by their first dimension over `batch_axes`. Each device walks its own rows in
    chunks (as `attend_cross_entropy` walks the whole table) for its own tokens, producing per
    token a partial logsumexp, the label's logit if it owns the label, and the logits' sum;
    one `pmax` and one `psum` over `vocab_axis`, each `(tokens, ...)`-sized with a few
    numbers per token, complete them. No device holds the whole table or a logits block of
    another device, forward or backward. The gradients follow the inputs: the table's (and
    A's) stays split by rows over `vocab_axis` (summed over `batch_axes`, a table-shard-sized
    all-reduce, as in any data-parallel step); the query's is summed over `vocab_axis`.

    On Explicit axes `attend_cross_entropy` calls this function by itself, with the axes read
    from the arrays' types; on Auto axes its plain `jax.jit` all-gathers the whole table
    forward and backward (the partitioner's choice, JAX 0.10).

    Args:
        params: from `init` / `enable_lora`; input_dim divisible by the `vocab_axis` size.
        query: floating `(..., output_dim)`; with `batch_axes`, of rank >= 2, its first
            dimension divisible by their size.
        labels: integer `query.shape[:-1]`.
        vocab_axis: mesh axis that splits the vocabulary; None: the table is whole on
            every device (data parallelism alone: each device walks the whole table for its
            own tokens, and the table's gradient is summed over `batch_axes`).
        mesh: the device mesh (Auto or Explicit axes); None takes the mesh in the params' or
            query's types, else the one set with `jax.set_mesh`.
        batch_axes: mesh axis (or axes) that split the query's first dimension, or None.
        chunk_size: rows of one shard per chunk; None picks about 8 MiB of logits per chunk
            on each device.

    The other keywords (`where`, `lora_alpha`, `use_rslora`, `logit_soft_cap`,
    `label_smoothing`, `z_loss`, `reduction`, `out_of_range`, `dtype`) are as in
    `jaxembed.attend_cross_entropy`.

    Returns:
        A float32 scalar, or `query.shape[:-1]` losses with reduction="none".

    Raises:
        TypeError, IndexError: as `jaxembed.attend_cross_entropy`.
        ValueError: as `jaxembed.attend_cross_entropy`; also trainable tokens, no mesh, a
            `vocab_axis` not in the mesh or whose size does not divide `input_dim`, or a
            query whose first dimension `batch_axes` cannot split.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> params = jaxembed.init(jax.random.key(0), 8, 2)
        >>> query, labels = jnp.ones((3, 2)), jnp.array([1, 7, 0])
        >>> loss = jaxembed.sharding.vocab_parallel_attend_cross_entropy(
        ...     params, query, labels, mesh=mesh, vocab_axis="model")
        >>> bool(jnp.allclose(loss, jaxembed.attend_cross_entropy(params, query, labels)))
        True
    """
    caller = "vocab_parallel_attend_cross_entropy"
    setup = loss._setup(params, query, labels, **loss._options(locals()))
    table = setup.table
    _table.refuse(table, caller)
    input_dim = table.input_dim
    mesh = (
        mesh
        or _mesh.explicit_mesh(table.leading, query)
        or _context_mesh(caller, "the params or query")
    )
    shards = 1 if vocab_axis is None else _vocab_axis_size(mesh, vocab_axis, input_dim, caller)
    batch = _without_trivial_axes(mesh, batch_axes)
    batch_size = int(np.prod([mesh.shape[name] for name in _mesh._axes([batch])], dtype=int))
    if batch is not None and (len(setup.positions) == 0 or setup.positions[0] % batch_size):
        raise ValueError(
            f"{caller} splits the query's first dimension over batch_axes={batch_axes!r} "
            f"({batch_size} devices): it needs query of rank >= 2 with that dimension "
            f"divisible by {batch_size}. Received: query of shape "
            f"{(*setup.positions, table.output_dim)}."
        )
    tokens = setup.query.shape[0]
    shard_rows = input_dim // shards
    kind = table.kind
    chunk = setup.chunk(tokens // batch_size, shard_rows)
    frozen = loss.frozen_rows(table, setup.dtype)
    static = (chunk, setup.logit_soft_cap, setup.scale, frozen)

    def local_losses(table_shards, adapter_shards, shard_query, shard_labels):
        table_shard = table_shards if frozen else kind.dense(table_shards).astype(setup.dtype)
        a, b = adapter_shards or (None, None)
        if vocab_axis is not None:
            # Labels outside [0, shard_rows) name rows of other shards: no label logit here.
            offset = jax.lax.axis_index(vocab_axis) * shard_rows
            shard_labels = shard_labels - offset.astype(shard_labels.dtype)
        lse, label_logit, logit_sum = loss._partial_statistics(
            static, *_varying_alike(shard_query, table_shard, a, b), None, shard_labels
        )
        if vocab_axis is None:  # the whole table here: the statistics are complete
            return loss._losses_from_statistics(
                lse, label_logit, logit_sum, setup.smoothing, setup.z_loss, input_dim
            )
        # One pmax and one psum of a few numbers per token combine the shards.
        top = jax.lax.pmax(jax.lax.stop_gradient(lse), vocab_axis)
        sums = jax.lax.psum(jnp.stack([jnp.exp(lse - top), label_logit, logit_sum]), vocab_axis)
        return loss._losses_from_statistics(
            top + jnp.log(sums[0]), sums[1], sums[2], setup.smoothing, setup.z_loss, input_dim
        )

    def split_rows(array: Any) -> PartitionSpec:
        return PartitionSpec(vocab_axis, *(None,) * (np.ndim(array) - 1))

    adapter = tuple(table.adapter or ())
    tokens_spec = PartitionSpec(batch)
    arrays = (table.arrays, adapter, setup.query, setup.labels)
    specs = (
        {key: split_rows(array) for key, array in table.arrays.items()},
        (split_rows(adapter[0]), PartitionSpec(None, None)) if adapter else (),
        PartitionSpec(batch, None),
        tokens_spec,
    )
    if AxisType.Explicit in mesh.axis_types:
        # On Explicit axes shard_map takes inputs whose types already carry its in_specs.
        arrays = jax.tree.map(
            lambda array, spec: jax.sharding.reshard(array, NamedSharding(mesh, spec)),
            arrays,
            specs,
        )
    losses = _compiled(local_losses, mesh, specs, tokens_spec)(*arrays)
    return setup.reduce(losses)
