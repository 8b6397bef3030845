"""LoRA fine-tuning of a vocab-sharded embedding table, with data-parallel ids, on a device mesh.

The mesh is `(data, model)`: the batch is split over "data", the vocabulary over "model".

* The `(V, D)` table and LoRA's `(V, r)` A are split by rows, `P("model", None)`: each device
  holds `V / model` rows. B (`r x D`) is small and replicated. The ids are `P("data", None)`.
* Only the adapter trains (`jaxembed.lora.split_trainable` / `combine`, `optax.adam`): the
  table gets no gradient and no optimizer state, and is bit-identical afterwards.
* The task is next-token prediction with tied logits: `apply` embeds the tokens, a frozen
  `D x D` projection stands in for the rest of a pretrained model, and `attend` scores the
  result against every row of the same (LoRA-adapted) table. Each training sequence walks
  a fixed random cycle of tokens spread over the whole vocabulary, so every shard takes part.
* Checks at the end: the compiled step never all-gathers the table (a vocab-parallel lookup
  is a local masked gather plus an all-reduce of the *output*), and the explicit shard_map
  lookup `jaxembed.sharding.vocab_parallel_apply` gives what `jaxembed.apply` gives.

On a CPU this simulates 8 devices (XLA's `--xla_force_host_platform_device_count=8`, set
below before JAX starts unless XLA_FLAGS is already set or JAX_PLATFORMS names an
accelerator); on GPUs or TPUs it uses the real ones. The mesh is `(2, n // 2)` for an even
device count n, else `(1, n)`.

Multi-host: the same script runs as one process per host, joined by `jax.distributed`
(`jaxembed.multihost.initialize`), and the mesh spans every host's devices. Nothing is
gathered onto one host: each process builds only the blocks of the params that its own
devices hold (`jax.make_array_from_callback`, as it would read its rows of a checkpoint),
supplies only its rows of each batch (`jax.make_array_from_process_local_data`), and the
checks compare on the devices, reading back replicated scalars. Process 0 prints the run;
every process prints which devices it holds and which rows of the table, A and the ids are
on them. With the default mesh, "data" runs across hosts and "model" within each: every host
holds the whole table in blocks over its own devices and feeds its share of the batch
(`--data-parallel 1` splits the table's rows across the hosts instead).

Run:
    python examples/sharded_finetune.py                      # Explicit mesh axes (default)
    python examples/sharded_finetune.py --axis-types auto    # Auto axes, jit in/out shardings
    python examples/sharded_finetune.py --help

Multi-host runs:
    # One machine, one command: 2 local processes x 4 simulated CPU devices (gloo
    # collectives over localhost); each line of output is prefixed with its process.
    python examples/sharded_finetune.py --local-processes 2
    # A cluster: one process per host, each naming host 0 (which runs the coordinator).
    python examples/sharded_finetune.py --num-processes 4 --process-id I --coordinator host0:1234
    # Cloud TPU, SLURM, Open MPI, Kubernetes: JAX finds the coordinator, count and rank.
    python examples/sharded_finetune.py --distributed
(`--local-processes N` re-runs this script as N processes with `jaxembed.multihost.launch`,
each with 8 // N simulated CPU devices and `--distributed`. The manual flags work on one
machine too: `--num-processes 2 --process-id 0` and `... --process-id 1`, both with
`--coordinator 127.0.0.1:PORT`, in two shells, 8 simulated devices each.)
"""

from __future__ import annotations

import os

# XLA reads this once, when JAX's CPU backend starts: it must precede `import jax`. It only
# affects the CPU ("host") platform, so it is left out where an accelerator is asked for.
if set(os.environ.get("JAX_PLATFORMS", "").lower().split(",")) <= {"", "cpu"}:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import functools
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
import jaxembed.multihost
from jaxembed import _hlo  # reads collectives from compiled HLO (private tooling, not API)

AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
PARAM_SPECS = {
    "embeddings": P("model", None),  # vocab-parallel: rows split over "model"
    "lora_embeddings_a": P("model", None),  # A's rows follow the table's
    "lora_embeddings_b": P(None, None),  # (rank, D): small, replicated
}
IDS_SPEC = P("data", None)  # data-parallel: sequences split over "data"
SIMULATED_DEVICES = 8  # in all, over the processes of --local-processes
LAUNCH_TIMEOUT = 3600.0  # seconds for a --local-processes run, all processes together
Params = dict[str, Any]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; the defaults run in a few seconds on two CPU cores."""
    parser = argparse.ArgumentParser(
        description=(
            "LoRA fine-tuning of a vocab-sharded jaxembed table with data-parallel ids on a "
            "(data, model) device mesh; 8 simulated devices on a CPU, in one process or "
            "several (multi-host)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # No abbreviations: --local-processes passes the rest of the command line on verbatim.
        allow_abbrev=False,
    )
    add = parser.add_argument
    add(
        "--axis-types",
        choices=sorted(AXIS_TYPES),
        default="explicit",
        help="mesh axis types: Explicit (shardings in the types) or Auto (jit shardings)",
    )
    add(
        "--data-parallel",
        type=int,
        default=None,
        help="size of the mesh's 'data' axis; None: 2 for an even device count, else 1",
    )
    add(
        "--vocab-size",
        type=int,
        default=4096,
        help="V, rows of the table; divisible by the 'model' axis size",
    )
    add("--dim", type=int, default=64, help="D, embedding dimension")
    add("--rank", type=int, default=8, help="LoRA rank r")
    add("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator")
    add("--cycle-length", type=int, default=64, help="tokens in the synthetic sequence pattern")
    add("--steps", type=int, default=40, help="fine-tuning steps")
    add(
        "--batch-size",
        type=int,
        default=16,
        help="sequences per step; divisible by the 'data' axis size",
    )
    add("--seq-len", type=int, default=32, help="tokens predicted per sequence")
    add("--learning-rate", type=float, default=3e-2, help="Adam's learning rate")
    add("--seed", type=int, default=0, help="for the data and the params")
    add("--json", type=pathlib.Path, metavar="PATH", help="also write the results here")
    hosts = parser.add_argument_group(
        "multi-host",
        "one process per host, joined by jax.distributed; or --local-processes on one machine",
    )
    hosts.add_argument(
        "--local-processes",
        type=int,
        choices=[1, 2, 4, 8],
        help=f"run as this many local processes of {SIMULATED_DEVICES} simulated CPU devices "
        "in all (this script again, with --distributed, by jaxembed.multihost.launch)",
    )
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host run: jax.distributed finds the rest on Cloud TPU, SLURM, "
        "Open MPI, Kubernetes (implied by the three flags below)",
    )
    hosts.add_argument("--num-processes", type=int, help="how many processes (hosts) take part")
    hosts.add_argument("--process-id", type=int, help="this process's rank, 0 on the coordinator")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    args = parser.parse_args(argv)
    for name in ("vocab_size", "dim", "rank", "cycle_length", "steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 2 <= args.cycle_length <= args.vocab_size:
        parser.error("--cycle-length must be between 2 and --vocab-size")
    if args.num_processes is not None and args.num_processes < 1:
        parser.error("--num-processes must be positive")
    if args.process_id is not None and args.process_id < 0:
        parser.error("--process-id must be non-negative")
    manual = (args.num_processes, args.process_id, args.coordinator)
    args.distributed = args.distributed or any(value is not None for value in manual)
    if args.local_processes and args.distributed:
        parser.error(
            "--local-processes starts the processes itself: leave out --distributed, "
            "--num-processes, --process-id and --coordinator"
        )
    return args


def make_mesh(data: int | None, axis_types: str) -> jax.sharding.Mesh:
    """A `(data, model)` mesh over every device: `(2, n // 2)` for even n, else `(1, n)`."""
    n = jax.device_count()
    if data is None:
        data = 2 if n % 2 == 0 else 1
    if data < 1 or n % data:
        raise SystemExit(f"--data-parallel {data} does not divide the {n} devices")
    return jax.make_mesh(
        (data, n // data), ("data", "model"), axis_types=(AXIS_TYPES[axis_types],) * 2
    )


def run_local_processes(argv: Sequence[str] | None, count: int) -> dict[str, Any]:
    """`--local-processes N`: this script again as N local processes of one multi-host
    program (`jaxembed.multihost.launch`), with the same arguments less `--local-processes`
    and plus `--distributed`, and 8 // N simulated CPU devices each; their output comes
    through line by line, prefixed with `[process i]`. JAX's backend never starts here."""
    rest, skip = [], False
    for arg in sys.argv[1:] if argv is None else argv:
        if not skip and arg != "--local-processes" and not arg.startswith("--local-processes="):
            rest.append(arg)
        skip = arg == "--local-processes"  # its value comes next
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), *rest, "--distributed"]
    try:
        jaxembed.multihost.launch(
            command,
            count,
            devices_per_process=SIMULATED_DEVICES // count,
            timeout=LAUNCH_TIMEOUT,
            echo=sys.stdout,
        )
    except jaxembed.multihost.LaunchError as error:
        raise SystemExit(str(error)) from None
    return {"process_count": count}


