"""QLoRA with jaxembed: quantize a trained table to int4, LoRA-fine-tune it, merge, requantize.

1. Pretrain a float32 `(vocab_size, dim)` table briefly on a synthetic task: every token has a
   class, read out through a small fixed linear head (`E[id] @ W`); the labels are noisy (with
   probability `--label-noise` a random class), and a held-out split of samples measures the
   loss.
2. Quantize the trained table to int8 and int4 (one scale per row) and to int4 with a scale and
   zero point per block of `--block-size` columns; print each format's bytes, rounding error
   and held-out loss. (Here even int4 costs almost no loss: the head reads only `classes` of
   the `dim` directions of a row, and most of the rounding error lies in the others.)
3. QLoRA: enable LoRA on the int4 table and train only A and B (float32) on a shifted task
   (every class renamed to the next one). The int4 values and scales get no gradient and no
   optimizer state, and come out bit-identical.
4. Merge: `merge_lora` dequantizes, adds the delta in float32 and requantizes to int4 (held-out
   loss close to the unmerged adapter's); `requantize=False` keeps the float32 merge.

Run: python examples/qlora.py [--vocab-size 5000 --dim 128 --block-size 32 --rank 8]
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed

Params = dict[str, jax.Array]
LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; every default keeps the whole run to a few seconds on a CPU."""
    parser = argparse.ArgumentParser(
        description="Quantize a trained embedding table to int8 / int4, QLoRA-fine-tune the "
        "int4 table, merge and requantize; print bytes and held-out loss."
    )
    add = parser.add_argument
    add("--vocab-size", type=int, default=5000, help="rows of the table, V (%(default)s)")
    add("--dim", type=int, default=128, help="embedding dimension, D (%(default)s)")
    add("--block-size", type=int, default=32, help="int4 columns per scale (%(default)s)")
    add("--classes", type=int, default=8, help="classes of the synthetic task (%(default)s)")
    add("--label-noise", type=float, default=0.2, help="share of random labels (%(default)s)")
    add("--train-samples", type=int, default=100_000, help="(token, label) pairs (%(default)s)")
    add("--held-out-samples", type=int, default=20_000, help="for the loss (%(default)s)")
    add("--rank", type=int, default=8, help="LoRA rank, r (%(default)s)")
    add("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (%(default)s)")
    add("--pretrain-steps", type=int, default=200, help="pretraining steps (%(default)s)")
    add("--finetune-steps", type=int, default=150, help="QLoRA fine-tuning steps (%(default)s)")
    add("--batch-size", type=int, default=1024, help="samples per step (%(default)s)")
    add("--learning-rate", type=float, default=1e-2, help="Adam's, both stages (%(default)s)")
    add("--seed", type=int, default=0, help="for the data and the params (%(default)s)")
    return parser.parse_args(argv)


class Split(NamedTuple):
    """Samples of the task: token ids and their (noisy) labels, both `(n,)` int arrays."""

    ids: np.ndarray
    labels: np.ndarray

    def shifted(self, classes: int) -> Split:
        """The fine-tuning task: every class renamed to the next one."""
        return Split(self.ids, (self.labels + 1) % classes)


def make_task(args: argparse.Namespace, rng: np.random.Generator) -> tuple[jax.Array, Split, Split]:
    """The fixed head `(dim, classes)` and the training and held-out splits.

    Every token has a class; a sample is a token and its class, or with probability
    `label_noise` a uniformly random class. Both splits are drawn the same way, so the
    held-out loss is the expected loss on fresh samples.
    """
    head = rng.standard_normal((args.dim, args.classes)) / np.sqrt(args.dim)
    token_class = rng.integers(0, args.classes, args.vocab_size)

    def draw(n: int) -> Split:
        ids = rng.integers(0, args.vocab_size, n)
        noisy = rng.random(n) < args.label_noise
        labels = np.where(noisy, rng.integers(0, args.classes, n), token_class[ids])
        return Split(ids, labels)

    return jnp.asarray(head, jnp.float32), draw(args.train_samples), draw(args.held_out_samples)


def bayes_optimum(classes: int, label_noise: float) -> tuple[float, float]:
    """The lowest expected loss and the highest accuracy any model can reach on noisy labels:
    the labels' entropy given the token, and the share of samples that keep their class."""
    right = 1.0 - label_noise + label_noise / classes
    wrong = label_noise / classes
    return float(-right * np.log(right) - (classes - 1) * wrong * np.log(wrong)), right


