"""Argument validation shared by every public function: one place for each error message.

Each check names the argument, the value received and what was expected, so a user can fix
the call from the message alone.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

OUT_OF_RANGE_POLICIES = ("error", "fill", "clip")


def _describe(value: Any) -> str:
    if isinstance(value, jax.core.Tracer):
        # Hyperparameters are static: a traced one means it went through jit as an argument.
        return (
            f"a traced value {jax.typeof(value)}; hyperparameters must be static Python "
            "values (bind them with functools.partial or jax.jit's static_argnames)"
        )
    return f"{value!r} (of type {type(value).__name__})"


def positive_int(name: str, value: Any) -> int:
    """Returns `value` if it is a positive Python/NumPy integer (not a bool), else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={_describe(value)}."
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
            f"`{name}` must be a finite {expected} number. Received: {name}={_describe(value)}."
        )
    return float(value)


def non_negative_float(name: str, value: Any) -> float:
    """Returns `value` as a float if it is a finite number >= 0, else raises."""
    return _finite_number(name, value, positive=False)


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Returns `value` if it is one of `choices`, else raises listing them."""
    choices = tuple(choices)
    if not isinstance(value, str | bool | int | type(None)) or value not in choices:
        raise ValueError(
            f"`{name}` must be one of {list(choices)}. Received: {name}={_describe(value)}."
        )
    return value


def axis_of_matrix(name: str, value: Any) -> int:
    """Returns `value` if it is an axis of a 2-D matrix (0, 1, -1 or -2), else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -2 <= value <= 1:
        raise ValueError(
            f"`{name}` must be an axis of the 2-D embeddings matrix (0 or 1). "
            f"Received: {name}={_describe(value)}."
        )
    return int(value)


def out_of_range_policy(value: Any) -> str:
    """Returns `value` if it is a known out-of-range policy, else raises."""
    return one_of("out_of_range", value, OUT_OF_RANGE_POLICIES)


def floating_dtype(name: str, value: Any) -> jnp.dtype:
    """Returns `value` as a NumPy dtype if it names a floating-point dtype, else raises."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating-point dtype such as jnp.float32 or jnp.bfloat16. "
            f"Received: {name}={_describe(value)}."
        )
    return dtype


def optional_floating_dtype(name: str, value: Any) -> jnp.dtype | None:
    """As `floating_dtype`, but `None` passes through (meaning: follow the params)."""
    return None if value is None else floating_dtype(name, value)


def integer_ids(ids: Any, name: str = "ids") -> jax.Array:
    """Returns `ids` as an integer JAX array; refuses floats and bools instead of truncating.

    Integer types narrower than 32 bits are widened to int32, so that comparisons with the
    vocabulary size (which may not fit in int8) and the out-of-range sentinel are exact.
    """
    dtype = getattr(ids, "dtype", None)
    if dtype is None:
        # Python ints and nested lists: let NumPy infer, so 1.5 in a list is caught below.
        dtype = np.asarray(ids).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must hold integers (token indices). Received: {name} of dtype {dtype}. "
            "Floating-point or boolean ids are refused rather than truncated: cast them "
            "yourself with `ids.astype(jnp.int32)` if truncation is what you want."
        )
    ids = jnp.asarray(ids)
    if ids.dtype.itemsize < 4:
        ids = ids.astype(jnp.int32)
    return ids


def is_traced(value: Any) -> bool:
    """True when `value` is abstract (inside jit, vmap, grad...), so its values are unknown."""
    return isinstance(value, jax.core.Tracer)


def first_out_of_range(ids: jax.Array, input_dim: int) -> int | None:
    """For concrete ids: the first id outside [0, input_dim), or None when all are valid."""
    host_ids = np.asarray(ids)
    bad = (host_ids < 0) | (host_ids >= input_dim)
    if not bad.any():
        return None
    return int(host_ids[bad].flat[0])


def out_of_range_message(input_dim: int, bad_id: Any) -> str:
    """The message for an id outside the vocabulary; `bad_id` may be a checkify format field."""
    return (
        f"`ids` must lie in [0, input_dim) = [0, {input_dim}); got id {bad_id}. "
        "Pass out_of_range='clip' to clamp such ids or out_of_range='fill' to get NaN rows."
    )


def weights_matrix(weights: Any, input_dim: int, output_dim: int) -> Any:
    """Returns `weights` as a checked `(input_dim, output_dim)` array of real numbers, or raises.

    A Keras-style one-element list `[matrix]` is accepted and unwrapped. The result may share
    memory with `weights`: copy it (`jnp.array`) before use so the caller's object stays intact.
    """
    if is_traced(weights):
        array = weights
    else:
        try:
            array = np.asarray(weights)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"`weights` must be a numeric matrix of shape ({input_dim}, {output_dim}). "
                f"Received: weights={_describe(weights)}, which is not array-like ({error})."
            ) from None
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
    kind = np.dtype(array.dtype).kind
    if kind not in "iuf" and array.dtype != jnp.bfloat16:
        raise ValueError(
            "`weights` must hold real numbers (integer or floating-point). "
            f"Received: weights of dtype {array.dtype}."
        )
    if not is_traced(array):
        count = int(np.size(array) - np.isfinite(np.asarray(array, dtype=np.float64)).sum())
        if count:
            raise ValueError(
                f"`weights` must be finite. Received: weights with {count} NaN or infinite "
                "value(s)."
            )
    return array


def _snake_case(name: str) -> str:
    """Keras class names ("RandomUniform", "L1L2", "MaxNorm") -> their snake names."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def resolve_identifier(
    argument: str,
    identifier: Any,
    factories: Mapping[str, Callable[[], Any]],
    aliases: Mapping[str, str],
) -> Any:
    """A Keras-style identifier -> a function: a name (snake or CamelCase, or an alias) is
    built by its factory with Keras's defaults; a callable passes through; else ValueError.
    """
    if isinstance(identifier, str):
        for name in (identifier, _snake_case(identifier)):
            name = aliases.get(name, name)
            if name in factories:
                return factories[name]()
    elif callable(identifier):
        return identifier
    valid = sorted({*factories, *aliases})
    if isinstance(identifier, str):
        raise ValueError(
            f"Unknown `{argument}`: {identifier!r}. Expected one of {valid} (or their Keras "
            "class names), or a callable."
        )
    raise ValueError(
        f"`{argument}` must be one of {valid} or a callable. "
        f"Received: {argument}={_describe(identifier)}."
    )


