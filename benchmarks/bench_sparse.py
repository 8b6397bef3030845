"""Benchmark: jaxembed.sparse's row-wise train step against the dense optax step.

Times, in one run on the default JAX device, one full-table training step of a `(V, --dim)`
float32 table on `--num-ids` int32 ids (uniform in [0, V), duplicates included; each step takes
the next of `--id-batches` batches in turn, so its rows are not the previous step's, still in
cache), at every V of `--vocab-sizes`, for four optimizer pairs (sparse vs its dense peer):

    sgd              vs optax.sgd      (the same numbers)
    adagrad          vs optax.adagrad  (the same numbers)
    rowwise_adagrad  vs optax.adagrad  (its closest dense peer; one accumulator per row)
    lazy_adam        vs optax.adam     (LazyAdam: untouched rows and moments left alone)

Both steps look the rows up with `jaxembed.apply(params, ids, out_of_range="clip")` and use the
loss `mean over ids of ||row - target||**2` against a random target (one per batch). The sparse
step takes `jaxembed.sparse.value_and_row_grads` (the gradient w.r.t. the looked-up rows only)
and the optimizer's `update(table, state, ids, row_grads, out_of_range="clip")`; the dense step
takes `jax.value_and_grad` w.r.t. the whole table (a `(V, dim)` scatter-add into zeros), then
`tx.update` + `optax.apply_updates`. Both are `jax.jit(step, donate_argnums=(0, 1))`: the table
and the optimizer state are donated and fed back every step, so neither side copies the table
per step (the compiled `alias` bytes show it).

Timing, with `common.time_round_robin` (one step + `block_until_ready` per sample; medians):

1. dense, per optimizer and V: the dense step alone, `--repeats` consecutive steps
   (`--large-repeats` at the largest V, where a dense step touches several GiB): the steady
   state of a dense training loop. The dense step at the largest V is skipped with
   `--skip-dense-largest`, or by itself when its compiled footprint (arguments + temp +
   outputs - aliased) exceeds 90% of the memory available.
2. sparse, per optimizer: the sparse steps of every V round-robin against each other
   (`--scaling-repeats` rounds): its ms/step per V, and the scaling ratio largest V /
   smallest V (ratio of medians; the paired ratio beside it).

dense/sparse per V is the ratio of the two medians. The sparse and dense steps are not
interleaved: XLA:CPU hands a dense step's GiB-sized temp buffer back to the OS after the call
has returned, and a sparse step timed right after it waits for that (measured: adagrad's
sparse step at V=1048576 took 65-72 ms right after a dense step, 7-11 ms after a 0.3 s pause,
10 ms alone), which would charge the dense step's cost to the sparse one.
`--interleave` also times them round-robin per V, as a diagnostic. Each section starts after
a `SETTLE_S` pause.

What grows with V in the sparse step is the memory system, not the program (no instruction
of its compiled HLO but the in-place scatters into the donated table and state has a V-sized
result): its rows are scattered over GiBs of 4 KiB pages, a TLB miss and page walk each.
`--malloc-hugetlb` (a diagnostic) reruns the script with glibc asked for transparent huge
pages; it speeds up both sides (the dense one more: far fewer page faults).

Also reported: compiled temp/argument/output/alias bytes (`memory_analysis()`) of every step,
and the optimizer state bytes of both sides (all leaves of the state pytree).

Before timing, at the smallest V, one step of each side is run from the same table: the
sparse step must change exactly the rows of the unique ids, and sgd/adagrad must match
optax within `--tolerance`; lazy_adam's first step must match `optax.adam` with its epsilon
moved under the bias correction (`eps / sqrt(1 - b2)`; TensorFlow's placement), within 1e-4;
the differences from the dense peer itself (lazy_adam, rowwise_adagrad) are reported only.

Memory per optimizer at V=1048576, D=256 float32: the table is 1 GiB, adagrad's state 1 GiB,
Adam's 2 GiB; the dense step adds a 1 GiB gradient (and more temp). One optimizer is set up
at a time, and the dense step of one V at a time (about 9 GiB at peak with Adam).

Targets: the sparse step at the largest V <= 1.5x the sparse step at the smallest V (per
optimizer); dense / sparse >= 20x at V=262144 (`--speedup-vocab`; per optimizer);
rowwise_adagrad's state = V float32 + the int32 count.

Usage:
    python benchmarks/bench_sparse.py                  # defaults: 1-3 minutes on 2 cores
    python benchmarks/bench_sparse.py --quick          # smoke run: small sizes, few repeats
    python benchmarks/bench_sparse.py --vocab-sizes 32768,262144 --optimizers sgd,lazy_adam
    python benchmarks/bench_sparse.py --json sparse.json
    python benchmarks/bench_sparse.py --interleave --malloc-hugetlb  # the two diagnostics
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed

SCALING_TARGET = 1.5  # sparse step at the largest V <= this x the sparse step at the smallest
SPEEDUP_TARGET = 20.0  # dense / sparse step time >= this at --speedup-vocab
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "lazy_adam")
# The dense optax peer of each sparse optimizer, as text for the report.
DENSE_PEER = {
    "sgd": "optax.sgd",
    "adagrad": "optax.adagrad",
    "rowwise_adagrad": "optax.adagrad",
    "lazy_adam": "optax.adam",
}
# Defaults of the full run and of --quick, for the flags that --quick changes.
DEFAULTS = {
    "vocab_sizes": "32768,262144,1048576",
    "dim": 256,
    "num_ids": 4096,
    "repeats": 15,
    "large_repeats": 5,
    "scaling_repeats": 40,
    "speedup_vocab": 262144,
}
QUICK = {
    "vocab_sizes": "2048,16384",
    "dim": 64,
    "num_ids": 256,
    "repeats": 3,
    "large_repeats": 2,
    "scaling_repeats": 3,
    "speedup_vocab": 16384,
}
# The command-line values the JSON's metadata records, in this order.
RECORDED_ARGS = (
    "vocab_sizes",
    "dim",
    "num_ids",
    "id_batches",
    "optimizers",
    "learning_rate",
    "repeats",
    "large_repeats",
    "scaling_repeats",
    "speedup_vocab",
    "skip_dense_largest",
    "interleave",
    "malloc_hugetlb",
    "quick",
)
MEMORY_FIELDS = ("temp", "argument", "output", "alias")
SETTLE_S = 0.5  # seconds of pause before each timed section (see `settle`)
LAZY_ADAM_EPS, LAZY_ADAM_B2 = 1e-8, 0.999  # jaxembed.sparse.lazy_adam's defaults


def sparse_optimizer(name: str, learning_rate: float) -> jaxembed.sparse.RowwiseOptimizer:
    return getattr(jaxembed.sparse, name)(learning_rate)


def dense_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name in ("adagrad", "rowwise_adagrad"):
        return optax.adagrad(learning_rate)
    return optax.adam(learning_rate)


def loss_fn(rows: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over ids of the squared distance between a row and its target."""
    return jnp.mean(jnp.sum(jnp.square(rows - target), axis=-1))


