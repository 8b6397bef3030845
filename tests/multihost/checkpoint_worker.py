"""One process of a 2-process checkpoint/resume run (test_checkpoint.py launches two).

    python tests/multihost/checkpoint_worker.py MODE CKPT_DIR OUTDIR

Two things train side by side on a global 2 x 4 mesh ("data", "model"; Explicit axes), each
process holding one "data" row of it:

* LoRA: optax Adam on the A and B of a frozen vocab-sharded table, with the tied-logits
  next-token loss of examples/sharded_finetune.py (lookup -> fixed projection -> `attend`
  -> softmax cross-entropy against one-hot labels);
* row-sparse: a full vocab-sharded table trained by `jaxembed.sparse.lazy_adam` through
  `jaxembed.sparse.value_and_row_grads` and `jaxembed.sharding.vocab_parallel_update`.

MODE "uninterrupted" trains steps 1..STEPS, saving everything trained (params and optimizer
states) with orbax after step SAVE_STEP, and goes on without restoring. MODE "resume", in
fresh processes, restores the step-SAVE_STEP checkpoint into abstract arrays that carry the
intended shardings and trains steps SAVE_STEP+1..STEPS. It then runs two controls from the
same restored state, which must NOT reproduce the uninterrupted run: one with a different
batch at the first resumed step, one with a single element of the restored LoRA A and sparse
table nudged by one ulp.

Each process loads only its own rows of each step's batch (a function of the step and the
row, nothing else) and builds its params with `jax.make_array_from_callback`. Everything is
gathered to the host only after training (`process_allgather`: `np.asarray` refuses arrays a
process cannot address), then each process writes OUTDIR/{MODE}_process_{i}.npz (the states
and losses) and OUTDIR/{MODE}_process_{i}.json (shardings, checkpoint layout, counts).

Importing this module does nothing that touches JAX's devices (pytest's doctest collection
imports it): `main` runs only as a script.
"""

import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
import jaxembed.multihost

V, D, RANK, ALPHA = 256, 16, 4, 8.0
BATCH, SEQ = 8, 6  # sequences per step (split over "data"), tokens predicted per sequence
CYCLE = 64  # tokens in the synthetic sequence pattern the LoRA model learns
STEPS, SAVE_STEP = 6, 3
SEED = 0
LORA_ADAM = optax.adam(3e-2)
SPARSE_ADAM = jaxembed.sparse.lazy_adam(1e-2)

VOCAB_ROWS = P("model", None)  # vocab-parallel: rows split over "model"
IDS = P("data", None)  # data-parallel: sequences split over "data"


def intended_spec(shape):
    """The layout of every array trained and checkpointed here: arrays indexed by the
    vocabulary (tables, LoRA A, their optimizer moments) split by rows over "model", all else
    (LoRA B, step counts) replicated."""
    if len(shape) >= 1 and shape[0] == V:
        return P("model", *(None,) * (len(shape) - 1))
    return P(*(None,) * len(shape))


def global_array(mesh, value, spec):
    """A global array from a host value every process can compute: each process fills only
    the blocks its own devices hold."""
    value = np.asarray(value)
    return jax.make_array_from_callback(
        value.shape, NamedSharding(mesh, spec), lambda index: value[index]
    )


def local_batch_rows(mesh):
    """The rows of the global batch this process's devices hold (one "data" row of the mesh:
    a contiguous half)."""
    rows = jaxembed.multihost.local_rows(NamedSharding(mesh, IDS), (BATCH, SEQ + 1))
    return range(rows.start, rows.stop)


def host_tokens(step, rows, salt=0):
    """Windows of a fixed cyclic sequence, one per batch row, each from an offset drawn from
    (salt, step, row) alone: a process builds its own rows and never the others'. The
    pattern is learnable, so the LoRA loss goes down."""
    cycle = np.random.default_rng(SEED).permutation(V)[:CYCLE]
    starts = [np.random.default_rng([salt, step, row]).integers(CYCLE) for row in rows]
    return np.stack([cycle[(s + np.arange(SEQ + 1)) % CYCLE] for s in starts]).astype(np.int32)


