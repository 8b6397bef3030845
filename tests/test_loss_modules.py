"""The fused loss and the soft cap through the linen and NNX layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxembed
import jaxembed.nnx

V, D = 40, 8
IDS = jnp.array([[1, 2, 0], [39, 5, 0]])
QUERY = jax.random.normal(jax.random.key(1), (2, 3, D))


@pytest.fixture(scope="module")
def linen_layer():
    layer = jaxembed.Embedding(V, D, lora_rank=2, lora_alpha=4.0)
    variables = layer.init(jax.random.key(0), IDS)
    variables = jax.tree.map(lambda x: x + 0.1, variables)  # B != 0: the adapter matters
    return layer, variables


def test_attend_soft_cap_is_c_tanh_of_the_logits(linen_layer):
    layer, variables = linen_layer
    logits = layer.apply(variables, QUERY, method="attend")
    capped = layer.apply(variables, QUERY, method="attend", logit_soft_cap=2.0)
    np.testing.assert_allclose(capped, 2.0 * jnp.tanh(logits / 2.0), rtol=1e-6)
    params = nn.unbox(variables["params"])
    pure = jaxembed.attend(params, QUERY, lora_alpha=4.0, logit_soft_cap=2.0)
    np.testing.assert_allclose(capped, pure, rtol=1e-6)


def test_linen_method_equals_the_materialized_loss(linen_layer):
    layer, variables = linen_layer
    mask = IDS != 0
    fused = layer.apply(
        variables, QUERY, IDS, method="attend_cross_entropy", where=mask, logit_soft_cap=3.0
    )
    logits = layer.apply(variables, QUERY, method="attend", logit_soft_cap=3.0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, IDS)
    np.testing.assert_allclose(fused, jnp.sum(losses * mask) / mask.sum(), rtol=1e-5)


def test_nnx_method_equals_the_materialized_loss():
    layer = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0))
    fused = layer.attend_cross_entropy(QUERY, IDS, reduction="sum")
    losses = optax.softmax_cross_entropy_with_integer_labels(layer.attend(QUERY), IDS)
    np.testing.assert_allclose(fused, losses.sum(), rtol=1e-5)


def test_row_sparse_nnx_refuses_the_fused_tied_loss_too():
    class Tied(nnx.Module):
        def __init__(self):
            self.tokens = jaxembed.nnx.Embedding(V, D, rngs=nnx.Rngs(0))

        def __call__(self, ids):
            return self.tokens.attend_cross_entropy(self.tokens(ids), ids)

    with pytest.raises(ValueError, match="tied"):
        jaxembed.sparse.nnx_value_and_grad(lambda model, ids: model(ids))(Tied(), IDS)
