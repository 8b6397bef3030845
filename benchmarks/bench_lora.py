"""Benchmark: jaxembed's LoRA embedding against keras.layers.Embedding(lora_rank=...).

Times, in one run on the default JAX device, with a `(--vocab, --dim)` float32 table, a rank
`--rank` adapter (A `(vocab, rank)`, B `(rank, dim)`, both float32, B random so that nothing
folds away) and `--num-ids` int32 ids:

1. forward: `jax.jit(lambda p, ids: jaxembed.apply(p, ids, out_of_range="clip", ...))`
   against `keras.layers.Embedding(vocab, dim, lora_rank=rank)` on the JAX backend, called
   as `layer.stateless_call(trainable, non_trainable, ids)` inside `jax.jit` (no eager
   overhead). jaxembed gathers rows of A, then multiplies by B; Keras builds
   `E + (alpha / rank) * A @ B` over the whole vocabulary on every call.
2. train step: forward + backward + `optax.adam(1e-3)` on A and B only, one jitted function
   each; loss `mean((out - target)**2)` against a fixed target. jaxembed differentiates only
   the trainable half of `jaxembed.lora.split_trainable(params)` (the table gets no gradient);
   Keras differentiates `stateless_call` w.r.t. its trainable variables (A and B: Keras
   freezes the table under LoRA). Same optax optimizer for both.
3. compiled temp memory of each step: `jax.jit(step).lower(...).compile().memory_analysis()`.
4. scaling: jaxembed's train step at `--large-vocab` rows against `--vocab` rows (same dim,
   ids and rank), round-robin; Keras's large-vocab step is timed after it, alone and fewer
   times (`--large-keras-repeats`, 0 skips it: it builds two `(large vocab, dim)` arrays).

Before timing, both forward outputs and one train step (loss, new A and B) of jaxembed and
Keras are checked to agree, Keras's variables holding the same table, A, B and lora_alpha.
Timing: every function is compiled and called once first; then the candidates of a section
are timed round-robin (the first one timed rotates every round), one call +
`block_until_ready` per sample; the median per call is reported, with the ratio of medians
(the verdicts decide on it) and the "paired" ratio (median over rounds of the per-round
ratio, which cancels slow drift) beside it, the minimum, and the minor page faults per call
(XLA:CPU allocates its buffers on every call; glibc serves a block it has no room for in the
heap with a fresh mmap, so such a call zero-fills new pages: `--no-mmap-malloc` is a
diagnostic that reruns the script with glibc told to keep freed memory in the heap).

Keras 3.15.1 drops the constructor's `lora_alpha` in `build()` (which calls
`enable_lora(rank)` without it); the script puts it back.

Targets: Keras/jaxembed forward >= 10x; train step >= 5x; jaxembed step temp memory <= 1/4 of
Keras's; jaxembed step at --large-vocab <= 1.5x its step at --vocab.

Usage:
    python benchmarks/bench_lora.py                 # defaults: about 30-90 s on 2 CPU cores
    python benchmarks/bench_lora.py --repeats 50 --json lora.json
    python benchmarks/bench_lora.py --no-mmap-malloc  # diagnostic: no per-call page faults
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported

import common
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax

import jaxembed
from jaxembed.lora import combine, split_trainable

FORWARD_TARGET = 10.0  # Keras / jaxembed forward time must be >= this
STEP_TARGET = 5.0  # Keras / jaxembed train step time must be >= this
MEMORY_TARGET = 0.25  # jaxembed step temp bytes must be <= this fraction of Keras's
SCALING_TARGET = 1.5  # jaxembed step at the large vocab must be <= this x the small vocab's
LEARNING_RATE = 1e-3
# The command-line values the JSON's metadata records, in this order.
RECORDED_ARGS = (
    "vocab",
    "large_vocab",
    "dim",
    "num_ids",
    "rank",
    "lora_alpha",
    "repeats",
    "large_keras_repeats",
    "no_mmap_malloc",
)


@dataclass
class Candidate:
    """A jitted function and the arguments it is timed with."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    compiled: Any = field(default=None, repr=False)

    def __call__(self) -> Any:
        return self.fn(*self.args)


