"""Embedding tables on device meshes: output shardings for Explicit meshes, and a
vocab-parallel lookup under `jax.shard_map`.

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
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jax.typing import ArrayLike, DTypeLike

from jaxembed import _checks, _mesh, _out_of_range, _table, lora
from jaxembed._mesh import SpecEntry, attend_shardings, gather_sharding

__all__ = ["attend_shardings", "gather_sharding", "vocab_parallel_apply"]


def _context_mesh() -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(
            "vocab_parallel_apply needs a mesh: pass `mesh=`, place the params or ids on a mesh "
            "with Explicit axes, or set one with `jax.set_mesh`. Received: mesh=None."
        )
    return mesh


def _without_trivial_axes(mesh: Any, axes: SpecEntry) -> SpecEntry:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(name for name in names if mesh.shape[name] > 1)
    return kept[0] if len(kept) == 1 else (kept or None)


def _vocab_axis_size(mesh: Any, vocab_axis: str, input_dim: int) -> int:
    if vocab_axis not in mesh.axis_names:
        raise ValueError(
            f"`vocab_axis` must be an axis of the mesh {tuple(mesh.axis_names)}. "
            f"Received: vocab_axis={vocab_axis!r}."
        )
    size = mesh.shape[vocab_axis]
    if input_dim % size:
        raise ValueError(
            f"vocab_parallel_apply needs input_dim divisible by the size of mesh axis "
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
        dtype, out_of_range, lora_alpha: as `jaxembed.apply`; "fill" gives NaN rows here too.

    Returns:
        `ids.shape + (output_dim,)`, first dimension split over `batch_axes`.

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
    ids = _checks.integer_ids(ids)
    if ids.ndim == 0:
        raise ValueError(
            "vocab_parallel_apply needs ids of rank >= 1 (their first dimension is split over "
            "`batch_axes`). Received: a scalar id; use `jaxembed.apply` or `ids[None]`."
        )
    dtype = _checks.optional_floating_dtype("dtype", dtype) or table.dtype
    lora.check_alpha(lora_alpha)
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
            rows = lora.add_delta(rows, a_rows, b, lora_alpha)
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
    return jax.shard_map(local_lookup, mesh=mesh, in_specs=specs, out_specs=ids_spec)(*arrays)
