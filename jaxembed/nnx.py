"""`flax.nnx` Embedding: holds the params as NNX variables and calls the pure functions.

The table is an `nnx.Param` with sharding metadata ("vocab", "embed") (a quantized table's
arrays are `jaxembed.nnx.Quantized` variables, never `nnx.Param`: no filter trains them);
LoRA weights are `nnx.LoRAParam`, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` and
`nnx.grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))` train only the adapter, with no
gradient or optimizer state for the table.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxembed.nnx
    >>> layer = jaxembed.nnx.Embedding(1000, 64, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((32, 10), jnp.int32)).shape
    (32, 10, 64)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta
from jax.typing import ArrayLike, DTypeLike

from jaxembed import (
    _config,
    _out_of_range,
    _paths,
    _table,
    constraints,
    functional,
    initializers,
    linen,
    lora,
    loss,
    quantization,
    regularizers,
    trainable_tokens,
    vocabulary,
)

__all__ = [
    "Embedding",
    "Quantized",
    "RowGradient",
    "RowIds",
    "TokenIds",
    "TrainableTokens",
    "trainable",
]


def _variable(kind: type[nnx.Variable], value: jax.Array, axes: tuple[Any, ...]) -> nnx.Variable:
    """An NNX variable carrying logical sharding axes.

    Flax shards a variable eagerly at creation when a mesh is set (`jax.set_mesh`), mapping the
    logical axes through the rules in context (`nn.logical_axis_rules`). Without a mesh the
    axes are kept as metadata only, so the layer works on one device with no setup.
    """
    eager = nnx.using_eager_sharding() and meta.global_mesh_defined()
    return kind(value, out_sharding=axes, eager_sharding=eager)


class Embedding(nnx.Module):
    """Keras's `Embedding` as a `flax.nnx.Module`; same arguments as `jaxembed.Embedding`.

    Args:
        input_dim, output_dim, embeddings_initializer, embeddings_regularizer,
        embeddings_constraint, mask_zero, weights, lora_rank, lora_alpha, out_of_range, dtype,
        param_dtype, quantization, use_rslora, padding_idx, num_lora_adapters,
        trainable_token_ids: as the linen `jaxembed.Embedding` (Keras's names and defaults).
        A quantized table is held as `Quantized` variables named as its params keys;
        `layer.quantize(mode)` quantizes a float layer in place, as Keras's. Trainable tokens
        are a `TrainableTokens` delta (an `nnx.Param`) and `TokenIds`;
        `layer.enable_trainable_tokens(ids)` adds them to a live layer.
        rngs: `nnx.Rngs`; the "params" stream draws the table and the adapter.

    Example:
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(100, 8, lora_rank=4, rngs=nnx.Rngs(0))
        >>> type(layer.lora_embeddings_a).__name__
        'LoRAParam'
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        *,
        embeddings_initializer: initializers.InitializerLike = "uniform",
        embeddings_regularizer: regularizers.RegularizerLike = None,
        embeddings_constraint: Any = None,
        mask_zero: bool = False,
        weights: ArrayLike | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        out_of_range: str = "error",
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        quantization: str | None = None,
        use_rslora: bool = False,
        padding_idx: int | None = None,
        num_lora_adapters: int | None = None,
        trainable_token_ids: Sequence[int] | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        config = _config.LayerConfig(**_config.select(locals()))
        params = config.initial_params(rngs.params() if weights is None else None)
        # The weights now live in the table, the rank and count in the adapter's shape, the
        # format in the table's arrays and the token ids in a variable, so the config keeps
        # none of them; `lora_alpha` may change with `enable_lora`.
        self.config = dataclasses.replace(
            config,
            weights=None,
            lora_rank=None,
            quantization=None,
            num_lora_adapters=None,
            trainable_token_ids=None,
        )
        self.lora_alpha = config.lora_alpha
        self._set_table(params)
        if lora_rank is not None:
            self.enable_lora(lora_rank, num_adapters=num_lora_adapters, rngs=rngs)
        if config.trainable_token_ids is not None:
            self.enable_trainable_tokens(config.trainable_token_ids)

    def __getattr__(self, name: str) -> Any:
        # The layer's arguments read as attributes (`layer.input_dim`), as on the linen module.
        config = self.__dict__.get("config")
        if config is not None and name in _config.NAMES and name != "weights":
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def lora_rank(self) -> int | None:
        """The adapter's rank, None without an adapter (read from the adapter itself)."""
        adapter = getattr(self, _table.LORA_A, None)
        return None if adapter is None else int(adapter.shape[-1])

    @property
    def num_lora_adapters(self) -> int | None:
        """How many stacked adapters; None for one ordinary adapter or none."""
        adapter = getattr(self, _table.LORA_A, None)
        return None if adapter is None or adapter.ndim == 2 else int(adapter.shape[0])

    @property
    def trainable_token_ids(self) -> tuple[int, ...] | None:
        """The rows trainable tokens train (sorted), None without them."""
        ids = getattr(self, _table.TOKEN_IDS, None)
        return None if ids is None else tuple(int(i) for i in jax.device_get(ids[...]))

    @property
    def quantization(self) -> str | None:
        """ "int8", "int4", "int4/128"...: the table's format; None for a float table."""
        return quantization.quantization_format(self.params())

    def _table_keys(self) -> list[str]:
        return [key for key in vars(self) if key in _table.table_keys()]

    def params(self) -> functional.Params:
        """The layer's arrays as the plain params dict of the pure functions."""
        optional = (*_table.LORA_KEYS, *_table.TOKEN_KEYS)
        keys = [*self._table_keys(), *(key for key in optional if key in vars(self))]
        return {key: getattr(self, key)[...] for key in keys}

    def _set_table(self, params: functional.Params) -> None:
        """Holds the table of `params` (float: an `nnx.Param`; quantized: `Quantized`
        variables), replacing the current one."""
        for key in self._table_keys():
            delattr(self, key)
        table = _table.view(params)  # other entries (adapter, tokens) are ignored here
        for key in table.kind.keys:
            value = params[key]
            if key == _table.EMBEDDINGS:
                setattr(self, key, _variable(nnx.Param, value, _config.TABLE_AXES))
            else:
                axes = _config.quantized_axes(key, value.ndim)
                setattr(self, key, _variable(Quantized, value, axes))

    def resize(
        self,
        new_input_dim: int,
        *,
        init: Any = "mean",
        pad_to_multiple_of: int | None = None,
        shrink: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        """Grows or shrinks the vocabulary in place (table, quantized arrays and LoRA's A);
        see `jaxembed.resize`. `rngs` draws new rows for `init="covariance"` or an
        initializer."""
        key = None if rngs is None else rngs.params()
        params = vocabulary.resize(
            self.params(),
            new_input_dim,
            key=key,
            init=init,
            pad_to_multiple_of=pad_to_multiple_of,
            shrink=shrink,
        )
        size = _table.view(params).input_dim
        self.config = dataclasses.replace(self.config, input_dim=size)
        self._set_table(params)
        if self.lora_rank is not None:
            self._set_adapter(params, None)

    def quantize(self, mode: str, *, block_size: int | None = None) -> None:
        """Quantizes the float table in place (as Keras's `layer.quantize(mode)`); see
        `jaxembed.quantize`. An adapter stays as it is (QLoRA)."""
        if self.config.embeddings_constraint is not None:
            raise constraints.refuse_quantized("quantize")
        self._set_table(quantization.quantize(self.params(), mode, block_size=block_size))

    def __call__(self, ids: ArrayLike, adapter_ids: ArrayLike | None = None) -> jax.Array:
        """Embeds `ids` (any integer shape) -> `ids.shape + (output_dim,)`; `adapter_ids`
        picks each example's adapter among stacked ones (see `jaxembed.apply`)."""
        rows = functional.apply(
            self.params(),
            ids,
            dtype=self.config.dtype,
            out_of_range=self.config.out_of_range,
            lora_alpha=self.lora_alpha,
            use_rslora=self.config.use_rslora,
            padding_idx=self.config.padding_idx,
            adapter_ids=adapter_ids,
        )
        if hasattr(self, "__captures__") and self._table_trains():
            # Under `nnx.capture` (jaxembed.sparse.nnx_value_and_grad): record the ids and
            # perturb the rows, so the step gets the gradient of the rows, not the table's.
            config = self.config
            ids = _out_of_range.update_ids(
                ids, config.input_dim, config.out_of_range, config.padding_idx
            )
            self.sow(RowIds, "ids", ids)
            rows = self.perturb("rows", rows, variable_type=RowGradient)
        return rows

    def compute_mask(self, ids: ArrayLike) -> jax.Array | None:
        """`ids != 0` when `mask_zero`, else None."""
        return functional.compute_mask(ids, self.config.mask_zero)

    def _table_trains(self) -> bool:
        """Whether the table itself trains (no adapter, no trainable tokens, not quantized)."""
        tokens = _table.TOKEN_IDS in vars(self)  # not the ids' values: they may be traced
        return self.lora_rank is None and self.quantization is None and not tokens

    def _refuse_row_sparse_tied(self) -> None:
        captures = getattr(self, "__captures__", ())
        if self._table_trains() and any(type(c) is RowGradient for c in captures):
            raise ValueError(
                "jaxembed.sparse.nnx_value_and_grad: this table is tied (`attend`): the "
                "logits give it a dense gradient, which a row-sparse update would drop. Train "
                "tied tables densely or untie them."
            )

    def attend(
        self,
        query: ArrayLike,
        adapter_ids: ArrayLike | None = None,
        *,
        logit_soft_cap: float | None = None,
    ) -> jax.Array:
        """Tied logits `query @ embeddings.T`: `(..., output_dim)` -> `(..., input_dim)`."""
        self._refuse_row_sparse_tied()
        return functional.attend(
            self.params(),
            query,
            dtype=self.config.dtype,
            lora_alpha=self.lora_alpha,
            logit_soft_cap=logit_soft_cap,
            use_rslora=self.config.use_rslora,
            adapter_ids=adapter_ids,
        )

    def attend_cross_entropy(
        self, query: ArrayLike, labels: ArrayLike, **options: Any
    ) -> jax.Array:
        """Cross-entropy of the tied logits against `labels`, never materializing the logits:
        `jaxembed.attend_cross_entropy` (keywords `where`, `logit_soft_cap`, `reduction`, ...)
        with this layer's params, `lora_alpha` and `dtype`."""
        self._refuse_row_sparse_tied()
        return loss.attend_cross_entropy(
            self.params(),
            query,
            labels,
            lora_alpha=self.lora_alpha,
            use_rslora=self.config.use_rslora,
            dtype=self.config.dtype,
            **options,
        )

    def regularization_penalty(self) -> jax.Array:
        """The scalar penalty of the trainable weights (Keras's `layer.losses`); 0 if none.

        A training loop adds it in one line: `loss = task_loss + layer.regularization_penalty()`.
        """
        return regularizers.regularization_penalty(
            self.params(), self.config.embeddings_regularizer
        )

    def enable_lora(
        self,
        rank: int,
        *,
        lora_alpha: float | None = None,
        a_initializer: initializers.InitializerLike = "he_uniform",
        b_initializer: initializers.InitializerLike = "zeros",
        num_adapters: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        """Adds a LoRA adapter (`nnx.LoRAParam` A and B; `num_adapters` stacked ones); the
        table is frozen from now on.

        Raises:
            ValueError: bad rank or alpha, LoRA already enabled, or an embeddings constraint.
        """
        if self.config.embeddings_constraint is not None:
            raise lora.refuse_constraint("enable_lora")
        lora.check_alpha(lora_alpha)
        params = lora.enable_lora(
            self.params(),
            rngs.params(),
            rank,
            a_initializer=a_initializer,
            b_initializer=b_initializer,
            num_adapters=num_adapters,
        )
        self._set_adapter(params, lora_alpha)

    def _set_adapter(self, params: functional.Params, lora_alpha: float | None) -> None:
        stacked = params[_table.LORA_A].ndim == 3
        for key in _table.LORA_KEYS:
            axes = _config.lora_axes(key, stacked)
            setattr(self, key, _variable(nnx.LoRAParam, params[key], axes))
        if lora_alpha is not None:
            self.lora_alpha = lora_alpha

    def enable_trainable_tokens(self, token_ids: ArrayLike | Sequence[int]) -> None:
        """Makes rows `token_ids` trainable (a `TrainableTokens` delta, zeros, and their
        `TokenIds`); the table is frozen from now on. See `jaxembed.enable_trainable_tokens`.

        Raises:
            ValueError: ids that are not distinct rows, tokens already enabled, or an
                embeddings constraint.
        """
        if self.config.embeddings_constraint is not None:
            raise lora.refuse_constraint("enable_trainable_tokens")
        params = trainable_tokens.enable_trainable_tokens(self.params(), token_ids)
        self.trainable_tokens_ids = TokenIds(params[_table.TOKEN_IDS])
        self.trainable_tokens_delta = _variable(
            TrainableTokens, params[_table.TOKEN_DELTA], _config.TOKEN_DELTA_AXES
        )

    def merge_trainable_tokens(self) -> None:
        """Writes the trained rows into the table (an index update; a quantized table's rows
        are requantized) and drops the tokens; see `jaxembed.merge_trainable_tokens`."""
        merged = trainable_tokens.merge_trainable_tokens(self.params())
        if self.quantization is None:
            self.embeddings[...] = merged[_table.EMBEDDINGS]  # the same variable, updated
        else:
            self._set_table(merged)
        del self.trainable_tokens_ids, self.trainable_tokens_delta

    def _drop_adapter(self) -> None:
        del self.lora_embeddings_a, self.lora_embeddings_b

    def merge_lora(self, *, safe_merge: bool = False, requantize: bool = True) -> None:
        """Folds the adapter into the table (float32 sum, cast back, or requantized in its
        format; `requantize=False` leaves a float table); no adapter is left.

        Raises:
            ValueError: no adapter, or (with `safe_merge`) a non-finite merged table.
        """
        merged = lora.merge_lora(
            self.params(),
            lora_alpha=self.lora_alpha,
            safe_merge=safe_merge,
            requantize=requantize,
            use_rslora=self.config.use_rslora,
        )
        if self.quantization is None:
            self.embeddings[...] = merged[_table.EMBEDDINGS]  # the same variable, updated
        else:
            self._set_table(merged)
        self._drop_adapter()

    def to_linen(self) -> tuple[linen.Embedding, dict[str, Any]]:
        """The equivalent linen module and its variables `{"params": {...}}` (plain arrays;
        a quantized table's arrays under "quantized").

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, out_of_range="clip", rngs=nnx.Rngs(0))
            >>> module, variables = layer.to_linen()
            >>> bool((module.apply(variables, jnp.arange(3)) == layer(jnp.arange(3))).all())
            True
        """
        arguments = self.config.arguments(
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            quantization=self.quantization,
            num_lora_adapters=self.num_lora_adapters,
            trainable_token_ids=self.trainable_token_ids,
        )
        params = {k: v for k, v in self.params().items() if k != _table.TOKEN_IDS}
        if self.quantization is None:
            return linen.Embedding(**arguments), {"params": params}
        quantized = set(_table.quantized_keys())
        return linen.Embedding(**arguments), {
            "params": {key: value for key, value in params.items() if key not in quantized},
            linen.QUANTIZED: {key: value for key, value in params.items() if key in quantized},
        }

    @classmethod
    def from_linen(
        cls, module: linen.Embedding, variables: dict[str, Any], *, rngs: nnx.Rngs | None = None
    ) -> Embedding:
        """An NNX module with `module`'s arguments and the arrays of linen `variables`.

        Args:
            module: a linen `jaxembed.Embedding`.
            variables: its variables, `{"params": {...}}` (boxed or not; a quantized table's
                arrays under "quantized") or the params alone; a LoRA adapter in them is
                carried over as `nnx.LoRAParam`, a quantized table as it is stored.
            rngs: unused draws are skipped, so any seed does; default `nnx.Rngs(0)`.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from flax import nnx
            >>> import jaxembed, jaxembed.nnx
            >>> module = jaxembed.Embedding(10, 4, out_of_range="clip")
            >>> variables = module.init(jax.random.key(0), jnp.arange(3))
            >>> layer = jaxembed.nnx.Embedding.from_linen(module, variables)
            >>> bool((layer(jnp.arange(3)) == module.apply(variables, jnp.arange(3))).all())
            True
        """
        variables = nn.unbox(variables)
        params = {**variables.get("params", variables), **variables.get(linen.QUANTIZED, {})}
        table = _table.view(_table.without_tokens(params))
        arguments = module._config.arguments(
            weights=table.dense(),
            lora_rank=None,
            quantization=None,
            num_lora_adapters=None,
            trainable_token_ids=None,
        )
        layer = cls(**arguments, rngs=rngs or nnx.Rngs(0))
        if module.quantization is not None:
            layer._set_table(_table.without_tokens(params))  # the stored arrays, exactly
        if table.adapter is not None:
            layer._set_adapter(params, module.lora_alpha)
        if module.trainable_token_ids is not None:
            layer.enable_trainable_tokens(module.trainable_token_ids)
            layer.trainable_tokens_delta[...] = jnp.asarray(params[_table.TOKEN_DELTA])
        return layer


class TrainableTokens(nnx.Param):
    """Trainable tokens' delta `(K, output_dim)`: an `nnx.Param`, so `wrt=TrainableTokens`
    trains it alone and `jaxembed.nnx.trainable(model)` includes it (the table beside it is
    frozen)."""


class TokenIds(nnx.Variable):
    """Trainable tokens' row ids `(K,)` int32: frozen, never an `nnx.Param`."""


class Quantized(nnx.Variable):
    """An array of a quantized table (values, scales, zero points): frozen, never an
    `nnx.Param`, so optimizers and `nnx.grad` over `nnx.Param` or `nnx.LoRAParam` skip it."""


class RowGradient(nnx.Perturbation):
    """The gradient of the loss with respect to a layer's looked-up rows (row-sparse
    training; see `jaxembed.sparse.nnx_value_and_grad`)."""


class RowIds(nnx.Intermediate):
    """The ids a layer looked up, captured for its row-sparse update."""


def trainable(model: nnx.Module) -> nnx.filterlib.Filter:
    """An NNX filter for Keras's trainable weights: every `nnx.Param` except tables that have
    a LoRA adapter beside them (frozen, as Keras freezes them).

    Use it where a whole model trains alongside its adapters:
    `nnx.Optimizer(model, tx, wrt=jaxembed.nnx.trainable(model))`. To train the adapters
    alone, use `nnx.LoRAParam`. Build it again after enabling or merging LoRA.

    Example:
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(10, 4, lora_rank=2, rngs=nnx.Rngs(0))
        >>> sorted(nnx.state(layer, jaxembed.nnx.trainable(layer)).keys())
        ['lora_embeddings_a', 'lora_embeddings_b']
    """
    frozen = _paths.frozen_tables(nnx.state(model, nnx.Param))

    def is_trainable(path: tuple[Any, ...], value: Any) -> bool:
        return isinstance(value, nnx.Param) and tuple(map(str, path)) not in frozen

    return is_trainable
