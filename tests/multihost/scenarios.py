"""The shared half of the multi-process equivalence suite: global data and scenario functions.

`equivalence_worker.py` (2 processes x 4 CPU devices, one global mesh) and
`test_equivalence.py` (this pytest process, one CPU device) both import this module, so the
distributed results and their single-process references come from the same NumPy data and
the same functions:

* `global_data()`: every input as one global NumPy array, drawn from fixed seeds. Each
  worker process builds only its own part of each global `jax.Array` from it (rows of the
  ids it supplies, the table blocks its devices hold); the test passes the arrays whole.
* The scenario functions are plain jaxembed calls, each returning a dict of arrays. The
  vocab-parallel ones (`jaxembed.sharding.vocab_parallel_*`) need a mesh: called with
  `mesh=None`, as the test calls them, they run the unsharded jaxembed function they must
  equal (`apply`, `optimizer.update`, `attend_cross_entropy`).
* `train_lora` and `train_sparse` run a few jitted training steps; `put` places each step's
  batch (per host in the worker, nothing in the test).

`CASES` lists which scenario runs on which mesh, axis types and table layout; the worker runs
them all and the test checks them all, each case's results stored under `Case.key`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import jaxembed

V, D, RANK = 256, 16, 4  # V divides over 4 and 2 shards; D over 4 and 2 (dim-parallel)
BATCH, LENGTH, QUERY_LENGTH = 8, 6, 3  # BATCH divides over 2 and 4 data shards
ALPHA = 8.0  # LoRA's scale numerator: scale 2, so that the adapter visibly counts
LORA_STEPS = 3
SPARSE_STEPS = 3
LEARNING_RATE = 1e-2

# The two meshes, both ("data", "model") over 2 processes x 4 devices (built by the worker):
# "data_across_hosts" is (2, 4), each process one "data" row, the vocabulary split within a
# host; "vocab_across_hosts" is (4, 2), each process one "model" column, so a vocab-parallel
# table's rows live on both hosts and every process holds every "data" row.
MESHES = ("data_across_hosts", "vocab_across_hosts")
KINDS = ("explicit", "auto")  # the meshes' axis types

# Where each params array lives, per table layout (LoRA's A follows the table's rows, B its
# columns, as tests/multidevice/test_sharded.py places them).
LAYOUTS = {
    "vocab": {
        "embeddings": P("model", None),
        "lora_embeddings_a": P("model", None),
        "lora_embeddings_b": P(None, None),
    },
    "dim": {
        "embeddings": P(None, "model"),
        "lora_embeddings_a": P(None, None),
        "lora_embeddings_b": P(None, "model"),
    },
}

QUANTIZED = {"int8": ("int8", None), "int4": ("int4", None), "int4_block8": ("int4", 8)}
SPARSE_OPTIMIZERS = {
    "sgd": lambda: jaxembed.sparse.sgd(0.1),
    "adagrad": lambda: jaxembed.sparse.adagrad(0.1),
    "rowwise_adagrad": lambda: jaxembed.sparse.rowwise_adagrad(0.1),
    "lazy_adam": lambda: jaxembed.sparse.lazy_adam(0.01),
}
# The fused loss with every option that changes its maths; 24-row chunks walk each shard
# (64 or 128 rows) in whole chunks plus an overlapping last one.
LOSS_OPTIONS = {
    "lora_alpha": ALPHA,
    "label_smoothing": 0.1,
    "z_loss": 1e-3,
    "logit_soft_cap": 5.0,
    "chunk_size": 24,
}


class Case(NamedTuple):
    """One scenario on one mesh, with one kind of axes and one table layout."""

    scenario: str
    mesh: str
    kind: str
    layout: str

    @property
    def key(self) -> str:
        """Its results' prefix in the worker's npz: `scenario/mesh/kind/layout/`."""
        return "/".join(self) + "/"

    @property
    def id(self) -> str:
        """The pytest id: `mesh-kind-layout`."""
        return "-".join(self[1:])


def _cases(scenario: str, meshes=MESHES, kinds=("explicit",), layouts=tuple(LAYOUTS)) -> list[Case]:
    return [Case(scenario, m, k, lay) for m in meshes for k in kinds for lay in layouts]


# Which scenario runs where: every scenario on both meshes with Explicit axes; the lookup and
# the LoRA training also on Auto axes (mesh "data_across_hosts"). The vocab-parallel
# functions, the row-sparse optimizers and the quantized tables split the vocabulary only
# ("vocab" layout). The plain fused loss runs on both Explicit meshes (where it runs the
# vocab-parallel walk by itself) and on Auto axes on the mesh whose vocab split spans the
# hosts (where the partitioner gathers the table). Each case is one jitted program (the
# training cases: one step, run a few times), so the list is kept short: compiling dominates
# the run.
CASES = {
    "lookup": _cases("lookup") + _cases("lookup", MESHES[:1], ("auto",)),
    "vocab_parallel_lookup": _cases("vocab_parallel_lookup", layouts=("vocab",)),
    "logits": _cases("logits"),
    "gradients": _cases("gradients"),
    "lora_training": _cases("lora_training")
    + _cases("lora_training", MESHES[:1], ("auto",), ("vocab",)),
    "sparse_training": _cases("sparse_training", layouts=("vocab",)),
    # optimizer.update with no mesh argument: vocab-parallel by itself on Explicit axes.
    "plain_sparse_training": _cases("plain_sparse_training", layouts=("vocab",)),
    "vocab_parallel_loss": _cases("vocab_parallel_loss", layouts=("vocab",)),
    "plain_loss": _cases("plain_loss", layouts=("vocab",))
    + _cases("plain_loss", MESHES[1:], ("auto",), ("vocab",)),
    "quantized": _cases("quantized", layouts=("vocab",)),
}
# The cases whose compiled programs are searched for an all-gather of the whole table.
GATHER_CHECKED = [
    case for name in ("lookup", "lora_training") for case in CASES[name] if case.layout == "vocab"
]


def _boundaries() -> np.ndarray:
    """The first and last row of every shard, for 2 and for 4 vocab shards."""
    starts = np.arange(0, V, V // 4)
    return np.concatenate([starts, starts + V // 4 - 1])


@functools.cache
def global_data() -> dict[str, np.ndarray]:
    """Every input, global and read-only, from fixed seeds (NumPy only: no JAX op runs)."""
    rng = np.random.default_rng(0)
    edges = _boundaries()  # 8 ids: one per example below
    ids = rng.integers(0, V, (BATCH, LENGTH), dtype=np.int32)
    ids[:, 0] = edges  # every shard's edge rows, spread over both halves of the batch
    ids[:, 1] = edges[::-1]
    ids[BATCH - 1, 2] = ids[0, 2]  # the same id in both halves of the batch
    ids[2, 3] = ids[2, 4]  # and twice in one example
    # Sparse steps: duplicates within a data shard and across them, and shard edges.
    sparse_ids = rng.integers(0, V, (SPARSE_STEPS, BATCH, LENGTH), dtype=np.int32)
    sparse_ids[:, :, 0] = edges
    sparse_ids[:, [0, BATCH - 1], 1] = V - 1
    sparse_ids[:, 3, 2] = sparse_ids[:, 3, 3]
    labels = rng.integers(0, V, (BATCH, QUERY_LENGTH), dtype=np.int32)
    labels[:, 0] = edges
    mask = rng.random((BATCH, QUERY_LENGTH)) < 0.75
    mask[:, 0] = True
    data = {
        "embeddings": rng.normal(0.0, 0.5, (V, D)).astype(np.float32),
        "lora_embeddings_a": rng.normal(0.0, 0.5, (V, RANK)).astype(np.float32),
        # Non-zero B (LoRA starts it at zero): the adapter's delta is part of every result.
        "lora_embeddings_b": rng.normal(0.0, 0.5, (RANK, D)).astype(np.float32),
        "ids": ids,
        "query": rng.normal(size=(BATCH, QUERY_LENGTH, D)).astype(np.float32),
        # A frozen D x D map between the lookup and the tied logits (as in
        # examples/sharded_finetune.py), orthonormal so that the logits stay moderate.
        "body": np.linalg.qr(rng.normal(size=(D, D)))[0].astype(np.float32),
        "tokens": rng.integers(0, V, (LORA_STEPS, BATCH, LENGTH + 1), dtype=np.int32),
        "sparse_ids": sparse_ids,
        "labels": labels,
        "mask": mask,
    }
    for array in data.values():
        array.setflags(write=False)
    return data


def base_params(data: dict[str, Any]) -> dict[str, Any]:
    """The plain table."""
    return {"embeddings": data["embeddings"]}


def lora_params(data: dict[str, Any]) -> dict[str, Any]:
    """The table with its LoRA adapter (A and B)."""
    keys = ("embeddings", "lora_embeddings_a", "lora_embeddings_b")
    return {key: data[key] for key in keys}


@functools.cache
def quantized_params(fmt: str) -> dict[str, np.ndarray]:
    """The table quantized to `fmt` (a key of QUANTIZED), with the LoRA adapter (QLoRA), as
    global NumPy arrays. Quantizing is deterministic: every process gets the same bytes."""
    mode, block_size = QUANTIZED[fmt]
    data = global_data()
    quantized = jaxembed.quantize(base_params(data), mode, block_size=block_size)
    params = {**jax.device_get(quantized), **lora_params(data)}
    del params["embeddings"]
    return params


# --- The scenarios: plain jaxembed calls, the same in every process and in the reference ---


def lookup(plain: dict, adapted: dict, ids: jax.Array) -> dict[str, jax.Array]:
    """`jaxembed.apply` of the plain table and of the LoRA-adapted one."""
    return {
        "plain": jaxembed.apply(plain, ids),
        "lora": jaxembed.apply(adapted, ids, lora_alpha=ALPHA),
    }


def vocab_parallel_lookup(
    plain: dict, adapted: dict, ids: jax.Array, mesh: Any = None
) -> dict[str, jax.Array]:
    """`jaxembed.sharding.vocab_parallel_apply` on `mesh` ("model" splits the vocabulary,
    "data" the ids); with no mesh, `jaxembed.apply`, which it must equal."""
    if mesh is None:
        return lookup(plain, adapted, ids)
    parallel = functools.partial(
        jaxembed.sharding.vocab_parallel_apply, mesh=mesh, vocab_axis="model", batch_axes="data"
    )
    return {"plain": parallel(plain, ids), "lora": parallel(adapted, ids, lora_alpha=ALPHA)}


def logits(plain: dict, adapted: dict, query: jax.Array) -> dict[str, jax.Array]:
    """`jaxembed.attend`: tied logits against the plain and the LoRA-adapted table."""
    return {
        "plain": jaxembed.attend(plain, query),
        "lora": jaxembed.attend(adapted, query, lora_alpha=ALPHA),
    }


def tied_loss(params: dict, body: jax.Array, tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy with tied logits: apply -> frozen `body` -> attend.

    One-hot labels, as in examples/sharded_finetune.py: optax's integer-label version gathers
    along the vocab-split axis of the logits, which an Explicit mesh refuses.
    """
    hidden = jaxembed.apply(params, tokens[:, :-1], lora_alpha=ALPHA)
    scores = jaxembed.attend(params, hidden @ body, lora_alpha=ALPHA)
    labels = jax.nn.one_hot(tokens[:, 1:], V, dtype=scores.dtype)
    return optax.softmax_cross_entropy(scores, labels).mean()