def make_loss(head: jax.Array, lora_alpha: float | None = None) -> LossFn:
    """Cross-entropy of `apply(params, ids) @ head` against the labels.

    The same function serves a float table, a quantized one and either with an adapter:
    `jaxembed.apply` gathers the stored rows and dequantizes only those. Ids are drawn in
    range, so "clip" is safe (the default "error" would need `checkify` under `jax.jit`).
    """

    def loss(params: Params, ids: jax.Array, labels: jax.Array) -> jax.Array:
        vectors = jaxembed.apply(params, ids, out_of_range="clip", lora_alpha=lora_alpha)
        return optax.softmax_cross_entropy_with_integer_labels(vectors @ head, labels).mean()

    return loss


@functools.partial(jax.jit, static_argnames="lora_alpha")
def evaluate(
    params: Params, head: jax.Array, split: Split, lora_alpha: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Loss and accuracy on a whole split, in one jitted pass (a handful of eager ops would
    each compile separately, which costs more on a CPU than the pass)."""
    vectors = jaxembed.apply(params, split.ids, out_of_range="clip", lora_alpha=lora_alpha)
    logits = vectors @ head
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, split.labels).mean()
    return loss, (logits.argmax(-1) == split.labels).mean()


def train(
    loss: LossFn,
    params: Params,
    split: Split,
    batches: np.ndarray,
    tx: optax.GradientTransformation,
    name: str,
) -> tuple[Params, optax.OptState, list[float]]:
    """Runs `tx` on the trainable half of `params`; returns params, optimizer state, losses.

    `split_trainable` puts a quantized table's arrays, and any table with an adapter beside
    it, in the frozen half: before `enable_lora` the float table trains (pretraining), after
    it only A and B do (QLoRA). The same loop serves both.
    """
    trainable, frozen = jaxembed.lora.split_trainable(params)

    def loss_of_halves(trainable: Any, frozen: Any, ids: jax.Array, labels: jax.Array) -> Any:
        return loss(jaxembed.lora.combine(trainable, frozen), ids, labels)

    @jax.jit
    def step(trainable: Any, opt_state: optax.OptState, frozen: Any, batch: Split) -> tuple:
        # Gradients w.r.t. the first argument only: the int4 arrays are an input of the step
        # but get no gradient (integers could not take one) and no optimizer state.
        value, grads = jax.value_and_grad(loss_of_halves)(trainable, frozen, *batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    opt_state = tx.init(trainable)
    losses = []
    report_every = max(1, len(batches) // 5)
    for i, rows in enumerate(batches):
        batch = Split(split.ids[rows], split.labels[rows])
        trainable, opt_state, value = step(trainable, opt_state, frozen, batch)
        losses.append(float(value))
        if i % report_every == 0 or i == len(batches) - 1:
            print(f"  {name} step {i:4d}  loss {losses[-1]:.4f}")
    return jaxembed.lora.combine(trainable, frozen), opt_state, losses


def nbytes(tree: Any) -> int:
    """Bytes of a pytree's arrays (None leaves, the other half of a split, count as 0)."""
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))


def table_bytes(params: Params) -> int:
    """Bytes of the table alone: values, scales and zero points, not the LoRA adapter."""
    return nbytes({k: v for k, v in params.items() if k not in jaxembed.lora.LORA_KEYS})


@jax.jit
def table_error(params: Params, reference: Params) -> jax.Array:
    """RMS of `dequantize(params) - reference` over RMS of the reference table (0 for float)."""
    if not jaxembed.quantization.is_quantized(params):
        return jnp.zeros(())
    error = jaxembed.dequantize(params)["embeddings"] - reference["embeddings"]
    return jnp.sqrt(jnp.mean(error**2) / jnp.mean(reference["embeddings"] ** 2))