def log(*args: Any) -> None:
    """`print`, from process 0 only: every process computes the same, one of them tells it."""
    if jax.process_index() == 0:
        print(*args)


def place(tree: Any, specs: Any, mesh: jax.sharding.Mesh) -> Any:
    """Each host (NumPy) array as a global array with `NamedSharding(mesh, spec)`, by
    `jax.make_array_from_callback`: JAX asks each process for the blocks its own devices
    hold, and for nothing else. With a checkpoint, `np.load(path, mmap_mode="r")` in place
    of the host array would read just those rows from disk."""

    def global_array(host: np.ndarray, spec: P) -> jax.Array:
        return jax.make_array_from_callback(
            host.shape, NamedSharding(mesh, spec), lambda index: host[index]
        )

    return jax.tree.map(global_array, tree, specs)


def load_ids(batch: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global ids array of `batch`, from this process's rows of it only (a data loader
    would read just those): `local_rows` reads them off the sharding's
    `addressable_devices_indices_map`, whatever the order of the mesh's devices."""
    rows = jaxembed.multihost.local_rows(sharding, batch.shape)
    return jax.make_array_from_process_local_data(sharding, batch[rows], batch.shape)


def init_optimizer(tx: optax.GradientTransformation, trainable: Params, mesh: Any) -> Any:
    """`tx.init` inside `jax.jit`, its outputs placed: mu and nu take each adapter matrix's
    sharding, the step count is replicated over the mesh. (An eager `tx.init` would make
    the count an array on one device of this process, which no global step can take.)"""
    state = jax.eval_shape(tx.init, trainable)
    placed = optax.tree_utils.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        state,
        shardings(trainable),
        transform_non_params=lambda _: NamedSharding(mesh, P()),
    )
    return jax.jit(tx.init, out_shardings=placed)(trainable)


def on_every_device(fn: Any, mesh: jax.sharding.Mesh) -> Any:
    """`fn` jitted with its (scalar) results replicated over the mesh: every process can
    then read them with `float`/`bool`, where `np.asarray` of a global array whose blocks
    live in several processes fails."""
    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def shardings(tree: Any) -> Any:
    """Each array's sharding, in the same pytree (None leaves, the other half of a split,
    stay None): the `in_shardings`/`out_shardings` jax.jit takes on an Auto mesh."""
    return jax.tree.map(lambda x: x.sharding, tree)


def shard_shape(x: jax.Array) -> tuple[int, ...]:
    """The shape of the block each device holds."""
    return tuple(x.addressable_shards[0].data.shape)


def print_process_placements(arrays: dict[str, jax.Array]) -> None:
    """Each process in turn (a barrier between) prints its devices and the rows of each
    array that they hold, from its `addressable_shards`: what is really in its memory."""
    devices = sorted(jax.local_devices(), key=lambda d: d.id)
    lines = [
        f"\nProcess {jax.process_index()} of {jax.process_count()}: devices "
        f"{[d.id for d in devices]} of the {jax.device_count()}; the rows of each array on them:"
    ]
    for name, x in arrays.items():
        rows = {s.device: s.index[0].indices(x.shape[0])[:2] for s in x.addressable_shards}
        held = ", ".join(f"{rows[d][0]}:{rows[d][1]}" for d in devices)
        lines.append(f"  {name:19s} {x.shape!s:12s} {held}")
    ids = arrays["ids"]
    rows = jaxembed.multihost.local_rows(ids.sharding, ids.shape)
    lines.append(f"  it supplied rows {rows.start}:{rows.stop} of each batch of ids")
    for process in range(jax.process_count()):
        if process == jax.process_index():
            print("\n".join(lines), flush=True)
        multihost_utils.sync_global_devices(f"placements of process {process}")


def placements_by_process(arrays: dict[str, jax.Array]) -> list[dict[str, Any]]:
    """For every process, as the shardings say (any process can tell): its devices, the
    `[start, stop)` rows of each array on each of them, and the ids rows it supplies."""
    found = []
    for process in range(jax.process_count()):
        rows = {}
        for name, x in arrays.items():
            index_map = x.sharding.devices_indices_map(x.shape)
            mine = sorted((d for d in index_map if d.process_index == process), key=lambda d: d.id)
            rows[name] = [list(index_map[d][0].indices(x.shape[0])[:2]) for d in mine]
        devices = sorted(d.id for d in jax.devices() if d.process_index == process)
        supplied = sorted({tuple(block) for block in rows["ids"]})
        found.append(
            {
                "process": process,
                "devices": devices,
                "rows": rows,
                "ids_rows_supplied": [list(block) for block in supplied],
            }
        )
    return found