def load_batch(mesh, step, rows, salt=0):
    """(tokens, targets) of one step as global arrays split over "data", each process
    supplying only its own rows. targets: the row-sparse model's regression target for each
    next token, a fixed random code per token id."""
    tokens = host_tokens(step, rows, salt)
    codes = np.random.default_rng(SEED + 3).standard_normal((V, D)).astype(np.float32)
    targets = codes[tokens[:, 1:]]
    return (
        jax.make_array_from_process_local_data(NamedSharding(mesh, IDS), tokens, (BATCH, SEQ + 1)),
        jax.make_array_from_process_local_data(
            NamedSharding(mesh, P("data", None, None)), targets, (BATCH, SEQ, D)
        ),
    )


def build_params(mesh):
    """(frozen LoRA half, projection, initial LoRA adapters, initial sparse table), from
    seeds: the same values in every process and every run. Needs no mesh context."""
    rng = np.random.default_rng(SEED)
    pretrained = rng.normal(0.0, 0.05, (V, D)).astype(np.float32)
    # enable_lora on host-local arrays (each process computes the same A), then to NumPy and
    # onto the mesh block by block.
    host_params = jax.tree.map(
        np.asarray,
        jaxembed.enable_lora(
            jaxembed.init(None, V, D, weights=pretrained), jax.random.key(SEED), RANK
        ),
    )
    params = {k: global_array(mesh, v, intended_spec(v.shape)) for k, v in host_params.items()}
    trainable, frozen = jaxembed.lora.split_trainable(params)
    # A frozen D x D projection between lookup and tied logits (as in the example).
    body = global_array(mesh, np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32), P())
    sparse_table = global_array(mesh, rng.normal(0.0, 0.05, (V, D)).astype(np.float32), VOCAB_ROWS)
    return frozen, body, trainable, sparse_table


def initial_state(trainable, sparse_table):
    """Everything trained and checkpointed. Call under `jax.set_mesh`: the optimizers' step
    counts are then replicated global arrays. Outside any mesh, both optax's and
    jaxembed.sparse's count is a single-device array, which orbax refuses to save in a
    multi-process run; under jit, jaxembed.sparse's rows lose the table's split (see
    `init_findings`)."""
    return {
        "lora": {"trainable": trainable, "adam": LORA_ADAM.init(trainable)},
        "sparse": {"table": sparse_table, "state": SPARSE_ADAM.init(sparse_table)},
    }


def describe_init(state):
    """Where an optimizer state's arrays live: the count's sharding, and every array's spec."""
    # RowwiseState, or optax.adam's (ScaleByAdamState, EmptyState).
    count = state.count if isinstance(state, jaxembed.sparse.RowwiseState) else state[0].count
    return {
        "count_sharding": type(count.sharding).__name__,
        "count_fully_addressable": count.is_fully_addressable,
        "specs": [str(x.sharding.spec) for x in jax.tree.leaves(state) if x.ndim],
    }


def init_findings(mesh, trainable, table):
    """How optax's and jaxembed.sparse's init place their state in a multi-process run,
    eagerly outside and inside `jax.set_mesh`, and under a plain jit; recorded for the
    report (a count that is fully addressable is one process's own array: orbax refuses it)."""
    findings = {
        "adam_eager_outside_mesh": describe_init(LORA_ADAM.init(trainable)),
        "sparse_eager_outside_mesh": describe_init(SPARSE_ADAM.init(table)),
    }
    with jax.set_mesh(mesh):
        findings["adam_eager_in_mesh"] = describe_init(LORA_ADAM.init(trainable))
        findings["sparse_eager_in_mesh"] = describe_init(SPARSE_ADAM.init(table))
        findings["adam_jit_in_mesh"] = describe_init(jax.jit(LORA_ADAM.init)(trainable))
        findings["sparse_jit_in_mesh"] = describe_init(jax.jit(SPARSE_ADAM.init)(table))
    return findings


def lora_loss(trainable, frozen, body, tokens):
    """Tied-logits next-token cross-entropy (examples/sharded_finetune.py's loss)."""
    params = jaxembed.lora.combine(trainable, frozen)
    hidden = jaxembed.apply(params, tokens[:, :-1], out_of_range="clip", lora_alpha=ALPHA)
    logits = jaxembed.attend(params, hidden @ body, lora_alpha=ALPHA)
    # One-hot labels: the integer-label version gathers across the vocab-sharded axis, which
    # an Explicit mesh refuses.
    labels = jax.nn.one_hot(tokens[:, 1:], V, dtype=logits.dtype)
    return optax.softmax_cross_entropy(logits, labels).mean()


