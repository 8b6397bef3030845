"""What both Flax wrappers share: the layer's arguments, validated once, and the logical axes.

`LayerConfig` is the one list of Keras's `Embedding` arguments with their defaults. The linen
module's fields and the NNX constructor's keywords repeat the names so that users and type
checkers see real signatures; tests/test_config.py keeps the three lists identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxembed import (
    _checks,
    _out_of_range,
    _table,
    constraints,
    functional,
    initializers,
    lora,
    quantization,
    regularizers,
    trainable_tokens,
)

VOCAB_AXIS = "vocab"
EMBED_AXIS = "embed"
TABLE_AXES = (VOCAB_AXIS, EMBED_AXIS)
"""Logical partitioning axes of the table; map them to mesh axes with logical axis rules."""
LORA_AXES = {_table.LORA_A: (VOCAB_AXIS, None), _table.LORA_B: (None, EMBED_AXIS)}
"""Logical axes of the adapter: A's rows follow the table's rows, B's columns its columns."""
TOKEN_DELTA_AXES = (None, EMBED_AXIS)
"""Logical axes of trainable tokens' delta `(K, output_dim)`: its columns follow the table's."""


def lora_axes(name: str, stacked: bool) -> tuple[str | None, ...]:
    """Logical axes of LoRA's A or B; stacked adapters' leading adapter axis is not split."""
    return ((None,) if stacked else ()) + LORA_AXES[name]


def quantized_axes(key: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a quantized table's array: values as the table; scales and zero
    points split with the rows ("vocab"), their groups whole."""
    if key in _table.QUANTIZED_VALUES.values():
        return TABLE_AXES
    return (VOCAB_AXIS, *(None,) * (ndim - 1))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerConfig:
    """Keras's `Embedding` arguments, checked at construction (as Keras does, not at first call).

    `weights` is replaced by a checked read-only copy in `param_dtype` (`_table.CheckedWeights`):
    the caller's array can change later without changing the table, and rebuilding a config
    from that copy (flax clones a linen module on every `apply`) costs no second check.

    Configs compare and hash by value (`weights` by identity): the NNX layer keeps one as
    static data of its graph, and equal arguments must give equal graphdefs (one trace).
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
    quantization: str | None = None
    use_rslora: bool = False
    padding_idx: int | None = None
    num_lora_adapters: int | None = None
    trainable_token_ids: Sequence[int] | None = None

    def __post_init__(self) -> None:
        _checks.positive_int("input_dim", self.input_dim)
        _checks.positive_int("output_dim", self.output_dim)
        initializers.get(self.embeddings_initializer)
        regularizers.get(self.embeddings_regularizer)
        has_constraint = constraints.get(self.embeddings_constraint) is not None
        _checks.boolean("mask_zero", self.mask_zero)
        if self.lora_rank is not None:
            lora.check_rank("lora_rank", self.lora_rank)
            if has_constraint:
                raise lora.refuse_constraint("Embedding")
        lora.check_alpha(self.lora_alpha)
        if self.num_lora_adapters is not None:
            _checks.positive_int("num_lora_adapters", self.num_lora_adapters)
            if self.lora_rank is None:
                raise ValueError(
                    "`num_lora_adapters` stacks LoRA adapters: it needs `lora_rank`. Received: "
                    f"num_lora_adapters={self.num_lora_adapters}, lora_rank=None."
                )
        if self.trainable_token_ids is not None:
            if has_constraint:
                raise lora.refuse_constraint("Embedding")
            ids = trainable_tokens.check_token_ids(self.trainable_token_ids, self.input_dim)
            object.__setattr__(self, "trainable_token_ids", tuple(ids.tolist()))
        _checks.boolean("use_rslora", self.use_rslora)
        functional.check_padding_idx(self.padding_idx, self.input_dim)
        if quantization.parse_format(self.quantization, self.output_dim) and has_constraint:
            raise constraints.refuse_quantized("Embedding")
        _out_of_range.policy(self.out_of_range)
        _checks.optional_floating_dtype("dtype", self.dtype)
        param_dtype = _checks.floating_dtype("param_dtype", self.param_dtype)
        if self.weights is not None:
            weights = _table.validated_weights(
                self.weights, self.input_dim, self.output_dim, param_dtype
            )
            object.__setattr__(self, "weights", weights)

    def _key(self) -> tuple[Any, ...]:
        return tuple(
            id(self.weights) if name == "weights" else _hashable(getattr(self, name))
            for name in NAMES
        )

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def after_creation(self) -> LayerConfig:
        """The config without the arguments used only to create the params (`CREATION_ONLY`,
        reset to their defaults): what a live NNX layer keeps, so that layers differing only in
        how they were initialized share one graphdef (as flax's `nnx.Embed` keeps no
        initializer)."""
        fields = {field.name: field.default for field in dataclasses.fields(self)}
        return dataclasses.replace(self, **{name: fields[name] for name in CREATION_ONLY})

    @classmethod
    def of(cls, source: Any) -> LayerConfig:
        """The config of anything carrying the arguments as attributes (a linen module)."""
        return cls(**{name: getattr(source, name) for name in NAMES})

    def arguments(self, **changes: Any) -> dict[str, Any]:
        """The arguments as keywords, with `changes` applied."""
        return {**{name: getattr(self, name) for name in NAMES}, **changes}

    def initial_params(self, key: Any) -> functional.Params:
        """The table (quantized when `quantization` is set), without an adapter."""
        params = functional.init(
            key,
            self.input_dim,
            self.output_dim,
            embeddings_initializer=self.embeddings_initializer,
            weights=self.weights,
            param_dtype=self.param_dtype,
            padding_idx=self.padding_idx,
        )
        fmt = quantization.parse_format(self.quantization, self.output_dim)
        if fmt is None:
            return params
        return quantization.quantize(params, fmt.mode, block_size=fmt.block_size)

    def table_initializer(self) -> initializers.Initializer:
        """The `(key, shape, dtype) -> table` function for the layer's table."""
        return functional.table_initializer(
            self.input_dim,
            self.output_dim,
            self.embeddings_initializer,
            self.weights,
            self.param_dtype,
            self.padding_idx,
        )


NAMES: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(LayerConfig))
"""The layer's argument names, in order."""

CREATION_ONLY = (
    "embeddings_initializer",
    "weights",
    "lora_rank",
    "quantization",
    "num_lora_adapters",
    "trainable_token_ids",
)
"""Arguments that only shape the params at creation: a live NNX layer reads the rank, the
format and the token ids from its variables, and keeps no initializer or initial weights."""


def _hashable(value: Any) -> Any:
    """`value`, or its identity when it cannot be hashed (a user's unhashable callable)."""
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def select(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The layer's arguments out of a namespace (a constructor's `locals()`)."""
    return {name: namespace[name] for name in NAMES}
