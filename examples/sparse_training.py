"""Row-sparse training of a large embedding table with `jaxembed.sparse`.

The task: which standard-library package does a line of Python come from? The model is a bag
of embeddings (fastText): the mean of the rows of a sample's words and hashed word bigrams,
then a small dense head. The table is large (262,144 rows by default: the most frequent words,
then hash buckets for bigrams), but one batch touches a few thousand rows.

A dense optax step pays for every row anyway: the table's gradient is a `(vocab, dim)` array
of mostly zeros, and the optimizer reads and writes the whole table and its state. The sparse
step below pays for the rows the batch touched:

1. look the rows up with `jaxembed.apply`;
2. differentiate the loss with respect to those rows (and the head), never the table;
3. update the touched rows with a `jaxembed.sparse` optimizer (`rowwise_adagrad`: one float of
   state per row; or `lazy_adam`), the head with optax;
4. jit with `donate_argnums`, so that XLA writes the rows into the table in place.

It then times a few dense optax steps of the same model, and checks that every row no batch
touched is bit-identical to its initial value. `_sparse_harness.py` beside it holds the flags,
the data (nothing to download), the loop with its progress bar and the summary table.

Run (under 30 s on two CPU cores, `--quick` about 10 s; `--help` for the flags):

    pip install -e ".[examples]" && python examples/sparse_training.py
    python examples/sparse_training.py --optimizer lazy_adam
"""

from __future__ import annotations

import pathlib
import sys
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed

# The helpers beside this file: `python examples/sparse_training.py` puts its folder on
# sys.path, importing the file by path (as the tests do) does not.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

try:  # the example's extras are not jaxembed's dependencies: tqdm, matplotlib
    import _sparse_harness as harness
except ImportError as error:
    raise SystemExit(
        f"{error.name} is missing: install the example's extras with "
        '`pip install -e ".[examples]"`.'
    ) from error

Head = dict[str, jax.Array]


def logits_of(rows: jax.Array, head: Head, ids: jax.Array) -> jax.Array:
    """`(batch, features, dim)` rows -> `(batch, classes)`: the head on each sample's mean row,
    padding (id 0) left out."""
    mask = jaxembed.compute_mask(ids, mask_zero=True)[..., None]
    bags = (rows * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1)
    return bags @ head["kernel"] + head["bias"]


def loss_of(rows: jax.Array, head: Head, ids: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of the package predictions."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_of(rows, head, ids), labels
    ).mean()


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    # "clip": main checks the data once, eagerly, so clipping never changes an id (the default
    # "error" cannot raise for traced ids under plain jax.jit).
    return jaxembed.apply({"embeddings": table}, ids, out_of_range="clip")


def make_sparse_step(
    table_tx: jaxembed.sparse.RowwiseOptimizer, head_tx: optax.GradientTransformation
):
    """The row-sparse step. Table, head and both states are donated: XLA may write the new
    values into their buffers, so the step never copies the table or its state."""

    @partial(jax.jit, donate_argnums=(0, 1, 2, 3))
    def step(table, table_state, head, head_state, ids, labels):
        rows = lookup(table, ids)  # (batch, features, dim): all the step reads of the table
        loss, (row_grads, head_grads) = jax.value_and_grad(loss_of, argnums=(0, 1))(
            rows, head, ids, labels
        )
        # Duplicate ids' gradients are summed; only the touched rows (and their state) change.
        table, table_state = table_tx.update(table, table_state, ids, row_grads)
        updates, head_state = head_tx.update(head_grads, head_state)
        return table, table_state, optax.apply_updates(head, updates), head_state, loss

    return step


