"""Generic argument validators: one place for each kind of error message.

Each check names the argument, the value received and what was expected, so a user can fix
the call from the message alone. What is specific to a concept lives with the concept: the
params layout in `_table`, the out-of-range policy in `_out_of_range`, the Keras name registry
in `_registry`.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def describe(value: Any) -> str:
    """A short description of `value` for an error message; never the whole of a big array."""
    if isinstance(value, jax.core.Tracer):
        # Hyperparameters are static: a traced one means it went through jit as an argument.
        return (
            f"a traced value {jax.typeof(value)}; hyperparameters must be static Python "
            "values (bind them with functools.partial or jax.jit's static_argnames)"
        )
    shape = getattr(value, "shape", None)
    if shape is not None and np.size(value) > 8:
        return f"an array of shape {tuple(shape)} and dtype {getattr(value, 'dtype', '?')}"
    text = repr(value)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{text} (of type {type(value).__name__})"


def dense(name: str, value: Any) -> Any:
    """`value` with a JAX sparse array (`jax.experimental.sparse.BCOO`, `BCSR`) made dense, as
    Keras's `Embedding` reads sparse ids on the JAX backend (implicit zeros are id 0); a SciPy
    sparse matrix is refused naming the fix. Anything else comes back as it is."""
    # Looked up, not imported: without the module loaded no value can be one of its arrays.
    jax_sparse = sys.modules.get("jax.experimental.sparse")
    if jax_sparse is not None and isinstance(value, jax_sparse.JAXSparse):
        if value.dtype != jnp.bool_:
            return value.todense()
        # Densifying sums duplicates, which JAX refuses for bools: count, then compare.
        children, aux = value.tree_flatten()
        counts = type(value).tree_unflatten(aux, (children[0].astype(jnp.int32), *children[1:]))
        return counts.todense() != 0
    scipy_sparse = sys.modules.get("scipy.sparse")
    if scipy_sparse is not None and scipy_sparse.issparse(value):
        raise TypeError(
            f"`{name}` must be an array; a SciPy sparse matrix is not read implicitly. "
            f"Received: {name} of type {type(value).__name__}; pass `{name}.toarray()`."
        )
    return value


def host_array(name: str, value: Any, expected: str, error: type[Exception]) -> np.ndarray:
    """`np.asarray(value)`, or `error` naming `name` when NumPy cannot make an array of it
    (ragged nested lists, arbitrary objects); JAX sparse arrays are made dense first."""
    value = dense(name, value)
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as cause:
        raise error(
            f"`{name}` must be {expected}. Received: {name}={describe(value)}, which is not "
            f"array-like ({cause})."
        ) from None


def concrete_array(name: str, value: Any, expected: str, fixed_when: str) -> np.ndarray:
    """`host_array` (errors are ValueErrors) for a value that must be known before tracing:
    a traced one is refused, saying it is fixed `fixed_when`."""
    if is_traced(value):
        raise ValueError(
            f"`{name}` must be concrete (a list or a NumPy / JAX array), not traced: {fixed_when}."
        )
    return host_array(name, value, expected, ValueError)


def is_traced(value: Any) -> bool:
    """True when `value` is abstract (inside jit, vmap, grad...), so its values are unknown."""
    return isinstance(value, jax.core.Tracer)


def positive_int(name: str, value: Any) -> int:
    """Returns `value` if it is a positive Python/NumPy integer (not a bool), else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={describe(value)}."
        )
    return int(value)


