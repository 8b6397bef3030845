"""Quantized tables: int8 and int4 embeddings that gather before they dequantize.

`quantize(params, mode)` turns a float table into int8 values (int4: two per byte) with
float32 scales, rounding exactly as Keras 3.15's `Embedding.quantize` does, so the stored
integers are identical to Keras's. Every function then takes the quantized params as it takes
float ones: `apply` gathers the stored rows and their scales and dequantizes only those rows;
`attend` dequantizes one chunk of the vocabulary at a time (never a float copy of the table);
`enable_lora` adds float32 A and B (QLoRA: the quantized arrays are never trained);
`merge_lora` dequantizes, adds the delta in float32 and requantizes in the same format.

Example:
    >>> import jax, jax.numpy as jnp, jaxembed
    >>> params = jaxembed.init(jax.random.key(0), 1000, 64)
    >>> q = jaxembed.quantize(params, "int4")
    >>> sorted(q), q["embeddings_int4"].shape
    (['embeddings_int4', 'embeddings_scale'], (1000, 32))
    >>> error = jaxembed.apply(q, jnp.arange(10)) - jaxembed.apply(params, jnp.arange(10))
    >>> bool(jnp.abs(error).max() < 0.05 / 7 + 1e-6)  # half a step: max|row| / 7 / 2
    True

The params layout (`jaxembed._table` owns the key names):

+------------------+------------------------------------------------------------------------+
| mode, block_size | keys and shapes                                                        |
+==================+========================================================================+
| "int8", None     | "embeddings_int8" int8 `(V, D)`, "embeddings_scale" float32 `(V,)`     |
+------------------+------------------------------------------------------------------------+
| "int4", None     | "embeddings_int4" int8 `(V, D/2)` packed, "embeddings_scale" `(V,)`    |
+------------------+------------------------------------------------------------------------+
| "int4", B        | "embeddings_int4" `(V, D/2)`, "embeddings_scale" float32 and           |
|                  | "embeddings_zero" int8, both `(V, D/B)`                                |
+------------------+------------------------------------------------------------------------+

Per-row formats: `value = q / scale` (symmetric abs-max; the error is at most `0.5 / scale`);
grouped: `value = (q - zero) * scale` per block of B columns (asymmetric min-max; the error is
at most `0.5 * scale`), each before float rounding.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxembed import _checks, _quantized, _table
from jaxembed._table import Params

__all__ = [
    "MODES",
    "dequantize",
    "is_quantized",
    "parse_format",
    "quantization_format",
    "quantize",
    "split_format",
]

MODES = _quantized.MODES


def _format(mode: Any, block_size: Any, output_dim: int) -> _quantized.Format:
    mode = _checks.one_of("mode", mode, MODES)
    if block_size is not None:
        block_size = _checks.positive_int("block_size", block_size)
        if output_dim % block_size:
            raise ValueError(
                f"`block_size` must divide output_dim={output_dim} (every group of columns has "
                f"one scale and zero point). Received: block_size={block_size}."
            )
    if mode == "int4" and output_dim % 2:
        raise ValueError(
            f"int4 packs two values per byte along output_dim, which must be even. Received: "
            f"output_dim={output_dim}. Pad the table with a zero column (an extra embedding "
            "dimension), or use mode='int8'."
        )
    return _quantized.Format(mode, block_size)


def parse_format(quantization: Any, output_dim: int) -> _quantized.Format | None:
    """Reads the modules' `quantization` argument: None, "int8", "int4", or "int4/128" (mode
    and block size, Keras's dtype-policy spelling); raises a ValueError naming it otherwise.

    Returns:
        None, or the format: its `mode` and `block_size` (None: one scale per row).

    Raises:
        ValueError: an unknown spelling, a block size not dividing `output_dim`, or int4
            with an odd `output_dim`.

    Example:
        >>> import jaxembed
        >>> jaxembed.quantization.parse_format("int4/128", output_dim=256).block_size
        128
    """
    if quantization is None:
        return None
    return _format(*split_format(quantization), output_dim)


def split_format(quantization: Any) -> tuple[str, int | None]:
    """("int4", 128) from "int4/128", ("int8", None) from "int8"; a ValueError naming
    `quantization` for anything else. Block sizes are checked against a table by
    `parse_format`.

    Raises:
        ValueError: anything but "int8", "int4" or a mode with a decimal block size.

    Example:
        >>> import jaxembed
        >>> jaxembed.quantization.split_format("int4/128")
        ('int4', 128)
    """
    mode, slash, block = (
        quantization.partition("/") if isinstance(quantization, str) else ("", "", "")
    )
    if mode not in MODES or (slash and not block.isdigit()):
        raise ValueError(
            '`quantization` must be None, "int8", "int4", or a mode with a block size such as '
            f'"int4/128". Received: quantization={quantization!r}.'
        )
    return mode, int(block) if block else None


def quantize(params: Params, mode: str, *, block_size: int | None = None) -> Params:
    """Quantizes the table of float params to int8 or int4, as Keras 3.15 does.

    Rounding is Keras's, operation for operation: int8 and per-row int4 are symmetric abs-max
    per row (`q = clip(round(x * scale), ...)`, `scale = qmax / (max|row| + 1e-7)`, ranges
    [-127, 127] and [-8, 7]); with `block_size` each block of columns of a row gets an
    asymmetric min-max step and an int8 zero point (Keras's
    `Int4QuantizationConfig(block_size=...)`, whose default is 128). Works under `jax.jit`.

    Args:
        params: float params from `init` (a LoRA adapter beside the table is kept as is).
        mode: "int8" or "int4".
        block_size: None: one scale per row. An int dividing `output_dim`: a scale and zero
            point per block of that many columns (each block's range includes 0).

    Returns:
        `{"embeddings_int8" | "embeddings_int4": values, "embeddings_scale": (V,) or (V, D/B)
        float32, ["embeddings_zero": (V, D/B) int8]}` plus the adapter, if any; the values
        are int8, `(V, D)` for int8 and `(V, D/2)` (two per byte) for int4.

    Raises:
        ValueError: an unknown mode, params already quantized, a `block_size` that is not a
            positive int dividing `output_dim`, or int4 with an odd `output_dim`.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 100, 256)
        >>> q = jaxembed.quantize(params, "int4", block_size=128)
        >>> q["embeddings_int4"].shape, q["embeddings_scale"].shape, q["embeddings_zero"].dtype
        ((100, 128), (100, 2), dtype('int8'))
    """
    table = _table.view(params)
    if is_quantized(params):
        raise ValueError(
            f"`params` are already quantized ({quantization_format(params)}). Dequantize them "
            f"first (jaxembed.dequantize) to quantize again. Received: mode={mode!r}."
        )
    fmt = _format(mode, block_size, table.output_dim)
    stored = _table.quantized_kind(fmt).store(_quantized.quantize(table.dense(), fmt))
    rest = {key: value for key, value in params.items() if key not in table.kind.keys}
    return {**rest, **stored}


def dequantize(params: Params, *, dtype: DTypeLike = jnp.float32) -> Params:
    """Float params from quantized ones: `{"embeddings": (V, D) table}` plus the adapter.

    Builds the whole float table; `apply` and `attend` never need it (they dequantize only the
    rows they use).

    Args:
        params: from `quantize`.
        dtype: the float table's dtype.

    Raises:
        ValueError: params that are not quantized (or malformed), or a non-floating dtype.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 100, 8)
        >>> back = jaxembed.dequantize(jaxembed.quantize(params, "int8"))
        >>> float(abs(back["embeddings"] - params["embeddings"]).max()) < 0.05 / 127
        True
    """
    table = _table.view(params)
    dtype = _checks.floating_dtype("dtype", dtype)
    if not is_quantized(params):
        raise ValueError(
            "`params` must hold a quantized table (from jaxembed.quantize). Received: params "
            f"with keys {sorted(params)}."
        )
    return _table.with_dense(params, table, table.dense().astype(dtype), as_float=True)


def is_quantized(params: Params) -> bool:
    """True when params hold a quantized table (validated).

    Raises:
        ValueError: malformed params (no table, or arrays of mismatched shapes).

    Example:
        >>> import jax, jaxembed
        >>> jaxembed.quantization.is_quantized(jaxembed.init(jax.random.key(0), 10, 4))
        False
    """
    return isinstance(_table.view(params).kind, _table.QuantizedTable)


def quantization_format(params: Params) -> str | None:
    """ "int8", "int4", or "int4/128" (mode and block size) for quantized params; None for
    float ones (Keras's dtype-policy spelling).

    Raises:
        ValueError: malformed params.

    Example:
        >>> import jax, jaxembed
        >>> q = jaxembed.quantize(jaxembed.init(jax.random.key(0), 10, 256), "int4",
        ...                       block_size=128)
        >>> jaxembed.quantization.quantization_format(q)
        'int4/128'
    """
    table = _table.view(params)
    if not isinstance(table.kind, _table.QuantizedTable):
        return None
    fmt = table.kind.format(table.arrays)
    return fmt.name
