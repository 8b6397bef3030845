"""One process of a 2-process run of the Flax modules (test_modules.py launches two).

    python tests/multihost/modules_worker.py OUTDIR

The thin shells on a global 2 x 4 mesh ("data", "model"; Explicit axes), as a Flax user writes
them, with the logical-axis rules that split the vocabulary over "model":

* NNX: `jaxembed.nnx.Embedding` created under `jax.set_mesh` and the rules (each process
  computes the initializer and keeps its own blocks), LoRA enabled, three `nnx.jit` Adam steps
  of the adapter on a loss of the lookup plus the fused tied-logits loss method (which runs
  vocab-parallel by itself on Explicit axes);
* linen: `jaxembed.Embedding` initialised with `jax.jit(init, out_shardings=...)` from the
  rules, three jitted SGD steps of the whole table on the same loss.

Ids are built per host (`jaxembed.multihost.local_rows`). Writes OUTDIR/process_{i}.npz: the
losses and the trained arrays, gathered with `process_allgather` after training, and
OUTDIR/process_{i}.json: the tables' specs and the rows of the table each process holds.
`run(mesh=None)` is the single-process reference the test computes in its own process.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
import jaxembed.multihost
import jaxembed.nnx

V, D, RANK, STEPS = 256, 16, 4, 3
RULES = [("vocab", "model"), ("embed", None)]
IDS = np.arange(8 * 6, dtype=np.int32).reshape(8, 6) * 37 % V  # rows of every vocab shard


def loss_of(embed: Callable[[jax.Array], jax.Array], fused: Callable[..., jax.Array], ids):
    """A lookup term plus the fused tied-logits loss of predicting each id from its row."""
    rows = embed(ids)
    return jnp.mean(jnp.sin(rows)) + fused(rows, ids)


def train_nnx(ids: jax.Array) -> dict[str, Any]:
    layer = jaxembed.nnx.Embedding(V, D, embeddings_initializer="normal", rngs=nnx.Rngs(0))
    layer.enable_lora(RANK, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(layer, optimizer, ids):
        def loss(layer):
            return loss_of(layer, layer.attend_cross_entropy, ids)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
        optimizer.update(layer, grads)
        return value

    losses = [step(layer, optimizer, ids) for _ in range(STEPS)]
    return {
        "losses": jnp.stack(losses),
        "a": layer.lora_embeddings_a[...],
        "b": layer.lora_embeddings_b[...],
        "table": layer.embeddings[...],
    }


def linen_params(ids: jax.Array, mesh: Any) -> dict[str, jax.Array]:
    """The linen module's params: `init` under `jax.jit(out_shardings=...)` from the rules,
    outside the mesh context (flax's boxes assert their sharding inside one)."""
    model = jaxembed.Embedding(V, D, embeddings_initializer="normal")
    key = jax.random.key(2)
    if mesh is None:
        return nn.unbox(model.init(key, ids)["params"])
    abstract = jax.eval_shape(model.init, key, ids)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    return nn.unbox(jax.jit(model.init, out_shardings=shardings)(key, ids)["params"])


def train_linen(params: dict[str, jax.Array], ids: jax.Array) -> dict[str, Any]:
    model = jaxembed.Embedding(V, D)

    def loss(params, ids):
        def method(name):
            return lambda *args: model.apply({"params": params}, *args, method=name)

        return loss_of(method("__call__"), method("attend_cross_entropy"), ids)

    @jax.jit
    def step(params, ids):  # ids an argument: jit refuses to close over a multi-host array
        value, grads = jax.value_and_grad(loss)(params, ids)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), value

    losses = []
    for _ in range(STEPS):
        params, value = step(params, ids)
        losses.append(value)
    return {"losses": jnp.stack(losses), "table": params["embeddings"]}


def run(mesh: Any = None) -> dict[str, Any]:
    """Both trainings, under `mesh` and the rules (or on one device with `mesh=None`)."""
    if mesh is None:
        ids = jnp.asarray(IDS)
        nnx_results, linen_results = train_nnx(ids), train_linen(linen_params(ids, None), ids)
    else:
        sharding = NamedSharding(mesh, P("data", None))
        rows = jaxembed.multihost.local_rows(sharding, IDS.shape)
        ids = jax.make_array_from_process_local_data(sharding, IDS[rows], IDS.shape)
        with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
            nnx_results = train_nnx(ids)
        with nn.logical_axis_rules(RULES):
            params = linen_params(ids, mesh)
        with jax.set_mesh(mesh):
            linen_results = train_linen(params, ids)
    return {
        **{f"nnx/{k}": v for k, v in nnx_results.items()},
        **{f"linen/{k}": v for k, v in linen_results.items()},
    }


def main(outdir: str) -> None:
    jaxembed.multihost.initialize()
    from jax.experimental import multihost_utils

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    results = run(mesh)
    meta = {
        "specs": {k: str(v.sharding.spec) for k, v in results.items()},
        "table_rows_here": sorted(
            {tuple(s.index[0].indices(V)[:2]) for s in results["nnx/table"].addressable_shards}
        ),
        "ids_rows_here": list(
            jaxembed.multihost.local_rows(NamedSharding(mesh, P("data", None)), IDS.shape).indices(
                len(IDS)
            )[:2]
        ),
    }
    gathered = {
        k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in results.items()
    }
    out = pathlib.Path(outdir)
    rank = jax.process_index()
    np.savez(out / f"process_{rank}.npz", **gathered)
    (out / f"process_{rank}.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    main(sys.argv[1])