def make_sparse_step(opt: jaxembed.sparse.RowwiseOptimizer) -> Callable[..., Any]:
    def step(table, state, ids, target):
        loss, row_grads = jaxembed.sparse.value_and_row_grads(
            loss_fn, {"embeddings": table}, ids, target, out_of_range="clip"
        )
        table, state = opt.update(table, state, ids, row_grads, out_of_range="clip")
        return table, state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_dense_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(table, state, ids, target):
        def table_loss(table):
            rows = jaxembed.apply({"embeddings": table}, ids, out_of_range="clip")
            return loss_fn(rows, target)

        loss, grad = jax.value_and_grad(table_loss)(table)
        updates, state = tx.update(grad, state, table)
        return optax.apply_updates(table, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of a pytree (abstract ShapeDtypeStructs included)."""
    return sum(
        int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
    )


@dataclass
class Step:
    """A jitted train step whose table and state are donated and fed back on every call."""

    name: str
    fn: Callable[..., Any]
    table: jax.Array
    state: Any
    batches: list[tuple[jax.Array, jax.Array]]
    compiled: Any = field(default=None, repr=False)
    calls: int = 0

    def __call__(self) -> Any:
        ids, target = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        self.table, self.state, loss = self.fn(self.table, self.state, ids, target)
        return self.table, self.state, loss


@dataclass
class Problem:
    """The table's initial values and the (ids, target) batches of one vocabulary size."""

    vocab: int
    table: jax.Array
    batches: list[tuple[jax.Array, jax.Array]]

    @property
    def ids(self) -> jax.Array:
        return self.batches[0][0]

    @property
    def target(self) -> jax.Array:
        return self.batches[0][1]


def make_problem(key: jax.Array, vocab: int, dim: int, num_ids: int, num_batches: int) -> Problem:
    table_key, *batch_keys = jax.random.split(key, 1 + num_batches)
    table = jaxembed.init(table_key, vocab, dim)["embeddings"]
    batches = []
    for batch_key in batch_keys:
        ids_key, target_key = jax.random.split(batch_key)
        ids = jax.random.randint(ids_key, (num_ids,), 0, vocab, dtype=jnp.int32)
        batches.append((ids, jax.random.normal(target_key, (num_ids, dim), jnp.float32)))
    return Problem(vocab, table, batches)


def compile_step(fn: Callable[..., Any], problem: Problem, state_shape: Any) -> Any:
    """AOT-compiles a step on abstract arguments (nothing allocated), for memory_analysis."""
    table = jax.ShapeDtypeStruct(problem.table.shape, problem.table.dtype)
    return fn.lower(table, state_shape, problem.ids, problem.target).compile()


def memory(compiled: Any) -> dict[str, int]:
    return common.memory_bytes(compiled, MEMORY_FIELDS)


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def warm(step: Step) -> float:
    """Calls the step twice (the jit cache compiles on the first call); seconds."""
    start = time.perf_counter()
    for _ in range(2):
        jax.block_until_ready(step())
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- setup


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
        + " unless given",
    )
    # The flags --quick changes default to SUPPRESS (absent unless given); filled in below.
    quick = {"default": argparse.SUPPRESS}
    parser.add_argument(
        "--vocab-sizes",
        help=f"comma-separated table rows (default {DEFAULTS['vocab_sizes']})",
        **quick,
    )
    parser.add_argument(
        "--dim", type=int, help=f"table columns (default {DEFAULTS['dim']})", **quick
    )
    parser.add_argument(
        "--num-ids", type=int, help=f"ids per step (default {DEFAULTS['num_ids']})", **quick
    )
    parser.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help="comma-separated sparse optimizers"
    )
    parser.add_argument(
        "--id-batches",
        type=int,
        default=8,
        help="distinct (ids, target) batches, used in turn by every step, so that the rows a "
        "step touches are not the ones of the step before (still in cache); 1 repeats one batch",
    )
    parser.add_argument("--learning-rate", type=float, default=0.01, help="for every optimizer")
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"dense steps timed per V below the largest (default {DEFAULTS['repeats']})",
        **quick,
    )
    parser.add_argument(
        "--large-repeats",
        type=int,
        help=f"dense steps timed at the largest V (default {DEFAULTS['large_repeats']})",
        **quick,
    )
    parser.add_argument(
        "--scaling-repeats",
        type=int,
        help=f"rounds of the sparse steps of every V, round-robin "
        f"(default {DEFAULTS['scaling_repeats']})",
        **quick,
    )
    parser.add_argument(
        "--speedup-vocab",
        type=int,
        help=f"V of the dense/sparse target (default {DEFAULTS['speedup_vocab']})",
        **quick,
    )
    parser.add_argument(
        "--skip-dense-largest",
        action="store_true",
        help="do not build or time the dense step at the largest V",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="diagnostic: also time the sparse step of each V round-robin with its dense step "
        "(the sparse step then pays for the dense step's deferred frees; see the docstring)",
    )
    parser.add_argument(
        "--malloc-hugetlb",
        action="store_true",
        help="diagnostic (glibc >= 2.35): rerun under GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so "
        "that large buffers get transparent huge pages where the kernel only grants them on "
        "madvise (fewer TLB misses for random rows; far fewer page faults for dense buffers)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-5, help="agreement rtol/atol (sgd, adagrad)"
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    for name, default in DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, QUICK[name] if args.quick else default)
    try:
        args.vocab_sizes = sorted({int(v) for v in str(args.vocab_sizes).split(",")})
    except ValueError:
        parser.error("--vocab-sizes must be comma-separated integers")
    args.optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = sorted(set(args.optimizers) - set(OPTIMIZERS))
    if unknown or not args.optimizers:
        parser.error(f"--optimizers: unknown {unknown}; choose from {', '.join(OPTIMIZERS)}")
    if min(*args.vocab_sizes, args.dim, args.num_ids, args.id_batches) < 1:
        parser.error("--vocab-sizes, --dim, --num-ids and --id-batches must be positive")
    if min(args.repeats, args.large_repeats, args.scaling_repeats) < 2:
        parser.error("--repeats, --large-repeats and --scaling-repeats must be at least 2")
    return args