@dataclass
class Setup:
    """Params, ids and target of one vocabulary size, and the candidates built on them."""

    vocab: int
    params: dict[str, jax.Array]
    ids: jax.Array
    target: jax.Array
    candidates: dict[str, Candidate] = field(default_factory=dict)


def make_setup(key: jax.Array, vocab: int, dim: int, num_ids: int, rank: int) -> Setup:
    """A random table, A (Keras's he_uniform) and a random nonzero B, ids and a target."""
    table_key, lora_key, b_key, ids_key, target_key = jax.random.split(key, 5)
    params = jaxembed.enable_lora(jaxembed.init(table_key, vocab, dim), lora_key, rank)
    # B starts at zero in LoRA; make it random so that no part of the delta folds away.
    params["lora_embeddings_b"] = 0.1 * jax.random.normal(b_key, (rank, dim), jnp.float32)
    ids = jax.random.randint(ids_key, (num_ids,), 0, vocab, dtype=jnp.int32)
    target = jax.random.normal(target_key, (num_ids, dim), jnp.float32)
    return Setup(vocab, params, ids, target)


def mse(out: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(out - target))


def jaxembed_candidates(setup: Setup, lora_alpha: float, tx: optax.GradientTransformation):
    """jaxembed's jitted forward and train step, with the arguments they are timed with."""

    def forward(params, ids):
        return jaxembed.apply(params, ids, out_of_range="clip", lora_alpha=lora_alpha)

    def step(trainable, opt_state, frozen, ids, target):
        def loss_fn(trainable):
            return mse(forward(combine(trainable, frozen), ids), target)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    trainable, frozen = split_trainable(setup.params)
    opt_state = tx.init(trainable)
    return (
        Candidate("jaxembed", jax.jit(forward), (setup.params, setup.ids)),
        Candidate(
            "jaxembed", jax.jit(step), (trainable, opt_state, frozen, setup.ids, setup.target)
        ),
    )


def keras_layer(setup: Setup, lora_alpha: float, rank: int) -> keras.layers.Embedding:
    """keras.layers.Embedding with LoRA, its variables set to the setup's table, A and B."""
    vocab, dim = setup.params["embeddings"].shape
    layer = keras.layers.Embedding(
        vocab, dim, embeddings_initializer="zeros", lora_rank=rank, lora_alpha=lora_alpha
    )  # "zeros": no time spent drawing a table that is overwritten below
    layer.build((None,))
    # Keras 3.15.1: build() calls enable_lora(lora_rank) without lora_alpha, which resets
    # lora_alpha to the rank, dropping the constructor's value; put it back.
    layer.lora_alpha = lora_alpha
    assert [v.name for v in layer.trainable_variables] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ], layer.trainable_variables
    assert [v.name for v in layer.non_trainable_variables] == ["embeddings"]
    layer.non_trainable_variables[0].assign(setup.params["embeddings"])  # `.embeddings` adds A@B
    layer.lora_embeddings_a.assign(setup.params["lora_embeddings_a"])
    layer.lora_embeddings_b.assign(setup.params["lora_embeddings_b"])
    return layer


def keras_candidates(layer: keras.layers.Embedding, setup: Setup, tx):
    """Keras's jitted stateless forward and train step, with their arguments."""
    trainable = [jnp.asarray(v.value) for v in layer.trainable_variables]  # [A, B]
    non_trainable = [jnp.asarray(v.value) for v in layer.non_trainable_variables]  # [table]

    def forward(trainable, non_trainable, ids):
        out, _ = layer.stateless_call(trainable, non_trainable, ids)
        return out

    def step(trainable, opt_state, non_trainable, ids, target):
        def loss_fn(trainable):
            return mse(forward(trainable, non_trainable, ids), target)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    opt_state = tx.init(trainable)
    return (
        Candidate("keras", jax.jit(forward), (trainable, non_trainable, setup.ids)),
        Candidate(
            "keras",
            jax.jit(step),
            (trainable, opt_state, non_trainable, setup.ids, setup.target),
        ),
    )


