"""jaxembed with Flax NNX: train a tied-embedding model, LoRA-tune it, merge, move to linen.

One job: the NNX workflow. A tiny next-token model (`jaxembed.nnx.Embedding` -> a Linear ->
tied logits through `attend`) learns a synthetic successor task; then `enable_lora` adds
`nnx.LoRAParam` weights, `nnx.Optimizer(..., wrt=nnx.LoRAParam)` trains only them on a
shifted task (the table stays bit-identical and gets no optimizer state), `merge_lora` folds
the adapter in, and `to_linen` hands the result to the linen module with the same outputs.

Run: python examples/nnx_lora.py [--steps 200] [--vocab 512]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxembed.nnx


class TiedModel(nnx.Module):
    """ids -> embedding -> Linear -> logits over the vocabulary through the same table."""

    def __init__(self, vocab: int, dim: int, rngs: nnx.Rngs) -> None:
        # Ids come from the task's own generator, so clamping is never exercised; "clip" keeps
        # the jitted step free of the checkify plumbing that "error" needs.
        self.tokens = jaxembed.nnx.Embedding(
            vocab, dim, embeddings_regularizer="l2", out_of_range="clip", rngs=rngs
        )
        self.mix = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.tokens.attend(self.mix(self.tokens(ids)))


def successor_batch(rng: np.random.Generator, vocab: int, batch: int, shift: int):
    """(ids, targets): the task is "predict (id + shift) mod vocab"."""
    ids = rng.integers(0, vocab, size=(batch,))
    return jnp.asarray(ids), jnp.asarray((ids + shift) % vocab)


def train(model: TiedModel, wrt: Any, steps: int, shift: int, lr: float, seed: int) -> list[float]:
    """Adam on the variables `wrt` selects; returns the loss per step."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=wrt)

    @nnx.jit
    def step(model: TiedModel, optimizer: nnx.Optimizer, ids: jax.Array, targets: jax.Array):
        def loss_fn(model: TiedModel) -> jax.Array:
            logits = model(ids)
            task = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return task + 1e-4 * model.tokens.regularization_penalty()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    return [
        float(step(model, optimizer, *successor_batch(rng, model.tokens.input_dim, 256, shift)))
        for _ in range(steps)
    ]


def accuracy(model: TiedModel, shift: int) -> float:
    ids = jnp.arange(model.tokens.input_dim)
    predicted = jnp.argmax(model(ids), axis=-1)
    return float(jnp.mean(predicted == (ids + shift) % model.tokens.input_dim))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--steps", type=int, default=300, help="steps per stage")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    args = parser.parse_args(argv)

    model = TiedModel(args.vocab, args.dim, nnx.Rngs(args.seed))
    print(f"1. Train everything (nnx.Param) on 'next id': {args.vocab} ids, dim {args.dim}")
    pretrain = train(model, nnx.Param, args.steps, shift=1, lr=1e-2, seed=args.seed)
    print(f"   loss {pretrain[0]:.3f} -> {pretrain[-1]:.3f}, accuracy {accuracy(model, 1):.1%}")

    table = np.array(model.tokens.embeddings[...])
    model.tokens.enable_lora(args.rank, lora_alpha=args.lora_alpha, rngs=nnx.Rngs(args.seed + 1))
    adapter_size = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    total_size = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"2. LoRA rank {args.rank} on the table; train only nnx.LoRAParam on 'id + 2'")
    print(f"   trainable {adapter_size:,} of {total_size:,} parameters")
    before = accuracy(model, 2)
    finetune = train(model, nnx.LoRAParam, args.steps, shift=2, lr=1e-2, seed=args.seed + 1)
    table_unchanged = bool(np.array_equal(model.tokens.embeddings[...], table))
    print(
        f"   loss {finetune[0]:.3f} -> {finetune[-1]:.3f}, accuracy on 'id + 2' "
        f"{before:.1%} -> {accuracy(model, 2):.1%}; table bit-identical: {table_unchanged}"
    )

    ids = jnp.arange(args.vocab)
    lora_logits = model(ids)
    model.tokens.merge_lora(safe_merge=True)
    merge_diff = float(jnp.max(jnp.abs(model(ids) - lora_logits)))
    print(
        f"3. merge_lora: no adapter left ({model.tokens.lora_rank=}), "
        f"max |merged - unmerged| logits {merge_diff:.1e}"
    )

    module, variables = model.tokens.to_linen()
    linen_diff = float(jnp.max(jnp.abs(module.apply(variables, ids) - model.tokens(ids))))
    print(f"4. to_linen: the linen module gives the same embeddings (max |diff| {linen_diff})")
    return {
        "pretrain_losses": pretrain,
        "finetune_losses": finetune,
        "table_unchanged": table_unchanged,
        "adapter_size": adapter_size,
        "merge_diff": merge_diff,
        "linen_diff": linen_diff,
    }


if __name__ == "__main__":
    main()
