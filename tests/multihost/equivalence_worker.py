"""One process of the multi-process equivalence suite: `python equivalence_worker.py OUTDIR`.

`test_equivalence.py` starts it as 2 processes x 4 simulated CPU devices (through
`jaxembed.multihost.launch`, which sets the environment `jaxembed.multihost.initialize()`
reads). Each process:

1. joins the other (`jaxembed.multihost.initialize()`, gloo CPU collectives);
2. builds the two global meshes of `scenarios.MESHES`, with Explicit and Auto axes, and
   checks which process owns which mesh devices;
3. builds every global array from its own part only: the batch (ids, tokens, query, labels)
   from the rows its devices hold (`jax.make_array_from_process_local_data`), the params from
   the blocks its devices hold (`jax.make_array_from_callback`, which records the blocks it
   asked for);
4. runs every case of `scenarios.CASES` (jitted jaxembed calls under `jax.set_mesh`), reads
   the compiled programs of `scenarios.GATHER_CHECKED` for an all-gather of the whole table;
5. gathers each result to the host (`process_allgather`, only to check it, outside the
   computation) and writes `OUTDIR/process_<rank>.npz` (results under `Case.key + name`) and
   `OUTDIR/process_<rank>.json` (what it supplied, where the shards and results live, the
   collectives of the checked programs, timings).

Importing this module does nothing (pytest's doctest collection imports it): `main` runs only
as a script.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import scenarios  # this script's folder is sys.path[0]
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed.multihost
from jaxembed import _hlo

AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def make_mesh(name: str, kind: str) -> Mesh:
    """One of `scenarios.MESHES` over every device of both processes."""
    types = (AXIS_TYPES[kind],) * 2
    if name == "data_across_hosts":
        return jax.make_mesh((2, 4), ("data", "model"), axis_types=types)
    # jax.devices() lists process 0's devices, then process 1's: transposed, each process's
    # devices form one "model" column, and "model" spans the hosts.
    by_process = np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
    return Mesh(by_process.T, ("data", "model"), axis_types=types)


def owners(mesh: Mesh) -> list[list[int]]:
    """The process that owns each device of the mesh, by (data, model) position."""
    return np.vectorize(lambda d: d.process_index)(mesh.devices).tolist()


def check_owners(name: str, mesh: Mesh) -> None:
    """Fails unless the mesh spans the hosts along the axis its name says."""
    grid = np.array(owners(mesh))
    expected = {
        "data_across_hosts": np.arange(2)[:, None].repeat(4, axis=1),  # row i on process i
        "vocab_across_hosts": np.arange(2)[None, :].repeat(4, axis=0),  # column j on process j
    }[name]
    if not np.array_equal(grid, expected):
        raise AssertionError(f"mesh {name}: devices owned by processes {grid.tolist()}")


def bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[list[int]]:
    """A block's index (slices) as [start, stop] per dimension."""
    return [list(s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)]


class Placer:
    """Builds this process's part of global arrays on one mesh and records what it read."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.batch_rows: set[tuple[int, int]] = set()  # rows of the batch supplied here
        self.blocks: dict[str, list] = {}  # params blocks read here, by name

    def params(self, arrays: dict[str, np.ndarray], specs: dict[str, P], name: str) -> dict:
        """Each array from the blocks this process's devices hold (the callback is called once
        per local device with that device's index), blocks recorded under `name/key`."""
        placed = {}
        for key, array in arrays.items():
            read = []

            def block(index, array=array, read=read):
                read.append(bounds(index, array.shape))
                return array[index]

            sharding = NamedSharding(self.mesh, specs[key])
            placed[key] = jax.make_array_from_callback(array.shape, sharding, block)
            self.blocks[f"{name}/{key}"] = sorted(read)
        return placed

    def batch(self, array: np.ndarray) -> jax.Array:
        """Examples split over "data", from the rows this process's devices hold only."""
        sharding = NamedSharding(self.mesh, P("data", *(None,) * (array.ndim - 1)))
        rows = jaxembed.multihost.local_rows(sharding, array.shape)
        start, stop = rows.start, rows.stop
        local = np.ascontiguousarray(array[start:stop])  # all this process ever passes on
        placed = jax.make_array_from_process_local_data(sharding, local, array.shape)
        for shard in placed.addressable_shards:  # each device got its own rows
            np.testing.assert_array_equal(np.asarray(shard.data), array[shard.index])
        self.batch_rows.add((start, stop))
        return placed


