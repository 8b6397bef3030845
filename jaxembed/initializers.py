"""Keras initializer names -> JAX initializers `(key, shape, dtype) -> array`.

Every factory takes Keras's arguments with Keras's defaults, so `get("uniform")` is
`keras.initializers.get("uniform")` (U(-0.05, 0.05)) drawn with a JAX key. Any JAX initializer
callable, such as `jax.nn.initializers.normal(0.02)`, is accepted as is.

Example:
    >>> import jax, jaxembed
    >>> table = jaxembed.initializers.get("glorot_uniform")(jax.random.key(0), (100, 8))
    >>> table.shape
    (100, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxembed import _checks, _registry

__all__ = [
    "NAMES",
    "Initializer",
    "InitializerLike",
    "constant",
    "get",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "identity",
    "lecun_normal",
    "lecun_uniform",
    "ones",
    "orthogonal",
    "random_normal",
    "random_uniform",
    "truncated_normal",
    "variance_scaling",
    "zeros",
]

Initializer: TypeAlias = Callable[..., jax.Array]
"""`(key, shape, dtype) -> array`, the signature of `jax.nn.initializers`."""

InitializerLike: TypeAlias = str | Initializer


def random_uniform(minval: float = -0.05, maxval: float = 0.05) -> Initializer:
    """Keras `RandomUniform`: U(minval, maxval); the Keras name "uniform" uses the defaults.

    Returns:
        An `Initializer`: `(key, shape, dtype=jnp.float32)` -> an array of that shape and
        (floating) dtype, as every initializer here.

    Example:
        >>> import jax, jaxembed
        >>> x = jaxembed.initializers.random_uniform(0.0, 1.0)(jax.random.key(0), (100, 8))
        >>> x.shape, x.dtype, bool((x >= 0).all() and (x < 1).all())
        ((100, 8), dtype('float32'), True)
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval, maxval)

    return init


def random_normal(mean: float = 0.0, stddev: float = 0.05) -> Initializer:
    """Keras `RandomNormal`: N(mean, stddev^2); the Keras name "normal" uses the defaults.

    Example:
        >>> import jax, jaxembed
        >>> x = jaxembed.initializers.random_normal(1.0, 0.1)(jax.random.key(0), (100, 100))
        >>> abs(float(x.mean()) - 1.0) < 0.01
        True
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
        return mean + stddev * jax.random.normal(key, shape, dtype)

    return init


def truncated_normal(mean: float = 0.0, stddev: float = 0.05) -> Initializer:
    """Keras `TruncatedNormal`: N(mean, stddev^2) redrawn beyond two standard deviations.

    Example:
        >>> import jax, jaxembed
        >>> x = jaxembed.initializers.truncated_normal()(jax.random.key(0), (100, 8))
        >>> bool(abs(x).max() <= 2 * 0.05)
        True
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
        return mean + stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


