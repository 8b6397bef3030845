"""The maths of quantized tables: Keras 3.15's rounding, int4 packing, and dequantizing rows.

Three formats, each bit-compatible with what `keras.layers.Embedding.quantize` stores:

| format          | values                    | per row                 | a value is         |
|-----------------|---------------------------|-------------------------|--------------------|
| int8            | int8 `(V, D)`, [-127, 127]| scale `(V,)`            | `q / scale`        |
| int4            | int8 `(V, D/2)`, packed   | scale `(V,)`            | `q / scale`        |
| int4, block `B` | int8 `(V, D/2)`, packed   | scale, zero `(V, D/B)`  | `(q - zero) * scale` |

Per-row formats are symmetric abs-max (`scale = qmax / (max|row| + 1e-7)`, a multiplier, as
Keras stores it); grouped formats are asymmetric min-max per block of `B` columns (`scale` is
the step `(max - min + 1e-7) / 15` and `zero` an int8 zero point, as Keras's
`abs_max_quantize_grouped_with_zero_point`, with each block's range widened to include 0 as
Keras fixed it after 3.15: identical for every block holding both signs). int4 packs two
values per byte along the columns: column `2j` in the low nibble of byte `j`, column `2j + 1`
in the high nibble (Keras's `pack_int4(axis=-1)`).

Everything here works on any leading shape, so one `dequantize` serves a gathered batch of
rows, a chunk of the vocabulary and the whole table alike.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

MODES = ("int8", "int4")
EPSILON = 1e-7
"""Keras's `backend.epsilon()`, added to the range before dividing (all-zero rows stay 0)."""


@dataclasses.dataclass(frozen=True)
class Format:
    """How a table is quantized: `mode` ("int8" or "int4") and `block_size` (None: per row)."""

    mode: str
    block_size: int | None = None

    @property
    def bits(self) -> int:
        return 8 if self.mode == "int8" else 4

    @property
    def packed(self) -> bool:
        """Two values per byte (int4)."""
        return self.bits == 4

    @property
    def grouped(self) -> bool:
        return self.block_size is not None

    @property
    def name(self) -> str:
        """ "int8", "int4" or "int4/128": Keras's dtype-policy spelling."""
        return self.mode if self.block_size is None else f"{self.mode}/{self.block_size}"

    @property
    def value_range(self) -> tuple[int, int]:
        """Keras's ranges: symmetric [-127, 127] for int8 per row, [-8, 7] for int4 (and the
        full signed range for any grouped format)."""
        low, high = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        if not self.grouped and self.bits == 8:
            low = -high
        return low, high


class Quantized(NamedTuple):
    """A quantized matrix: int8 `values` (packed for int4), float32 `scale`, int8 `zero` (None
    for per-row formats)."""

    values: jax.Array
    scale: jax.Array
    zero: jax.Array | None


@functools.partial(jax.jit, static_argnums=1)  # compiled once per shape: eager calls are fast
def quantize(matrix: jax.Array, fmt: Format) -> Quantized:
    """Quantizes `(..., D)` rows as Keras 3.15 does (float32 arithmetic, round half to even).

    `D` must be even for int4 and divisible by `fmt.block_size` when grouped (checked by the
    caller); the arithmetic is Keras's NumPy path, operation for operation, so the stored
    integers are identical.
    """
    x = matrix.astype(jnp.float32)
    low, high = fmt.value_range
    if fmt.grouped:
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // fmt.block_size, fmt.block_size)
        # Each block's range includes 0 (as keras-team/keras#23636, after 3.15): the zero
        # point is then always representable and every value within half a step. Keras 3.15
        # took the block's own min and max, pinning the zero point of a one-signed block to
        # the end of the range and clipping its codes (0.5 and 0.7 both became code 7).
        minimum = jnp.minimum(blocks.min(axis=-1, keepdims=True), 0.0)
        maximum = jnp.maximum(blocks.max(axis=-1, keepdims=True), 0.0)
        spread = (maximum - minimum) + EPSILON
        step = spread / _unbroadcast(jnp.float32(high - low), spread)
        zero = jnp.clip(jnp.round(-minimum / step) + low, low, high)
        q = jnp.round(blocks / _unbroadcast(step, blocks)) + zero
        q = jnp.clip(q, low, high).reshape(x.shape)
        scale, zero = step[..., 0], zero[..., 0].astype(jnp.int8)
    else:
        scale = high / (jnp.max(jnp.abs(x), axis=-1, keepdims=True) + EPSILON)
        q = jnp.clip(jnp.round(x * scale), low, high)
        scale, zero = scale[..., 0], None
    q = q.astype(jnp.int8)
    return Quantized(pack_int4(q) if fmt.packed else q, scale, zero)


def _unbroadcast(divisor: jax.Array, like: jax.Array) -> jax.Array:
    """`divisor` broadcast to `like`'s shape, so that XLA keeps a true division by it.

    XLA rewrites `x / broadcast(d)` as `x * broadcast(1 / d)`: one ulp off the correctly
    rounded quotient for about a third of the values, which turns rounding ties (a quotient of
    exactly k + 0.5) the other way than Keras's NumPy division. Adding `0 * like` (exactly
    zero for finite values, and fused away into the same loop) makes the divisor an array
    expression XLA cannot rewrite that way.
    """
    return divisor + 0 * jax.lax.stop_gradient(like)


def pack_int4(q: jax.Array) -> jax.Array:
    """`(..., D)` int8 values in [-8, 7] -> `(..., D/2)` bytes: even columns in the low nibble."""
    pairs = q.astype(jnp.int32).reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    byte = (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)
    return jnp.where(byte > 127, byte - 256, byte).astype(jnp.int8)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """`(..., D/2)` bytes -> `(..., D)` int32 values in [-8, 7].

    Each byte is repeated once per column and shifted so that the column's nibble lands in
    the top four bits, then shifted back down arithmetically (sign-extending it): one fused
    elementwise pass with a per-column shift and no select. Unpacking the low and high halves
    separately and interleaving them with stack/concatenate is markedly slower on CPU.
    """
    byte = packed.astype(jnp.int32)
    columns = 2 * packed.shape[-1]
    repeated = jnp.broadcast_to(byte[..., None], (*byte.shape, 2)).reshape(
        *byte.shape[:-1], columns
    )
    # Even columns: the low nibble (bits 0-3) moves to bits 28-31; odd: bits 4-7 do.
    shift = jnp.where(jnp.arange(columns) % 2 == 0, 28, 24)
    return (repeated << shift) >> 28


def integers(values: jax.Array, fmt: Format) -> jax.Array:
    """The stored integers, unpacked: `(..., D)`."""
    return unpack_int4(values) if fmt.packed else values


def dequantize(
    values: jax.Array, scale: jax.Array, zero: jax.Array | None, fmt: Format
) -> jax.Array:
    """Float32 rows from stored rows: `(..., D)` from values `(..., stored)` and the rows'
    scale `(...)` (per row) or scale and zero `(..., D / block)` (grouped).

    Elementwise the same operations as Keras's dequantization, so the floats agree exactly.
    """
    q = integers(values, fmt).astype(jnp.float32)
    if not fmt.grouped:
        return q / scale.astype(jnp.float32)[..., None]
    blocks = q.reshape(*q.shape[:-1], q.shape[-1] // fmt.block_size, fmt.block_size)
    zero = zero.astype(jnp.float32)[..., None]
    return ((blocks - zero) * scale.astype(jnp.float32)[..., None]).reshape(q.shape)