def last_dim(name: str, array: jax.Array, expected: int, expected_name: str) -> None:
    if array.ndim == 0 or array.shape[-1] != expected:
        raise ValueError(
            f"`{name}` must have last dimension {expected_name}={expected}. "
            f"Received: {name} of shape {tuple(array.shape)}."
        )


def floating_array(name: str, value: Any) -> jax.Array:
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array. Received: {name} of dtype {array.dtype}."
        )
    return array


def positive_number(name: str, value: Any) -> float:
    """Returns `value` as a float if it is a finite number > 0, else raises."""
    return _finite_number(name, value, positive=True)


def embeddings_table(params: Any) -> jax.Array:
    """Returns params["embeddings"], checked to be a 2-D floating-point table."""
    if not isinstance(params, dict) or "embeddings" not in params:
        keys = list(params) if isinstance(params, dict) else None
        raise ValueError(
            "`params` must be a dict holding the table under 'embeddings' (as returned by "
            f"jaxembed.init). Received: params={_describe(params) if keys is None else keys}."
        )
    table = params["embeddings"]
    if hasattr(table, "unbox"):
        raise ValueError(
            "params['embeddings'] is a boxed flax param "
            f"({type(table).__name__}); unbox the variables first: `flax.linen.unbox(params)`."
        )
    if getattr(table, "ndim", None) != 2:
        raise ValueError(
            "params['embeddings'] must be a 2-D (input_dim, output_dim) array. "
            f"Received: shape {getattr(table, 'shape', None)}."
        )
    return jnp.asarray(table)


LORA_A = "lora_embeddings_a"
LORA_B = "lora_embeddings_b"


def lora_weights(params: dict[str, Any]) -> tuple[jax.Array, jax.Array] | None:
    """Returns (A, B) when params hold a LoRA adapter, checked against the table; else None."""
    present = [key for key in (LORA_A, LORA_B) if key in params]
    if not present:
        return None
    if len(present) == 1:
        raise ValueError(
            f"params hold {present[0]!r} but not its partner: a LoRA adapter needs both "
            f"{LORA_A!r} (input_dim, rank) and {LORA_B!r} (rank, output_dim)."
        )
    input_dim, output_dim = embeddings_table(params).shape
    a, b = jnp.asarray(params[LORA_A]), jnp.asarray(params[LORA_B])
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != input_dim or b.shape != (a.shape[1], output_dim):
        raise ValueError(
            f"LoRA weights must have shapes {LORA_A}=(input_dim, rank)=({input_dim}, rank) and "
            f"{LORA_B}=(rank, output_dim)=(rank, {output_dim}). Received: "
            f"{tuple(a.shape)} and {tuple(b.shape)}."
        )
    return a, b


def no_lora_with_constraint(function: str) -> ValueError:
    """Keras refuses LoRA together with an embeddings constraint; so do we."""
    return ValueError(
        f"{function}: LoRA is incompatible with embedding constraints (as in Keras): the table "
        "is frozen under LoRA. Remove the `embeddings_constraint`, or merge the adapter first."
    )