def check_agreement(
    name: str, problem: Problem, sparse_fn: Callable, dense_fn: Callable, args: argparse.Namespace
) -> dict[str, Any]:
    """One step of each side from the same table (copies: the steps donate their inputs)."""
    sparse_opt = sparse_optimizer(name, args.learning_rate)
    tx = dense_optimizer(name, args.learning_rate)
    start = np.asarray(problem.table)
    sparse_table, _, sparse_loss = sparse_fn(
        jnp.array(start), sparse_opt.init(jnp.array(start)), problem.ids, problem.target
    )
    dense_table, _, dense_loss = dense_fn(
        jnp.array(start), tx.init(jnp.array(start)), problem.ids, problem.target
    )
    sparse_table, dense_table = np.asarray(sparse_table), np.asarray(dense_table)
    changed = np.flatnonzero(np.any(sparse_table != start, axis=1))
    touched = np.unique(np.asarray(problem.ids))
    assert np.array_equal(changed, touched), f"{name}: the sparse step moved other rows"
    np.testing.assert_allclose(sparse_loss, dense_loss, rtol=args.tolerance)
    sparse_delta, dense_delta = sparse_table - start, dense_table - start
    rel = float(
        np.abs(sparse_delta - dense_delta).max() / max(float(np.abs(dense_delta).max()), 1e-30)
    )
    if name in ("sgd", "adagrad"):
        np.testing.assert_allclose(
            sparse_table, dense_table, rtol=args.tolerance, atol=args.tolerance, err_msg=name
        )
    elif name == "lazy_adam":
        # LazyAdam's first step is Adam's with TensorFlow's epsilon placement: optax.adam
        # with eps / sqrt(1 - b2) gives the same numbers.
        tx = optax.adam(args.learning_rate, eps=LAZY_ADAM_EPS / np.sqrt(1 - LAZY_ADAM_B2))
        reference, _, _ = make_dense_step(tx)(
            jnp.array(start), tx.init(jnp.array(start)), problem.ids, problem.target
        )
        np.testing.assert_allclose(sparse_table, reference, rtol=1e-4, atol=1e-6, err_msg=name)
    checked = {
        "sgd": f"equal to optax within {args.tolerance:g}",
        "adagrad": f"equal to optax within {args.tolerance:g}",
        "lazy_adam": "equal to optax.adam(eps=eps/sqrt(1-b2)) within 1e-4",
        "rowwise_adagrad": "a different optimizer: difference reported only",
    }[name]
    return {
        "checked": checked,
        "rows_touched": len(touched),
        "max_abs_diff_table": float(np.abs(sparse_table - dense_table).max()),
        "max_rel_diff_update": rel,
        "loss": float(sparse_loss),
    }


