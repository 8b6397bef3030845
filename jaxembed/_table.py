"""The params layout: which keys hold the table and its LoRA adapter, and how to read them.

Every other module asks this one, through `view(params)`, instead of reading
`params["embeddings"]` itself:

    table = _table.view(params)     # validated once per call
    table.input_dim, table.output_dim, table.dtype, table.adapter
    table.gather(indices)           # rows for prepared ids: ids.shape + (output_dim,)
    table.contract(query, dtype)    # query @ table.T, sharded like the table
    table.dense()                   # the whole (input_dim, output_dim) float matrix

Two kinds exist: `DenseTable` (a float matrix under "embeddings") and `QuantizedTable`
(int8 or packed int4 values with float32 scales, and int8 zero points when grouped; the maths
in `jaxembed._quantized`). **Adding a table kind**: write a `TableKind` subclass here, naming
the params keys it stores and answering `shape`, `dtype`, `gather` and `dense` (and
`contract` where it can beat contracting against `dense()`, `encode` where merging should
keep the kind, `frozen` where it is never trained), then add it to `KINDS`. `jaxembed.apply`,
`attend`, LoRA, regularization and the vocab-parallel `shard_map` then work on it unchanged:
they only call the methods above. Two rules make the
sharded lookup work: every array of a kind has the vocabulary as its first dimension (so
splitting rows splits the table), and `gather` honours `Indices.fill` (NaN rows for
out-of-range ids; integer storage gathers clipped rows, dequantizes, then masks them).
tests/test_table.py proves the seam with a `(rows, scale)` test double.

LoRA's A `(input_dim, rank)` and B `(rank, output_dim)` sit beside any kind under the keys in
`LORA_KEYS` (stacked adapters add a leading adapter axis: `(n, input_dim, rank)` and
`(n, rank, output_dim)`); their maths lives in `jaxembed.lora`. Trainable tokens sit beside any
kind too: K sorted row ids and a `(K, output_dim)` float32 delta added to those rows (the maths
in `jaxembed.trainable_tokens`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import _checks, _mesh, _quantized
from jaxembed._out_of_range import Indices

Params: TypeAlias = dict[str, jax.Array]
"""{"embeddings": (input_dim, output_dim) table}, plus LoRA weights when enabled."""

EMBEDDINGS = "embeddings"
QUANTIZED_VALUES = {"int8": "embeddings_int8", "int4": "embeddings_int4"}
"""Where a quantized table keeps its int8 values (packed two per byte for int4), by mode."""
SCALE = "embeddings_scale"
ZERO = "embeddings_zero"
LORA_A = "lora_embeddings_a"
LORA_B = "lora_embeddings_b"
LORA_KEYS = (LORA_A, LORA_B)
LORA_DTYPE = jnp.float32
"""Adapter storage dtype whatever the table's (as Keras: avoids under/overflow in training)."""
TOKEN_IDS = "trainable_tokens_ids"
TOKEN_DELTA = "trainable_tokens_delta"
TOKEN_KEYS = (TOKEN_IDS, TOKEN_DELTA)
"""Trainable tokens: `(K,)` sorted, distinct int32 row ids and the `(K, output_dim)` float32
delta added to those rows (the delta trains; the ids and the table are frozen)."""


def take_rows(matrix: jax.Array, indices: Indices) -> jax.Array:
    """`matrix[indices]`: shape `ids.shape + matrix.shape[1:]`, NaN where `indices.fill` marks
    an id out of range (never wrapping -1 to the last row).

    On an Explicit mesh the output sharding is derived from the operands (the batch follows
    the ids, the features the matrix's columns); plain `jnp.take` would be refused there.
    """
    return matrix.at[indices.ids].get(
        mode=indices.gather_mode,
        fill_value=jnp.nan if indices.fill else None,
        wrap_negative_indices=False,
        out_sharding=_mesh.gather_sharding(matrix, indices.ids),
    )


def take_stacked_rows(a: jax.Array, index: jax.Array, indices: Indices) -> jax.Array:
    """`a[index, ids]` for stacked adapters' A `(n, input_dim, rank)`: `index` (one adapter per
    example, a prefix of `ids.shape`) broadcast over the rest of `ids`; NaN as `take_rows`."""
    ids = indices.ids
    which = jnp.broadcast_to(
        index.reshape(*index.shape, *(1,) * (ids.ndim - index.ndim)), ids.shape
    )
    return a.at[which, ids].get(
        mode=indices.gather_mode,
        fill_value=jnp.nan if indices.fill else None,
        wrap_negative_indices=False,
        out_sharding=_mesh.gather_sharding(a, ids, indexed_dims=2),
    )


