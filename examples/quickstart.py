"""Quickstart: the seed's Keras example, `Embedding(1000, 64)` on (32, 10) ids, in jaxembed.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxembed


def main() -> None:
    # The flax.linen module, with Keras's arguments.
    layer = jaxembed.Embedding(1000, 64, mask_zero=True)
    input_array = np.random.default_rng(0).integers(1, 1000, size=(32, 10))
    input_array[::2, 7:] = 0  # pad every other sequence: id 0 is padding with mask_zero
    variables = layer.init(jax.random.key(0), input_array)
    output_array = layer.apply(variables, input_array)
    print("linen output shape:", output_array.shape)  # (32, 10, 64)
    mask = layer.apply(variables, input_array, method="compute_mask")
    print("mask shape:", mask.shape, "padding positions:", int((~mask).sum()))

    # The same layer as pure functions on a params dict.
    params = jaxembed.init(jax.random.key(0), 1000, 64)
    lookup = jax.jit(lambda p, ids: jaxembed.apply(p, ids, out_of_range="clip"))
    print("functional output shape:", lookup(params, input_array).shape)

    # Tied output logits through the same table.
    logits = jaxembed.attend(params, jnp.ones((32, 10, 64)))
    print("attend logits shape:", logits.shape)  # (32, 10, 1000)

    # Out-of-range ids are refused by default (out_of_range="error"), where Keras wraps -1 to the
    # last row: this last lookup fails on purpose, and the script catches the error.
    try:
        jaxembed.apply(params, jnp.array([3, 1000]))
    except IndexError as error:
        print('Expected: id 1000 is out of range, and the default out_of_range="error" refuses')
        print(f"it with an IndexError: {error}")


if __name__ == "__main__":
    main()
