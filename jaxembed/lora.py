"""LoRA on a params dict: enable, merge, unmerge, remove, and freezing the base table.

LoRA adds "lora_embeddings_a" `(input_dim, rank)` and "lora_embeddings_b" `(rank, output_dim)`
beside the frozen "embeddings" table; `jaxembed.apply` and `jaxembed.attend` then add
`(lora_alpha / rank) * A[ids] @ B` without ever building the `(input_dim, output_dim)` delta.
`lora_alpha` is a static hyperparameter passed where it is used (apply, attend, merge), not a
param: nothing in the params pytree is a number that must not be trained.

Training only the adapter, with no gradient or optimizer state for the table:

    >>> import jax, jax.numpy as jnp, optax, jaxembed
    >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 100, 8),
    ...                               jax.random.key(1), rank=2)
    >>> trainable, frozen = jaxembed.lora.split_trainable(params)
    >>> sorted(name for name, leaf in trainable.items() if leaf is not None)
    ['lora_embeddings_a', 'lora_embeddings_b']
    >>> loss = lambda t: jnp.sum(jaxembed.apply(jaxembed.lora.combine(t, frozen),
    ...                                         jnp.array([1, 2])) ** 2)
    >>> grads = jax.grad(loss)(trainable)  # A and B only; the table gets no gradient
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from jaxembed import _checks, _paths, initializers
from jaxembed._checks import LORA_A, LORA_B
from jaxembed.functional import Params, lora_scale

LORA_KEYS = (LORA_A, LORA_B)
TRAINABLE = "trainable"
FROZEN = "frozen"


def has_lora(params: Params) -> bool:
    """True when params hold a LoRA adapter (both A and B, checked against the table).

    Example:
        >>> import jax, jaxembed
        >>> jaxembed.lora.has_lora(jaxembed.init(jax.random.key(0), 10, 4))
        False
    """
    return _checks.lora_weights(params) is not None


LORA_DTYPE = jnp.float32
"""Adapter storage dtype whatever the table's (as Keras: avoids under/overflow in training)."""


def adapter_shapes(input_dim: int, output_dim: int, rank: int) -> dict[str, tuple[int, int]]:
    """{"lora_embeddings_a": (input_dim, rank), "lora_embeddings_b": (rank, output_dim)}.

    Example:
        >>> import jaxembed
        >>> jaxembed.lora.adapter_shapes(100, 8, rank=4)["lora_embeddings_a"]
        (100, 4)
    """
    input_dim = _checks.positive_int("input_dim", input_dim)
    output_dim = _checks.positive_int("output_dim", output_dim)
    rank = _checks.positive_int("rank", rank)
    return {LORA_A: (input_dim, rank), LORA_B: (rank, output_dim)}


def adapter_initializers(
    a_initializer: initializers.InitializerLike = "he_uniform",
    b_initializer: initializers.InitializerLike = "zeros",
) -> dict[str, initializers.Initializer]:
    """{name: (key, shape, dtype) -> matrix} for A and B, Keras's defaults.

    Example:
        >>> import jax, jaxembed
        >>> draws = jaxembed.lora.adapter_initializers()
        >>> float(draws["lora_embeddings_b"](jax.random.key(0), (2, 3)).sum())
        0.0
    """
    return {LORA_A: initializers.get(a_initializer), LORA_B: initializers.get(b_initializer)}


def init_lora(
    key: jax.Array,
    input_dim: int,
    output_dim: int,
    rank: int,
    *,
    a_initializer: initializers.InitializerLike = "he_uniform",
    b_initializer: initializers.InitializerLike = "zeros",
) -> Params:
    """A fresh adapter: {"lora_embeddings_a": (input_dim, rank), "lora_embeddings_b": (rank,
    output_dim)}, both float32 whatever the table's dtype.

    A's default "he_uniform" has fan_in = input_dim and B starts at zero, so a fresh adapter
    leaves the layer's output unchanged.

    Example:
        >>> import jax, jaxembed
        >>> adapter = jaxembed.lora.init_lora(jax.random.key(0), 100, 8, rank=4)
        >>> adapter["lora_embeddings_a"].shape, adapter["lora_embeddings_b"].shape
        ((100, 4), (4, 8))
    """
    shapes = adapter_shapes(input_dim, output_dim, rank)
    draws = adapter_initializers(a_initializer, b_initializer)
    keys = dict(zip(LORA_KEYS, jax.random.split(key), strict=True))
    return {name: draws[name](keys[name], shapes[name], LORA_DTYPE) for name in LORA_KEYS}