def collectives(compiled_text: str) -> list[tuple[str, str]]:
    """(op, result shape) for every collective of a compiled program, a pair per result."""
    return [(c.op, shape) for c in _hlo.collectives(compiled_text) for shape in c.shapes]


def listing(found: list[tuple[str, str]]) -> str:
    """The distinct (op, shape) pairs as one line: "all-reduce f32[8,64], ..."."""
    return ", ".join(f"{op} {shape}" for op, shape in sorted(set(found))) or "none"


def cycle_batches(
    rng: np.random.Generator, cycle: np.ndarray, steps: int, batch: int, length: int
) -> np.ndarray:
    """`(steps, batch, length)` windows of the cyclic sequence, each from a random offset."""
    starts = rng.integers(0, len(cycle), (steps, batch, 1))
    return cycle[(starts + np.arange(length)) % len(cycle)]


def make_model(vocab: int, alpha: float) -> tuple[Any, Any]:
    """(forward, loss): the tied-embedding next-token model and its cross-entropy."""

    def forward(params: Params, body: jax.Array, inputs: jax.Array) -> tuple[jax.Array, ...]:
        """(hidden, logits): the lookup, then the frozen projection and tied logits."""
        # On an Explicit mesh: the batch over "data" from the ids, features whole.
        hidden = jaxembed.apply(params, inputs, out_of_range="clip", lora_alpha=alpha)
        # The vocabulary over "model", from the table's rows: no device holds all the logits.
        return hidden, jaxembed.attend(params, hidden @ body, lora_alpha=alpha)

    def loss(trainable: Params, frozen: Params, body: jax.Array, tokens: jax.Array) -> jax.Array:
        params = jaxembed.lora.combine(trainable, frozen)
        _, logits = forward(params, body, tokens[:, :-1])
        # One-hot labels rather than optax's integer-label version: its take_along_axis
        # gathers across the vocab-sharded axis, which an Explicit mesh refuses.
        labels = jax.nn.one_hot(tokens[:, 1:], vocab, dtype=logits.dtype)
        return optax.softmax_cross_entropy(logits, labels).mean()

    return forward, loss


def print_row(name: str, shape: tuple[int, ...], spec: Any, block: Any) -> None:
    log(f"  {name:27s} {shape!s:15s} {spec!s:25s} per device {block}")


def check_step_collectives(
    compiled_text: str, replicate: Any, table: jax.Array, rank: int, model: int
) -> dict[str, Any]:
    """Looks for an all-gather of the whole table (or of the whole A) in the compiled step,
    and checks, as a control, that the same search finds one made on purpose."""
    vocab, dim = table.shape
    found = collectives(compiled_text)
    full_table, full_a = f"f32[{vocab},{dim}]", f"f32[{vocab},{rank}]"  # as HLO spells them
    table_gathered = _hlo.all_gathers(compiled_text, (vocab, dim))
    a_gathered = _hlo.all_gathers(compiled_text, (vocab, rank))
    log(f"Collectives in the compiled step: {listing(found)}")
    log(
        f"  all-gather of the whole table {full_table}: {table_gathered}; "
        f"of the whole A {full_a}: {a_gathered}"
    )
    control = _hlo.compiled_text(replicate, table)
    # With a single "model" device the table is whole already: nothing to gather.
    control_detected = _hlo.all_gathers(control, (vocab, dim)) if model > 1 else None
    log(
        f"  control, a deliberate reshard to replicated, found by the same search: "
        f"{control_detected}"
    )
    return {
        "collectives": [list(item) for item in found],
        "all_gathered_shapes": _hlo.all_gathered_shapes(compiled_text),
        "full_table_shape": full_table,
        "table_all_gathered": table_gathered,
        "lora_a_all_gathered": a_gathered,
        "control_gather_detected": control_detected,
    }


