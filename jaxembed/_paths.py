"""Finding jaxembed params by name inside any pytree: a plain dict, flax.linen variables with
`nn.LogicallyPartitioned` boxes, or an `nnx.State`."""

from __future__ import annotations

from typing import Any

import jax

from jaxembed import _table

KeyPath = tuple[Any, ...]


def names(path: KeyPath) -> tuple[str, ...]:
    """The named keys of a key path, with the trailing "value" of flax boxes dropped.

    `nn.LogicallyPartitioned` and `nnx.Variable` hold their array under an attribute called
    "value"; without dropping it every boxed param would be named "value".
    """
    named = [getattr(key, "key", getattr(key, "name", None)) for key in path]
    named = [str(name) for name in named if name is not None]
    while named and named[-1] == "value":
        named.pop()
    return tuple(named)


def param_name(path: KeyPath) -> str | None:
    """The name of the param a leaf belongs to ("embeddings", "kernel", ...), if any."""
    named = names(path)
    return named[-1] if named else None


def tables_beside_lora(tree: Any) -> set[tuple[str, ...]]:
    """Name paths of every table leaf that has a LoRA adapter or trainable tokens beside it
    (frozen)."""
    named = {names(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
    table_keys = _table.table_keys()
    return {
        path
        for path in named
        if path
        and path[-1] in table_keys
        and any((*path[:-1], key) in named for key in (_table.LORA_A, _table.TOKEN_DELTA))
    }


def frozen_tables(tree: Any) -> set[tuple[str, ...]]:
    """Name paths of every leaf that is never trained: tables with a LoRA adapter or
    trainable tokens beside them, every array of a quantized table (its values, scales and
    zero points), and trainable tokens' ids (integers)."""
    never = _table.quantized_keys() | {_table.TOKEN_IDS}
    named = {names(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
    return tables_beside_lora(tree) | {path for path in named if path and path[-1] in never}
