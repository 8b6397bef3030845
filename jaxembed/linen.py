"""`flax.linen` Embedding: declares the params and calls the pure functions, nothing else.

Example:
    >>> import jax, jax.numpy as jnp, jaxembed
    >>> layer = jaxembed.Embedding(1000, 64)
    >>> ids = jnp.ones((32, 10), jnp.int32)
    >>> variables = layer.init(jax.random.key(0), ids)
    >>> layer.apply(variables, ids).shape
    (32, 10, 64)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxembed import (
    _config,
    _table,
    constraints,
    functional,
    initializers,
    lora,
    loss,
    regularizers,
)

__all__ = [
    "Embedding",
    "losses",
]


class Embedding(nn.Module):
    """Keras's `Embedding` as a `flax.linen.Module`, with Keras's argument names and defaults.

    Attributes:
        input_dim: vocabulary size (largest id + 1).
        output_dim: embedding dimension.
        embeddings_initializer: Keras initializer name or JAX initializer; default "uniform"
            (U(-0.05, 0.05)).
        embeddings_regularizer: Keras regularizer name or callable. Its penalty is sown into
            the "losses" collection as "embeddings_regularization" on every `__call__`.
        embeddings_constraint: Keras constraint name or callable; enforce it with
            `jaxembed.keep_embeddings_constrained` last in the optax chain.
        mask_zero: whether id 0 is padding (see `compute_mask`).
        weights: optional initial `(input_dim, output_dim)` matrix.
        lora_rank: if set, the table is frozen and a LoRA adapter of this rank is trained
            (params "lora_embeddings_a" and "lora_embeddings_b", float32).
        lora_alpha: LoRA scale numerator (`lora_alpha / lora_rank`); None means lora_rank.
        out_of_range: "error" (default: `IndexError` in eager code; NaN rows under plain
            `jax.jit`, the error under `checkify`), "fill" (NaN rows) or "clip"; see
            `jaxembed.apply`.
        dtype: output dtype; None keeps `param_dtype`.
        param_dtype: storage dtype of the table.

    The table is param "embeddings" with logical axes ("vocab", "embed").
    """

    input_dim: int
    output_dim: int
    embeddings_initializer: initializers.InitializerLike = "uniform"
    embeddings_regularizer: regularizers.RegularizerLike = None
    embeddings_constraint: constraints.ConstraintLike = None
    mask_zero: bool = False
    weights: ArrayLike | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    out_of_range: str = "error"
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32

    def __post_init__(self) -> None:
        config = _config.LayerConfig.of(self)  # fails here, at construction, as Keras does
        # The checked read-only copy, not the caller's array (see LayerConfig); flax's clones
        # (one per `apply`) then rebuild the config without a second check.
        object.__setattr__(self, "weights", config.weights)
        object.__setattr__(self, "_config", config)
        super().__post_init__()

    def setup(self) -> None:
        init_fn = self._config.table_initializer()
        self.embeddings = self.param(
            "embeddings",
            nn.with_logical_partitioning(init_fn, _config.TABLE_AXES),
            (self.input_dim, self.output_dim),
            self.param_dtype,
        )
        self.adapter = {}
        if self.lora_rank:
            shapes = lora.adapter_shapes(self.input_dim, self.output_dim, self.lora_rank)
            draws = lora.adapter_initializers()
            self.adapter = {
                name: self.param(
                    name,
                    nn.with_logical_partitioning(draws[name], _config.LORA_AXES[name]),
                    shapes[name],
                    _table.LORA_DTYPE,
                )
                for name in _table.LORA_KEYS
            }

    def _params(self) -> functional.Params:
        return {_table.EMBEDDINGS: self.embeddings, **self.adapter}

    def __call__(self, ids: ArrayLike) -> jax.Array:
        """Embeds `ids` (any integer shape) -> `ids.shape + (output_dim,)`."""
        params = self._params()
        if self.embeddings_regularizer is not None:
            # Overwrite rather than append: one penalty per layer however often it is called.
            self.sow(
                "losses",
                "embeddings_regularization",
                regularizers.regularization_penalty(params, self.embeddings_regularizer),
                init_fn=lambda: jnp.zeros(()),
                reduce_fn=lambda _, new: new,
            )
        return functional.apply(
            params,
            ids,
            dtype=self.dtype,
            out_of_range=self.out_of_range,
            lora_alpha=self.lora_alpha,
        )

    def compute_mask(self, ids: ArrayLike) -> jax.Array | None:
        """`ids != 0` when `mask_zero`, else None."""
        return functional.compute_mask(ids, self.mask_zero)

    def attend(self, query: ArrayLike, *, logit_soft_cap: float | None = None) -> jax.Array:
        """Tied logits `query @ embeddings.T`: `(..., output_dim)` -> `(..., input_dim)`."""
        return functional.attend(
            self._params(),
            query,
            dtype=self.dtype,
            lora_alpha=self.lora_alpha,
            logit_soft_cap=logit_soft_cap,
        )

    def attend_cross_entropy(
        self, query: ArrayLike, labels: ArrayLike, **options: Any
    ) -> jax.Array:
        """Cross-entropy of the tied logits against `labels`, never materializing the logits:
        `jaxembed.attend_cross_entropy` (keywords `where`, `logit_soft_cap`, `reduction`, ...)
        with this layer's params, `lora_alpha` and `dtype`."""
        return loss.attend_cross_entropy(
            self._params(), query, labels, lora_alpha=self.lora_alpha, dtype=self.dtype, **options
        )


def losses(variables: Any) -> jax.Array:
    """Sum of everything sown into the "losses" collection (0.0 when there is none).

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> layer = jaxembed.Embedding(10, 4, embeddings_regularizer="l2")
        >>> variables = layer.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
        >>> _, state = layer.apply(variables, jnp.zeros((2,), jnp.int32), mutable=["losses"])
        >>> float(jaxembed.linen.losses(state)) > 0
        True
    """
    collection = variables.get("losses", {}) if isinstance(variables, dict) else {}
    leaves = jax.tree_util.tree_leaves(collection)
    return sum((jnp.sum(leaf) for leaf in leaves), start=jnp.zeros(()))