class TableKind:
    """One way of storing a table in params. Subclass it to add a kind (see the module doc)."""

    frozen: bool = False
    """Never trained (quantized): the fused loss reads it chunk by chunk and gives it no
    gradient."""

    keys: tuple[str, ...] = ()
    """The params keys this kind stores; the first is 2-D, `(input_dim, output_dim)`-shaped
    (its sharding decides the output's, and `attend` reads two spec entries from it)."""

    def shape(self, arrays: Mapping[str, Any]) -> tuple[int, int]:
        """`(input_dim, output_dim)`, after checking the arrays; raises ValueError if bad."""
        raise NotImplementedError

    def dtype(self, arrays: Mapping[str, jax.Array]) -> np.dtype:
        """The floating dtype rows are gathered in."""
        raise NotImplementedError

    def gather(self, arrays: Mapping[str, jax.Array], indices: Indices) -> jax.Array:
        """Rows for prepared ids, `ids.shape + (output_dim,)` in `dtype` (`take_rows` does
        the sharding and the NaN fill of a float array)."""
        raise NotImplementedError

    def dense(self, arrays: Mapping[str, jax.Array]) -> jax.Array:
        """The whole `(input_dim, output_dim)` floating matrix."""
        raise NotImplementedError

    def encode(self, arrays: Mapping[str, jax.Array], matrix: jax.Array) -> dict[str, jax.Array]:
        """Arrays of this kind (and format, for `arrays`'s) holding a new float `matrix`: what
        merging an adapter writes back. By default a float table in the rows' dtype."""
        return {EMBEDDINGS: matrix.astype(self.dtype(arrays))}

    def contract(
        self, arrays: Mapping[str, jax.Array], query: jax.Array, shardings: Any
    ) -> jax.Array:
        """`query @ dense().T` in `query.dtype`; `shardings` from `_mesh.attend_shardings`."""
        table = self.dense(arrays)
        if shardings is not None and shardings.table is not None:
            table = jax.sharding.reshard(table, shardings.table)
        return jnp.einsum(
            "...d,vd->...v",
            query,
            table.astype(query.dtype),
            out_sharding=shardings and shardings.logits,
        )


class DenseTable(TableKind):
    """A floating-point `(input_dim, output_dim)` matrix under "embeddings"."""

    keys = (EMBEDDINGS,)

    def shape(self, arrays: Mapping[str, Any]) -> tuple[int, int]:
        table = arrays[EMBEDDINGS]
        if hasattr(table, "unbox"):
            raise ValueError(
                f"params['embeddings'] is a boxed flax param ({type(table).__name__}); unbox "
                "the variables first: `flax.linen.unbox(params)`."
            )
        if getattr(table, "ndim", None) != 2:
            raise ValueError(
                "params['embeddings'] must be a 2-D (input_dim, output_dim) array. "
                f"Received: shape {getattr(table, 'shape', None)}."
            )
        dtype = getattr(table, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                "params['embeddings'] must be a floating-point table. Received: "
                f"embeddings of dtype {dtype}; cast it, e.g. `table.astype(jnp.float32)`."
            )
        return tuple(table.shape)

    def dtype(self, arrays: Mapping[str, jax.Array]) -> np.dtype:
        return arrays[EMBEDDINGS].dtype

    def gather(self, arrays: Mapping[str, jax.Array], indices: Indices) -> jax.Array:
        return take_rows(jnp.asarray(arrays[EMBEDDINGS]), indices)

    def dense(self, arrays: Mapping[str, jax.Array]) -> jax.Array:
        return jnp.asarray(arrays[EMBEDDINGS])


def _array_summary(array: Any) -> str:
    """ "shape (5, 1), dtype int8" for an array (traced or not), else a description."""
    if hasattr(array, "shape") and hasattr(array, "dtype"):
        return f"shape {tuple(array.shape)}, dtype {array.dtype}"
    return _checks.describe(array)


