"""Hypothesis strategies shared by the property tests.

JAX compiles once per input shape (each op eagerly, the whole function under `jax.jit`), so a
freely drawn shape recompiles on nearly every example. Shapes here come from a few fixed ones
instead, and examples reuse the compilations; the elements are still drawn freely.
"""

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import strategies as st

# Rank 0 to 3, with a side of 1 and unequal sides (a swapped or dropped axis shows).
SHAPES = [(), (1,), (4,), (2, 3), (3, 1, 4)]


def id_arrays(low, high, dtype=np.int32):
    """Arrays of ids in [low, high] (both ends included), each of a shape from `SHAPES`."""
    return st.sampled_from(SHAPES).flatmap(
        lambda shape: hnp.arrays(dtype, shape, elements=st.integers(low, high))
    )
