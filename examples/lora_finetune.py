"""LoRA fine-tuning of an embedding table with jaxembed's pure functions, end to end.

1. Pretrain a `(vocab_size, dim)` table briefly on a synthetic task: every token has a class,
   read out through a small fixed linear head (`E[id] @ W`).
2. Enable LoRA (rank 8, lora_alpha 16) and fine-tune only the adapter on a shifted task (every
   class renamed to the next one): the table gets no gradient and no optimizer state.
3. Count trainable vs total parameters.
4. Merge the adapter into the table and check that outputs before and after merging agree.
5. Save the merged params and the adapter (small) with `numpy.savez`, reload, compare.

Run: python examples/lora_finetune.py [--vocab-size 5000 --dim 64 --rank 8 --out DIR]
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

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
        description="Pretrain an embedding table, LoRA-fine-tune it, merge, save and reload."
    )
    add = parser.add_argument
    add("--vocab-size", type=int, default=5000, help="rows of the table, V (%(default)s)")
    add("--dim", type=int, default=64, help="embedding dimension, D (%(default)s)")
    add("--classes", type=int, default=8, help="classes of the synthetic task (%(default)s)")
    add("--rank", type=int, default=8, help="LoRA rank, r (%(default)s)")
    add("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (%(default)s)")
    add("--pretrain-steps", type=int, default=200, help="pretraining steps (%(default)s)")
    add("--finetune-steps", type=int, default=150, help="LoRA fine-tuning steps (%(default)s)")
    add("--batch-size", type=int, default=1024, help="ids per step (%(default)s)")
    add("--learning-rate", type=float, default=1e-2, help="Adam's, both stages (%(default)s)")
    add("--seed", type=int, default=0, help="for the data and the params (%(default)s)")
    add("--out", type=pathlib.Path, help="folder for the .npz files (default: a temporary one)")
    return parser.parse_args(argv)


def make_loss(head: jax.Array, lora_alpha: float | None = None) -> LossFn:
    """Cross-entropy of `apply(params, ids) @ head` against each id's label.

    `lora_alpha` is a static hyperparameter, not a param, so it is closed over here; the same
    value must be given to `merge_lora` later. Ids are drawn in range, so "clip" is safe: the
    default "error" policy would need `checkify` under `jax.jit`.
    """

    def loss(params: Params, ids: jax.Array, labels: jax.Array) -> jax.Array:
        vectors = jaxembed.apply(params, ids, out_of_range="clip", lora_alpha=lora_alpha)
        logits = vectors @ head
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[ids]).mean()

    return loss


@functools.partial(jax.jit, static_argnames="lora_alpha")
def accuracy(
    params: Params, head: jax.Array, labels: jax.Array, lora_alpha: float | None = None
) -> jax.Array:
    """Share of the whole vocabulary classified right: a full pass is cheap at these sizes.

    Jitted (a handful of eager ops would each compile separately, which costs more on a CPU
    than the whole pass); `lora_alpha` is static, like every jaxembed hyperparameter.
    """
    ids = jnp.arange(labels.shape[0])
    logits = jaxembed.apply(params, ids, out_of_range="clip", lora_alpha=lora_alpha) @ head
    return (logits.argmax(-1) == labels).mean()


def train(
    loss: LossFn,
    params: Params,
    labels: jax.Array,
    batches: np.ndarray,
    tx: optax.GradientTransformation,
    name: str,
) -> tuple[Params, optax.OptState, list[float]]:
    """Runs `tx` on the trainable half of `params`; returns params, optimizer state, losses.

    `split_trainable` puts every table with an adapter beside it in the frozen half, with None
    in the other half's place: before `enable_lora` everything trains (pretraining), after it
    only A and B do (fine-tuning). The same loop serves both.
    """
    trainable, frozen = jaxembed.lora.split_trainable(params)

    def loss_of_halves(trainable: Any, frozen: Any, ids: jax.Array) -> jax.Array:
        return loss(jaxembed.lora.combine(trainable, frozen), ids, labels)

    @jax.jit
    def step(trainable: Any, opt_state: optax.OptState, frozen: Any, ids: jax.Array) -> tuple:
        # jax.grad differentiates w.r.t. the first argument only: the frozen table is an input
        # of the step (not a constant baked into it) but gets no gradient at all.
        value, grads = jax.value_and_grad(loss_of_halves)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    opt_state = tx.init(trainable)  # state for the trainable leaves only
    losses = []
    report_every = max(1, len(batches) // 5)
    for i, ids in enumerate(batches):
        trainable, opt_state, value = step(trainable, opt_state, frozen, ids)
        losses.append(float(value))
        if i % report_every == 0 or i == len(batches) - 1:
            print(f"  {name} step {i:4d}  loss {losses[-1]:.4f}")
    return jaxembed.lora.combine(trainable, frozen), opt_state, losses


def count(tree: Any) -> int:
    """Number of floats in a pytree (None leaves, the other half of a split, count as 0)."""
    return sum(int(x.size) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


def save_npz(path: pathlib.Path, arrays: dict[str, Any]) -> None:
    """One flat dict of arrays per file: jaxembed params are plain dicts, so this is enough.

    For sharded or large models, `orbax.checkpoint.StandardCheckpointer` saves the same dicts.
    """
    np.savez(path, **{name: np.asarray(value) for name, value in arrays.items()})


def load_npz(path: pathlib.Path) -> dict[str, jax.Array]:
    """The dict `save_npz` wrote, as JAX arrays."""
    with np.load(path) as data:
        return {name: jnp.asarray(data[name]) for name in data.files}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the five steps, prints what happens and returns the numbers the test checks."""
    args = parse_args(argv)
    vocab, dim, rank, alpha = args.vocab_size, args.dim, args.rank, args.lora_alpha
    rng = np.random.default_rng(args.seed)  # data: NumPy, cheap and plain
    key_table, key_lora = jax.random.split(jax.random.key(args.seed))  # params: JAX keys

    # The synthetic task: each token has one of `classes` labels, predicted from its embedding
    # through a fixed random head. The fine-tuning task renames every class to the next one.
    head = jnp.asarray(rng.standard_normal((dim, args.classes)) / np.sqrt(dim), jnp.float32)
    labels = jnp.asarray(rng.integers(0, args.classes, vocab))
    shifted_labels = (labels + 1) % args.classes

    def batches(steps: int) -> np.ndarray:
        return rng.integers(0, vocab, (steps, args.batch_size))

    tx = optax.adam(args.learning_rate)

    print(f"1. Pretrain a ({vocab}, {dim}) table on the {args.classes}-class task")
    base = jaxembed.init(key_table, vocab, dim)  # Keras's default U(-0.05, 0.05)
    base, _, pretrain_losses = train(
        make_loss(head), base, labels, batches(args.pretrain_steps), tx, "pretrain"
    )
    pretrain_acc = float(accuracy(base, head, labels))
    print(f"  accuracy on the pretraining task: {pretrain_acc:.1%}")
    # (A table from elsewhere works the same: jaxembed.init(None, V, D, weights=matrix).)

    print(f"\n2. Enable LoRA (rank {rank}, lora_alpha {alpha:g}); fine-tune on shifted labels")
    lora = jaxembed.enable_lora(base, key_lora, rank)  # B starts at zero: output unchanged
    acc_before = float(accuracy(lora, head, shifted_labels, alpha))
    # Only A and B train: the table, frozen, gets no gradient and no optimizer state. For a
    # whole model with one optimizer, jaxembed.freeze_lora_base(tx) does the same job.
    lora, opt_state, finetune_losses = train(
        make_loss(head, alpha), lora, shifted_labels, batches(args.finetune_steps), tx, "finetune"
    )
    acc_after = float(accuracy(lora, head, shifted_labels, alpha))
    base_unchanged = bool(np.array_equal(lora["embeddings"], base["embeddings"]))  # bit for bit
    print(f"  accuracy on the shifted task: {acc_before:.1%} before, {acc_after:.1%} after")
    print(f"  base table bit-identical after fine-tuning: {base_unchanged}")

    print("\n3. Parameter counts")
    trainable, _ = jaxembed.lora.split_trainable(lora)
    n_trainable, n_total, n_state = count(trainable), count(lora), count(opt_state)
    print(f"  trainable (A + B): {n_trainable:,} = {vocab}*{rank} + {rank}*{dim}")
    print(f"  total (table + adapter): {n_total:,}; trainable share {n_trainable / n_total:.2%}")
    print(f"  Adam state: {n_state:,} floats (2 per trainable param, none for the table)")

    print(f"\n4. Merge: E + ({alpha:g} / {rank}) * A @ B, adapter removed")
    merged = jaxembed.merge_lora(lora, lora_alpha=alpha, safe_merge=True)  # same alpha!
    ids = jnp.arange(vocab)
    merge_diff = float(
        jnp.abs(jaxembed.apply(merged, ids) - jaxembed.apply(lora, ids, lora_alpha=alpha)).max()
    )
    merged_acc = float(accuracy(merged, head, shifted_labels))
    print(f"  max |apply(merged) - apply(lora)| over all ids: {merge_diff:.2e}")
    print(f"  merged accuracy on the shifted task: {merged_acc:.1%}; keys {sorted(merged)}")

    print("\n5. Save and reload")
    with tempfile.TemporaryDirectory() as temp:
        out = args.out if args.out is not None else pathlib.Path(temp)
        out.mkdir(parents=True, exist_ok=True)
        merged_path, adapter_path = out / "merged.npz", out / "adapter.npz"
        save_npz(merged_path, merged)
        # The adapter alone (plus its alpha, which is not a param) turns the base into the
        # fine-tuned model: ship it instead of a whole table per task.
        adapter = {name: lora[name] for name in jaxembed.lora.LORA_KEYS}
        save_npz(adapter_path, {**adapter, "lora_alpha": np.float32(alpha)})
        sizes = {path.name: path.stat().st_size for path in (merged_path, adapter_path)}

        merged_back = load_npz(merged_path)
        adapter_back = load_npz(adapter_path)
        alpha_back = float(adapter_back.pop("lora_alpha"))
        merged_equal = merged_back.keys() == merged.keys() and all(
            np.array_equal(merged_back[name], merged[name]) for name in merged
        )
        lora_back = {**base, **adapter_back}
        adapter_equal = bool(
            np.array_equal(
                jaxembed.apply(lora_back, ids, lora_alpha=alpha_back),
                jaxembed.apply(lora, ids, lora_alpha=alpha),
            )
        )
    for name, size in sizes.items():
        print(f"  {out / name}: {size / 1024:,.0f} KiB")
    if args.out is None:
        print("  (a temporary folder, now deleted: pass --out DIR to keep the files)")
    print(f"  merged params reload equal: {merged_equal}")
    print(f"  base + reloaded adapter gives the fine-tuned outputs exactly: {adapter_equal}")

    return {
        "pretrain_losses": pretrain_losses,
        "pretrain_accuracy": pretrain_acc,
        "finetune_losses": finetune_losses,
        "finetune_accuracy_before": acc_before,
        "finetune_accuracy_after": acc_after,
        "base_unchanged": base_unchanged,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "optimizer_state_floats": n_state,
        "merge_max_abs_diff": merge_diff,
        "merged_accuracy": merged_acc,
        "merged_reload_equal": merged_equal,
        "adapter_reload_equal": adapter_equal,
        "file_sizes": sizes,
    }


if __name__ == "__main__":
    main()