def bit_identical(a: Params, b: Params) -> bool:
    """Same keys, dtypes, shapes and values, bit for bit."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the four steps, prints what happens and returns the numbers the test checks."""
    args = parse_args(argv)
    vocab, dim, rank, alpha = args.vocab_size, args.dim, args.rank, args.lora_alpha
    rng = np.random.default_rng(args.seed)  # data: NumPy, cheap and plain
    key_table, key_lora = jax.random.split(jax.random.key(args.seed))  # params: JAX keys
    head, train_split, held_out = make_task(args, rng)

    def batches(steps: int) -> np.ndarray:
        """Rows of the training split, `(steps, batch_size)`."""
        return rng.integers(0, len(train_split.ids), (steps, args.batch_size))

    tx = optax.adam(args.learning_rate)

    print(f"1. Pretrain a float32 ({vocab}, {dim}) table on the {args.classes}-class task")
    base = jaxembed.init(key_table, vocab, dim)
    base, _, pretrain_losses = train(
        make_loss(head), base, train_split, batches(args.pretrain_steps), tx, "pretrain"
    )

    print("\n2. Quantize the trained table")
    # quantize works under jax.jit: one compilation instead of one per operation eagerly
    # (the stored integers are the same).
    quantize = jax.jit(jaxembed.quantize, static_argnames=("mode", "block_size"))
    tables = {
        "float32": base,
        "int8": quantize(base, "int8"),  # one scale per row
        "int4": quantize(base, "int4"),  # two values per byte, one scale per row
        # A scale and an int8 zero point per block of columns: finer steps, more bytes.
        f"int4/{args.block_size}": quantize(base, "int4", block_size=args.block_size),
    }
    formats = {}
    print("  format        bytes  vs f32  table error  held-out loss  accuracy")
    for name, params in tables.items():
        loss, accuracy = map(float, evaluate(params, head, held_out))
        size, error = table_bytes(params), float(table_error(params, base))
        ratio = size / table_bytes(base)
        formats[name] = {"bytes": size, "ratio": ratio, "held_out_loss": loss}
        print(
            f"  {name:<9} {size:>9,} {ratio:>6.3f}x {error:>12.2%} {loss:>14.4f} {accuracy:>9.1%}"
        )
    best_loss, best_accuracy = bayes_optimum(args.classes, args.label_noise)
    print(
        f"  ({args.label_noise:.0%} of the labels are random: a perfect model averages "
        f"{best_loss:.4f} and {best_accuracy:.1%})"
    )

    print(f"\n3. QLoRA: LoRA (rank {rank}, lora_alpha {alpha:g}) on the int4 table, shifted task")
    int4 = tables["int4"]
    shifted_train, shifted_held_out = (s.shifted(args.classes) for s in (train_split, held_out))
    lora = jaxembed.enable_lora(int4, key_lora, rank)  # B starts at zero: output unchanged
    loss_before = float(evaluate(lora, head, shifted_held_out, alpha)[0])
    # Only A and B train. For a whole model with one optimizer, jaxembed.freeze_lora_base(tx)
    # does the same job.
    lora, opt_state, finetune_losses = train(
        make_loss(head, alpha), lora, shifted_train, batches(args.finetune_steps), tx, "finetune"
    )
    loss_after = float(evaluate(lora, head, shifted_held_out, alpha)[0])
    frozen_unchanged = bit_identical({k: lora[k] for k in int4}, int4)
    adapter_bytes = nbytes({k: lora[k] for k in jaxembed.lora.LORA_KEYS})
    print(f"  held-out loss on the shifted task: {loss_before:.4f} before, {loss_after:.4f} after")
    print(f"  int4 values and scales bit-identical after fine-tuning: {frozen_unchanged}")
    print(f"  trained: A and B, {adapter_bytes:,} bytes, and Adam's state, {nbytes(opt_state):,}")
    print(f"  frozen: the int4 table, {table_bytes(lora):,} bytes; no gradient, no optimizer state")

    print(f"\n4. Merge: E + ({alpha:g} / {rank}) * A @ B, adapter removed")
    # Like quantize, merge_lora works under jax.jit (the same integers as eagerly, faster).
    merge = jax.jit(jaxembed.merge_lora, static_argnames=("lora_alpha", "requantize"))
    merged = merge(lora, lora_alpha=alpha)  # dequantize, add in float32, requantize: int4 again
    merged_float = merge(lora, lora_alpha=alpha, requantize=False)  # a float32 table
    merged_format = jaxembed.quantization.quantization_format(merged)
    merged_loss = float(evaluate(merged, head, shifted_held_out)[0])
    merged_float_loss = float(evaluate(merged_float, head, shifted_held_out)[0])
    print("  params                          bytes  held-out loss")
    for name, params, loss in [
        ("int4 + adapter (unmerged)", lora, loss_after),
        (f"merged, requantized ({merged_format})", merged, merged_loss),
        ("merged, float32", merged_float, merged_float_loss),
    ]:
        print(f"  {name:<27} {nbytes(params):>9,} {loss:>14.4f}")

    return {
        "pretrain_losses": pretrain_losses,
        "formats": formats,
        "finetune_losses": finetune_losses,
        "finetune_loss_before": loss_before,
        "finetune_loss_after": loss_after,
        "frozen_unchanged": frozen_unchanged,
        "adapter_bytes": adapter_bytes,
        "optimizer_state_bytes": nbytes(opt_state),
        "merged_loss": merged_loss,
        "merged_float_loss": merged_float_loss,
        "tables": tables,
        "lora": lora,
        "merged": merged,
        "merged_float": merged_float,
    }


if __name__ == "__main__":
    main()
