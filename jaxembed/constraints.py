"""Keras constraint names -> projections `matrix -> matrix`, and `apply_constraint`.

Keras assigns `constraint(variable)` after each optimizer update; the optax transformation
that does so in a training loop is `jaxembed.keep_embeddings_constrained` (`jaxembed.optim`).

Example:
    >>> import jax.numpy as jnp, jaxembed
    >>> unit = jaxembed.constraints.get("unit_norm")(jnp.array([[3.0], [4.0]]))
    >>> [round(float(x), 4) for x in unit.ravel()]
    [0.6, 0.8]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp

from jaxembed import _checks, _registry, _table, lora

__all__ = [
    "NAMES",
    "Constraint",
    "ConstraintLike",
    "apply_constraint",
    "get",
    "max_norm",
    "min_max_norm",
    "non_neg",
    "project",
    "unit_norm",
]

Constraint: TypeAlias = Callable[[jax.Array], jax.Array]
"""`matrix -> projected matrix` of the same shape."""

ConstraintLike: TypeAlias = str | Constraint | None

# Keras's backend.epsilon(), added to norms before dividing.
_EPSILON = 1e-7


def _column_norms(w: jax.Array, axis: int) -> jax.Array:
    # Summed in float32 at least: squares of a float16 table overflow long before its norms.
    squares = jnp.square(w.astype(jnp.promote_types(w.dtype, jnp.float32)))
    return jnp.sqrt(jnp.sum(squares, axis=axis, keepdims=True))


def max_norm(max_value: float = 2.0, axis: int = 0) -> Constraint:
    """Keras `MaxNorm`: rescales slices along `axis` whose L2 norm exceeds `max_value`.

    With Keras's default `axis=0` each *column* (one feature over the whole vocabulary) is
    constrained; pass `axis=1` to constrain each token's embedding vector.

    Returns:
        A `Constraint`: a float `(input_dim, output_dim)` matrix -> the projected matrix, same
        shape (computed in at least float32; `apply_constraint` casts back to the table's
        dtype). The other constraints here return the same kind of function.

    Raises:
        ValueError: a negative or non-finite `max_value`, or an `axis` not 0 or 1 (-1, -2).

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> w = jnp.array([[3.0, 4.0], [0.6, 0.8]])
        >>> projected = jaxembed.constraints.max_norm(2.0, axis=1)(w)
        >>> jnp.linalg.norm(projected, axis=1).round(4).tolist()
        [2.0, 1.0]
    """
    max_value = _checks.non_negative_float("max_value", max_value)
    return _registry.Bound("max_norm", _max_norm, (max_value, _checks.axis_of_matrix("axis", axis)))


def _max_norm(max_value: float, axis: int, w: jax.Array) -> jax.Array:
    norms = _column_norms(w, axis)
    return w * (jnp.clip(norms, 0, max_value) / (_EPSILON + norms))


def min_max_norm(
    min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: int = 0
) -> Constraint:
    """Keras `MinMaxNorm`: moves slice norms towards [min_value, max_value] at `rate`.

    Returns a `Constraint` as `max_norm`'s.

    Raises:
        ValueError: a negative or non-finite bound or rate, or an `axis` not 0 or 1.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> w = jnp.array([[0.3, 0.4], [3.0, 4.0]])
        >>> projected = jaxembed.constraints.min_max_norm(1.0, 2.0, axis=1)(w)
        >>> jnp.linalg.norm(projected, axis=1).round(4).tolist()
        [1.0, 2.0]
    """
    arguments = (
        _checks.non_negative_float("min_value", min_value),
        _checks.non_negative_float("max_value", max_value),
        _checks.non_negative_float("rate", rate),
        _checks.axis_of_matrix("axis", axis),
    )
    return _registry.Bound("min_max_norm", _min_max_norm, arguments)


def _min_max_norm(
    min_value: float, max_value: float, rate: float, axis: int, w: jax.Array
) -> jax.Array:
    norms = _column_norms(w, axis)
    desired = rate * jnp.clip(norms, min_value, max_value) + (1 - rate) * norms
    return w * (desired / (_EPSILON + norms))


def non_neg() -> Constraint:
    """Keras `NonNeg`: negative entries become 0 (a `Constraint`, same shape and dtype).

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> jaxembed.constraints.non_neg()(jnp.array([[-1.0, 2.0]])).tolist()
        [[0.0, 2.0]]
    """
    return _registry.Bound("non_neg", _non_neg)


def _non_neg(w: jax.Array) -> jax.Array:
    return jnp.maximum(w, 0)


def unit_norm(axis: int = 0) -> Constraint:
    """Keras `UnitNorm`: every slice along `axis` is divided by its L2 norm.

    Returns a `Constraint` as `max_norm`'s.

    Raises:
        ValueError: an `axis` not 0 or 1 (-1, -2).

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> unit = jaxembed.constraints.unit_norm(axis=1)(jnp.array([[3.0, 4.0]]))
        >>> bool(jnp.allclose(unit, jnp.array([[0.6, 0.8]])))
        True
    """
    return _registry.Bound("unit_norm", _unit_norm, (_checks.axis_of_matrix("axis", axis),))


def _unit_norm(axis: int, w: jax.Array) -> jax.Array:
    return w / (_EPSILON + _column_norms(w, axis))


_FACTORIES: dict[str, Callable[[], Constraint]] = {
    "max_norm": max_norm,
    "min_max_norm": min_max_norm,
    "non_neg": non_neg,
    "unit_norm": unit_norm,
}
NAMES: tuple[str, ...] = tuple(sorted(_FACTORIES))
"""Every constraint name `get` accepts (Keras class names such as "MaxNorm" too)."""


def get(identifier: Any) -> Constraint | None:
    """Resolves a Keras constraint name or passes a callable through; `None` stays `None`.

    Args:
        identifier: None, a name ("max_norm", "non_neg", "UnitNorm", ...), or any callable
            `matrix -> matrix`, e.g. `max_norm(3.0, axis=1)` or a Keras constraint instance.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or a non-callable.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> jaxembed.constraints.get("non_neg")(jnp.array([[-1.0, 2.0]])).tolist()
        [[0.0, 2.0]]
    """
    if identifier is None:
        return None
    return _registry.resolve("embeddings_constraint", identifier, _FACTORIES, {})


def project(constraint: Constraint, matrix: jax.Array) -> jax.Array:
    """`constraint(matrix)` in `matrix`'s dtype, refusing an output of another shape (a user
    callable returning a transposed or broadcastable matrix would silently corrupt the table).

    Raises:
        ValueError: the constraint returned something other than an array of `matrix`'s
            shape.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> matrix = jnp.ones((3, 2), jnp.bfloat16)
        >>> out = jaxembed.constraints.project(jaxembed.constraints.max_norm(1.0), matrix)
        >>> out.shape, out.dtype
        ((3, 2), dtype(bfloat16))
    """
    projected = _checks.as_array_or_none(constraint(matrix))
    _checks.callable_output(
        "embeddings_constraint",
        constraint,
        projected,
        f"a matrix of the table's shape {tuple(matrix.shape)}",
        projected is not None and projected.shape == matrix.shape,
    )
    return projected.astype(matrix.dtype)


def refuse_quantized(function: str) -> ValueError:
    """A quantized table is frozen (as Keras's): no constraint can project it."""
    return ValueError(
        f"{function}: a quantized table is frozen (its int8/int4 values are never trained, as "
        "in Keras), so an `embeddings_constraint` cannot apply to it. Remove the constraint, "
        "or constrain the float table before quantizing it."
    )


def apply_constraint(
    params: dict[str, jax.Array], embeddings_constraint: Any
) -> dict[str, jax.Array]:
    """Projects the embeddings table onto the constraint set; other entries pass through.

    Args:
        params: a jaxembed params dict, table `(input_dim, output_dim)` under "embeddings".
        embeddings_constraint: as accepted by `get`; `None` returns params unchanged.

    Returns:
        A new params dict (the input is not modified) whose table is
        `constraint(params["embeddings"])`, cast back to the table's dtype.

    Raises:
        ValueError: params holding a LoRA adapter (the table is frozen), or a constraint
            returning a matrix of another shape.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> params = {"embeddings": jnp.full((4, 1), 3.0)}  # column norm 6
        >>> projected = jaxembed.apply_constraint(params, "max_norm")  # max_value=2, axis=0
        >>> round(float(jnp.linalg.norm(projected["embeddings"])), 4)
        2.0
    """
    table = _table.view(params)
    constraint = get(embeddings_constraint)
    if constraint is None:
        return dict(params)
    if table.adapter is not None or table.tokens is not None:
        raise lora.refuse_constraint("apply_constraint")
    if isinstance(table.kind, _table.QuantizedTable):
        raise refuse_quantized("apply_constraint")
    return _table.with_dense(params, table, project(constraint, table.dense()))