def _finite_number(name: str, value: Any, *, positive: bool) -> float:
    """`value` as a float if it is a finite real number, > 0 or >= 0 as asked; else raises."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not np.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        expected = "positive" if positive else "non-negative"
        raise ValueError(
            f"`{name}` must be a finite {expected} number. Received: {name}={describe(value)}."
        )
    return float(value)


def non_negative_float(name: str, value: Any) -> float:
    """Returns `value` as a float if it is a finite number >= 0, else raises."""
    return _finite_number(name, value, positive=False)


def positive_number(name: str, value: Any) -> float:
    """Returns `value` as a float if it is a finite number > 0, else raises."""
    return _finite_number(name, value, positive=True)


def one_of(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """Returns `value` if it is one of `choices`, else raises listing them."""
    if not isinstance(value, str | bool | int | type(None)) or value not in choices:
        raise ValueError(
            f"`{name}` must be one of {list(choices)}. Received: {name}={describe(value)}."
        )
    return value


def boolean(name: str, value: Any) -> bool:
    """Returns `value` if it is True or False (a Python or NumPy bool; not 1 or 0), else
    raises."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(
            f"`{name}` must be one of [True, False]. Received: {name}={describe(value)}."
        )
    return bool(value)


def axis_of_matrix(name: str, value: Any) -> int:
    """Returns `value` if it is an axis of a 2-D matrix (0, 1, -1 or -2), else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -2 <= value <= 1:
        raise ValueError(
            f"`{name}` must be an axis of the 2-D embeddings matrix (0 or 1). "
            f"Received: {name}={describe(value)}."
        )
    return int(value)


def floating_dtype(name: str, value: Any) -> np.dtype:
    """Returns `value` as a NumPy dtype if it names a floating-point dtype, else raises."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating-point dtype such as jnp.float32 or jnp.bfloat16. "
            f"Received: {name}={describe(value)}."
        )
    return dtype


def optional_floating_dtype(name: str, value: Any) -> np.dtype | None:
    """As `floating_dtype`, but `None` passes through (meaning: follow the params)."""
    return None if value is None else floating_dtype(name, value)


def integer_ids(ids: Any, name: str = "ids") -> np.ndarray | jax.Array:
    """Returns `ids` as an integer array; refuses floats, bools and ragged nests of lists.

    JAX arrays (traced or not) come back as they are. Anything else comes back as a NumPy array
    in the dtype NumPy gives it, 64-bit included: converting to a JAX array here could narrow
    `2**32 + 3` to `3` when `jax_enable_x64` is off, so the out-of-range policy looks at the
    exact values first (`_out_of_range.prepare`).
    """
    ids = dense(name, ids)
    if not isinstance(ids, jax.Array):
        expected = "a rectangular array of integers (token indices)"
        ids = host_array(name, ids, expected, TypeError)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must hold integers (token indices). Received: {name} of dtype "
            f"{ids.dtype}. Floating-point or boolean ids are refused rather than truncated: "
            "cast them yourself with `ids.astype(jnp.int32)` if truncation is what you want."
        )
    return ids


def last_dim(name: str, array: Any, expected: int, expected_name: str) -> None:
    """Raises unless `array`'s last dimension is `expected`."""
    if array.ndim == 0 or array.shape[-1] != expected:
        raise ValueError(
            f"`{name}` must have last dimension {expected_name}={expected}. "
            f"Received: {name} of shape {tuple(array.shape)}."
        )


def floating_array(name: str, value: Any) -> jax.Array:
    """Returns `value` as a JAX array if it holds floating-point numbers, else raises (a JAX
    sparse array is made dense first)."""
    array = jnp.asarray(dense(name, value))
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array. Received: {name} of dtype {array.dtype}."
        )
    return array


def as_array_or_none(value: Any) -> jax.Array | None:
    """`value` as a JAX array, or None when it is not array-like (None, a string, ...)."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):
        return None


def callable_output(argument: str, function: Any, output: Any, expected: str, ok: bool) -> Any:
    """Returns `output` when `ok`, else raises: a user callable (`argument`) returned something
    other than what jaxembed needs."""
    if not ok:
        shape = getattr(output, "shape", None)
        received = f"an array of shape {tuple(shape)}" if shape is not None else describe(output)
        raise ValueError(
            f"`{argument}` must return {expected}. Received: {describe(function)} returned "
            f"{received}."
        )
    return output