def gradients(
    plain: dict, adapted: dict, body: jax.Array, tokens: jax.Array
) -> dict[str, jax.Array]:
    """The tied loss and its gradients, in one program: the whole table's (no LoRA; a dense
    data-parallel gradient), and the adapter's A and B (LoRA, the table frozen with
    `jaxembed.lora.split_trainable` / `combine`)."""
    loss, grads = jax.value_and_grad(tied_loss)(plain, body, tokens)
    trainable, frozen = jaxembed.lora.split_trainable(adapted)

    def adapted_loss(trainable):
        return tied_loss(jaxembed.lora.combine(trainable, frozen), body, tokens)

    lora_loss, lora_grads = jax.value_and_grad(adapted_loss)(trainable)
    return {
        "loss": loss,
        "embeddings": grads["embeddings"],
        "lora_loss": lora_loss,
        **{key: grad for key, grad in lora_grads.items() if grad is not None},
    }


def _lora_step(tx: optax.GradientTransformation, trainable, opt_state, frozen, body, tokens):
    def loss(trainable):
        return tied_loss(jaxembed.lora.combine(trainable, frozen), body, tokens)

    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value


def train_lora(
    adapted: dict,
    body: jax.Array,
    batches: Any,
    *,
    put: Callable[[Any], Any] = lambda batch: batch,
    inspect: Callable[..., None] | None = None,
) -> dict[str, jax.Array]:
    """LORA_STEPS jitted Adam steps on the adapter; the losses and A, B after.

    The optimizer state is initialised inside `jax.jit`: under a mesh its scalar step count
    is then a global array like the rest (an eager `tx.init` makes it a one-device array of
    this process). `put(batch)` places each step's tokens; `inspect(step, *args)` is called
    once with the jitted step and its first arguments (the worker reads its compiled HLO).
    """
    tx = optax.adam(LEARNING_RATE)
    trainable, frozen = jaxembed.lora.split_trainable(adapted)
    opt_state = jax.jit(tx.init)(trainable)
    step = jax.jit(functools.partial(_lora_step, tx))
    losses = []
    for i, batch in enumerate(batches):
        args = (trainable, opt_state, frozen, body, put(batch))
        if i == 0 and inspect is not None:
            inspect(step, *args)
        trainable, opt_state, loss = step(*args)
        losses.append(loss)
    return {
        **{f"loss_{i}": loss for i, loss in enumerate(losses)},
        "lora_embeddings_a": trainable["lora_embeddings_a"],
        "lora_embeddings_b": trainable["lora_embeddings_b"],
        "adam_count": optax.tree_utils.tree_get(opt_state, "count"),
    }