def make_dense_step(table_tx: optax.GradientTransformation, head_tx: optax.GradientTransformation):
    """The same model trained the usual way, for comparison: the gradient of the whole table."""

    @partial(jax.jit, donate_argnums=(0, 1, 2, 3))
    def step(table, table_state, head, head_state, ids, labels):
        def loss_fn(table, head):
            return loss_of(lookup(table, ids), head, ids, labels)

        loss, (table_grad, head_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(table, head)
        updates, table_state = table_tx.update(table_grad, table_state, table)  # every row
        table = optax.apply_updates(table, updates)
        updates, head_state = head_tx.update(head_grads, head_state)
        return table, table_state, optax.apply_updates(head, updates), head_state, loss

    return step


# The sparse optimizer for the table, and its nearest dense optax counterpart.
OPTIMIZERS = {
    "rowwise_adagrad": (jaxembed.sparse.rowwise_adagrad, optax.adagrad),
    "lazy_adam": (jaxembed.sparse.lazy_adam, optax.adam),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the whole example; returns what the test checks (losses, tables, timings)."""
    args = harness.parse_args(argv)
    started = time.perf_counter()
    corpus = harness.load_corpus(args)
    for ids in (corpus.train_ids, corpus.held_out_ids):
        jaxembed.check_in_range(ids, args.vocab)  # eagerly, once: the steps can then "clip"
    harness.describe_run(corpus, args)

    table_key, head_key = jax.random.split(jax.random.key(args.seed))
    table = jaxembed.init(table_key, args.vocab, args.dim)["embeddings"]  # U(-0.05, 0.05)
    head = {
        "kernel": jax.random.normal(head_key, (args.dim, len(corpus.classes))) / args.dim**0.5,
        "bias": jnp.zeros(len(corpus.classes)),
    }
    initial_table = np.array(table)  # a copy: the steps donate (and so consume) their inputs
    initial_head = jax.tree.map(np.array, head)
    evaluate = harness.make_evaluator(
        lambda table, head, ids: logits_of(lookup(table, ids), head, ids),
        corpus.held_out_ids, corpus.held_out_labels, args.eval_samples, args.batch_size,
    )  # fmt: skip
    eval_before = evaluate(table, head)

    # Row-sparse training: the table with jaxembed.sparse, the head with optax.
    sparse_tx, dense_tx = OPTIMIZERS[args.optimizer]
    table_tx, head_tx = sparse_tx(args.lr), optax.adam(args.head_lr)
    state = (table, table_tx.init(table), head, head_tx.init(head))
    touched = np.zeros(args.vocab, bool)  # every id any batch held
    rng = np.random.default_rng(args.seed)
    batches = harness.random_batches(corpus.train_ids, corpus.train_labels, args.batch_size, rng)
    sparse_state_bytes = harness.nbytes(state[1]) + harness.nbytes(state[3])
    (table, _, head, _), sparse_log = harness.train(
        make_sparse_step(table_tx, head_tx), state, batches, args.steps,
        desc=f"sparse ({args.optimizer})", quiet=args.quiet, touched=touched,
    )  # fmt: skip
    eval_after = evaluate(table, head)

    # A few dense optax steps of the same model from the same start, timed for comparison.
    dense_table, dense_head = jnp.array(initial_table), jax.tree.map(jnp.array, initial_head)
    dense_table_tx = dense_tx(args.lr)
    state = (dense_table, dense_table_tx.init(dense_table), dense_head, head_tx.init(dense_head))
    dense_state_bytes = harness.nbytes(state[1]) + harness.nbytes(state[3])
    batches = harness.random_batches(corpus.train_ids, corpus.train_labels, args.batch_size, rng)
    _, dense_log = harness.train(
        make_dense_step(dense_table_tx, head_tx), state, batches, args.dense_steps,
        desc=f"dense (optax.{dense_tx.__name__})", quiet=args.quiet,
    )  # fmt: skip

    final_table = np.asarray(table)
    result = {
        "args": args,
        "classes": corpus.classes,
        "eval_before": eval_before,
        "eval_after": eval_after,
        "sparse": sparse_log,
        "dense": dense_log,
        "dense_name": f"optax.{dense_tx.__name__}",
        "state_bytes": (sparse_state_bytes, dense_state_bytes),
        "touched": touched,
        "initial_table": initial_table,
        "final_table": final_table,
        "untouched_identical": bool(np.array_equal(final_table[~touched], initial_table[~touched])),
    }
    harness.print_summary(result, started)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["untouched_identical"] else 1)