def sparse_loss(rows, body, targets):
    """Regression of each looked-up row (through the projection) onto its next token's code:
    it reads the table only through the lookup, so its gradient is row-sparse."""
    return jnp.mean(jnp.square(rows @ body - targets))


def train_step(state, frozen, body, tokens, targets):
    """One step of both models; returns the new state and the two losses."""
    lora, sparse = state["lora"], state["sparse"]
    lora_value, grads = jax.value_and_grad(lora_loss)(lora["trainable"], frozen, body, tokens)
    updates, adam = LORA_ADAM.update(grads, lora["adam"], lora["trainable"])
    trainable = optax.apply_updates(lora["trainable"], updates)

    ids = tokens[:, :-1]
    sparse_value, row_grads = jaxembed.sparse.value_and_row_grads(
        sparse_loss, {"embeddings": sparse["table"]}, ids, body, targets, out_of_range="clip"
    )
    table, sparse_state = jaxembed.sharding.vocab_parallel_update(
        SPARSE_ADAM,
        sparse["table"],
        sparse["state"],
        ids,
        row_grads,
        vocab_axis="model",
        batch_axes="data",
        out_of_range="fill",
    )
    new_state = {
        "lora": {"trainable": trainable, "adam": adam},
        "sparse": {"table": table, "state": sparse_state},
    }
    return new_state, jnp.stack([lora_value, sparse_value])


def abstract_state(mesh):
    """The restore target: the checkpointed pytree as shapes and dtypes (from the optimizers'
    own init, traced, nothing computed) with the intended NamedShardings attached."""
    trainable = {
        "embeddings": None,
        "lora_embeddings_a": jax.ShapeDtypeStruct((V, RANK), jnp.float32),
        "lora_embeddings_b": jax.ShapeDtypeStruct((RANK, D), jnp.float32),
    }
    table = jax.ShapeDtypeStruct((V, D), jnp.float32)
    shapes = {
        "lora": {"trainable": trainable, "adam": jax.eval_shape(LORA_ADAM.init, trainable)},
        "sparse": {"table": table, "state": jax.eval_shape(SPARSE_ADAM.init, table)},
    }
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=NamedSharding(mesh, intended_spec(s.shape))
        ),
        shapes,
    )


def flat(tree):
    """{path: leaf}, e.g. "['lora']['adam'][0].mu['lora_embeddings_a']"."""
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def specs(tree):
    return {name: str(x.sharding.spec) for name, x in flat(tree).items()}


def nudge(state):
    """The state with one element of the LoRA A and one of the sparse table moved by one ulp
    (the smallest change a restore could make)."""

    @jax.jit
    def up(x):
        # A mask laid out like x rather than `x.at[0, 0]`: an Explicit mesh refuses both an
        # indexed update on a sharded axis and a select between differently sharded operands.
        first = (jnp.arange(x.shape[0])[:, None] == 0) & (jnp.arange(x.shape[1]) == 0)
        first = jax.sharding.reshard(first, jax.typeof(x).sharding.spec)
        return jnp.where(first, jnp.nextafter(x, jnp.inf), x)

    nudged = jax.tree.map(lambda x: x, state)  # a new container; the arrays are immutable
    a = nudged["lora"]["trainable"]
    nudged["lora"]["trainable"] = {**a, "lora_embeddings_a": up(a["lora_embeddings_a"])}
    nudged["sparse"] = {**nudged["sparse"], "table": up(nudged["sparse"]["table"])}
    return nudged


def train(step_fn, state, frozen, body, mesh, rows, first, *, on_step=None, salt_at=None):
    """Steps first+1..STEPS; `salt_at`: the step whose batch is replaced by another one."""
    losses = []
    for step in range(first + 1, STEPS + 1):
        batch = load_batch(mesh, step, rows, salt=1 if step == salt_at else 0)
        state, loss = step_fn(state, frozen, body, *batch)
        losses.append(loss)
        if on_step is not None:
            on_step(step, state)
    return state, losses


