"""What both Flax wrappers share: checking the layer's arguments, and the logical axes."""

from __future__ import annotations

from typing import Any

from jaxembed import _checks, _out_of_range, constraints, functional, lora, regularizers
from jaxembed._table import LORA_A, LORA_B

VOCAB_AXIS = "vocab"
EMBED_AXIS = "embed"
TABLE_AXES = (VOCAB_AXIS, EMBED_AXIS)
"""Logical partitioning axes of the table; map them to mesh axes with logical axis rules."""
LORA_AXES = {LORA_A: (VOCAB_AXIS, None), LORA_B: (None, EMBED_AXIS)}
"""Logical axes of the adapter: A's rows follow the table's rows, B's columns its columns."""

ARGUMENTS = (
    "input_dim",
    "output_dim",
    "embeddings_initializer",
    "embeddings_regularizer",
    "embeddings_constraint",
    "mask_zero",
    "weights",
    "lora_rank",
    "lora_alpha",
    "out_of_range",
    "dtype",
    "param_dtype",
)
"""The layer's arguments, shared by the linen and NNX modules."""


def check_arguments(
    *,
    input_dim: Any,
    output_dim: Any,
    embeddings_initializer: Any,
    embeddings_regularizer: Any,
    embeddings_constraint: Any,
    mask_zero: Any,
    weights: Any,
    lora_rank: Any,
    lora_alpha: Any,
    out_of_range: Any,
    dtype: Any,
    param_dtype: Any,
) -> None:
    """Validates every argument of an Embedding layer at construction, as Keras does."""
    functional.table_initializer(
        input_dim, output_dim, embeddings_initializer, weights, param_dtype
    )
    regularizers.get(embeddings_regularizer)
    has_constraint = constraints.get(embeddings_constraint) is not None
    _checks.boolean("mask_zero", mask_zero)
    if lora_rank is not None:
        lora.check_rank("lora_rank", lora_rank)
        if has_constraint:
            raise lora.refuse_constraint("Embedding")
    lora.check_alpha(lora_alpha)
    _out_of_range.policy(out_of_range)
    _checks.optional_floating_dtype("dtype", dtype)
