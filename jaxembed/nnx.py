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
import inspect
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta, spmd
from jax.sharding import PartitionSpec
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

    As flax does, the value is sharded at creation when a mesh is set (`jax.set_mesh`), the
    logical axes mapped through the rules in context (`nn.logical_axis_rules`). A name the
    mesh does not know after the rules (no rule maps "vocab" on a mesh of axes "X", "Y", or a
    rule names an axis the mesh lacks) leaves that dimension unsplit: the layer is created
    there as flax creates its own (replicated), never an error. Without a mesh the axes are
    metadata only, so the layer works on one device with no setup.
    """
    if nnx.using_eager_sharding() and meta.global_mesh_defined():
        mesh = meta.get_global_mesh()
        names = set(mesh.axis_names)
        spec = spmd.apply_rules(PartitionSpec(*axes), None)
        known = [
            entry if entry is not None and set(_axis_names(entry)) <= names else None
            for entry in spec
        ]
        value = spmd.shard_value(value, PartitionSpec(*known), None, mesh)
    return kind(value, out_sharding=axes, eager_sharding=False)


def _axis_names(entry: str | tuple[str, ...]) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry)


class _InitSignature:
    """`inspect.signature(cls)` of an NNX module class: its `__init__`'s, without `self`.

    On an instance it is None, so that `inspect.signature(layer)` stays `__call__`'s.
    """

    def __get__(self, instance: Any, owner: type) -> inspect.Signature | None:
        if instance is not None:
            return None
        signature = inspect.signature(owner.__init__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])


class Embedding(nnx.Module):
    """Keras's `Embedding` as a `flax.nnx.Module`; same arguments as `jaxembed.Embedding`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(100, 8, lora_rank=4, rngs=nnx.Rngs(0))
        >>> out = layer(jnp.array([[1, 2, 3]]))
        >>> out.shape, out.dtype, type(layer.lora_embeddings_a).__name__
        ((1, 3, 8), dtype('float32'), 'LoRAParam')

    Args:
        input_dim: vocabulary size (largest id + 1).
        output_dim: embedding dimension.
        rngs: `nnx.Rngs`; its "params" stream draws the table and the adapter.

    The other keywords (`embeddings_initializer`, `embeddings_regularizer`,
    `embeddings_constraint`, `mask_zero`, `weights`, `lora_rank`, `lora_alpha`, `out_of_range`,
    `dtype`, `param_dtype`, `quantization`, `use_rslora`, `padding_idx`, `num_lora_adapters`,
    `trainable_token_ids`) are the linen `jaxembed.Embedding`'s attributes: Keras's names and
    defaults, read back as attributes (`layer.input_dim`). A quantized table is held as
    `Quantized` variables named as its params keys; `layer.quantize(mode)` quantizes a float
    layer in place, as Keras's. Trainable tokens are a `TrainableTokens` delta (an
    `nnx.Param`) and `TokenIds`; `layer.enable_trainable_tokens(ids)` adds them to a live
    layer.

    Raises:
        ValueError: an invalid argument, at construction (as Keras checks them): a
            non-positive dimension, an unknown initializer, regularizer or constraint name,
            `weights` of the wrong shape or not real numbers, a bad LoRA or quantization
            option.
    """

    # flax.nnx's metaclass defines `__call__(cls, *args, **kwargs)`, which `inspect.signature`
    # (so `help()` and Sphinx) reports for the class ahead of `__init__`: show `__init__`'s.
    __signature__ = _InitSignature()

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
        # format in the table's arrays and the token ids in a variable, and the initializer
        # has done its job, so the config (static data of the graph) keeps none of them;
        # `lora_alpha` may change with `enable_lora`.
        self.config = config.after_creation()
        self.lora_alpha = config.lora_alpha
        self._set_table(params)
        if lora_rank is not None:
            self.enable_lora(lora_rank, num_adapters=num_lora_adapters, rngs=rngs)
        if config.trainable_token_ids is not None:
            self.enable_trainable_tokens(config.trainable_token_ids)

    def __getattr__(self, name: str) -> Any:
        # The layer's arguments read as attributes (`layer.input_dim`), as on the linen module.
        config = self.__dict__.get("config")
        if config is not None and name in _config.CREATION_ONLY:
            raise AttributeError(
                f"{type(self).__name__!r} keeps no {name!r}: it is used only to create the "
                "params (as flax's nnx.Embed keeps no initializer), so that layers built "
                "alike share one graphdef."
            )
        if config is not None and name in _config.NAMES:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def lora_rank(self) -> int | None:
        """The adapter's rank, None without an adapter (read from the adapter itself).

        Example:
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> jaxembed.nnx.Embedding(10, 4, lora_rank=2, rngs=nnx.Rngs(0)).lora_rank
            2
        """
        adapter = getattr(self, _table.LORA_A, None)
        return None if adapter is None else int(adapter.shape[-1])

    @property
    def num_lora_adapters(self) -> int | None:
        """How many stacked adapters; None for one ordinary adapter or none.

        Example:
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> jaxembed.nnx.Embedding(10, 4, lora_rank=2, num_lora_adapters=3,
            ...                        rngs=nnx.Rngs(0)).num_lora_adapters
            3
        """
        adapter = getattr(self, _table.LORA_A, None)
        return None if adapter is None or adapter.ndim == 2 else int(adapter.shape[0])

    @property
    def trainable_token_ids(self) -> tuple[int, ...] | None:
        """The rows trainable tokens train (sorted), None without them.

        Example:
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> jaxembed.nnx.Embedding(10, 4, trainable_token_ids=[7, 2],
            ...                        rngs=nnx.Rngs(0)).trainable_token_ids
            (2, 7)
        """
        ids = getattr(self, _table.TOKEN_IDS, None)
        return None if ids is None else tuple(int(i) for i in jax.device_get(ids[...]))

    @property
    def quantization(self) -> str | None:
        """ "int8", "int4", "int4/128"...: the table's format; None for a float table.

        Example:
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> jaxembed.nnx.Embedding(10, 4, quantization="int8", rngs=nnx.Rngs(0)).quantization
            'int8'
        """
        return quantization.quantization_format(self.params())

    def _table_keys(self) -> list[str]:
        return [key for key in vars(self) if key in _table.table_keys()]

    def params(self) -> functional.Params:
        """The layer's arrays as the plain params dict of the pure functions (the table
        `(input_dim, output_dim)` under "embeddings", or a quantized table's arrays, and any
        adapter or trainable tokens), ready for `jaxembed.apply` and the others.

        Example:
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, lora_rank=2, rngs=nnx.Rngs(0))
            >>> {key: value.shape for key, value in layer.params().items()}
            {'embeddings': (10, 4), 'lora_embeddings_a': (10, 2), 'lora_embeddings_b': (2, 4)}
        """
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
        initializer.

        Raises:
            ValueError: as `jaxembed.resize`.

        Example:
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
            >>> layer.resize(16)
            >>> layer.input_dim, layer.embeddings.shape
            (16, (16, 4))
        """
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
        `jaxembed.quantize`. An adapter stays as it is (QLoRA).

        Raises:
            ValueError: as `jaxembed.quantize`, or a layer with an embeddings constraint.

        Example:
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
            >>> layer.quantize("int8")
            >>> layer.quantization, layer.embeddings_int8.dtype
            ('int8', dtype('int8'))
        """
        if self.config.embeddings_constraint is not None:
            raise constraints.refuse_quantized("quantize")
        self._set_table(quantization.quantize(self.params(), mode, block_size=block_size))

    def __call__(self, ids: ArrayLike, adapter_ids: ArrayLike | None = None) -> jax.Array:
        """Embeds `ids` (any integer shape) -> `ids.shape + (output_dim,)` in `dtype` (None:
        `param_dtype`, float32 for a quantized table); `adapter_ids` picks each example's
        adapter among stacked ones (see `jaxembed.apply`).

        Raises:
            TypeError, IndexError, ValueError: as `jaxembed.apply`.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            >>> out = layer(jnp.array([[1, 2]]))
            >>> out.shape, out.dtype
            ((1, 2, 4), dtype(bfloat16))
        """
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
        """`ids != 0` (bool, shaped like `ids`) when `mask_zero`, else None.

        Raises:
            TypeError: non-integer ids.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, mask_zero=True, rngs=nnx.Rngs(0))
            >>> layer.compute_mask(jnp.array([3, 0])).tolist()
            [True, False]
        """
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
        """Tied logits `query @ embeddings.T`: `(..., output_dim)` -> `(..., input_dim)`, in
        `dtype` (None: query and table promoted); see `jaxembed.attend`.

        Raises:
            TypeError, IndexError, ValueError: as `jaxembed.attend`; ValueError also for a
                row-sparse table under `jaxembed.sparse.nnx_value_and_grad`.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
            >>> layer.attend(jnp.ones((2, 4))).shape
            (2, 10)
        """
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
        with this layer's params, `lora_alpha` and `dtype`: query `(..., output_dim)`, integer
        labels `query.shape[:-1]`, a float32 scalar (per-position losses with
        `reduction="none"`).

        Raises:
            TypeError, IndexError, ValueError: as `jaxembed.attend_cross_entropy`; ValueError
                also for a row-sparse table under `jaxembed.sparse.nnx_value_and_grad`.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
            >>> loss = layer.attend_cross_entropy(jnp.ones((2, 4)), jnp.array([1, 9]))
            >>> loss.shape, loss.dtype
            ((), dtype('float32'))
        """
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
        The scalar is in the penalized weights' dtype (float32 under LoRA).

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, weights=jnp.ones((10, 4)),
            ...                                embeddings_regularizer="l2", rngs=nnx.Rngs(0))
            >>> round(float(layer.regularization_penalty()), 6)  # 0.01 * 40
            0.4
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

        Example:
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
            >>> layer.enable_lora(2, rngs=nnx.Rngs(1))
            >>> layer.lora_rank, layer.lora_embeddings_b.shape
            (2, (2, 4))
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

        Example:
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
            >>> layer.enable_trainable_tokens([9, 3])
            >>> layer.trainable_token_ids, layer.trainable_tokens_delta.shape
            ((3, 9), (2, 4))
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
        are requantized) and drops the tokens; see `jaxembed.merge_trainable_tokens`.

        Raises:
            ValueError: a layer without trainable tokens.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, weights=jnp.zeros((10, 4)),
            ...                                trainable_token_ids=[3], rngs=nnx.Rngs(0))
            >>> layer.trainable_tokens_delta[...] = jnp.ones((1, 4))
            >>> layer.merge_trainable_tokens()
            >>> layer.trainable_token_ids, layer.embeddings[3].tolist()
            (None, [1.0, 1.0, 1.0, 1.0])
        """
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

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import jaxembed.nnx
            >>> layer = jaxembed.nnx.Embedding(10, 4, lora_rank=2, rngs=nnx.Rngs(0))
            >>> before = layer(jnp.arange(10))
            >>> layer.merge_lora()
            >>> layer.lora_rank, bool(jnp.allclose(layer(jnp.arange(10)), before))
            (None, True)
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

        Raises:
            ValueError: variables holding no table, or arrays not matching `module`'s
                arguments (shapes, adapter, trainable tokens).

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
    """Trainable tokens' delta `(K, output_dim)` float32: an `nnx.Param`, so
    `wrt=TrainableTokens` trains it alone and `jaxembed.nnx.trainable(model)` includes it (the
    table beside it is frozen).

    Example:
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(10, 4, trainable_token_ids=[3], rngs=nnx.Rngs(0))
        >>> list(nnx.state(layer, jaxembed.nnx.TrainableTokens).keys())
        ['trainable_tokens_delta']
    """


class TokenIds(nnx.Variable):
    """Trainable tokens' row ids `(K,)` int32: frozen, never an `nnx.Param`.

    Example:
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(10, 4, trainable_token_ids=[7, 3], rngs=nnx.Rngs(0))
        >>> ids = layer.trainable_tokens_ids
        >>> type(ids).__name__, ids[...].tolist(), isinstance(ids, nnx.Param)
        ('TokenIds', [3, 7], False)
    """


class Quantized(nnx.Variable):
    """An array of a quantized table (values, scales, zero points): frozen, never an
    `nnx.Param`, so optimizers and `nnx.grad` over `nnx.Param` or `nnx.LoRAParam` skip it.

    Example:
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(10, 4, quantization="int8", rngs=nnx.Rngs(0))
        >>> sorted(nnx.state(layer, jaxembed.nnx.Quantized).keys())
        ['embeddings_int8', 'embeddings_scale']
        >>> len(nnx.state(layer, nnx.Param))  # nothing for an optimizer to train
        0
    """


class RowGradient(nnx.Perturbation):
    """The gradient of the loss with respect to a layer's looked-up rows (row-sparse
    training; see `jaxembed.sparse.nnx_value_and_grad`), shaped `ids.shape + (output_dim,)`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
        >>> _, captured = nnx.capture(lambda m, x: m(x), jaxembed.nnx.RowGradient)(
        ...     layer, jnp.array([3, 5]))
        >>> captured["rows"][...].shape  # the slot `nnx.grad` fills with the rows' gradient
        (2, 4)
    """


class RowIds(nnx.Intermediate):
    """The ids a layer looked up, captured for its row-sparse update.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import jaxembed.nnx
        >>> layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
        >>> _, captured = nnx.capture(lambda m, x: m(x), jaxembed.nnx.RowIds)(
        ...     layer, jnp.array([3, 5]))
        >>> captured["ids"][0].tolist()
        [3, 5]
    """


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
