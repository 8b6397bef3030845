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

from collections.abc import Mapping, Sequence
from typing import Any

import flax
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
    quantization,
    regularizers,
    trainable_tokens,
    vocabulary,
)

__all__ = [
    "QUANTIZED",
    "Embedding",
    "losses",
    "quantize_variables",
    "resize_variables",
]

QUANTIZED = "quantized"
"""The variable collection holding quantized tables: they are never trained, so they stay out
of "params" (whose gradient a train step takes), as flax keeps "batch_stats" out."""


class Embedding(nn.Module):
    """Keras's `Embedding` as a `flax.linen.Module`, with Keras's argument names and defaults.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> layer = jaxembed.Embedding(1000, 64, mask_zero=True)
        >>> ids = jnp.array([[5, 7, 0]])
        >>> variables = layer.init(jax.random.key(0), ids)
        >>> out = layer.apply(variables, ids)
        >>> out.shape, out.dtype
        ((1, 3, 64), dtype('float32'))
        >>> layer.compute_mask(ids).tolist()
        [[True, True, False]]

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
        dtype: output dtype; None keeps `param_dtype` (float32 for a quantized table).
        param_dtype: storage dtype of the table.
        quantization: None, "int8", "int4" or "int4/128" (int4 with a scale and zero point
            per block of 128 columns; any block size dividing `output_dim`): the table is
            drawn (or taken from `weights`), quantized as `jaxembed.quantize`, and kept in
            the "quantized" collection, frozen. Add `lora_rank` for QLoRA.
        use_rslora: scale LoRA by `lora_alpha / sqrt(lora_rank)` (rank-stabilized LoRA, PEFT's
            `use_rslora`) instead of `lora_alpha / lora_rank`.
        padding_idx: torch's `nn.Embedding(padding_idx=)`: a drawn table has that row zeroed,
            and the row receives no gradient through the lookup (it is not masked: see
            `mask_zero` for that).
        num_lora_adapters: with `lora_rank`, n stacked adapters (A `(n, input_dim, rank)`, B
            `(n, rank, output_dim)`): each example picks one with `adapter_ids` (-1: none) in
            `__call__` and `attend` (serving many fine-tunes in one batch).
        trainable_token_ids: rows to train while the table stays frozen: param
            "trainable_tokens_delta" `(K, output_dim)` (zeros; logical axes (None, "embed"))
            is added to those rows (see `jaxembed.enable_trainable_tokens`). The ids are part
            of the module, not a variable.

    The table is param "embeddings" with logical axes ("vocab", "embed"). A quantized table's
    arrays ("embeddings_int8" or "embeddings_int4", "embeddings_scale", "embeddings_zero")
    live in the "quantized" collection, values on ("vocab", "embed"), scales and zero points
    on "vocab".

    Raises:
        ValueError: an invalid argument, at construction (as Keras checks them): a
            non-positive dimension, an unknown initializer, regularizer or constraint name,
            `weights` of the wrong shape or not real numbers, a bad LoRA or quantization
            option.
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
    # Documented under Attributes above; its default (a class, `jnp.float32`) would otherwise
    # get a second "alias of" entry from Sphinx's autodoc.
    #: :meta private:
    param_dtype: DTypeLike = jnp.float32
    quantization: str | None = None
    use_rslora: bool = False
    padding_idx: int | None = None
    num_lora_adapters: int | None = None
    trainable_token_ids: Sequence[int] | None = None

    def __post_init__(self) -> None:
        config = _config.LayerConfig.of(self)  # fails here, at construction, as Keras does
        # The checked read-only copy, not the caller's array (see LayerConfig); flax's clones
        # (one per `apply`) then rebuild the config without a second check.
        object.__setattr__(self, "weights", config.weights)
        object.__setattr__(self, "trainable_token_ids", config.trainable_token_ids)
        object.__setattr__(self, "_config", config)
        super().__post_init__()

    def setup(self) -> None:
        """Declares the variables (flax calls it; not meant to be called directly)."""
        fmt = quantization.parse_format(self.quantization, self.output_dim)
        if fmt is None:
            init_fn = self._config.table_initializer()
            self.table = {
                _table.EMBEDDINGS: self.param(
                    _table.EMBEDDINGS,
                    nn.with_logical_partitioning(init_fn, _config.TABLE_AXES),
                    (self.input_dim, self.output_dim),
                    self.param_dtype,
                )
            }
        else:
            self.table = self._quantized_table(fmt)
        self.adapter = {}
        if self.lora_rank:
            count = self.num_lora_adapters
            shapes = lora.adapter_shapes(
                self.input_dim, self.output_dim, self.lora_rank, num_adapters=count
            )
            draws = lora.adapter_initializers(num_adapters=count)
            self.adapter = {
                name: self.param(
                    name,
                    nn.with_logical_partitioning(
                        draws[name], _config.lora_axes(name, count is not None)
                    ),
                    shapes[name],
                    _table.LORA_DTYPE,
                )
                for name in _table.LORA_KEYS
            }
        self.tokens = {}
        if self.trainable_token_ids is not None:
            ids = self.trainable_token_ids
            delta = self.param(
                _table.TOKEN_DELTA,
                nn.with_logical_partitioning(nn.initializers.zeros, _config.TOKEN_DELTA_AXES),
                (len(ids), self.output_dim),
                trainable_tokens.TOKEN_DTYPE,
            )
            self.tokens = {_table.TOKEN_IDS: jnp.asarray(ids, jnp.int32), _table.TOKEN_DELTA: delta}

    def _quantized_table(self, fmt: Any) -> dict[str, jax.Array]:
        """The quantized arrays, drawn and quantized once when the variables are created."""
        drawn: dict[str, jax.Array] = {}

        def initial(name: str) -> jax.Array:
            if not drawn:
                key = None if self.weights is not None else self.make_rng("params")
                drawn.update(self._config.initial_params(key))
            return drawn[name]

        def boxed(name: str) -> Any:
            ndim = 1 if name == _table.SCALE and not fmt.grouped else 2
            axes = _config.quantized_axes(name, ndim)
            return nn.with_logical_partitioning(lambda: initial(name), axes)

        keys = _table.quantized_kind(fmt).keys
        return {name: self.variable(QUANTIZED, name, boxed(name)).value for name in keys}

    def _params(self) -> functional.Params:
        return {**self.table, **self.adapter, **self.tokens}

    def __call__(self, ids: ArrayLike, adapter_ids: ArrayLike | None = None) -> jax.Array:
        """Embeds `ids` (any integer shape) -> `ids.shape + (output_dim,)` in `dtype` (None:
        `param_dtype`, float32 for a quantized table); `adapter_ids` picks each example's
        adapter when `num_lora_adapters` is set.

        Raises:
            TypeError, IndexError, ValueError: as `jaxembed.apply`.

        Example:
            >>> import jax, jax.numpy as jnp, jaxembed
            >>> layer = jaxembed.Embedding(10, 4, dtype=jnp.bfloat16)
            >>> variables = layer.init(jax.random.key(0), jnp.arange(3))
            >>> out = layer.apply(variables, jnp.array([[1, 2]]))
            >>> out.shape, out.dtype
            ((1, 2, 4), dtype(bfloat16))
        """
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
            use_rslora=self.use_rslora,
            padding_idx=self.padding_idx,
            adapter_ids=adapter_ids,
        )

    def compute_mask(self, ids: ArrayLike) -> jax.Array | None:
        """`ids != 0` (bool, shaped like `ids`) when `mask_zero`, else None; needs no variables.

        Raises:
            TypeError: non-integer ids.

        Example:
            >>> import jax.numpy as jnp, jaxembed
            >>> jaxembed.Embedding(10, 4, mask_zero=True).compute_mask(jnp.array([3, 0])).tolist()
            [True, False]
        """
        return functional.compute_mask(ids, self.mask_zero)

    def attend(
        self,
        query: ArrayLike,
        adapter_ids: ArrayLike | None = None,
        *,
        logit_soft_cap: float | None = None,
    ) -> jax.Array:
        """Tied logits `query @ embeddings.T`: `(..., output_dim)` -> `(..., input_dim)`, in
        `dtype` (None: query and table promoted); see `jaxembed.attend`.

        Raises:
            TypeError, IndexError, ValueError: as `jaxembed.attend`.

        Example:
            >>> import jax, jax.numpy as jnp, jaxembed
            >>> layer = jaxembed.Embedding(10, 4)
            >>> variables = layer.init(jax.random.key(0), jnp.arange(3))
            >>> layer.apply(variables, jnp.ones((2, 4)), method="attend").shape
            (2, 10)
        """
        return functional.attend(
            self._params(),
            query,
            dtype=self.dtype,
            lora_alpha=self.lora_alpha,
            logit_soft_cap=logit_soft_cap,
            use_rslora=self.use_rslora,
            adapter_ids=adapter_ids,
        )

    def attend_cross_entropy(
        self, query: ArrayLike, labels: ArrayLike, **options: Any
    ) -> jax.Array:
        """Cross-entropy of the tied logits against `labels`, never materializing the logits:
        `jaxembed.attend_cross_entropy` (keywords `where`, `logit_soft_cap`, `reduction`, ...)
        with this layer's params, `lora_alpha` and `dtype`: query `(..., output_dim)`, integer
        labels `query.shape[:-1]`, a float32 scalar (per-position losses with
        `reduction="none"`).

        Raises:
            TypeError, IndexError, ValueError: as `jaxembed.attend_cross_entropy`.

        Example:
            >>> import jax, jax.numpy as jnp, jaxembed
            >>> layer = jaxembed.Embedding(10, 4)
            >>> variables = layer.init(jax.random.key(0), jnp.arange(3))
            >>> query, labels = jnp.ones((2, 4)), jnp.array([1, 9])
            >>> loss = layer.apply(variables, query, labels, method="attend_cross_entropy")
            >>> loss.shape, loss.dtype
            ((), dtype('float32'))
        """
        return loss.attend_cross_entropy(
            self._params(),
            query,
            labels,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            dtype=self.dtype,
            **options,
        )


def quantize_variables(
    variables: Mapping[str, Any], mode: str, *, block_size: int | None = None
) -> dict[str, Any]:
    """The variables of the quantized model from a float model's: every jaxembed table in
    `variables["params"]` (an "embeddings" entry, at any depth) is quantized as
    `jaxembed.quantize` and moved to the "quantized" collection at the same path; LoRA
    adapters and every other variable stay where they are. Apply them with the modules built
    with `quantization=mode` (or "mode/block_size"), e.g. `module.clone(quantization="int8")`.

    Logically partitioned tables stay partitioned: values on the table's axes, scales and zero
    points on its first ("vocab") axis.

    Raises:
        ValueError: no jaxembed table in `variables["params"]`, or what `jaxembed.quantize`
            raises (unknown mode, bad block size, odd `output_dim` for int4).

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> module = jaxembed.Embedding(100, 8)
        >>> variables = module.init(jax.random.key(0), jnp.arange(3))
        >>> quantized = jaxembed.linen.quantize_variables(variables, "int8")
        >>> sorted(quantized["quantized"]), quantized["params"]
        (['embeddings_int8', 'embeddings_scale'], {})
        >>> out = module.clone(quantization="int8").apply(quantized, jnp.arange(3))
        >>> out.shape
        (3, 8)
    """
    variables = flax.core.unfreeze(variables)

    def split(params: Any) -> tuple[Any, Any]:
        """(params left, quantized arrays) of one level of the params tree."""
        if not isinstance(params, dict):
            return params, None
        if _table.EMBEDDINGS in params:
            box = params[_table.EMBEDDINGS]
            # The table alone: adapters and tokens' deltas stay as they are, boxes and all.
            stored = quantization.quantize(
                {_table.EMBEDDINGS: nn.unbox(box)}, mode, block_size=block_size
            )
            quantized = dict(stored)
            if isinstance(box, nn.LogicallyPartitioned):
                vocab = box.names[0]
                quantized = {
                    key: box.replace_boxed(value)
                    if key in _table.QUANTIZED_VALUES.values()
                    else box.replace(value=value, names=(vocab, *(None,) * (value.ndim - 1)))
                    for key, value in quantized.items()
                }
            rest = {key: value for key, value in params.items() if key != _table.EMBEDDINGS}
            return rest, quantized
        pairs = {key: split(value) for key, value in params.items()}
        kept = {key: pair[0] for key, pair in pairs.items()}
        quantized = {key: pair[1] for key, pair in pairs.items() if pair[1]}
        return kept, quantized

    params, quantized = split(variables.get("params", {}))
    if not quantized:
        raise ValueError(
            "quantize_variables: `variables['params']` hold no jaxembed table ('embeddings'). "
            f"Received: variables with collections {sorted(variables)}."
        )
    existing = variables.get(QUANTIZED, {})
    return {**variables, "params": params, QUANTIZED: {**existing, **quantized}}


def resize_variables(
    variables: Mapping[str, Any],
    new_input_dim: int,
    *,
    key: jax.Array | None = None,
    init: Any = "mean",
    pad_to_multiple_of: int | None = None,
    shrink: bool = False,
) -> dict[str, Any]:
    """The variables of one `jaxembed.Embedding` with its vocabulary resized (`jaxembed.resize`:
    the table or quantized arrays, and LoRA's A); apply them with
    `module.clone(input_dim=<the new size>)`. Logically partitioned arrays stay partitioned.

    Raises:
        ValueError: what `jaxembed.resize` raises (e.g. shrinking without `shrink=True`, or
            trainable tokens beyond the new size).

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> module = jaxembed.Embedding(100, 8, lora_rank=2)
        >>> variables = module.init(jax.random.key(0), jnp.arange(3))
        >>> grown = jaxembed.linen.resize_variables(variables, 128)
        >>> module.clone(input_dim=128).apply(grown, jnp.array([127])).shape
        (1, 8)
    """
    variables = flax.core.unfreeze(variables)
    collections = ("params", QUANTIZED)
    plain = {
        name: nn.unbox(value)
        for collection in collections
        for name, value in variables.get(collection, {}).items()
        if name != _table.TOKEN_DELTA  # kept as it is; the ids live in the module
    }
    resized = vocabulary.resize(
        plain,
        new_input_dim,
        key=key,
        init=init,
        pad_to_multiple_of=pad_to_multiple_of,
        shrink=shrink,
    )
    out = {**variables}
    for collection in collections:
        if collection not in variables:
            continue
        out[collection] = {
            name: (
                value
                if name not in resized
                else value.replace_boxed(resized[name])
                if isinstance(value, nn.meta.AxisMetadata)
                else resized[name]
            )
            for name, value in variables[collection].items()
        }
    return out


def losses(variables: Any) -> jax.Array:
    """Sum of everything sown into the "losses" collection (0.0 when there is none): a
    float32 scalar (the penalties' dtype, promoted).

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
