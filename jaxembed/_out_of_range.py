"""The out-of-range policy: what an id outside `[0, input_dim)` gives, in one place.

| policy            | concrete ids (eager)  | traced ids, plain jit | traced ids under checkify |
|-------------------|-----------------------|-----------------------|---------------------------|
| "error" (default) | `IndexError` at once  | NaN rows              | the `IndexError` message  |
| "fill"            | NaN rows              | NaN rows              | NaN rows                  |
| "clip"            | nearest valid row     | nearest valid row     | nearest valid row         |

`prepare` turns user ids into `Indices`: gather indices in one integer dtype, plus whether
out-of-bounds entries must read as NaN. Every lookup (`jaxembed.apply`, the vocab-parallel
`shard_map`, the modules) and `check_in_range` go through it, so the policy is written once.

Ids are compared with the vocabulary in their own dtype before any narrowing cast: a NumPy
`int64` id `2**32 + 3` is out of range (not row 3) even when `jax_enable_x64` is off, and a
`uint32` id is never compared through a negative bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxembed import _checks

POLICIES = ("error", "fill", "clip")


def policy(value: Any) -> str:
    """Returns `value` if it names a policy, else raises listing them."""
    return _checks.one_of("out_of_range", value, POLICIES)


class Indices(NamedTuple):
    """Gather indices prepared by `prepare`.

    `ids` has the index dtype of the vocabulary (`index_dtype`). With `fill` False every entry
    lies in `[0, input_dim)`; with `fill` True an entry outside it must give a NaN row.
    """

    ids: jax.Array
    fill: bool

    def valid(self, input_dim: int) -> jax.Array:
        """Bool mask of the entries that name a row (all True when `fill` is False)."""
        return (self.ids >= 0) & (self.ids < input_dim)

    @property
    def gather_mode(self) -> str:
        """The `.at[].get` mode: "fill" reads out-of-bounds entries as the fill value."""
        return "fill" if self.fill else "promise_in_bounds"


def index_dtype(input_dim: int) -> np.dtype:
    """int32 when it can index every row, else int64 (which needs `jax_enable_x64`)."""
    if input_dim <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    if jax.config.jax_enable_x64:
        return np.dtype(np.int64)
    raise ValueError(
        f"`input_dim`={input_dim} rows cannot be indexed with int32 ids (at most "
        f"{np.iinfo(np.int32).max} rows): enable 64-bit ids with "
        "`jax.config.update('jax_enable_x64', True)` and pass int64 ids."
    )


def message(input_dim: int, bad_id: Any) -> str:
    """The message for an id outside the vocabulary; `bad_id` may be a checkify format field."""
    return (
        f"`ids` must lie in [0, input_dim) = [0, {input_dim}); got id {bad_id}. "
        "Pass out_of_range='clip' (a lookup clamps such ids) or out_of_range='fill' (a lookup "
        "gives NaN rows); a row-wise optimizer's update drops them under either."
    )


def _bounds(dtype: np.dtype, high: int, low: int = 0) -> tuple[bool, bool]:
    """Which comparisons can be false for ids of `dtype`: (id < low possible, id >= high
    possible). Skipping the impossible ones keeps every constant representable in `dtype`."""
    info = np.iinfo(dtype)
    return info.min < low, info.max >= high


def host_check(
    ids: np.ndarray, high: int, describe: Callable[[Any], str] | None = None, low: int = 0
) -> None:
    """`IndexError` naming the first id outside `[low, high)`, with the exact value the user
    passed; `describe(bad_id)` is the message (default: a vocabulary of `high` rows)."""
    bad = (ids < low) | (ids >= high)
    if bad.any():
        raise IndexError((describe or _vocabulary(high))(int(ids[bad].flat[0])))


def device_valid(ids: jax.Array, high: int, low: int = 0) -> jax.Array:
    """Bool mask of the ids in `[low, high)`, compared in the ids' own dtype."""
    can_be_low, can_be_high = _bounds(ids.dtype, high, low)
    valid = jnp.ones(ids.shape, bool)
    if can_be_low:
        valid &= ids >= jnp.asarray(low, ids.dtype)
    if can_be_high:
        valid &= ids < jnp.asarray(high, ids.dtype)
    return valid