class QuantizedTable(TableKind):
    """An int8 or int4 table with float32 scales (and int8 zero points when grouped), stored as
    Keras stores it; `jaxembed._quantized` holds the maths.

    Lookups gather the stored rows and their scales, then unpack and dequantize only those;
    `contract` walks the vocabulary in chunks, so no float copy of the whole table is built.
    """

    frozen = True

    def __init__(self, mode: str, grouped: bool):
        self.mode, self.grouped = mode, grouped
        self.keys = (QUANTIZED_VALUES[mode], SCALE, *((ZERO,) if grouped else ()))

    def __repr__(self) -> str:
        return f"QuantizedTable({self.mode!r}, grouped={self.grouped})"

    def format(self, arrays: Mapping[str, Any]) -> _quantized.Format:
        """The format, with the block size read from the shapes (groups divide the columns)."""
        output_dim = self._output_dim(arrays[self.keys[0]])
        block = output_dim // arrays[SCALE].shape[1] if self.grouped else None
        return _quantized.Format(self.mode, block)

    def _output_dim(self, values: Any) -> int:
        """Columns of the table stored in `values` (int4 packs two per byte)."""
        return values.shape[1] * (2 if self.mode == "int4" else 1)

    def shape(self, arrays: Mapping[str, Any]) -> tuple[int, int]:
        values_key = self.keys[0]
        values, scale = arrays[values_key], arrays[SCALE]
        if getattr(values, "ndim", None) != 2 or getattr(values, "dtype", None) != jnp.int8:
            raise ValueError(
                f"params[{values_key!r}] must be a 2-D int8 array (as jaxembed.quantize "
                f"returns). Received: {_array_summary(values)}."
            )
        input_dim, output_dim = values.shape[0], self._output_dim(values)
        groups = f"(input_dim, groups) = ({input_dim}, groups)"
        expected = groups if self.grouped else f"(input_dim,) = ({input_dim},)"
        scale_shape = tuple(getattr(scale, "shape", ()))
        per_row_ok = scale_shape == (input_dim,)
        grouped_ok = len(scale_shape) == 2 and scale_shape[0] == input_dim
        if not (grouped_ok if self.grouped else per_row_ok):
            raise ValueError(
                f"params[{SCALE!r}] must have shape {expected}. Received: shape {scale_shape}."
            )
        if not jnp.issubdtype(scale.dtype, jnp.floating):
            raise TypeError(f"params[{SCALE!r}] must be floating. Received: dtype {scale.dtype}.")
        if self.grouped:
            zero = arrays[ZERO]
            if tuple(getattr(zero, "shape", ())) != scale_shape or zero.dtype != jnp.int8:
                raise ValueError(
                    f"params[{ZERO!r}] must be int8 of the scale's shape {scale_shape}. "
                    f"Received: {_array_summary(zero)}."
                )
            if scale_shape[1] == 0 or output_dim % scale_shape[1]:
                raise ValueError(
                    f"params[{SCALE!r}] must have a number of groups dividing output_dim="
                    f"{output_dim}. Received: {scale_shape[1]} groups."
                )
        return input_dim, output_dim

    def dtype(self, arrays: Mapping[str, jax.Array]) -> np.dtype:
        return np.dtype(np.float32)

    def dequantize(
        self, arrays: Mapping[str, jax.Array], fmt: _quantized.Format, rows: Any = None
    ) -> jax.Array:
        """Float32 rows: `rows(array)` picks them out of each stored array (all of them when
        None)."""
        pick = rows or jnp.asarray
        zero = pick(arrays[ZERO]) if self.grouped else None
        return _quantized.dequantize(pick(arrays[self.keys[0]]), pick(arrays[SCALE]), zero, fmt)

    def gather(self, arrays: Mapping[str, jax.Array], indices: Indices) -> jax.Array:
        # Integers have no NaN: gather clipped rows of the integer arrays; the scale, gathered
        # with the policy's NaN fill, turns the rows of out-of-range ids into NaN.
        input_dim = arrays[SCALE].shape[0]
        clipped = Indices(jnp.clip(indices.ids, 0, input_dim - 1), fill=False)

        def rows(array: jax.Array) -> jax.Array:
            floating = jnp.issubdtype(array.dtype, jnp.floating)
            return take_rows(jnp.asarray(array), indices if floating else clipped)

        return self.dequantize(arrays, self.format(arrays), rows)

    def dense(self, arrays: Mapping[str, jax.Array]) -> jax.Array:
        return self.dequantize(arrays, self.format(arrays))

    def encode(self, arrays: Mapping[str, jax.Array], matrix: jax.Array) -> dict[str, jax.Array]:
        return self.store(_quantized.quantize(matrix, self.format(arrays)))

    def store(self, quantized: _quantized.Quantized) -> dict[str, jax.Array]:
        """The params entries holding `quantized` (values, scale, and zero when grouped)."""
        return dict(zip(self.keys, (a for a in quantized if a is not None), strict=True))

    def contract(
        self, arrays: Mapping[str, jax.Array], query: jax.Array, shardings: Any
    ) -> jax.Array:
        if shardings is not None:
            # Explicit mesh: the partitioner dequantizes each device's rows where they live.
            return super().contract(arrays, query, shardings)
        return _contract_in_chunks(self, arrays, query)