class Context(NamedTuple):
    """What a case runs on: one mesh, the placed inputs, one table layout."""

    mesh: Mesh
    placer: Placer
    plain: dict  # {"embeddings"}
    adapted: dict  # the same table with LoRA's A and B
    batch: dict  # ids, query, labels, mask, tokens (of the first LoRA step), placed
    body: jax.Array


def gather_checks(text: str) -> dict[str, Any]:
    """What the compiled program all-gathers, and every collective it runs."""
    return {
        "table_gathered": _hlo.all_gathers(text, (scenarios.V, scenarios.D)),
        "lora_a_gathered": _hlo.all_gathers(text, (scenarios.V, scenarios.RANK)),
        "all_gathered": _hlo.all_gathered_shapes(text),
        "collectives": [[c.op, list(c.shapes), c.group_size] for c in _hlo.collectives(text)],
    }


def run_case(case: scenarios.Case, ctx: Context, hlo: dict) -> dict[str, jax.Array]:
    """Runs one case on the placed inputs (jitted, under the mesh set by `main`); for the
    cases of `scenarios.GATHER_CHECKED`, records its compiled program's collectives in
    `hlo[case.key]` (the lookup's executable is the one that then runs)."""
    data = scenarios.global_data()
    mesh, plain, adapted, batch, body = ctx.mesh, ctx.plain, ctx.adapted, ctx.batch, ctx.body
    checked = case in scenarios.GATHER_CHECKED
    name = case.scenario
    if name == "lookup":
        compiled = jax.jit(scenarios.lookup).lower(plain, adapted, batch["ids"]).compile()
        if checked:
            hlo[case.key] = gather_checks(compiled.as_text())
        return compiled(plain, adapted, batch["ids"])
    if name == "vocab_parallel_lookup":
        parallel = functools.partial(scenarios.vocab_parallel_lookup, mesh=mesh)
        return jax.jit(parallel)(plain, adapted, batch["ids"])
    if name == "logits":
        return jax.jit(scenarios.logits)(plain, adapted, batch["query"])
    if name == "gradients":
        return jax.jit(scenarios.gradients)(plain, adapted, body, batch["tokens"])
    if name == "lora_training":

        def inspect(step, *args):
            hlo[case.key] = gather_checks(_hlo.compiled_text(step, *args))

        return scenarios.train_lora(
            adapted,
            body,
            data["tokens"],
            put=ctx.placer.batch,
            inspect=inspect if checked else None,
        )
    if name in ("sparse_training", "plain_sparse_training"):
        explicit_call = mesh if name == "sparse_training" else None
        return scenarios.train_sparse(
            plain["embeddings"], body, data["sparse_ids"], mesh=explicit_call, put=ctx.placer.batch
        )
    loss_args = (adapted, batch["query"], batch["labels"], batch["mask"])
    if name == "vocab_parallel_loss":
        return jax.jit(functools.partial(scenarios.fused_loss, mesh=mesh))(*loss_args)
    if name == "plain_loss":
        return jax.jit(scenarios.fused_loss)(*loss_args)
    if name == "quantized":
        formats = {}
        for fmt in scenarios.QUANTIZED:
            arrays = scenarios.quantized_params(fmt)
            specs = {key: scenarios.quantized_spec(key, x.ndim) for key, x in arrays.items()}
            formats[fmt] = ctx.placer.params(arrays, specs, f"quantized_{fmt}")
        quantized = functools.partial(scenarios.quantized, mesh=mesh)
        return jax.jit(quantized)(formats, batch["ids"], batch["query"])
    raise ValueError(f"no runner for scenario {name!r}")


