"""Output shardings on Explicit meshes, derived from the types of the operands (no arguments).

On an Auto mesh, or on one device, every function here returns None and the partitioner
decides. See `jaxembed.sharding` for the whole story.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

SpecEntry = str | tuple[str, ...] | None


def explicit_mesh(*arrays: Any) -> Any:
    """The mesh of the first array whose type carries Explicit mesh axes, else None."""
    for array in arrays:
        mesh = getattr(jax.typeof(array).sharding, "mesh", None)
        if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
            return mesh
    return None


def own_sharding(array: Any) -> NamedSharding | None:
    """The array's sharding on an Explicit mesh (to keep it through an update), else None."""
    return jax.typeof(array).sharding if explicit_mesh(array) else None


def whole_last_dim(array: jax.Array) -> jax.Array:
    """`array` with its last dimension unsplit on an Explicit mesh (as it is elsewhere).

    `attend` moves the query's features onto the table's column axis; the per-example adapter
    and trainable-token products then contract those features with small matrices, which is
    simplest with each device holding whole query rows (the query is small: tokens x D).
    """
    if explicit_mesh(array) is None or _spec(array)[-1] is None:
        return array
    spec = PartitionSpec(*_spec(array)[:-1], None)
    return jax.sharding.reshard(array, NamedSharding(jax.typeof(array).sharding.mesh, spec))


def explicit_row_axes(array: jax.Array) -> SpecEntry:
    """The mesh axis (or axes) splitting `array`'s first dimension on an Explicit mesh, else
    None (Auto axes, no mesh, a whole first dimension)."""
    return _spec(array)[0] if explicit_mesh(array) is not None and array.ndim else None


def vocab_parallel_axes(table: jax.Array, batch: Any, caller: str) -> tuple[Any, Any] | None:
    """`(vocab_axis, batch_axes)` of the vocab-parallel program for `table` and a `batch`
    array (ids or tokens, first dimension the batch) on an Explicit mesh: the axis splitting
    the table's rows (None: whole) and those splitting the batch (None: whole). None when
    neither is split (one device, Auto axes, nothing split). A batch split over the vocab
    axis is made whole: every device needs the whole batch against its own rows.

    Raises:
        ValueError: the table's rows split over several mesh axes.
    """
    vocab_axis = explicit_row_axes(table)
    batch_axes = explicit_row_axes(batch) if isinstance(batch, jax.Array) else None
    if vocab_axis is None and batch_axes is None:
        return None
    if vocab_axis is not None and not isinstance(vocab_axis, str):
        raise ValueError(
            f"{caller} needs the table's rows split over one mesh axis; they are split over "
            f"{vocab_axis}."
        )
    if vocab_axis is not None and vocab_axis in _axes([batch_axes]):
        batch_axes = None
    return vocab_axis, batch_axes


def explicit_column_axes(array: jax.Array) -> SpecEntry:
    """The mesh axis (or axes) splitting `array`'s last dimension on an Explicit mesh, else
    None."""
    return _spec(array)[-1] if explicit_mesh(array) is not None and array.ndim else None


def like(array: jax.Array, reference: Any) -> jax.Array:
    """`array` with `reference`'s sharding on an Explicit mesh (if they differ), else as is."""
    if explicit_mesh(reference) is None:
        return array
    sharding = jax.typeof(reference).sharding
    return (
        array if jax.typeof(array).sharding == sharding else jax.sharding.reshard(array, sharding)
    )


def _spec(array: Any) -> tuple[SpecEntry, ...]:
    """The array's PartitionSpec from its type, one entry per dimension."""
    spec = tuple(getattr(jax.typeof(array).sharding, "spec", ()) or ())
    return spec + (None,) * (array.ndim - len(spec))


def _axes(entries: Iterable[SpecEntry]) -> set[str]:
    names: set[str] = set()
    for entry in entries:
        if entry is not None:
            names.update((entry,) if isinstance(entry, str) else entry)
    return names


def _unless_used(entry: SpecEntry, used: set[str]) -> SpecEntry:
    """`entry`, or None when one of its mesh axes already shards another dimension."""
    return None if _axes([entry]) & used else entry


def gather_sharding(
    matrix: jax.Array, ids: jax.Array, indexed_dims: int = 1
) -> NamedSharding | None:
    """Output sharding of `matrix[ids]` on an Explicit mesh; None on Auto meshes or one device.

    The batch dimensions follow the ids' sharding and the feature dimensions (none for a 1-D
    per-row array such as a scale) the matrix's (unless the ids already use that mesh axis).
    `indexed_dims`: how many leading dimensions of `matrix` the ids index (2 for stacked
    adapters' `a[adapter, ids]`).

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> jaxembed.sharding.gather_sharding(jnp.ones((4, 2)), jnp.arange(3)) is None
        True
    """
    mesh = explicit_mesh(ids, matrix)
    if mesh is None:
        return None
    batch = _spec(ids)
    features = (_unless_used(entry, _axes(batch)) for entry in _spec(matrix)[indexed_dims:])
    return NamedSharding(mesh, PartitionSpec(*batch, *features))


class AttendShardings(NamedTuple):
    """Shardings for `attend` on an Explicit mesh."""

    query: NamedSharding
    """The query, its feature dimension moved to the table's column axis (the query is small)."""
    logits: NamedSharding
    """`(..., input_dim)` logits."""
    low_rank: NamedSharding
    """LoRA's `(..., rank)` projection `query @ B.T`."""
    table: NamedSharding | None
    """Where to move the table first, or None to leave it where it is."""
    lora_a: NamedSharding
    """LoRA's A, rows split like the logits' vocab dimension, so that A's gradient is
    computed where the logits live instead of gathering logits-sized cotangents."""


def attend_shardings(query: jax.Array, table: jax.Array) -> AttendShardings | None:
    """On an Explicit mesh, the shardings `attend` computes with; None on Auto meshes.

    The logits' vocab dimension takes the table's row axis. A dim-parallel table (columns
    split, rows whole) is first re-split by rows over the same axis: contracting over its split
    columns would cost logits-sized collectives (an all-reduce forward, two all-gathers
    backward), while re-splitting moves one table shard per device (an all-to-all; no device
    ever holds the whole table). That is the cheaper side whenever a batch's logits
    (tokens x input_dim) outweigh a table shard, as in language-model training.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> jaxembed.sharding.attend_shardings(jnp.ones((2, 4)), jnp.ones((10, 4))) is None
        True
    """
    mesh = explicit_mesh(query, table)
    if mesh is None:
        return None
    batch = _spec(query)[:-1]
    used = _axes(batch)
    vocab_axis, embed_axis = (_unless_used(entry, used) for entry in _spec(table))
    table_sharding = None
    if vocab_axis is None and embed_axis is not None:
        vocab_axis, embed_axis = embed_axis, None
        table_sharding = NamedSharding(mesh, PartitionSpec(vocab_axis, None))
    return AttendShardings(
        query=NamedSharding(mesh, PartitionSpec(*batch, embed_axis)),
        logits=NamedSharding(mesh, PartitionSpec(*batch, vocab_axis)),
        low_rank=NamedSharding(mesh, PartitionSpec(*batch, None)),
        table=table_sharding,
        lora_a=NamedSharding(mesh, PartitionSpec(vocab_axis, None)),
    )