def check_vocab_parallel(
    params: Params, tokens: jax.Array, mesh: jax.sharding.Mesh, alpha: float
) -> dict[str, Any]:
    """`jaxembed.sharding.vocab_parallel_apply` (an explicit shard_map) against `apply`."""
    vocab_parallel = jax.jit(
        functools.partial(
            jaxembed.sharding.vocab_parallel_apply,
            mesh=mesh,
            vocab_axis="model",
            batch_axes="data",
            out_of_range="clip",
            lora_alpha=alpha,
        )
    )
    reference = jax.jit(functools.partial(jaxembed.apply, out_of_range="clip", lora_alpha=alpha))
    out = vocab_parallel(params, tokens)
    expected = reference(params, tokens)
    # Compared on the devices, where the blocks are; only two replicated scalars come back.
    compare = on_every_device(
        lambda a, b: (jnp.abs(a - b).max(), jnp.allclose(a, b, rtol=1e-6, atol=1e-6)), mesh
    )
    diff, close = compare(out, expected)
    diff, equal = float(diff), bool(close)
    found = collectives(_hlo.compiled_text(vocab_parallel, params, tokens))
    log(
        f"\nvocab_parallel_apply vs apply on the last batch: max |diff| {diff:.2e}, "
        f"equal: {equal}; output {out.shape} {out.sharding.spec}"
    )
    log(
        f"  its collectives: {listing(found)} (table rows and A's rank-r rows, summed over 'model')"
    )
    return {
        "vocab_parallel_max_abs_diff": diff,
        "vocab_parallel_equal": equal,
        "vocab_parallel_collectives": [list(item) for item in found],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tunes, prints each step's loss and the checks, and returns what the test checks."""
    args = parse_args(argv)
    if args.local_processes:
        return run_local_processes(argv, args.local_processes)
    if args.distributed:  # first: before anything asks JAX for devices
        jaxembed.multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    start_time = time.perf_counter()
    vocab, dim, rank, alpha = args.vocab_size, args.dim, args.rank, args.lora_alpha
    explicit = args.axis_types == "explicit"
    processes = jax.process_count()

    mesh = make_mesh(args.data_parallel, args.axis_types)
    data, model = mesh.shape["data"], mesh.shape["model"]
    if vocab % model:
        raise SystemExit(
            f"--vocab-size {vocab} must be divisible by the 'model' axis size {model}: "
            f"pad the vocabulary to {-(-vocab // model) * model}"
        )
    if args.batch_size % data:
        raise SystemExit(
            f"--batch-size {args.batch_size} must be divisible by the 'data' axis size {data}"
        )
    in_processes = f" in {processes} processes" if processes > 1 else ""
    log(f"{jax.device_count()} {jax.devices()[0].platform} devices{in_processes}; {mesh}")
    log(f"device ids by (data, model):\n{mesh.device_ids}")

    # Data: windows of a fixed random cycle through tokens spread over the whole vocabulary.
    # Every process draws the same global batches; each feeds only its rows (`load_ids`).
    rng = np.random.default_rng(args.seed)
    cycle = rng.choice(vocab, size=args.cycle_length, replace=False)
    batches = cycle_batches(rng, cycle, args.steps, args.batch_size, args.seq_len + 1)

    # Params: a "pretrained" table (random here, at Keras's RandomNormal(0.05) scale; a
    # checkpoint's matrix in practice) with LoRA on top. B starts at zero, so the adapted
    # table starts out equal to the base one, and the loss at ln(V), a uniform guess.
    pretrained = rng.normal(0.0, 0.05, (vocab, dim)).astype(np.float32)
    params = jaxembed.enable_lora(
        jaxembed.init(None, vocab, dim, weights=pretrained), jax.random.key(args.seed), rank
    )
    checkpoint = jax.tree.map(np.asarray, params)  # host arrays, as a checkpoint's would be
    # A frozen D x D projection between the lookup and the tied output layer: with the same
    # table on both sides and nothing between, the logits would be a symmetric Gram matrix,
    # which cannot make every token's successor outscore the token itself.
    body = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    forward, loss_fn = make_model(vocab, alpha)
    tx = optax.adam(args.learning_rate)

    with jax.set_mesh(mesh):
        # Each process builds only the blocks its own devices hold, of the params and ids.
        params = place(checkpoint, PARAM_SPECS, mesh)
        body = place(body, P(None, None), mesh)
        ids_sharding = NamedSharding(mesh, IDS_SPEC)
        tokens = load_ids(batches[0], ids_sharding)
        trainable, frozen = jaxembed.lora.split_trainable(params)  # A and B | the table
        opt_state = init_optimizer(tx, trainable, mesh)  # mu, nu sharded as A and B
        if processes > 1:
            print_process_placements({**params, "ids": tokens})

        def step(
            trainable: Params, opt_state: Any, frozen: Params, body: jax.Array, tokens: jax.Array
        ) -> tuple[Params, Any, jax.Array]:
            # Gradients for the first argument only: the frozen table gets none.
            loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, body, tokens)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss

        first_args = (trainable, opt_state, frozen, body, tokens)
        if explicit:
            # The shardings are in the arrays' types and jaxembed derives its outputs' from
            # them: jit needs nothing more.
            step_fn = jax.jit(step)
        else:
            # Auto axes: pin the layout, so that every step returns the shardings it takes
            # (the partitioner would otherwise choose the outputs').
            step_fn = jax.jit(
                step,
                in_shardings=shardings(first_args),
                out_shardings=(
                    shardings(trainable),
                    shardings(opt_state),
                    NamedSharding(mesh, P()),
                ),
            )

        log(
            f"\nFine-tuning LoRA (rank {rank}, alpha {alpha:g}) on a ({vocab}, {dim}) table, "
            f"{args.axis_types} axes, batches of {args.batch_size} x {args.seq_len} tokens"
        )
        losses = []
        for i, batch in enumerate(batches):
            tokens = load_ids(batch, ids_sharding)
            trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, body, tokens)
            losses.append(float(loss))  # the global loss: replicated, the same in every process
            log(f"  step {i + 1:3d}  loss {losses[-1]:.4f}")
        tuned = jaxembed.lora.combine(trainable, frozen)

        log("\nShardings (spec, and the block each device holds):")
        adam_mu = optax.tree_utils.tree_get(opt_state, "mu")
        arrays = {
            **tuned,
            "ids": tokens,
            "adam mu[lora_embeddings_a]": adam_mu["lora_embeddings_a"],
        }
        placements = {}
        for name, x in arrays.items():
            spec, block = x.sharding.spec, shard_shape(x)
            print_row(name, x.shape, spec, block)
            placements[name] = {"shape": list(x.shape), "spec": str(spec), "block": list(block)}
        activations = jax.eval_shape(forward, tuned, body, tokens[:, :-1])
        for name, x in zip(("hidden (apply)", "logits (attend)"), activations, strict=True):
            if explicit:  # the sharding is part of the type, known before anything runs
                print_row(name, x.shape, x.sharding.spec, x.sharding.shard_shape(x.shape))
            else:
                log(f"  {name:27s} {x.shape!s:15s} chosen by the partitioner (Auto axes)")

        same = on_every_device(jnp.array_equal, mesh)  # compared where the blocks are
        table_unchanged = bool(same(tuned["embeddings"], params["embeddings"]))
        loss_decreased = losses[-1] < losses[0]
        log(f"\nBase table bit-identical after fine-tuning: {table_unchanged}")
        log(f"Loss went down: {losses[0]:.4f} -> {losses[-1]:.4f}: {loss_decreased}")

        def replicate(table: jax.Array) -> jax.Array:
            """The control: gathers the whole table on every device, on purpose."""
            if explicit:
                return jax.sharding.reshard(table, P(None, None)) * 2
            return jax.lax.with_sharding_constraint(table, P(None, None)) * 2

        gather_results = check_step_collectives(
            _hlo.compiled_text(step_fn, *first_args), replicate, tuned["embeddings"], rank, model
        )
        parallel_results = check_vocab_parallel(tuned, tokens, mesh, alpha)

    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)  # Adam's count aside
    seconds = time.perf_counter() - start_time
    log(
        f"\nTrained {n_trainable:,} adapter floats of {n_trainable + vocab * dim:,}; "
        f"Adam state {n_state:,} floats (none for the table). {seconds:.1f} s."
    )
    if processes > 1:  # every process: the same global loss, the same compiled step
        print(
            f"Process {jax.process_index()}: global loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
            f"whole table all-gathered: {gather_results['table_all_gathered']}"
        )
    results = {
        "process_count": processes,
        "device_count": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "mesh": {"shape": dict(mesh.shape), "axis_types": args.axis_types},
        "placements": placements,
        "process_placements": placements_by_process({**tuned, "ids": tokens}),
        "losses": losses,
        "loss_decreased": loss_decreased,
        "table_unchanged": table_unchanged,
        **gather_results,
        **parallel_results,
        "trainable_params": int(n_trainable),
        "optimizer_state_floats": int(n_state),
        "seconds": seconds,
    }
    if args.json is not None and jax.process_index() == 0:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