def checkpoint_layout(path):
    """Per ocdbt.process_i folder of a saved checkpoint: its files and their bytes."""
    return {
        d.name: {
            "files": sum(1 for f in d.rglob("*") if f.is_file()),
            "bytes": sum(f.stat().st_size for f in d.rglob("*") if f.is_file()),
        }
        for d in sorted(path.glob("ocdbt.process_*"))
    }


def main(mode, ckpt_dir, outdir):
    start = time.perf_counter()
    # First: joins the other process (and switches CPU collectives to gloo) before anything
    # asks JAX for devices.
    jaxembed.multihost.initialize()
    process = jax.process_index()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    rows = local_batch_rows(mesh)
    path = pathlib.Path(ckpt_dir).resolve() / f"step_{SAVE_STEP}"
    checkpointer = ocp.StandardCheckpointer()
    arrays, meta = {}, {"mode": mode, "process": process, "local_batch_rows": list(rows)}
    meta["steps"], meta["save_step"] = STEPS, SAVE_STEP

    frozen, body, trainable, sparse_table = build_params(mesh)
    if mode == "uninterrupted":
        meta["init_findings"] = init_findings(mesh, trainable, sparse_table)  # outside the mesh
    with jax.set_mesh(mesh):
        meta["intended_specs"] = {
            name: str(intended_spec(x.shape)) for name, x in flat(abstract_state(mesh)).items()
        }
        step_fn = jax.jit(train_step)

        if mode == "uninterrupted":
            initial = initial_state(trainable, sparse_table)
            meta["initial_specs"] = specs(initial)
            at_save = {}

            def save(step, state):
                if step == SAVE_STEP:
                    # Every process calls save: each writes the shards it holds.
                    checkpointer.save(path, state)
                    at_save["state"] = state

            final, losses = train(step_fn, initial, frozen, body, mesh, rows, 0, on_step=save)
            checkpointer.wait_until_finished()  # the save runs in the background
            multihost_utils.sync_global_devices("checkpoint written")
            meta["checkpoint_layout"] = checkpoint_layout(path)
            arrays["at_save"] = at_save["state"]
        elif mode == "resume":
            target = abstract_state(mesh)
            restored = checkpointer.restore(path, target)
            meta["target_specs"] = specs(target)
            meta["restored_specs"] = specs(restored)
            meta["restored_counts"] = {
                "lora_adam": int(restored["lora"]["adam"][0].count),
                "sparse": int(restored["sparse"]["state"].count),
            }
            final, losses = train(step_fn, restored, frozen, body, mesh, rows, SAVE_STEP)
            arrays["at_save"] = restored
            # Controls: the same run from the same restored state, with one other batch or
            # a one-ulp change; bit-identical results from these would mean the comparison
            # cannot see a difference.
            other_batch, _ = train(
                step_fn, restored, frozen, body, mesh, rows, SAVE_STEP, salt_at=SAVE_STEP + 1
            )
            nudged, _ = train(step_fn, nudge(restored), frozen, body, mesh, rows, SAVE_STEP)
            arrays["control_other_batch"], arrays["control_nudged"] = other_batch, nudged
        else:
            raise SystemExit(f"unknown MODE {mode!r}: 'uninterrupted' or 'resume'")
        arrays["final"] = final
        meta["final_specs"] = specs(final)

        # Only now, after training, to the host: a collective every process takes part in.
        host = multihost_utils.process_allgather(
            {**arrays, "losses": jnp.stack(losses)}, tiled=True
        )
    checkpointer.close()

    npz = {"losses": host.pop("losses")}
    for group, tree in host.items():
        npz.update({f"{group}/{name}": value for name, value in flat(tree).items()})
    outdir = pathlib.Path(outdir)
    np.savez(outdir / f"{mode}_process_{process}.npz", **npz)
    meta["seconds"] = time.perf_counter() - start
    (outdir / f"{mode}_process_{process}.json").write_text(json.dumps(meta, indent=2))
    print(f"process {process}: {mode} done in {meta['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(f"usage: {os.path.basename(sys.argv[0])} MODE CKPT_DIR OUTDIR")
    main(*sys.argv[1:])