def constant(value: float = 0.0) -> Initializer:
    """Keras `Constant`: every entry equals `value` (Keras's default is 0); the key is unused.

    Example:
        >>> import jax, jaxembed
        >>> jaxembed.initializers.constant(0.5)(jax.random.key(0), (1, 2)).tolist()
        [[0.5, 0.5]]
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
        del key
        return jnp.full(shape, value, dtype)

    return init


def identity(gain: float = 1.0) -> Initializer:
    """Keras `Identity`: `gain` times the (possibly rectangular) identity matrix.

    Raises:
        ValueError: (from the initializer) a shape that is not 2-D.

    Example:
        >>> import jax, jaxembed
        >>> jaxembed.initializers.identity(2.0)(jax.random.key(0), (2, 3)).tolist()
        [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
        del key
        if len(shape) != 2:
            raise ValueError(
                "The identity initializer builds 2-D matrices only. "
                f"Received: shape={tuple(shape)}."
            )
        return gain * jnp.eye(*shape, dtype=dtype)

    return init


def orthogonal(gain: float = 1.0) -> Initializer:
    """Keras `Orthogonal`: orthonormal rows or columns (whichever are fewer), times `gain`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> x = jaxembed.initializers.orthogonal()(jax.random.key(0), (10, 4))
        >>> bool(jnp.allclose(x.T @ x, jnp.eye(4), atol=1e-5))
        True
    """
    draw = jax.nn.initializers.orthogonal(scale=gain)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
        # The QR decomposition has no bfloat16/float16 kernel on CPU: draw wide, then cast.
        wide = jnp.promote_types(dtype, jnp.float32)
        return draw(key, shape, wide).astype(dtype)

    return init


# Keras reads "normal" as the truncated normal (a legacy name); "untruncated_normal" is not.
_DISTRIBUTIONS = {
    "truncated_normal": "truncated_normal",
    "normal": "truncated_normal",
    "untruncated_normal": "normal",
    "uniform": "uniform",
}


def variance_scaling(
    scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal"
) -> Initializer:
    """Keras `VarianceScaling`: variance `scale / n`, n the fan given by `mode`.

    For the `(input_dim, output_dim)` table, fan_in is `input_dim` and fan_out `output_dim`,
    as Keras computes them for 2-D shapes.

    Raises:
        ValueError: a non-positive `scale`, or an unknown `mode` or `distribution`.

    Example:
        >>> import jax, jaxembed
        >>> init = jaxembed.initializers.variance_scaling(2.0, "fan_out", "uniform")
        >>> x = init(jax.random.key(0), (100, 8))  # U(-limit, limit), limit = sqrt(3 * 2 / 8)
        >>> bool(abs(x).max() <= (3 * 2.0 / 8) ** 0.5)
        True
    """
    _checks.positive_number("scale", scale)
    _checks.one_of("mode", mode, ("fan_in", "fan_out", "fan_avg"))
    _checks.one_of("distribution", distribution, tuple(_DISTRIBUTIONS))
    return jax.nn.initializers.variance_scaling(scale, mode, _DISTRIBUTIONS[distribution])


def glorot_uniform() -> Initializer:
    """Keras `GlorotUniform`: variance_scaling(1, "fan_avg", "uniform").

    Example:
        >>> import jax, jaxembed
        >>> x = jaxembed.initializers.glorot_uniform()(jax.random.key(0), (100, 8))
        >>> bool(abs(x).max() <= (6 / (100 + 8)) ** 0.5)
        True
    """
    return variance_scaling(1.0, "fan_avg", "uniform")


def glorot_normal() -> Initializer:
    """Keras `GlorotNormal`: variance_scaling(1, "fan_avg", "truncated_normal").

    Example:
        >>> import jax, jaxembed
        >>> x = jaxembed.initializers.glorot_normal()(jax.random.key(0), (50, 150))
        >>> abs(float(x.std()) - (1 / 100) ** 0.5) < 0.01
        True
    """
    return variance_scaling(1.0, "fan_avg", "truncated_normal")


def he_uniform() -> Initializer:
    """Keras `HeUniform`: variance_scaling(2, "fan_in", "uniform").

    Example:
        >>> import jax, jaxembed
        >>> x = jaxembed.initializers.he_uniform()(jax.random.key(0), (100, 8))
        >>> bool(abs(x).max() <= (6 / 100) ** 0.5)
        True
    """
    return variance_scaling(2.0, "fan_in", "uniform")


def he_normal() -> Initializer:
    """Keras `HeNormal`: variance_scaling(2, "fan_in", "truncated_normal").

    Example:
        >>> import jax, jaxembed
        >>> x = jaxembed.initializers.he_normal()(jax.random.key(0), (200, 500))
        >>> abs(float(x.std()) - (2 / 200) ** 0.5) < 0.01
        True
    """
    return variance_scaling(2.0, "fan_in", "truncated_normal")


def lecun_uniform() -> Initializer:
    """Keras `LecunUniform`: variance_scaling(1, "fan_in", "uniform").

    Example:
        >>> import jax, jaxembed
        >>> x = jaxembed.initializers.lecun_uniform()(jax.random.key(0), (100, 8))
        >>> bool(abs(x).max() <= (3 / 100) ** 0.5)
        True
    """
    return variance_scaling(1.0, "fan_in", "uniform")


def lecun_normal() -> Initializer:
    """Keras `LecunNormal`: variance_scaling(1, "fan_in", "truncated_normal").

    Example:
        >>> import jax, jaxembed
        >>> x = jaxembed.initializers.lecun_normal()(jax.random.key(0), (100, 1000))
        >>> abs(float(x.std()) - (1 / 100) ** 0.5) < 0.01
        True
    """
    return variance_scaling(1.0, "fan_in", "truncated_normal")


def zeros() -> Initializer:
    """Keras `Zeros`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> x = jaxembed.initializers.zeros()(jax.random.key(0), (2, 3), jnp.bfloat16)
        >>> x.dtype, float(abs(x).max())
        (dtype(bfloat16), 0.0)
    """
    return constant(0.0)


def ones() -> Initializer:
    """Keras `Ones`.

    Example:
        >>> import jax, jaxembed
        >>> jaxembed.initializers.ones()(jax.random.key(0), (1, 2)).tolist()
        [[1.0, 1.0]]
    """
    return constant(1.0)


_FACTORIES: dict[str, Callable[[], Initializer]] = {
    "random_uniform": random_uniform,
    "random_normal": random_normal,
    "truncated_normal": truncated_normal,
    "zeros": zeros,
    "ones": ones,
    "constant": constant,
    "identity": identity,
    "orthogonal": orthogonal,
    "variance_scaling": variance_scaling,
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "he_uniform": he_uniform,
    "he_normal": he_normal,
    "lecun_uniform": lecun_uniform,
    "lecun_normal": lecun_normal,
}
# Keras's short aliases and legacy class names.
_ALIASES = {
    "uniform": "random_uniform",
    "normal": "random_normal",
    "zero": "zeros",
    "one": "ones",
    "identity_initializer": "identity",
    "orthogonal_initializer": "orthogonal",
}
NAMES: tuple[str, ...] = tuple(sorted({*_FACTORIES, *_ALIASES}))
"""Every initializer name `get` accepts (CamelCase class names such as "RandomUniform" too)."""


def get(identifier: Any) -> Initializer:
    """Resolves a Keras initializer name, or passes a `(key, shape, dtype)` callable through.

    Args:
        identifier: a Keras name ("uniform", "glorot_normal", "RandomNormal", ...) or a JAX
            initializer callable.

    Returns:
        An initializer `(key, shape, dtype) -> array`.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or a non-callable.

    Example:
        >>> import jax, jaxembed
        >>> init = jaxembed.initializers.get("uniform")
        >>> float(abs(init(jax.random.key(0), (4, 3))).max()) <= 0.05
        True
    """
    return _registry.resolve("embeddings_initializer", identifier, _FACTORIES, _ALIASES)
