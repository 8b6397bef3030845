"""optax transformations: the home of everything that changes how params are updated.

* `keep_embeddings_constrained`: Keras's post-step `variable.assign(constraint(variable))`,
  as a transformation placed last in a chain (in the manner of `optax.keep_params_nonnegative`).
* `freeze_lora_base`: zero updates and no optimizer state for tables frozen under LoRA.

Example:
    >>> import jax.numpy as jnp, optax, jaxembed
    >>> tx = optax.chain(optax.sgd(0.5), jaxembed.keep_embeddings_constrained("non_neg"))
    >>> params = {"embeddings": jnp.array([[0.25, 1.0]])}
    >>> updates, _ = tx.update({"embeddings": jnp.ones((1, 2))}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["embeddings"].tolist()  # 0.25 - 0.5 -> 0
    [[0.0, 0.5]]
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import optax

from jaxembed import _paths, constraints, lora

__all__ = ["KeepConstrainedState", "freeze_lora_base", "keep_embeddings_constrained"]


class KeepConstrainedState(NamedTuple):
    """No state: the projection depends on the params alone.

    Example:
        >>> import jax.numpy as jnp, jaxembed
        >>> tx = jaxembed.keep_embeddings_constrained("non_neg")
        >>> tx.init({"embeddings": jnp.ones((4, 2))})
        KeepConstrainedState()
    """


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
        embeddings_constraint: as accepted by `jaxembed.constraints.get` (not None).
        param_name: the key that marks a table to constrain.

    Returns:
        An `optax.GradientTransformation` whose `update` requires `params`; each table's
        update keeps its shape and dtype.

    Raises:
        ValueError: a None or unknown constraint; from `update`, params missing, a table with
            a LoRA adapter beside it (frozen), or a constraint changing the table's shape.

    Example:
        >>> import jax.numpy as jnp, optax, jaxembed
        >>> params = {"embeddings": jnp.ones((4, 2))}
        >>> tx = optax.chain(optax.sgd(1.0), jaxembed.keep_embeddings_constrained("non_neg"))
        >>> grads = {"embeddings": jnp.full((4, 2), 3.0)}
        >>> updates, _ = tx.update(grads, tx.init(params), params)
        >>> optax.apply_updates(params, updates)["embeddings"].min().item()
        0.0
    """
    constraint = constraints.get(embeddings_constraint)
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
            raise lora.refuse_constraint("keep_embeddings_constrained")

        def step(path: tuple[Any, ...], update: jax.Array, param: jax.Array) -> jax.Array:
            if _paths.param_name(path) != param_name:
                return update
            projected = constraints.project(constraint, param + update).astype(param.dtype)
            return (projected - param).astype(update.dtype)

        return jax.tree_util.tree_map_with_path(step, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def freeze_lora_base(
    tx: optax.GradientTransformation, *, adapters_only: bool = False
) -> optax.GradientTransformation:
    """`tx` for the trainable leaves (see `jaxembed.lora.trainable_labels`); zero updates and
    no optimizer state for the frozen ones.

    One line for a whole model: `tx = jaxembed.freeze_lora_base(optax.adam(1e-3))`. If the
    frozen leaves' gradients are computed but only fed here, XLA removes them from the compiled
    step. To not even trace them, differentiate `jaxembed.lora.split_trainable`'s first half.

    Raises:
        ValueError: (from `init` and `update`) an `adapters_only` that is not a bool.

    Example:
        >>> import jax, optax, jaxembed
        >>> tx = jaxembed.freeze_lora_base(optax.adam(1e-3))
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> # Adam's two moments for A (10x2) and B (2x4) and a step count; none for the table
        >>> sum(leaf.size for leaf in jax.tree.leaves(tx.init(params)))
        57
    """
    return optax.partition(
        {lora.TRAINABLE: tx, lora.FROZEN: optax.set_to_zero()},
        functools.partial(lora.trainable_labels, adapters_only=adapters_only),
    )
