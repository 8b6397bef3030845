"""jaxembed: Keras 3's `Embedding` layer as pure JAX functions with thin Flax wrappers.

Example:
    >>> import jax, jax.numpy as jnp, jaxembed
    >>> ids = jnp.array([[1, 2, 3]])
    >>> params = jaxembed.init(jax.random.key(0), 1000, 64)  # the pure functions
    >>> jaxembed.apply(params, ids).shape
    (1, 3, 64)
    >>> layer = jaxembed.Embedding(1000, 64)  # the linen module, on the same params
    >>> bool((layer.apply({"params": params}, ids) == jaxembed.apply(params, ids)).all())
    True

The public API, re-exported; everything is defined in the modules named beside each group.
Every submodule is an attribute of the package; `jaxembed.nnx` is imported on first access,
because importing `flax.nnx` adds over 10% (about 0.1 s) to `import jaxembed`, and so are
`jaxembed.interop` (its optional dependencies are imported where they are used) and
`jaxembed.multihost` (tooling, also run as `python -m jaxembed.multihost`).
"""

import importlib as _importlib
import types as _types
import typing as _typing

from jaxembed import (
    constraints,
    functional,
    initializers,
    linen,
    lora,
    loss,
    optim,
    quantization,
    regularizers,
    sharding,
    sparse,
    trainable_tokens,
    vocabulary,
)
from jaxembed.constraints import apply_constraint
from jaxembed.functional import apply, attend, check_in_range, compute_mask, init
from jaxembed.linen import Embedding
from jaxembed.lora import enable_lora, merge_lora
from jaxembed.loss import attend_cross_entropy
from jaxembed.optim import freeze_lora_base, keep_embeddings_constrained
from jaxembed.quantization import dequantize, quantize
from jaxembed.regularizers import regularization_penalty
from jaxembed.trainable_tokens import enable_trainable_tokens, merge_trainable_tokens
from jaxembed.vocabulary import resize

if _typing.TYPE_CHECKING:
    from jaxembed import interop, multihost, nnx

__version__ = "0.1.0"

__all__ = [
    "Embedding",
    "apply",
    "apply_constraint",
    "attend",
    "attend_cross_entropy",
    "check_in_range",
    "compute_mask",
    "constraints",
    "dequantize",
    "enable_lora",
    "enable_trainable_tokens",
    "freeze_lora_base",
    "functional",
    "init",
    "initializers",
    "interop",
    "keep_embeddings_constrained",
    "linen",
    "lora",
    "loss",
    "merge_lora",
    "merge_trainable_tokens",
    "multihost",
    "nnx",
    "optim",
    "quantization",
    "quantize",
    "regularization_penalty",
    "regularizers",
    "resize",
    "sharding",
    "sparse",
    "trainable_tokens",
    "vocabulary",
]

# multihost too: `python -m jaxembed.multihost` runs it as __main__, which must come first.
_LAZY_SUBMODULES = ("interop", "multihost", "nnx")


def __getattr__(name: str) -> _types.ModuleType:
    """Imports a lazy submodule on first access (PEP 562); the import then sets the attribute."""
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