@dataclass
class OptimizerBench:
    """One optimizer's sparse steps (every V) and what was measured of it."""

    name: str
    sparse: dict[int, Step]
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    faults: dict[str, dict[str, list[int]]] = field(default_factory=dict)


def set_up_sparse(
    name: str, problems: dict[int, Problem], args: argparse.Namespace
) -> OptimizerBench:
    """Compiles and warms the sparse step of `name` at every V."""
    opt = sparse_optimizer(name, args.learning_rate)
    fn = make_sparse_step(opt)
    bench = OptimizerBench(name, {})
    for vocab, problem in problems.items():
        key = f"sparse V={vocab}"
        start = time.perf_counter()
        state_shape = jax.eval_shape(opt.init, problem.table)
        compiled = compile_step(fn, problem, state_shape)
        table, state = jnp.array(problem.table), opt.init(problem.table)
        step = Step(key, fn, table, state, problem.batches, compiled)
        bench.memory[key] = memory(compiled)
        bench.state_bytes[key] = tree_bytes(step.state)
        warm(step)
        bench.compile_s[key] = time.perf_counter() - start
        bench.sparse[vocab] = step
    return bench


def set_up_dense(
    bench: OptimizerBench, problem: Problem, args: argparse.Namespace, largest: bool
) -> Step | None:
    """The dense step at one V, compiled and warmed; None where it is skipped (says why)."""
    key = f"dense V={problem.vocab}"
    if largest and args.skip_dense_largest:
        bench.skipped[key] = "--skip-dense-largest"
        return None
    tx = dense_optimizer(bench.name, args.learning_rate)
    fn = make_dense_step(tx)
    start = time.perf_counter()
    state_shape = jax.eval_shape(tx.init, problem.table)
    compiled = compile_step(fn, problem, state_shape)
    mem = memory(compiled)
    bench.memory[key] = mem
    bench.state_bytes[key] = tree_bytes(state_shape)
    needed = mem["argument"] + mem["temp"] + mem["output"] - mem["alias"]
    available = available_bytes()
    if available is not None and needed > 0.9 * available:
        bench.skipped[key] = f"needs {needed / 2**30:.1f} GiB, {available / 2**30:.1f} available"
        return None
    table, state = jnp.array(problem.table), tx.init(problem.table)
    step = Step(key, fn, table, state, problem.batches, compiled)
    warm(step)
    bench.compile_s[key] = time.perf_counter() - start
    return step