def check_agreement(
    layer: keras.layers.Embedding, setup: Setup, lora_alpha: float, tol: float
) -> dict[str, float]:
    """jaxembed and Keras agree: forward (jitted and Keras eager) and one train step."""
    cands = setup.candidates
    ours = np.asarray(cands["jaxembed forward"]())
    theirs = np.asarray(cands["keras forward"]())
    eager = np.asarray(layer(setup.ids))
    # The reference, in float64 numpy: E[ids] + (alpha / rank) * A[ids] @ B.
    params = {k: np.asarray(v, np.float64) for k, v in setup.params.items()}
    ids = np.asarray(setup.ids)
    a = params["lora_embeddings_a"]
    reference = params["embeddings"][ids] + (lora_alpha / a.shape[1]) * (
        a[ids] @ params["lora_embeddings_b"]
    )
    delta = reference - params["embeddings"][ids]
    assert np.abs(delta).mean() > 1e-3, "the LoRA delta is too small to test anything"
    for name, out in (("jaxembed", ours), ("keras jitted", theirs), ("keras eager", eager)):
        np.testing.assert_allclose(out, reference, rtol=tol, atol=tol, err_msg=name)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol)

    (new_ours, _, loss_ours) = cands["jaxembed step"]()
    (new_theirs, _, loss_theirs) = cands["keras step"]()
    np.testing.assert_allclose(loss_ours, loss_theirs, rtol=tol)
    for i, name in enumerate(("lora_embeddings_a", "lora_embeddings_b")):
        assert new_ours["embeddings"] is None  # the table is not trained
        np.testing.assert_allclose(new_ours[name], new_theirs[i], rtol=tol, atol=tol, err_msg=name)
        moved = np.abs(np.asarray(new_ours[name]) - np.asarray(setup.params[name])).max()
        assert moved > 0, f"{name} did not move in the train step"
    return {
        "max_abs_diff_forward": float(np.abs(ours - theirs).max()),
        "max_abs_diff_vs_float64": float(np.abs(ours - reference).max()),
        "loss_jaxembed": float(loss_ours),
        "loss_keras": float(loss_theirs),
    }


def compile_and_warm(candidate: Candidate) -> float:
    """AOT-compiles (for memory_analysis), then calls the jitted function twice; seconds."""
    start = time.perf_counter()
    candidate.compiled = candidate.fn.lower(*candidate.args).compile()
    for _ in range(2):  # the jit cache compiles again on the first call; then settle
        jax.block_until_ready(candidate())
    return time.perf_counter() - start


def memory(candidate: Candidate) -> dict[str, int]:
    names = ("temp", "argument", "output", "alias", "generated_code")
    return common.memory_bytes(candidate.compiled, names)


def vd_ops(candidate: Candidate, vocab: int, dim: int) -> int:
    """How many instructions of the compiled HLO (fused computations included) produce a
    float `(vocab, dim)` array: 0 means no V x D array is ever computed (parameters excluded)."""
    produces = re.compile(rf"^\s*(ROOT )?%\S+ = f(16|32|64)\[{vocab},{dim}\]")
    return sum(
        1
        for line in candidate.compiled.as_text().splitlines()
        if produces.match(line) and "parameter(" not in line
    )


def stats(times: list[float], faults: list[int]) -> dict[str, float]:
    return {
        **common.quartile_summary(times, "ms"),
        "minor_faults_per_call": statistics.median(faults),
    }


# glibc reads these at process start: big blocks come from the heap and freed memory stays
# there, so XLA:CPU's per-call buffers over 32 MiB stop costing fresh zeroed pages per call.
NO_MMAP_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**31), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def rerun_with_malloc_env(argv: list[str]) -> None:
    """Replaces this process by the same run under NO_MMAP_MALLOC_ENV, unless already so."""
    if all(os.environ.get(k) == v for k, v in NO_MMAP_MALLOC_ENV.items()):
        return
    sys.stdout.flush()
    command = [sys.executable, os.path.abspath(__file__), *argv]
    os.execve(sys.executable, command, {**os.environ, **NO_MMAP_MALLOC_ENV})


