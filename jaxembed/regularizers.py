"""Keras regularizer names -> penalty functions `matrix -> scalar`, and the penalty of params.

The factories take Keras's arguments and defaults and compute Keras's formulas, so the penalty
equals `keras.regularizers.get(name)(matrix)`, in the matrix's dtype; sums run in float32 at
least, so a float16 table's penalty does not overflow where Keras's does.

Example:
    >>> import jax.numpy as jnp, jaxembed
    >>> params = {"embeddings": jnp.ones((10, 4))}
    >>> round(float(jaxembed.regularization_penalty(params, "l2")), 6)  # 0.01 * 40
    0.4
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp

from jaxembed import _checks, _registry, _table

__all__ = [
    "NAMES",
    "Regularizer",
    "RegularizerLike",
    "get",
    "l1",
    "l1_l2",
    "l2",
    "orthogonal_regularizer",
    "regularization_penalty",
]

Regularizer: TypeAlias = Callable[[jax.Array], jax.Array]
"""`matrix -> scalar penalty`."""

RegularizerLike: TypeAlias = str | Regularizer | None

# Keras's backend.epsilon(), the floor under norms in its normalize().
_EPSILON = 1e-7


def _at_least_float32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _l1_penalty(factor: float, x: jax.Array) -> jax.Array:
    return (factor * jnp.sum(jnp.abs(_at_least_float32(x)))).astype(x.dtype)


def _l2_penalty(factor: float, x: jax.Array) -> jax.Array:
    return (factor * jnp.sum(jnp.square(_at_least_float32(x)))).astype(x.dtype)


def _l1_l2_penalty(factor_l1: float, factor_l2: float, x: jax.Array) -> jax.Array:
    return _l1_penalty(factor_l1, x) + _l2_penalty(factor_l2, x)


def l1(l1: float = 0.01) -> Regularizer:
    """Keras `L1`: `l1 * sum(|x|)`.

    Returns:
        A `Regularizer`: a float matrix -> a scalar penalty in the matrix's dtype (summed in
        at least float32), as every regularizer here.

    Raises:
        ValueError: a negative or non-finite factor.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> float(jaxembed.regularizers.l1(0.5)(jnp.array([[-1.0, 2.0]])))
        1.5
    """
    return _registry.Bound("l1", _l1_penalty, (_checks.non_negative_float("l1", l1),))


def l2(l2: float = 0.01) -> Regularizer:
    """Keras `L2`: `l2 * sum(x**2)`.

    Raises:
        ValueError: a negative or non-finite factor.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> float(jaxembed.regularizers.l2(0.5)(jnp.array([[-1.0, 2.0]])))
        2.5
    """
    return _registry.Bound("l2", _l2_penalty, (_checks.non_negative_float("l2", l2),))


def l1_l2(l1: float = 0.01, l2: float = 0.01) -> Regularizer:
    """Keras `L1L2`: `l1 * sum(|x|) + l2 * sum(x**2)`.

    The defaults are those Keras documents for the name "l1_l2" (0.01 each). Keras 3 itself
    refuses the string "l1_l2" and gives zero factors for "l1l2"; see the differences from
    Keras in docs/guides/keras.md.

    Raises:
        ValueError: a negative or non-finite factor.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> float(jaxembed.regularizers.l1_l2(0.5, 0.5)(jnp.array([[-1.0, 2.0]])))
        4.0
    """
    factors = (_checks.non_negative_float("l1", l1), _checks.non_negative_float("l2", l2))
    return _registry.Bound("l1_l2", _l1_l2_penalty, factors)


def orthogonal_regularizer(factor: float = 0.01, mode: str = "rows") -> Regularizer:
    """Keras `OrthogonalRegularizer`: mean `|cosine|` between distinct rows (or columns).

    Unlike Keras, the penalty of a single row is 0 (Keras divides by zero pairs: NaN), and an
    all-zero row has a finite gradient (Keras's `rsqrt(0)` gives NaN gradients).

    Warning: in "rows" mode this builds an `(input_dim, input_dim)` matrix; keep it for small
    vocabularies.

    Returns:
        A `Regularizer`: `(input_dim, output_dim)` float matrix -> a scalar penalty in its
        dtype, `factor * mean |cosine|` over the pairs.

    Raises:
        ValueError: a negative or non-finite factor, or a mode other than "rows" or
            "columns".

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> penalty = jaxembed.regularizers.orthogonal_regularizer(1.0)
        >>> float(penalty(jnp.eye(3))), round(float(penalty(jnp.ones((3, 2)))), 4)
        (0.0, 1.0)
    """
    factor = _checks.non_negative_float("factor", factor)
    _checks.one_of("mode", mode, ("rows", "columns"))
    return _registry.Bound("orthogonal_regularizer", _orthogonal_penalty, (factor, mode))


def _orthogonal_penalty(factor: float, mode: str, matrix: jax.Array) -> jax.Array:
    axis = 1 if mode == "rows" else 0
    x = _at_least_float32(matrix)
    squared_norms = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    # Keras's floor on 1/norm, written so that a zero row differentiates to 0, not NaN.
    floor = _EPSILON**2
    inv_norm = jax.lax.rsqrt(jnp.maximum(squared_norms, floor))
    unit = x * inv_norm
    product = unit @ unit.T if mode == "rows" else unit.T @ unit
    size = product.shape[0]
    if size < 2:
        return jnp.zeros((), matrix.dtype)
    off_diagonal = product * (1.0 - jnp.eye(size, dtype=x.dtype))
    num_pairs = size * (size - 1.0) / 2.0
    return (factor * 0.5 * jnp.sum(jnp.abs(off_diagonal)) / num_pairs).astype(matrix.dtype)


_FACTORIES: dict[str, Callable[[], Regularizer]] = {
    "l1": l1,
    "l2": l2,
    "l1_l2": lambda: l1_l2(0.01, 0.01),
    "orthogonal_regularizer": orthogonal_regularizer,
}
_ALIASES = {"l1l2": "l1_l2", "orthogonal": "orthogonal_regularizer"}
NAMES: tuple[str, ...] = tuple(sorted({*_FACTORIES, *_ALIASES}))
"""Every regularizer name `get` accepts (Keras class names such as "L1L2" too)."""


def get(identifier: Any) -> Regularizer | None:
    """Resolves a Keras regularizer name or passes a callable through; `None` stays `None`.

    Args:
        identifier: None, a name ("l1", "l2", "l1_l2", "L2", ...), or any callable
            `matrix -> scalar`: a factory result such as `l2(0.1)`, or a Keras regularizer
            instance such as `keras.regularizers.L2(0.1)` on the JAX backend.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or a non-callable.

    Example:
        >>> import jaxembed
        >>> jaxembed.regularizers.get(None) is None
        True
    """
    if identifier is None:
        return None
    return _registry.resolve("embeddings_regularizer", identifier, _FACTORIES, _ALIASES)


def regularization_penalty(params: dict[str, jax.Array], embeddings_regularizer: Any) -> jax.Array:
    """The penalty of the trainable weights, a scalar to add to the training loss.

    As Keras, the penalty covers the trainable weights: the table, or, under LoRA (table
    frozen), `regularizer(A) + regularizer(B)`, plus `regularizer(delta)` for trainable tokens
    (the delta alone with a frozen table and no adapter). A quantized table without an adapter is
    penalized on its dequantized values (a constant, since nothing trains it; Keras gives no
    penalty there).

    Args:
        params: a jaxembed params dict with the `(input_dim, output_dim)` table under
            "embeddings" (and a LoRA adapter, if enabled).
        embeddings_regularizer: as accepted by `get`. `None` gives a penalty of 0.

    Returns:
        A scalar array (in the penalized weights' dtype, float32 under LoRA), equal to the sum
        of Keras's `layer.losses` for the same weights.

    Raises:
        ValueError: malformed params, an unknown regularizer name, or a regularizer that does
            not return a real scalar.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> params = {"embeddings": -jnp.ones((3, 2))}
        >>> float(jaxembed.regularization_penalty(params, jaxembed.regularizers.l1(0.5)))
        3.0
    """
    table = _table.view(params)
    regularizer = get(embeddings_regularizer)
    if regularizer is None:
        return jnp.zeros((), table.dtype)
    trainable = (*(table.adapter or ()), *(() if table.tokens is None else (table.tokens.delta,)))
    weights = trainable or (table.dense(),)
    penalties = [_penalty(regularizer, weight) for weight in weights]
    return sum(penalties[1:], start=penalties[0])


def _penalty(regularizer: Regularizer, weight: jax.Array) -> jax.Array:
    """`regularizer(weight)`, refusing anything but a real scalar (a user callable returning
    a vector or None would otherwise broadcast into the loss or fail far away)."""
    penalty = regularizer(weight)
    array = _checks.as_array_or_none(penalty)
    real = array is not None and jnp.issubdtype(array.dtype, jnp.number)
    ok = real and array.ndim == 0 and not jnp.issubdtype(array.dtype, jnp.complexfloating)
    return _checks.callable_output(
        "embeddings_regularizer", regularizer, array, "a real scalar", ok
    )