def device_check(ids: jax.Array, valid: jax.Array, describe: Callable[[Any], str]) -> None:
    """Concrete ids: `IndexError` now. Traced ids: a check that checkify reports and that
    compiles to nothing otherwise (`checkify.debug_check`), so plain jit works. `describe`
    makes the message from the bad id (a checkify format field when traced)."""
    largest = jnp.asarray(np.iinfo(ids.dtype).max, ids.dtype)
    # A reduction rather than indexing at argmin: it also compiles for ids sharded over an
    # Explicit mesh; `initial` keeps it defined for empty ids. It names the smallest bad id.
    smallest_bad = jnp.min(jnp.where(valid, largest, ids), initial=largest)
    if _checks.is_traced(ids) or _checks.is_traced(valid):
        checkify.debug_check(jnp.all(valid), describe("{bad_id}"), bad_id=smallest_bad)
    elif not bool(jnp.all(valid)):
        raise IndexError(describe(smallest_bad.item()))


def _vocabulary(input_dim: int) -> Callable[[Any], str]:
    return lambda bad_id: message(input_dim, bad_id)


def _representable(ids: np.ndarray, input_dim: int, dtype: np.dtype) -> np.ndarray:
    """Host ids in `dtype` with every out-of-range value replaced by an out-of-range stand-in
    (-1 or input_dim) that `dtype` holds, so the narrowing cast cannot wrap it into range."""
    lowest = -1 if np.iinfo(ids.dtype).min < 0 else 0
    return np.clip(ids, lowest, input_dim).astype(dtype)


def check(ids: Any, input_dim: int) -> None:
    """The "error" policy's check alone (`jaxembed.check_in_range`)."""
    prepare(ids, input_dim, "error")


def prepare(ids: Any, input_dim: int, out_of_range: str) -> Indices:
    """Validated integer ids -> `Indices` for a vocabulary of `input_dim` rows.

    "error" checks (see the module's table), then gathers like "fill"; "fill" keeps
    out-of-range ids and gathers with NaN fill; "clip" clamps.
    """
    ids = _checks.integer_ids(ids)
    out_of_range = policy(out_of_range)
    dtype = index_dtype(input_dim)
    if isinstance(ids, np.ndarray):
        if out_of_range == "error":
            host_check(ids, input_dim)
        ids = jnp.asarray(_representable(ids, input_dim, dtype))
    elif out_of_range == "error":
        device_check(ids, device_valid(ids, input_dim), _vocabulary(input_dim))
    if out_of_range == "clip":
        can_be_negative, can_be_too_large = _bounds(ids.dtype, input_dim)
        if can_be_negative:
            ids = jnp.maximum(ids, 0)
        if can_be_too_large:
            ids = jnp.minimum(ids, jnp.asarray(input_dim - 1, ids.dtype))
        return Indices(ids.astype(dtype), fill=False)
    if np.can_cast(ids.dtype, dtype, casting="safe"):
        # A widening cast keeps every value, so the gather's bounds check sees the bad ones.
        return Indices(ids.astype(dtype), fill=True)
    return Indices(jnp.where(device_valid(ids, input_dim), ids.astype(dtype), -1), fill=True)


def update_ids(ids: Any, input_dim: int, policy_name: str, padding_idx: int | None) -> jax.Array:
    """The ids a row-wise update of a lookup's rows writes: clamped as the lookup clamped them
    under "clip" (the gradient flowed to the clamped row), out-of-range ones kept out of range
    (the update drops them), and `padding_idx` made out of range too (-1): torch's padding
    row receives no gradient, so no update either."""
    ids = prepare(ids, input_dim, "clip" if policy_name == "clip" else "fill").ids
    return ids if padding_idx is None else jnp.where(ids == padding_idx, -1, ids)