# ----------------------------------------------------------------------------- setup


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--vocab", type=int, default=32000, help="table rows (input_dim)")
    parser.add_argument("--dim", type=int, default=1024, help="table columns (output_dim)")
    parser.add_argument("--num-ids", type=int, default=4096, help="ids looked up per call")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (both)")
    parser.add_argument(
        "--large-vocab", type=int, default=262144, help="vocabulary of the scaling test"
    )
    parser.add_argument(
        "--repeats", type=int, default=60, help="timed calls per candidate and section"
    )
    parser.add_argument(
        "--large-keras-repeats",
        type=int,
        default=5,
        help="timed calls of Keras's step at --large-vocab (separate from the round-robin of "
        "the scaling test: it is slow); 0 skips it",
    )
    parser.add_argument("--tolerance", type=float, default=1e-5, help="agreement rtol/atol")
    parser.add_argument(
        "--no-mmap-malloc",
        action="store_true",
        help="diagnostic (glibc): rerun under MALLOC_MMAP_THRESHOLD_=2**31 "
        "MALLOC_TRIM_THRESHOLD_=2**32, so that freed memory stays in the heap and per-call "
        "buffers over 32 MiB stop costing fresh page faults",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.vocab, args.dim, args.num_ids, args.rank, args.large_vocab) < 1:
        parser.error("--vocab, --dim, --num-ids, --rank and --large-vocab must be positive")
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    return args


@dataclass
class Bench:
    """Everything set up before timing."""

    sections: dict[str, dict[str, Candidate]]
    """Section name -> the candidates timed round-robin against each other."""
    compiled: dict[str, tuple[Candidate, int]]
    """Name -> a compiled function whose memory is reported, and its vocabulary."""
    agreement: dict[str, float]
    compile_s: dict[str, float]


def set_up(args: argparse.Namespace, tx: optax.GradientTransformation) -> Bench:
    """Builds, compiles and warms every candidate, and checks that jaxembed and Keras agree."""
    small_key, large_key = jax.random.split(jax.random.key(args.seed))
    small = make_setup(small_key, args.vocab, args.dim, args.num_ids, args.rank)
    layer = keras_layer(small, args.lora_alpha, args.rank)
    ours_fwd, ours_step = jaxembed_candidates(small, args.lora_alpha, tx)
    keras_fwd, keras_step = keras_candidates(layer, small, tx)
    small.candidates = {
        "jaxembed forward": ours_fwd,
        "keras forward": keras_fwd,
        "jaxembed step": ours_step,
        "keras step": keras_step,
    }
    compile_s = {name: compile_and_warm(c) for name, c in small.candidates.items()}
    agreement = check_agreement(layer, small, args.lora_alpha, args.tolerance)
    print(
        f"compiled in {sum(compile_s.values()):.1f} s; jaxembed and Keras agree (forward max "
        f"|diff| {agreement['max_abs_diff_forward']:.1e}, loss {agreement['loss_jaxembed']:.6f}"
        f" vs {agreement['loss_keras']:.6f}, new A and B within {args.tolerance:g})"
    )

    large = make_setup(large_key, args.large_vocab, args.dim, args.num_ids, args.rank)
    _, large_step = jaxembed_candidates(large, args.lora_alpha, tx)
    compile_s["jaxembed step large"] = compile_and_warm(large_step)
    bench = Bench(
        sections={
            "forward": {"jaxembed": ours_fwd, "keras": keras_fwd},
            "train step": {"jaxembed": ours_step, "keras": keras_step},
            "scaling": {f"V={args.vocab}": ours_step, f"V={args.large_vocab}": large_step},
        },
        compiled={
            **{name: (c, args.vocab) for name, c in small.candidates.items()},
            "jaxembed step large": (large_step, args.large_vocab),
        },
        agreement=agreement,
        compile_s=compile_s,
    )
    if args.large_keras_repeats > 0:
        large_layer = keras_layer(large, args.lora_alpha, args.rank)
        _, large_keras_step = keras_candidates(large_layer, large, tx)
        compile_s["keras step large"] = compile_and_warm(large_keras_step)
        bench.sections["keras large"] = {"keras": large_keras_step}
        bench.compiled["keras step large"] = (large_keras_step, args.large_vocab)
    return bench


