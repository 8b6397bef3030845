"""Keras constraint names -> projections `matrix -> matrix`, and the optax transformation
that enforces one after every optimizer step.

Keras assigns `constraint(variable)` after each optimizer update. In optax terms that is a
`GradientTransformation` placed last in the chain whose updates land the params on the
constrained set, in the manner of `optax.keep_params_nonnegative`.

Example:
    >>> import optax, jaxembed
    >>> tx = optax.chain(optax.adam(1e-3), jaxembed.keep_embeddings_constrained("max_norm"))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

from jaxembed import _checks, _paths

Constraint: TypeAlias = Callable[[jax.Array], jax.Array]
"""`matrix -> projected matrix` of the same shape."""

ConstraintLike: TypeAlias = str | Constraint | None

# Keras's backend.epsilon(), added to norms before dividing.
_EPSILON = 1e-7


def _column_norms(w: jax.Array, axis: int) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=axis, keepdims=True))


def max_norm(max_value: float = 2.0, axis: int = 0) -> Constraint:
    """Keras `MaxNorm`: rescales slices along `axis` whose L2 norm exceeds `max_value`.

    With Keras's default `axis=0` each *column* (one feature over the whole vocabulary) is
    constrained; pass `axis=1` to constrain each token's embedding vector.
    """
    max_value = _checks.non_negative_float("max_value", max_value)
    axis = _checks.axis_of_matrix("axis", axis)

    def project(w: jax.Array) -> jax.Array:
        norms = _column_norms(w, axis)
        return w * (jnp.clip(norms, 0, max_value) / (_EPSILON + norms))

    return project


def min_max_norm(
    min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: int = 0
) -> Constraint:
    """Keras `MinMaxNorm`: moves slice norms towards [min_value, max_value] at `rate`."""
    min_value = _checks.non_negative_float("min_value", min_value)
    max_value = _checks.non_negative_float("max_value", max_value)
    rate = _checks.non_negative_float("rate", rate)
    axis = _checks.axis_of_matrix("axis", axis)

    def project(w: jax.Array) -> jax.Array:
        norms = _column_norms(w, axis)
        desired = rate * jnp.clip(norms, min_value, max_value) + (1 - rate) * norms
        return w * (desired / (_EPSILON + norms))

    return project


def non_neg() -> Constraint:
    """Keras `NonNeg`: negative entries become 0."""
    return lambda w: jnp.maximum(w, 0)


def unit_norm(axis: int = 0) -> Constraint:
    """Keras `UnitNorm`: every slice along `axis` is divided by its L2 norm."""
    axis = _checks.axis_of_matrix("axis", axis)
    return lambda w: w / (_EPSILON + _column_norms(w, axis))


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
    return _checks.resolve_identifier("embeddings_constraint", identifier, _FACTORIES, {})


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

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> params = {"embeddings": jnp.full((4, 1), 3.0)}  # column norm 6
        >>> projected = jaxembed.apply_constraint(params, "max_norm")  # max_value=2, axis=0
        >>> round(float(jnp.linalg.norm(projected["embeddings"])), 4)
        2.0
    """
    table = _checks.embeddings_table(params)
    constraint = get(embeddings_constraint)
    if constraint is None:
        return dict(params)
    if _checks.lora_weights(params) is not None:
        raise _checks.no_lora_with_constraint("apply_constraint")
    return {**params, "embeddings": jnp.asarray(constraint(table)).astype(table.dtype)}


class KeepConstrainedState(NamedTuple):
    """No state: the projection depends on the params alone."""


def keep_embeddings_constrained(
    embeddings_constraint: Any, *, param_name: str = "embeddings"
) -> optax.GradientTransformation:
    """An optax transformation that keeps every embeddings table on the constraint set.

    Place it last in an `optax.chain`. For each leaf whose key is `param_name` (all jaxembed
    tables in a Flax model, linen or NNX, boxed or not) the update becomes
    `constraint(params + updates) - params`, so that `optax.apply_updates` lands on the
    projected table, as Keras's post-step `variable.assign(constraint(variable))` does.
    Other leaves pass through untouched.

    Args:
        embeddings_constraint: as accepted by `get` (not None).
        param_name: the key that marks a table to constrain.

    Returns:
        An `optax.GradientTransformation` whose `update` requires `params`.

    Example:
        >>> import jax.numpy as jnp, optax, jaxembed
        >>> params = {"embeddings": jnp.ones((4, 2))}
        >>> tx = optax.chain(optax.sgd(1.0), jaxembed.keep_embeddings_constrained("non_neg"))
        >>> grads = {"embeddings": jnp.full((4, 2), 3.0)}
        >>> updates, _ = tx.update(grads, tx.init(params), params)
        >>> optax.apply_updates(params, updates)["embeddings"].min().item()
        0.0
    """
    constraint = get(embeddings_constraint)
    if constraint is None:
        raise ValueError(
            "`embeddings_constraint` must name a constraint or be a callable. "
            "Received: embeddings_constraint=None."
        )

    def init_fn(params: Any) -> KeepConstrainedState:
        del params
        return KeepConstrainedState()

    def update_fn(
        updates: Any, state: KeepConstrainedState, params: Any = None
    ) -> tuple[Any, KeepConstrainedState]:
        if params is None:
            raise ValueError(
                "keep_embeddings_constrained needs the current params: call "
                "`tx.update(updates, state, params)`. Received: params=None."
            )
        if _paths.tables_beside_lora(params):
            raise _checks.no_lora_with_constraint("keep_embeddings_constrained")

        def project(path: tuple[Any, ...], update: jax.Array, param: jax.Array) -> jax.Array:
            if _paths.param_name(path) != param_name:
                return update
            projected = jnp.asarray(constraint(param + update)).astype(param.dtype)
            return (projected - param).astype(update.dtype)

        return jax.tree_util.tree_map_with_path(project, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)