def _sparse_loss(rows: jax.Array, body: jax.Array) -> jax.Array:
    # Its row gradients depend on the rows, so each step sees the previous steps' updates.
    return jnp.sum(jnp.sin(rows @ body))


def _sparse_step(optimizers, tables, states, ids, body, *, mesh=None):
    """One step of every optimizer, each on its own copy of the table."""
    new_tables, new_states, losses = {}, {}, {}
    for name, optimizer in optimizers.items():
        loss, row_grads = jaxembed.sparse.value_and_row_grads(
            _sparse_loss, {"embeddings": tables[name]}, ids, body
        )
        args = (tables[name], states[name], ids, row_grads)
        if mesh is None:
            new_tables[name], new_states[name] = optimizer.update(*args)
        else:
            new_tables[name], new_states[name] = jaxembed.sharding.vocab_parallel_update(
                optimizer, *args, vocab_axis="model", mesh=mesh, batch_axes="data"
            )
        losses[name] = loss
    return new_tables, new_states, losses


def train_sparse(
    table: jax.Array,
    body: jax.Array,
    batches: Any,
    *,
    mesh: Any = None,
    put: Callable[[Any], Any] = lambda batch: batch,
) -> dict[str, jax.Array]:
    """SPARSE_STEPS steps of every row-wise optimizer of SPARSE_OPTIMIZERS, side by side in
    one jitted step (one program to compile): row gradients from
    `jaxembed.sparse.value_and_row_grads`, then `jaxembed.sharding.vocab_parallel_update` on
    `mesh` (each shard updates its own rows), or `optimizer.update` with no mesh. The states
    come from an eager `optimizer.init`, as a user would write it. Returns, under
    `<optimizer>/`, the losses, the table and every array of the state after."""
    optimizers = {name: make() for name, make in SPARSE_OPTIMIZERS.items()}
    tables = dict.fromkeys(optimizers, table)
    states = {name: optimizer.init(table) for name, optimizer in optimizers.items()}
    step = jax.jit(functools.partial(_sparse_step, optimizers, mesh=mesh))
    results = {}
    for i, batch in enumerate(batches):
        tables, states, losses = step(tables, states, put(batch), body)
        results.update({f"{name}/loss_{i}": loss for name, loss in losses.items()})
    for name in optimizers:
        results[f"{name}/table"] = tables[name]
        results[f"{name}/count"] = states[name].count
        results.update({f"{name}/state_{i}": row for i, row in enumerate(states[name].rows)})
    return results