# ----------------------------------------------------------------------------- measure


def measure(bench: Bench, args: argparse.Namespace) -> tuple[dict, dict]:
    """Per-call seconds and minor page faults, {section: {candidate: samples}}."""
    samples, faults = {}, {}
    for section, candidates in bench.sections.items():
        rounds = args.large_keras_repeats if section == "keras large" else args.repeats
        samples[section], faults[section] = common.time_round_robin(candidates, rounds)
    return samples, faults


def summarize(
    bench: Bench, samples: dict, faults: dict, args: argparse.Namespace
) -> dict[str, Any]:
    """The figures reported: timing statistics, ratios, compiled memory and V x D ops."""
    forward, step, scaling = samples["forward"], samples["train step"], samples["scaling"]
    return {
        "results": {
            section: {name: stats(times, faults[section][name]) for name, times in by_name.items()}
            for section, by_name in samples.items()
        },
        "ratios": {
            "forward_keras_over_jaxembed": common.ratios(forward["keras"], forward["jaxembed"]),
            "step_keras_over_jaxembed": common.ratios(step["keras"], step["jaxembed"]),
            "jaxembed_step_large_over_small": common.ratios(
                scaling[f"V={args.large_vocab}"], scaling[f"V={args.vocab}"]
            ),
        },
        "memory_bytes": {name: memory(c) for name, (c, _) in bench.compiled.items()},
        "vd_ops": {name: vd_ops(c, v, args.dim) for name, (c, v) in bench.compiled.items()},
    }


