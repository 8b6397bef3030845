"""jaxembed: Keras 3's `Embedding` layer as pure JAX functions with thin Flax wrappers.

The public API, re-exported; everything is defined in the modules named beside each group.
"""

from jaxembed import constraints, functional, initializers, linen, lora, regularizers, sharding
from jaxembed.constraints import apply_constraint, keep_embeddings_constrained
from jaxembed.functional import apply, attend, check_in_range, compute_mask, init
from jaxembed.linen import Embedding
from jaxembed.lora import enable_lora, freeze_lora_base, merge_lora
from jaxembed.regularizers import regularization_penalty

__version__ = "0.1.0"

__all__ = [
    "Embedding",
    "apply",
    "apply_constraint",
    "attend",
    "check_in_range",
    "compute_mask",
    "constraints",
    "enable_lora",
    "freeze_lora_base",
    "functional",
    "init",
    "initializers",
    "keep_embeddings_constrained",
    "linen",
    "lora",
    "merge_lora",
    "regularization_penalty",
    "regularizers",
    "sharding",
]