def fused_loss(
    params: dict, query: jax.Array, labels: jax.Array, mask: jax.Array, mesh: Any = None
) -> dict[str, jax.Array]:
    """The fused tied-logits loss and its gradients wrt every params array and the query:
    `jaxembed.sharding.vocab_parallel_attend_cross_entropy` on `mesh`, or the plain
    `jaxembed.attend_cross_entropy` with no mesh."""

    def loss(params, query):
        if mesh is None:
            return jaxembed.attend_cross_entropy(params, query, labels, where=mask, **LOSS_OPTIONS)
        return jaxembed.sharding.vocab_parallel_attend_cross_entropy(
            params,
            query,
            labels,
            where=mask,
            mesh=mesh,
            vocab_axis="model",
            batch_axes="data",
            **LOSS_OPTIONS,
        )

    value, (param_grads, query_grad) = jax.value_and_grad(loss, argnums=(0, 1))(params, query)
    return {"loss": value, "query": query_grad, **param_grads}


def quantized(formats: dict, ids: jax.Array, query: jax.Array, mesh: Any = None) -> dict:
    """Quantized tables, one per format of QUANTIZED, in one program, under `<format>/`: the
    lookup, the tied logits and the vocab-parallel lookup (`jaxembed.apply` again with no
    mesh) with the LoRA adapter (QLoRA), and both lookups of the bare quantized table
    (`plain_`: integer gathers and dequantization, no sum)."""

    def parallel(params, **options):
        if mesh is None:
            return jaxembed.apply(params, ids, **options)
        return jaxembed.sharding.vocab_parallel_apply(
            params, ids, mesh=mesh, vocab_axis="model", batch_axes="data", **options
        )

    results = {}
    for fmt, adapted in formats.items():
        bare = {key: value for key, value in adapted.items() if not key.startswith("lora_")}
        results[f"{fmt}/lookup"] = jaxembed.apply(adapted, ids, lora_alpha=ALPHA)
        results[f"{fmt}/logits"] = jaxembed.attend(adapted, query, lora_alpha=ALPHA)
        results[f"{fmt}/vocab_parallel_lookup"] = parallel(adapted, lora_alpha=ALPHA)
        results[f"{fmt}/plain_lookup"] = jaxembed.apply(bare, ids)
        results[f"{fmt}/plain_vocab_parallel_lookup"] = parallel(bare)
    return results


def quantized_spec(key: str, ndim: int) -> P:
    """Every quantized table array split over rows ("model"); LoRA's B whole (as
    tests/multidevice/test_quantized_sharded.py)."""
    if key == "lora_embeddings_b":
        return P(None, None)
    return P("model", *(None,) * (ndim - 1))