# ----------------------------------------------------------------------------- report


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def report_timings(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """The timing table and the ratios."""
    results, ratio = summary["results"], summary["ratios"]
    rows = []
    for section, by_name in results.items():
        for name, s in by_name.items():
            label = f"{section}: {name}"
            if section == "keras large":
                label = f"scaling: keras V={args.large_vocab}"
            rows.append(
                [
                    label,
                    f"{s['median_ms']:.2f}",
                    f"{s['p25_ms']:.2f}-{s['p75_ms']:.2f}",
                    f"{s['min_ms']:.2f}",
                    s["n"],
                    f"{s['minor_faults_per_call']:.0f}",
                ]
            )
    columns = [
        ("section / candidate", "<28"),
        ("median ms", ">10"),
        ("p25-p75 ms", ">16"),
        ("min ms", ">9"),
        ("n", ">4"),
        ("faults/call", ">12"),
    ]
    print("\n" + common.format_table(columns, rows))
    print(
        f"\nKeras / jaxembed: forward {common.format_ratio(ratio['forward_keras_over_jaxembed'])}"
        f", train step {common.format_ratio(ratio['step_keras_over_jaxembed'])}"
    )
    print(
        f"jaxembed step V={args.large_vocab} / V={args.vocab}: "
        f"{common.format_ratio(ratio['jaxembed_step_large_over_small'])}"
    )
    if "keras large" in results:
        keras_scaling = (
            results["keras large"]["keras"]["median_ms"]
            / results["train step"]["keras"]["median_ms"]
        )
        print(f"keras step V={args.large_vocab} / V={args.vocab}: {keras_scaling:.2f}x")
    else:
        print(f"keras step at V={args.large_vocab}: skipped (--large-keras-repeats 0)")


def report_memory(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """The compiled-memory table."""
    mem, vd_counts = summary["memory_bytes"], summary["vd_ops"]
    columns = [
        ("compiled function", "<22"),
        ("temp", ">12"),
        ("temp bytes", ">12"),
        ("arguments", ">12"),
        ("outputs", ">12"),
        ("V x D ops", ">10"),
    ]
    rows = [
        [name, mib(m["temp"]), m["temp"], mib(m["argument"]), mib(m["output"]), vd_counts[name]]
        for name, m in mem.items()
    ]
    print(
        "\ncompiled memory (memory_analysis); 'V x D ops' = HLO instructions producing a "
        "(vocab, dim) float array"
    )
    print(common.format_table(columns, rows))
    vd_bytes, large_vd_bytes = args.vocab * args.dim * 4, args.large_vocab * args.dim * 4
    print(
        f"V*D*4 = {mib(vd_bytes)} at V={args.vocab}, {mib(large_vd_bytes)} at "
        f"V={args.large_vocab}; jaxembed step temp < V*D*4: "
        f"{mem['jaxembed step']['temp'] < vd_bytes} (V={args.vocab}), "
        f"{mem['jaxembed step large']['temp'] < large_vd_bytes} (V={args.large_vocab})"
    )


def verdict(summary: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """A PASS/FAIL line per target (module docstring), then the VERDICT line."""
    forward = summary["ratios"]["forward_keras_over_jaxembed"]["of_medians"]
    step = summary["ratios"]["step_keras_over_jaxembed"]["of_medians"]
    scaling = summary["ratios"]["jaxembed_step_large_over_small"]["of_medians"]
    ours, theirs = summary["memory_bytes"]["jaxembed step"], summary["memory_bytes"]["keras step"]
    ours_large = summary["memory_bytes"]["jaxembed step large"]
    mem_ratio = ours["temp"] / max(theirs["temp"], 1)
    return common.verdict_lines(
        [
            (
                forward >= FORWARD_TARGET,
                f"forward Keras/jaxembed >= {FORWARD_TARGET:g}x: {forward:.2f}x",
            ),
            (
                step >= STEP_TARGET,
                f"train step Keras/jaxembed >= {STEP_TARGET:g}x: {step:.2f}x",
            ),
            (
                mem_ratio <= MEMORY_TARGET,
                f"train step temp memory jaxembed <= 1/{1 / MEMORY_TARGET:g} of Keras: "
                f"{mib(ours['temp'])} vs {mib(theirs['temp'])} ({mem_ratio:.4f})",
            ),
            (
                ours["temp"] < args.vocab * args.dim * 4
                and ours_large["temp"] < args.large_vocab * args.dim * 4,
                "jaxembed train step holds no V x D temp buffer (temp < V*D*4, both vocabs)",
            ),
            (
                scaling <= SCALING_TARGET,
                f"jaxembed step V={args.large_vocab} <= {SCALING_TARGET:g}x V={args.vocab}: "
                f"{scaling:.2f}x",
            ),
        ]
    )


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """Prints what runs where; returns the run's metadata."""
    meta = common.start_run(args, RECORDED_ARGS)
    print(
        f"table ({args.vocab}, {args.dim}) float32, LoRA rank {args.rank}, "
        f"lora_alpha {args.lora_alpha:g}, {args.num_ids} int32 ids, "
        f"optax.adam({LEARNING_RATE:g}) on A and B; median per call in ms"
        + ("; --no-mmap-malloc" if args.no_mmap_malloc else "")
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    wall = time.perf_counter()
    if args.no_mmap_malloc:
        rerun_with_malloc_env(argv)
    tx = optax.adam(LEARNING_RATE)
    meta = describe(args)

    bench = set_up(args, tx)
    print(f"set up and compiled in {time.perf_counter() - wall:.1f} s; timing...")
    samples, faults = measure(bench, args)

    summary = summarize(bench, samples, faults, args)
    report_timings(summary, args)
    report_memory(summary, args)
    lines = verdict(summary, args)
    print("\n" + "\n".join(lines))
    common.finish_run(meta, wall)
    if args.json:
        common.write_json(
            args.json,
            {
                "meta": meta,
                "agreement": bench.agreement,
                "compile_s": bench.compile_s,
                **summary,
                "verdict": lines,
                "samples_ms": common.scaled_samples(samples, "ms"),
                "minor_faults_per_call": faults,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