_CHUNK_BYTES = 16 * 2**20
"""`attend` on a quantized table dequantizes about this many bytes of rows at a time."""


def _chunk_rows(output_dim: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * output_dim))


def _strided_chunk_count(input_dim: int, output_dim: int) -> int:
    """How many strided chunks: the fewest that divide `input_dim` and keep a chunk's float32
    rows within `_CHUNK_BYTES`, or 0 when no divisor comes close."""
    fewest = -(-input_dim // _chunk_rows(output_dim))
    for count in range(fewest, 4 * fewest + 1):
        if input_dim % count == 0:
            return count
    return 0


def _on_several_devices(array: Any) -> bool:
    """Whether `array` may be split over devices: a concrete array on several, or a traced
    one under a context mesh (`jax.set_mesh`) of several devices."""
    if not _checks.is_traced(array) and hasattr(array, "sharding"):
        return len(array.sharding.device_set) > 1
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def _contract_in_chunks(
    kind: QuantizedTable, arrays: Mapping[str, jax.Array], query: jax.Array
) -> jax.Array:
    """`query @ dense().T`, dequantizing one chunk of rows at a time into a logits buffer.

    On one device chunks are contiguous blocks of rows (the last one overlapping its
    predecessor; it rewrites the same logits). On several (an Auto mesh: a concrete sharded
    table, or a context mesh under jit), chunks are strided when `n` of them divide the
    vocabulary: chunk `i` holds rows `i, i + n, i + 2n, ...`, so reshaping `(V, ...)` to
    `(V / n, n, ...)` keeps a vocab-sharded table sharded over its first axis and each device
    dequantizes only its own rows (contiguous slices would make the partitioner gather the
    table). Strided reads and writes cost about 1.5x contiguous ones on CPU.
    """
    input_dim, output_dim = kind.shape(arrays)
    fmt = kind.format(arrays)
    per_chunk = _chunk_rows(output_dim)
    if per_chunk >= input_dim:
        return TableKind.contract(kind, arrays, query, None)
    batch = query.shape[:-1]

    def logits_of(rows: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", query, rows.astype(query.dtype))

    count = _strided_chunk_count(input_dim, output_dim)
    if count and _on_several_devices(arrays[kind.keys[0]]):
        rows_per_chunk = input_dim // count
        strided = {k: v.reshape(rows_per_chunk, count, *v.shape[1:]) for k, v in arrays.items()}

        def strided_step(i: jax.Array, buffer: jax.Array) -> jax.Array:
            def rows(array: jax.Array) -> jax.Array:
                return jax.lax.dynamic_index_in_dim(array, i, axis=1, keepdims=False)

            block = logits_of(kind.dequantize(strided, fmt, rows))[..., None]
            return jax.lax.dynamic_update_slice_in_dim(buffer, block, i, axis=-1)

        buffer = jnp.zeros((*batch, rows_per_chunk, count), query.dtype)
        return jax.lax.fori_loop(0, count, strided_step, buffer).reshape(*batch, input_dim)

    def contiguous_step(i: jax.Array, buffer: jax.Array) -> jax.Array:
        start = jnp.minimum(i * per_chunk, input_dim - per_chunk)

        def rows(array: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice_in_dim(array, start, per_chunk)

        block = logits_of(kind.dequantize(arrays, fmt, rows))
        return jax.lax.dynamic_update_slice_in_dim(buffer, block, start, axis=-1)

    buffer = jnp.zeros((*batch, input_dim), query.dtype)
    return jax.lax.fori_loop(0, -(-input_dim // per_chunk), contiguous_step, buffer)


KINDS: list[TableKind] = [
    # Grouped formats first: their keys include the per-row formats' keys.
    QuantizedTable("int4", grouped=True),
    QuantizedTable("int4", grouped=False),
    QuantizedTable("int8", grouped=True),
    QuantizedTable("int8", grouped=False),
    DenseTable(),
]
"""Every table kind, tried in order; the first whose keys are all in params reads them."""


class Adapter(NamedTuple):
    """LoRA's A `(input_dim, rank)` and B `(rank, output_dim)`, or stacked adapters' A
    `(n, input_dim, rank)` and B `(n, rank, output_dim)`."""

    a: jax.Array
    b: jax.Array

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def count(self) -> int | None:
        """How many stacked adapters; None for one ordinary adapter."""
        return int(self.a.shape[0]) if self.a.ndim == 3 else None


class Tokens(NamedTuple):
    """Trainable tokens: `ids` `(K,)` sorted distinct rows, `delta` `(K, output_dim)`."""

    ids: jax.Array
    delta: jax.Array


@dataclasses.dataclass(frozen=True)
class Table:
    """A validated view of params: the table's kind and arrays, and the adapter if any."""

    kind: TableKind
    arrays: dict[str, jax.Array]
    input_dim: int
    output_dim: int
    adapter: Adapter | None
    tokens: Tokens | None = None

    @property
    def dtype(self) -> np.dtype:
        """The dtype rows come out in (the table's dtype for a dense table)."""
        return self.kind.dtype(self.arrays)

    @property
    def leading(self) -> jax.Array:
        """The array whose sharding the output follows."""
        return self.arrays[self.kind.keys[0]]

    def gather(self, indices: Indices) -> jax.Array:
        return self.kind.gather(self.arrays, indices)

    def contract(self, query: jax.Array, shardings: Any = None) -> jax.Array:
        return self.kind.contract(self.arrays, query, shardings)

    def dense(self) -> jax.Array:
        return self.kind.dense(self.arrays)


def quantized_kind(fmt: _quantized.Format) -> QuantizedTable:
    """The kind that stores tables of format `fmt`."""
    return next(
        kind
        for kind in KINDS
        if isinstance(kind, QuantizedTable) and (kind.mode, kind.grouped) == (fmt.mode, fmt.grouped)
    )


def _describe_params(params: Any) -> str:
    if isinstance(params, Mapping):
        return f"params with keys {sorted(map(str, params))}"
    return f"params={_checks.describe(params)}"


def kind_of(params: Mapping[str, Any]) -> TableKind | None:
    """The first kind whose keys params hold, or None."""
    return next((kind for kind in KINDS if all(key in params for key in kind.keys)), None)


def _pair(
    params: Mapping[str, Any], keys: tuple[str, str], what: str, shapes: tuple[str, str]
) -> tuple[jax.Array, jax.Array] | None:
    """The two arrays of `what` under `keys` as JAX arrays, None when neither is there; a
    ValueError for half a pair."""
    present = [key for key in keys if key in params]
    if not present:
        return None
    if len(present) == 1:
        raise ValueError(
            f"params hold {present[0]!r} but not its partner: {what} needs both "
            f"{keys[0]!r} {shapes[0]} and {keys[1]!r} {shapes[1]}."
        )
    return jnp.asarray(params[keys[0]]), jnp.asarray(params[keys[1]])


def adapter_of(params: Mapping[str, Any], input_dim: int, output_dim: int) -> Adapter | None:
    """The LoRA adapter in params, checked against the table's shape; None when there is none."""
    pair = _pair(params, LORA_KEYS, "a LoRA adapter", ("(input_dim, rank)", "(rank, output_dim)"))
    if pair is None:
        return None
    a, b = pair
    single = a.ndim == 2 and b.ndim == 2 and a.shape[0] == input_dim
    single = single and b.shape == (a.shape[1], output_dim)
    stacked = a.ndim == 3 and b.ndim == 3 and a.shape[:2] == (b.shape[0], input_dim)
    stacked = stacked and b.shape[1:] == (a.shape[2], output_dim)
    if not (single or stacked):
        raise ValueError(
            f"LoRA weights must have shapes {LORA_A}=(input_dim, rank)=({input_dim}, rank) and "
            f"{LORA_B}=(rank, output_dim)=(rank, {output_dim}), or stacked adapters' "
            f"(n, {input_dim}, rank) and (n, rank, {output_dim}). Received: "
            f"{tuple(a.shape)} and {tuple(b.shape)}."
        )
    if a.shape[-1] == 0 or a.shape[0] == 0:
        raise ValueError(
            f"A LoRA adapter must have rank >= 1 (and stacked adapters n >= 1). Received: "
            f"{LORA_A} of shape {tuple(a.shape)}."
        )
    for key, matrix in zip(LORA_KEYS, (a, b), strict=True):
        if not jnp.issubdtype(matrix.dtype, jnp.floating):
            raise TypeError(
                f"params[{key!r}] must be floating-point. Received: dtype {matrix.dtype}."
            )
    return Adapter(a, b)


def tokens_of(params: Mapping[str, Any], input_dim: int, output_dim: int) -> Tokens | None:
    """The trainable tokens in params, checked for shapes and dtypes (their values, sorted and
    in range, are checked where they are made: `enable_trainable_tokens`); None if absent."""
    pair = _pair(params, TOKEN_KEYS, "trainable tokens", ("(K,)", "(K, output_dim)"))
    if pair is None:
        return None
    ids, delta = pair
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"params[{TOKEN_IDS!r}] must be a 1-D integer array of row ids. Received: "
            f"{_array_summary(ids)}."
        )
    if delta.shape != (ids.shape[0], output_dim) or not jnp.issubdtype(delta.dtype, jnp.floating):
        raise ValueError(
            f"params[{TOKEN_DELTA!r}] must be floating of shape (K, output_dim) = "
            f"({ids.shape[0]}, {output_dim}). Received: {_array_summary(delta)}."
        )
    if not _checks.is_traced(params[TOKEN_IDS]):
        host = np.asarray(params[TOKEN_IDS])
        if host.size and (host[0] < 0 or host[-1] >= input_dim or (np.diff(host) <= 0).any()):
            raise ValueError(
                f"params[{TOKEN_IDS!r}] must be sorted, distinct row ids in [0, input_dim) = "
                f"[0, {input_dim}) (as enable_trainable_tokens makes them). Received: "
                f"{host.tolist()[:8]}{'...' if host.size > 8 else ''}."
            )
    return Tokens(ids, delta)


def refuse(table: Table, function: str, *, stacked: bool = True, tokens: bool = True) -> None:
    """A ValueError for `function` on params it cannot take: stacked adapters (which one?),
    or trainable tokens (not supported there yet)."""
    if stacked and table.adapter is not None and table.adapter.count is not None:
        raise ValueError(
            f"{function} takes one LoRA adapter; params hold {table.adapter.count} stacked "
            "adapters. Pick one with `jaxembed.lora.select_adapter(params, index)`."
        )
    if tokens and table.tokens is not None:
        raise tokens_unsupported(function, table.tokens.ids.shape[0])


def tokens_unsupported(function: str, count: int) -> ValueError:
    """The error of a function that cannot take trainable tokens (and must not drop them)."""
    return ValueError(
        f"{function} does not support trainable tokens; params hold {count}. Merge them "
        "first: `jaxembed.merge_trainable_tokens(params)`."
    )


def view(params: Any) -> Table:
    """Validates params and returns the `Table` that reads them.

    Raises:
        ValueError: params that are not a mapping, hold no table, hold a boxed or misshapen
            table, or half an adapter. TypeError: a non-floating table.
    """
    kind = kind_of(params) if isinstance(params, Mapping) else None
    if kind is None:
        raise ValueError(
            "`params` must be a dict holding the table under 'embeddings' (as returned by "
            "jaxembed.init), or a quantized table under "
            f"{' or '.join(repr(key) for key in QUANTIZED_VALUES.values())} with {SCALE!r} (as "
            f"returned by jaxembed.quantize). Received: {_describe_params(params)}."
        )
    tables = sorted({other.keys[0] for other in KINDS if other.keys[0] in params})
    if len(tables) > 1:
        raise ValueError(
            f"`params` must hold one table. Received: params with tables under {tables}."
        )
    arrays = {key: params[key] for key in kind.keys}
    input_dim, output_dim = kind.shape(arrays)
    adapter = adapter_of(params, input_dim, output_dim)
    tokens = tokens_of(params, input_dim, output_dim)
    return Table(kind, arrays, input_dim, output_dim, adapter, tokens)


def with_dense(
    params: Mapping[str, Any], table: Table, matrix: jax.Array, *, as_float: bool = False
) -> Params:
    """Params with the table replaced by the float `matrix`, stored as the table was (cast to
    its dtype, or requantized in its format), or as a float table when `as_float`: what
    merging an adapter or projecting onto a constraint writes back."""
    rest = {key: value for key, value in params.items() if key not in table.kind.keys}
    if as_float:
        return {**rest, EMBEDDINGS: matrix}
    return {**rest, **table.kind.encode(table.arrays, matrix)}


def without_adapter(params: Mapping[str, Any]) -> Params:
    """Params with the LoRA keys dropped."""
    return {key: value for key, value in params.items() if key not in LORA_KEYS}


def without_tokens(params: Mapping[str, Any]) -> Params:
    """Params with the trainable tokens dropped."""
    return {key: value for key, value in params.items() if key not in TOKEN_KEYS}


def with_rows(params: Mapping[str, Any], table: Table, ids: jax.Array, rows: jax.Array) -> Params:
    """Params with rows `ids` of the table replaced by the float `rows` `(K, output_dim)`,
    stored as the table is (cast, or quantized in its format: every kind encodes rows one by
    one, so only those rows change), by an index update of each stored array."""
    encoded = table.kind.encode(table.arrays, rows)
    updated = {
        key: jnp.asarray(table.arrays[key])
        .at[ids]
        .set(encoded[key].astype(table.arrays[key].dtype))
        for key in table.kind.keys
    }
    return {**params, **updated}


def table_keys() -> set[str]:
    """Every key any table kind stores: the leaves LoRA freezes."""
    return {key for kind in KINDS for key in kind.keys}


def quantized_keys() -> set[str]:
    """Every key a quantized table stores: leaves that are never trained."""
    return {key for kind in KINDS if isinstance(kind, QuantizedTable) for key in kind.keys}


class CheckedWeights(np.ndarray):
    """A read-only NumPy copy of initial weights, already checked in its dtype: passing it on
    (a linen module is cloned on every `apply`) costs no second check or copy."""


def validated_weights(weights: Any, input_dim: int, output_dim: int, dtype: Any) -> np.ndarray:
    """`weights` as a checked, read-only NumPy copy of shape `(input_dim, output_dim)` in
    `dtype`, finite in that dtype (1e5 is finite, but not in a float16 table).

    A Keras-style one-element list `[matrix]` is accepted and unwrapped. The copy is the
    caller's matrix frozen at this moment: mutating theirs later changes nothing here.
    """
    dtype = np.dtype(dtype)
    if (
        isinstance(weights, CheckedWeights)
        and weights.dtype == dtype
        and weights.shape == (input_dim, output_dim)
    ):
        return weights
    expected = f"a numeric matrix of shape ({input_dim}, {output_dim})"
    fixed_when = "initial weights are fixed when the layer is built"
    array = _checks.concrete_array("weights", weights, expected, fixed_when)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(
            f"`weights` must be a 2-D matrix of shape ({input_dim}, {output_dim}). "
            f"Received: weights of shape {tuple(array.shape)} ({array.ndim}-D)."
        )
    if tuple(array.shape) != (input_dim, output_dim):
        raise ValueError(
            f"`weights` must have shape (input_dim, output_dim) = ({input_dim}, {output_dim}). "
            f"Received: weights of shape {tuple(array.shape)}."
        )
    if array.dtype.kind not in "iuf" and array.dtype != jnp.bfloat16:
        raise ValueError(
            "`weights` must hold real numbers (integer or floating-point). "
            f"Received: weights of dtype {array.dtype}."
        )
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(dtype)  # always a copy
    count = int(np.size(cast) - np.isfinite(cast).sum())
    if count:
        raise ValueError(
            f"`weights` must be finite. Received: weights with {count} NaN or infinite "
            f"value(s) once cast to param_dtype={dtype.name} (whose largest finite value is "
            f"{float(jnp.finfo(dtype).max):.4g})."
        )
    cast = cast.view(CheckedWeights)
    cast.flags.writeable = False
    return cast


def out_sharding(table: Table, indices: Indices) -> Any:
    """The output sharding of a lookup on an Explicit mesh (None elsewhere)."""
    return _mesh.gather_sharding(table.leading, indices.ids)