def control_gathers_table(mesh: Mesh, kind: str, table: jax.Array) -> bool:
    """The control for the all-gather search: a deliberate replication of the table."""
    whole = NamedSharding(mesh, P(None, None))

    def replicate(table):
        if kind == "explicit":
            return jax.sharding.reshard(table, whole) * 2
        return jax.lax.with_sharding_constraint(table, whole) * 2

    return _hlo.all_gathers(_hlo.compiled_text(replicate, table), table.shape)


def spec_of(x: jax.Array) -> str | None:
    """A result's PartitionSpec, as a string of its tuple: "('data', None, None)"."""
    sharding = x.sharding
    return str(tuple(sharding.spec)) if isinstance(sharding, NamedSharding) else None


def main(outdir: str) -> None:
    """Joins the other process, runs every case on every mesh, writes the npz and JSON."""
    jaxembed.multihost.initialize()
    start = time.perf_counter()
    rank = jax.process_index()
    data = scenarios.global_data()
    results: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {
        "process_index": rank,
        "process_count": jax.process_count(),
        "local_device_ids": [d.id for d in jax.local_devices()],
        "device_processes": [[d.id, d.process_index] for d in jax.devices()],
        "meshes": {},
        "batch_rows": {},
        "blocks": {},
        "result_specs": {},
        "hlo": {},
        "control_gathers_table": {},
        "case_seconds": {},
    }
    for mesh_name in scenarios.MESHES:
        for kind in scenarios.KINDS:
            mesh = make_mesh(mesh_name, kind)
            check_owners(mesh_name, mesh)
            where = f"{mesh_name}/{kind}"
            meta["meshes"][where] = {
                "shape": dict(mesh.shape),
                "device_ids": mesh.device_ids.tolist(),
                "owners": owners(mesh),
            }
            placer = Placer(mesh)
            cases = [
                case
                for cases in scenarios.CASES.values()
                for case in cases
                if (case.mesh, case.kind) == (mesh_name, kind)
            ]
            with jax.set_mesh(mesh):
                batch = {key: placer.batch(data[key]) for key in ("ids", "query", "labels", "mask")}
                batch["tokens"] = placer.batch(data["tokens"][0])
                body = placer.params({"body": data["body"]}, {"body": P(None, None)}, "body")
                for layout in scenarios.LAYOUTS:
                    layout_cases = [case for case in cases if case.layout == layout]
                    if not layout_cases:
                        continue
                    adapted = placer.params(
                        scenarios.lora_params(data), scenarios.LAYOUTS[layout], layout
                    )
                    ctx = Context(
                        mesh,
                        placer,
                        {"embeddings": adapted["embeddings"]},
                        adapted,
                        batch,
                        body["body"],
                    )
                    for case in layout_cases:
                        case_start = time.perf_counter()
                        out = run_case(case, ctx, meta["hlo"])
                        for name, x in out.items():
                            meta["result_specs"][case.key + name] = spec_of(x)
                        gathered = multihost_utils.process_allgather(out, tiled=True)
                        results.update({case.key + k: np.asarray(v) for k, v in gathered.items()})
                        meta["case_seconds"][case.key] = time.perf_counter() - case_start
                    if layout == "vocab":
                        meta["control_gathers_table"][where] = control_gathers_table(
                            mesh, kind, adapted["embeddings"]
                        )
            meta["batch_rows"][where] = sorted(map(list, placer.batch_rows))
            meta["blocks"][where] = placer.blocks
    meta["seconds"] = time.perf_counter() - start
    out = pathlib.Path(outdir)
    np.savez(out / f"process_{rank}.npz", **results)
    (out / f"process_{rank}.json").write_text(json.dumps(meta, indent=1))
    print(f"process {rank}: {len(results)} results in {meta['seconds']:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