def enable_lora(
    params: Params,
    key: jax.Array,
    rank: int,
    *,
    a_initializer: initializers.InitializerLike = "he_uniform",
    b_initializer: initializers.InitializerLike = "zeros",
) -> Params:
    """Adds a LoRA adapter of `rank` to existing params (pretrained, loaded, `weights=`...).

    Args:
        params: params without an adapter, table `(input_dim, output_dim)`.
        key: PRNG key for A's initializer.
        rank: positive int.
        a_initializer, b_initializer: Keras names or JAX initializers (Keras's defaults).

    Returns:
        A new dict: the same table plus "lora_embeddings_a" and "lora_embeddings_b".

    Raises:
        ValueError: bad rank, or params that already hold an adapter.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.init(jax.random.key(0), 100, 8)
        >>> sorted(jaxembed.enable_lora(params, jax.random.key(1), rank=4))
        ['embeddings', 'lora_embeddings_a', 'lora_embeddings_b']
    """
    table = _checks.embeddings_table(params)
    rank = _checks.positive_int("rank", rank)
    if has_lora(params):
        raise ValueError(
            "LoRA is already enabled: params hold an adapter of rank "
            f"{params[LORA_A].shape[1]}. Merge it (merge_lora) or remove it (remove_lora) "
            f"before enabling another. Received: rank={rank}."
        )
    input_dim, output_dim = table.shape
    adapter = init_lora(
        key,
        input_dim,
        output_dim,
        rank,
        a_initializer=a_initializer,
        b_initializer=b_initializer,
    )
    return {**params, **adapter}


def _adapter(params: Params, function: str) -> tuple[jax.Array, jax.Array]:
    adapter = _checks.lora_weights(params)
    if adapter is None:
        raise ValueError(
            f"{function} needs params holding a LoRA adapter ({LORA_A!r}, {LORA_B!r}). "
            f"Received: params with keys {sorted(params)}."
        )
    return adapter


def _delta(a: jax.Array, b: jax.Array, lora_alpha: float | None) -> jax.Array:
    """The full `(input_dim, output_dim)` float32 delta: built only when merging, never in a
    training or inference step."""
    scale = lora_scale(a.shape[1], lora_alpha)
    # Merging happens once: full float32 precision, not TF32 / bf16 passes on GPU and TPU.
    product = jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return scale * product


def merge_lora(
    params: Params, *, lora_alpha: float | None = None, safe_merge: bool = False
) -> Params:
    """Folds the adapter into the table: `E + (lora_alpha / rank) * A @ B`, adapter removed.

    The sum is computed in float32 and cast back to the table's dtype.

    Args:
        params: params holding an adapter.
        lora_alpha: the alpha used in training; None means the rank.
        safe_merge: refuse a merged table with NaN or infinite values (as peft's
            `safe_merge`): a `ValueError` for concrete params, a `checkify` error under jit.

    Returns:
        `{"embeddings": merged table}` plus any other entries of params, without the adapter.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> ids = jnp.arange(10)
        >>> merged = jaxembed.merge_lora(params)
        >>> bool(jnp.allclose(jaxembed.apply(merged, ids), jaxembed.apply(params, ids)))
        True
    """
    table = _checks.embeddings_table(params)
    a, b = _adapter(params, "merge_lora")
    _checks.one_of("safe_merge", safe_merge, (True, False))
    merged = table.astype(jnp.float32) + _delta(a, b, lora_alpha)
    if safe_merge:
        _check_finite_merge(merged)
    rest = {key: value for key, value in params.items() if key not in LORA_KEYS}
    return {**rest, "embeddings": merged.astype(table.dtype)}


def _check_finite_merge(merged: jax.Array) -> None:
    message = "merge_lora(safe_merge=True): the merged table has {count} NaN or infinite values."
    count = jnp.sum(~jnp.isfinite(merged))
    if _checks.is_traced(merged):
        checkify.check(count == 0, message, count=count)
    elif int(count):
        raise ValueError(message.format(count=int(count)))


