"""Checks shared by the tests of table kinds (tests/test_table.py's test double, the quantized
tables of tests/test_quantization.py): a kind's lookup must equal its dense table's."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest


def check_lookup_matches_dense(apply, params, dense, ids, bad_ids, bad, *, eager_error):
    """`apply(params, ...)` equals `apply(dense, ...)` and `dense["embeddings"][ids]` for
    valid ids, float32 rows; for `bad_ids` (`bad` marks the out-of-range ones): an IndexError
    when `eager_error`, else the dense table's rows (NaN rows compare equal).

    Returns the rows of `bad_ids`, or None after the IndexError.
    """
    out = apply(params, ids)
    chex.assert_shape(out, (*np.shape(ids), dense["embeddings"].shape[1]))
    chex.assert_type(out, jnp.float32)
    chex.assert_trees_all_equal(out, dense["embeddings"][ids])
    chex.assert_trees_all_equal(out, apply(dense, ids))
    if eager_error:
        with pytest.raises(IndexError, match="got id -1"):
            apply(params, bad_ids)
        return None
    out = apply(params, bad_ids)
    chex.assert_trees_all_equal(out, apply(dense, bad_ids))
    if np.isnan(out).any():  # "fill", and "error" under plain jit
        np.testing.assert_array_equal(np.isnan(out).all(-1), bad)
        assert not np.isnan(out[~bad]).any()
    return out