# ----------------------------------------------------------------------------- measure


def settle() -> None:
    """Lets the previous section's frees finish (XLA:CPU returns a large buffer to the OS after
    the call that used it has returned, which would slow whatever is timed next)."""
    gc.collect()
    time.sleep(SETTLE_S)


def measure_optimizer(
    name: str, problems: dict[int, Problem], args: argparse.Namespace
) -> OptimizerBench:
    """Sets up, checks and times one optimizer: the dense step per V, then the sparse steps."""
    bench = set_up_sparse(name, problems, args)
    largest = max(problems)
    for vocab, problem in problems.items():
        dense = set_up_dense(bench, problem, args, largest=vocab == largest)
        section = f"dense V={vocab}"
        if dense is None:
            print(f"  {name} V={vocab}: dense skipped ({bench.skipped[section]})")
            continue
        if vocab == min(problems):
            bench.agreement = check_agreement(name, problem, bench.sparse[vocab].fn, dense.fn, args)
        rounds = args.large_repeats if vocab == largest else args.repeats
        sections = {section: {"dense": dense}}
        if args.interleave:
            sections[f"interleaved V={vocab}"] = {"sparse": bench.sparse[vocab], "dense": dense}
        for section, calls in sections.items():
            settle()
            bench.samples[section], bench.faults[section] = common.time_round_robin(calls, rounds)
            medians = ", ".join(
                f"{side} {statistics.median(times) * 1e3:.2f} ms"
                for side, times in bench.samples[section].items()
            )
            print(f"  {name} {section}: {medians} ({rounds} rounds)")
        del sections, calls, dense
    settle()
    calls = {f"V={vocab}": step for vocab, step in bench.sparse.items()}
    bench.samples["sparse"], bench.faults["sparse"] = common.time_round_robin(
        calls, args.scaling_repeats
    )
    medians = ", ".join(
        f"V={vocab} {statistics.median(bench.samples['sparse'][f'V={vocab}']) * 1e3:.2f} ms"
        for vocab in problems
    )
    print(f"  {name} sparse: {medians} ({args.scaling_repeats} rounds)")
    bench.sparse = {}  # frees the tables and states before the next optimizer
    settle()
    return bench


def measure(args: argparse.Namespace) -> dict[str, OptimizerBench]:
    keys = jax.random.split(jax.random.key(args.seed), len(args.vocab_sizes))
    problems = {
        vocab: make_problem(key, vocab, args.dim, args.num_ids, args.id_batches)
        for vocab, key in zip(args.vocab_sizes, keys, strict=True)
    }
    benches = {}
    for name in args.optimizers:
        start = time.perf_counter()
        benches[name] = measure_optimizer(name, problems, args)
        print(f"{name}: done in {time.perf_counter() - start:.1f} s")
    return benches


def stats(times: list[float], faults: list[int]) -> dict[str, float]:
    return {
        **common.quartile_summary(times, "ms"),
        "minor_faults_per_call": statistics.median(faults),
    }


def summarize(benches: dict[str, OptimizerBench], args: argparse.Namespace) -> dict[str, Any]:
    """Per optimizer: timing statistics, ratios, compiled memory and state bytes."""
    smallest, largest = min(args.vocab_sizes), max(args.vocab_sizes)
    out = {}
    for name, bench in benches.items():
        results = {
            section: {
                side: stats(times, bench.faults[section][side]) for side, times in by_side.items()
            }
            for section, by_side in bench.samples.items()
        }
        sparse = bench.samples["sparse"]
        dense_over_sparse, interleaved = {}, {}
        for vocab in args.vocab_sizes:
            if f"dense V={vocab}" not in bench.samples:
                continue
            dense = bench.samples[f"dense V={vocab}"]["dense"]
            dense_over_sparse[f"V={vocab}"] = common.ratio_of_medians(dense, sparse[f"V={vocab}"])
            mixed = bench.samples.get(f"interleaved V={vocab}")
            if mixed:
                interleaved[f"V={vocab}"] = common.ratios(mixed["dense"], mixed["sparse"])
        out[name] = {
            "dense_peer": DENSE_PEER[name],
            "results": results,
            "dense_over_sparse": dense_over_sparse,
            "dense_over_sparse_interleaved": interleaved,
            "sparse_largest_over_smallest": common.ratios(
                sparse[f"V={largest}"], sparse[f"V={smallest}"]
            ),
            "memory_bytes": bench.memory,
            "state_bytes": bench.state_bytes,
            "compile_s": bench.compile_s,
            "agreement": bench.agreement,
            "skipped": bench.skipped,
        }
    return out


# ----------------------------------------------------------------------------- report


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def report_timings(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """Per optimizer and V: sparse and dense ms/step, dense/sparse; the sparse scaling."""
    columns = [
        ("optimizer", "<16"),
        ("dense peer", "<14"),
        ("V", ">8"),
        ("sparse ms", ">10"),
        ("dense ms", ">10"),
        ("dense/sparse", ">13"),
        ("n s/d", ">6"),
        ("faults s/d", ">12"),
    ]
    if args.interleave:
        columns += [("interleaved: sparse ms", ">23"), ("dense/sparse", ">13"), ("paired", ">7")]
        # (the interleaved dense/sparse is the ratio of the two sides' medians in that section)
    rows = []
    for name, s in summary.items():
        for vocab in args.vocab_sizes:
            sparse = s["results"]["sparse"][f"V={vocab}"]
            cells = [name, s["dense_peer"], vocab, f"{sparse['median_ms']:.2f}"]
            if f"dense V={vocab}" not in s["results"]:
                rows.append([*cells, "skipped"])
                continue
            dense = s["results"][f"dense V={vocab}"]["dense"]
            faults = f"{sparse['minor_faults_per_call']:.0f}/{dense['minor_faults_per_call']:.0f}"
            cells += [
                f"{dense['median_ms']:.2f}",
                f"{s['dense_over_sparse'][f'V={vocab}']:.1f}x",
                f"{sparse['n']}/{dense['n']}",
                faults,
            ]
            if args.interleave:
                mixed = s["results"][f"interleaved V={vocab}"]["sparse"]
                ratio = s["dense_over_sparse_interleaved"][f"V={vocab}"]
                cells += [
                    f"{mixed['median_ms']:.2f}",
                    f"{ratio['of_medians']:.1f}x",
                    f"{ratio['paired']:.1f}x",
                ]
            rows.append(cells)
    print(
        "\nmedian ms per step: sparse = the sparse steps of every V timed round-robin; dense = "
        "the dense step of one V, its consecutive steps"
        + ("; interleaved = sparse and dense of one V round-robin" if args.interleave else "")
    )
    print(common.format_table(columns, rows))

    columns = [("optimizer", "<16")]
    columns += [(f"V={v} ms", ">14") for v in args.vocab_sizes]
    columns += [("largest/smallest", ">17"), ("paired", ">8")]
    rows = []
    for name, s in summary.items():
        sparse = s["results"]["sparse"]
        ratio = s["sparse_largest_over_smallest"]
        rows.append(
            [
                name,
                *(f"{sparse[f'V={v}']['median_ms']:.2f}" for v in args.vocab_sizes),
                f"{ratio['of_medians']:.2f}x",
                f"{ratio['paired']:.2f}x",
            ]
        )
    print(f"\nscaling: sparse step, median ms (n={args.scaling_repeats})")
    print(common.format_table(columns, rows))


def report_memory(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """Compiled memory and optimizer state of every step, MiB."""
    columns = [
        ("optimizer", "<16"),
        ("step", "<16"),
        ("temp", ">10"),
        ("arguments", ">10"),
        ("outputs", ">10"),
        ("aliased", ">10"),
        ("opt state", ">10"),
        ("state bytes", ">12"),
    ]
    rows = []
    for name, s in summary.items():
        for key, m in s["memory_bytes"].items():
            state = s["state_bytes"][key]
            row = [name, key, mib(m["temp"]), mib(m["argument"]), mib(m["output"])]
            rows.append([*row, mib(m["alias"]), mib(state), state])
    print(
        "\ncompiled memory (memory_analysis) and optimizer state, MiB; 'aliased' = donated "
        "buffers reused for the outputs; V*D*4 = "
        + ", ".join(f"{mib(v * args.dim * 4)} at V={v}" for v in args.vocab_sizes)
    )
    print(common.format_table(columns, rows))
    for name, s in summary.items():
        for key, why in s["skipped"].items():
            print(f"{name} {key}: not timed ({why})")


def report_agreement(summary: dict[str, Any]) -> None:
    print("\nagreement, one step from the same table at the smallest V (sparse vs dense peer):")
    for name, s in summary.items():
        a = s["agreement"]
        if not a:
            print(f"  {name}: not checked (dense skipped)")
            continue
        print(
            f"  {name} vs {s['dense_peer']}: sparse moved exactly the {a['rows_touched']} "
            f"touched rows; table max |diff| {a['max_abs_diff_table']:.2e}, update max rel diff "
            f"{a['max_rel_diff_update']:.2e}; {a['checked']}"
        )


def verdict(summary: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """A PASS/FAIL line per target (module docstring), then the VERDICT line."""
    smallest, largest = min(args.vocab_sizes), max(args.vocab_sizes)
    checks = []
    for name, s in summary.items():
        scaling = s["sparse_largest_over_smallest"]["of_medians"]
        checks.append(
            (
                scaling <= SCALING_TARGET,
                f"{name}: sparse step V={largest} <= {SCALING_TARGET:g}x V={smallest}: "
                f"{scaling:.2f}x",
            )
        )
        section = f"V={args.speedup_vocab}"
        if section in s["dense_over_sparse"]:
            speedup = s["dense_over_sparse"][section]
            checks.append(
                (
                    speedup >= SPEEDUP_TARGET,
                    f"{name}: sparse >= {SPEEDUP_TARGET:g}x faster than {s['dense_peer']} at "
                    f"{section}: {speedup:.1f}x",
                )
            )
        else:
            checks.append((False, f"{name}: no dense measurement at {section}"))
        if name == "rowwise_adagrad":
            for vocab in args.vocab_sizes:
                state = s["state_bytes"][f"sparse V={vocab}"]
                checks.append(
                    (
                        state == vocab * 4 + 4,
                        f"rowwise_adagrad state at V={vocab} = V float32 + int32 count "
                        f"({vocab * 4 + 4} bytes): {state} bytes",
                    )
                )
    return common.verdict_lines(checks)


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """Prints what runs where; returns the run's metadata."""
    meta = common.run_metadata(
        ("jax", "jaxlib", "optax", "jaxembed"),
        **{name: getattr(args, name) for name in RECORDED_ARGS},
        machine=platform.machine(),
        load_average_start=common.load_average(),
    )
    lines = common.header_lines(
        meta, ("jax", "jaxlib", "optax", "jaxembed"), load=meta["load_average_start"]
    )
    print("\n".join(lines))
    print(f"date {meta['date']}, machine {meta['machine']}")
    print(
        f"tables (V, {args.dim}) float32 at V = {', '.join(map(str, args.vocab_sizes))}; "
        f"{args.num_ids} int32 ids per step, {args.id_batches} batches in turn; "
        f"lr {args.learning_rate:g}; table and state donated; median ms per step"
        + (f"; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')}" if args.malloc_hugetlb else "")
        + ("; --quick" if args.quick else "")
    )
    return meta


HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"


def rerun_with_hugetlb(argv: list[str]) -> None:
    """Replaces this process by the same run with HUGETLB_TUNABLE set, unless already so
    (glibc reads its tunables at process start)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if HUGETLB_TUNABLE in tunables.split(":"):
        return
    sys.stdout.flush()
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGETLB_TUNABLE]))}
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.malloc_hugetlb:
        rerun_with_hugetlb(argv)
    wall = time.perf_counter()
    meta = describe(args)

    benches = measure(args)

    summary = summarize(benches, args)
    report_timings(summary, args)
    report_memory(summary, args)
    report_agreement(summary)
    lines = verdict(summary, args)
    if args.quick:
        lines.append("(--quick: a smoke run; its sizes are too small for the targets to mean much)")
    print("\n" + "\n".join(lines))
    meta["load_average_end"] = end_load = common.load_average()
    print(f"\ntotal {time.perf_counter() - wall:.1f} s; load average {end_load} at end")
    if args.json:
        common.write_json(
            args.json,
            {
                "meta": meta,
                "optimizers": summary,
                "verdict": lines,
                "samples_ms": {
                    name: common.scaled_samples(b.samples, "ms") for name, b in benches.items()
                },
                "minor_faults_per_call": {name: b.faults for name, b in benches.items()},
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