def unmerge_lora(params: Params, adapter: Params, *, lora_alpha: float | None = None) -> Params:
    """Takes a merged adapter out again: `E - (lora_alpha / rank) * A @ B`, adapter re-attached.

    Exact up to float rounding of the merge (and of the table's dtype, if narrower than f32).

    Args:
        params: merged params, without an adapter.
        adapter: the {"lora_embeddings_a", "lora_embeddings_b"} that were merged.
        lora_alpha: the alpha they were merged with.

    Example:
        >>> import jax, jax.numpy as jnp, jaxembed
        >>> base = jaxembed.init(jax.random.key(0), 10, 4)
        >>> adapter = jaxembed.lora.init_lora(jax.random.key(1), 10, 4, rank=2,
        ...                                   b_initializer="ones")
        >>> merged = jaxembed.merge_lora({**base, **adapter})
        >>> restored = jaxembed.lora.unmerge_lora(merged, adapter)
        >>> bool(jnp.allclose(restored["embeddings"], base["embeddings"], atol=1e-6))
        True
    """
    table = _checks.embeddings_table(params)
    if has_lora(params):
        raise ValueError(
            "unmerge_lora needs merged params without an adapter; these still hold one. "
            f"Received: params with keys {sorted(params)}."
        )
    a, b = _adapter({**params, **adapter}, "unmerge_lora")
    unmerged = table.astype(jnp.float32) - _delta(a, b, lora_alpha)
    return {**params, "embeddings": unmerged.astype(table.dtype), LORA_A: a, LORA_B: b}


def remove_lora(params: Params) -> Params:
    """Takes an unmerged adapter off, discarding it: the base params as before `enable_lora`.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> sorted(jaxembed.lora.remove_lora(params))
        ['embeddings']
    """
    _adapter(params, "remove_lora")
    return {key: value for key, value in params.items() if key not in LORA_KEYS}


def trainable_labels(tree: Any, *, adapters_only: bool = False) -> Any:
    """Labels each leaf "trainable" or "frozen", for `optax.partition` (or `freeze_lora_base`).

    By default, as Keras: "frozen" for every table that has a LoRA adapter beside it,
    "trainable" for everything else. With `adapters_only=True`, only the LoRA matrices are
    "trainable" and every other leaf of the model is "frozen" (classic LoRA fine-tuning).

    Works on any params pytree: one jaxembed layer's dict, or a whole Flax model (linen
    variables, boxed or not, or an `nnx.State`) holding jaxembed layers beside other layers.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> jaxembed.lora.trainable_labels(params)["embeddings"]
        'frozen'
    """
    _checks.one_of("adapters_only", adapters_only, (True, False))
    frozen = _paths.tables_beside_lora(tree)

    def label(path: tuple[Any, ...], _: Any) -> str:
        names = _paths.names(path)
        if adapters_only:
            return TRAINABLE if names and names[-1] in LORA_KEYS else FROZEN
        return FROZEN if names in frozen else TRAINABLE

    return jax.tree_util.tree_map_with_path(label, tree)


def freeze_lora_base(
    tx: optax.GradientTransformation, *, adapters_only: bool = False
) -> optax.GradientTransformation:
    """`tx` for the trainable leaves (see `trainable_labels`); zero updates and no optimizer
    state for the frozen ones.

    One line for a whole model: `tx = jaxembed.freeze_lora_base(optax.adam(1e-3))`. If the
    frozen leaves' gradients are computed but only fed here, XLA removes them from the compiled
    step. To not even trace them, differentiate `split_trainable`'s first half instead.

    Example:
        >>> import optax, jaxembed
        >>> tx = jaxembed.freeze_lora_base(optax.adam(1e-3))
    """
    return optax.partition(
        {TRAINABLE: tx, FROZEN: optax.set_to_zero()},
        functools.partial(trainable_labels, adapters_only=adapters_only),
    )


def split_trainable(tree: Any, *, adapters_only: bool = False) -> tuple[Any, Any]:
    """Splits params into (trainable, frozen) pytrees of the same structure, with `None`
    where the other half holds a leaf; `combine` joins them again. Labels as
    `trainable_labels` (`adapters_only=True`: train the LoRA matrices alone).

    Differentiate and optimize only the trainable half: the frozen leaves then get no
    gradient and no optimizer state at all.

    Example:
        >>> import jax, jaxembed
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 10, 4),
        ...                               jax.random.key(1), rank=2)
        >>> trainable, frozen = jaxembed.lora.split_trainable(params)
        >>> trainable["embeddings"] is None, frozen["lora_embeddings_a"] is None
        (True, True)
    """
    labels = trainable_labels(tree, adapters_only=adapters_only)
    trainable = jax.tree.map(lambda x, label: x if label == TRAINABLE else None, tree, labels)
    frozen = jax.tree.map(lambda x, label: x if label == FROZEN else None, tree, labels)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split_trainable`: takes each leaf from whichever half holds it."""
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )
