"""Benchmark: jaxembed's embedding lookup against jnp.take, flax.linen.Embed and Keras.

Times, in one run on the default JAX device, the jitted lookup of `--num-ids` ids in a
`(--vocab, --dim)` float32 table for:

* raw `jnp.take(table, ids, axis=0)` (the baseline every ratio is taken against),
* `jaxembed.apply` with out_of_range="fill" (the headline), "clip", and "error" (under
  `checkify`, the error fetched and thrown on every call, as a user would),
* the `jaxembed.Embedding` linen module (out_of_range="fill"),
* `flax.linen.Embed`,
* `keras.layers.Embedding` on the JAX backend, called as `layer.stateless_call` inside jax.jit.

Two workloads: forward, and forward+backward (jitted `jax.grad` of `sum(out**2)` w.r.t. the
table). Every candidate reads the same table and ids. Each is compiled and checked against
jnp.take first; then the candidates are timed round-robin (the starting candidate rotates
every round) so that drift on a noisy machine hits all of them alike. Each sample is one call
followed by `block_until_ready`; the table shows the median per call in microseconds, its
ratio to jnp.take's median, and the "paired" ratio: the median over rounds of the candidate's
time over jnp.take's time in the same round, which cancels slow drift.

Targets (verdict lines, decided on the paired ratio): jaxembed.apply "fill" forward <= 1.10x
jnp.take, and no slower than flax.linen.Embed and keras.layers.Embedding, forward and
forward+backward ("no slower" allows `--tolerance`, default 5%, of timing noise).

Usage:
    python benchmarks/bench_lookup.py                      # defaults, about 45-55 s on 2 CPU cores
    python benchmarks/bench_lookup.py --repeats 200 --json results.json
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax.experimental import checkify

import jaxembed

BASELINE = "jnp.take"
HEADLINE = "jaxembed.apply fill"
FORWARD_TARGET = 1.10  # jaxembed forward must be <= 1.10x raw jnp.take
LIBRARIES = ("jax", "jaxlib", "flax", "keras", "jaxembed")  # the versions reported


@dataclass
class Candidate:
    name: str
    forward: Callable[[jax.Array, jax.Array], Any]
    forward_backward: Callable[[jax.Array, jax.Array], Any]


def sum_of_squares(out: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(out.astype(jnp.float32)))


def plain(lookup: Callable[[jax.Array, jax.Array], jax.Array]) -> Candidate:
    """Jitted forward and forward+backward of a `(table, ids) -> rows` function."""
    return Candidate(
        name="",
        forward=jax.jit(lookup),
        forward_backward=jax.jit(jax.grad(lambda table, ids: sum_of_squares(lookup(table, ids)))),
    )


def checkified(lookup: Callable[[jax.Array, jax.Array], jax.Array]) -> Candidate:
    """As `plain`, but checkified; every call fetches the error and throws it if set."""
    forward = jax.jit(checkify.checkify(lookup))
    forward_backward = jax.jit(
        checkify.checkify(jax.grad(lambda table, ids: sum_of_squares(lookup(table, ids))))
    )

    def thrown(fn: Callable[..., Any]) -> Callable[[jax.Array, jax.Array], Any]:
        def call(table: jax.Array, ids: jax.Array) -> Any:
            err, out = fn(table, ids)
            err.throw()
            return out

        return call

    return Candidate(name="", forward=thrown(forward), forward_backward=thrown(forward_backward))


def keras_candidate(vocab: int, dim: int) -> Candidate:
    layer = keras.layers.Embedding(vocab, dim)
    layer.build((None,))
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
        out, _ = layer.stateless_call([table], non_trainable, ids)
        return out

    return plain(lookup)


def build_candidates(vocab: int, dim: int) -> list[Candidate]:
    def jaxembed_apply(policy: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda table, ids: jaxembed.apply({"embeddings": table}, ids, out_of_range=policy)

    jaxembed_module = jaxembed.Embedding(vocab, dim, out_of_range="fill")
    flax_module = nn.Embed(vocab, dim)
    named = [
        (BASELINE, plain(lambda table, ids: jnp.take(table, ids, axis=0))),
        (HEADLINE, plain(jaxembed_apply("fill"))),
        ("jaxembed.apply clip", plain(jaxembed_apply("clip"))),
        ("jaxembed.apply error+checkify", checkified(jaxembed_apply("error"))),
        (
            "jaxembed.Embedding (linen) fill",
            plain(lambda t, i: jaxembed_module.apply({"params": {"embeddings": t}}, i)),
        ),
        (
            "flax.linen.Embed",
            plain(lambda t, i: flax_module.apply({"params": {"embedding": t}}, i)),
        ),
        ("keras.layers.Embedding", keras_candidate(vocab, dim)),
    ]
    for name, candidate in named:
        candidate.name = name
    return [candidate for _, candidate in named]


def warm_up_and_check(candidates: list[Candidate], table: jax.Array, ids: jax.Array) -> None:
    """Compiles every function and checks its result against jnp.take's (and its gradient)."""
    expected = {
        "forward": np.asarray(jnp.take(table, ids, axis=0)),
        "forward_backward": None,
    }
    for workload in ("forward", "forward_backward"):
        for candidate in candidates:
            fn = getattr(candidate, workload)
            for _ in range(2):  # compile, then one more call to settle allocations
                out = jax.block_until_ready(fn(table, ids))
            out = np.asarray(out)
            if expected[workload] is None:
                expected[workload] = out
            np.testing.assert_allclose(
                out,
                expected[workload],
                rtol=1e-6,
                atol=1e-6,
                err_msg=f"{candidate.name} ({workload}) disagrees with {BASELINE}",
            )


# ----------------------------------------------------------------------------- measure


def measure(
    candidates: list[Candidate], table: jax.Array, ids: jax.Array, rounds: dict[str, int]
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call, {workload: {candidate: samples}}, each workload round-robin."""
    samples = {}
    for workload, n in rounds.items():
        calls = {c.name: functools.partial(getattr(c, workload), table, ids) for c in candidates}
        samples[workload], _ = common.time_round_robin(calls, n)
    return samples


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Quartiles of each candidate, and its ratios to jnp.take: of the medians, and the median
    of per-round ratios (each round's time over the same round's jnp.take time), which
    cancels slow drift."""
    base = samples[BASELINE]
    summary = {}
    for name, times in samples.items():
        ratio = common.ratios(times, base)
        summary[name] = {
            **common.quartile_summary(times, "us"),
            "ratio_vs_take": ratio["of_medians"],
            "paired_ratio_vs_take": ratio["paired"],
        }
    return summary


# ----------------------------------------------------------------------------- report


def paired_text(ratio: dict[str, float]) -> str:
    """`paired 0.984x (ratio of medians 0.990x)`: the verdicts decide on the paired ratio."""
    return f"paired {ratio['paired']:.3f}x (ratio of medians {ratio['of_medians']:.3f}x)"


def verdict(samples: dict[str, dict[str, list[float]]], tolerance: float) -> list[str]:
    """PASS/FAIL per target, decided on the paired ratio (the lower-variance estimate on a
    noisy machine); the ratio of medians is shown beside it."""
    forward = common.ratios(samples["forward"][HEADLINE], samples["forward"][BASELINE])
    checks = [
        (
            forward["paired"] <= FORWARD_TARGET,
            f"{HEADLINE} forward <= {FORWARD_TARGET:.2f}x {BASELINE}: {paired_text(forward)}",
        )
    ]
    for workload in ("forward", "forward_backward"):
        for other in ("flax.linen.Embed", "keras.layers.Embedding"):
            ratio = common.ratios(samples[workload][HEADLINE], samples[workload][other])
            checks.append(
                (
                    ratio["paired"] <= 1 + tolerance,
                    f"{HEADLINE} {workload} no slower than {other} (<= {1 + tolerance:.2f}x, "
                    f"{tolerance:.0%} noise margin): {paired_text(ratio)}",
                )
            )
    return common.verdict_lines(checks)


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A table per workload: median and quartiles per call, and the ratios to jnp.take."""
    columns = [
        ("candidate", "<33"),
        ("median us", ">10"),
        ("p25-p75 us", ">15"),
        ("x take", ">7"),
        ("paired", ">7"),
    ]
    parts = []
    for workload, label in (("forward", "forward"), ("forward_backward", "forward+backward")):
        rows = [
            [
                name,
                f"{s['median_us']:.0f}",
                f"{s['p25_us']:.0f}-{s['p75_us']:.0f}",
                f"{s['ratio_vs_take']:.3f}x",
                f"{s['paired_ratio_vs_take']:.3f}x",
            ]
            for name, s in results[workload].items()
        ]
        parts.append(f"\n{label} (n={results[workload][BASELINE]['n']} calls each)")
        parts.append(common.format_table(columns, rows))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--vocab", type=int, default=32000, help="table rows (input_dim)")
    parser.add_argument("--dim", type=int, default=1024, help="table columns (output_dim)")
    parser.add_argument("--num-ids", type=int, default=4096, help="ids looked up per call")
    parser.add_argument(
        "--repeats",
        type=int,
        default=60,
        help="timed calls per candidate for forward+backward",
    )
    parser.add_argument(
        "--forward-repeats",
        type=int,
        default=None,
        help="timed calls per candidate for forward; unset = 5 x --repeats (forward is cheap)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="'no slower than flax/Keras' allows this relative noise margin",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the table and ids")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.vocab, args.dim, args.num_ids) < 1:
        parser.error("--vocab, --dim and --num-ids must be positive")
    args.forward_repeats = args.forward_repeats or 5 * args.repeats
    if min(args.repeats, args.forward_repeats) < 2:
        parser.error("--repeats and --forward-repeats must be at least 2 (for quartiles)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table_key, ids_key = jax.random.split(jax.random.key(args.seed))
    table = jaxembed.init(table_key, args.vocab, args.dim)["embeddings"]
    ids = jax.random.randint(ids_key, (args.num_ids,), 0, args.vocab, dtype=jnp.int32)
    meta = common.run_metadata(
        libraries=LIBRARIES,
        vocab=args.vocab,
        dim=args.dim,
        num_ids=args.num_ids,
        table_dtype=str(table.dtype),
        repeats_forward=args.forward_repeats,
        repeats_forward_backward=args.repeats,
        tolerance=args.tolerance,
    )
    print("\n".join(common.header_lines(meta, LIBRARIES)))
    print(
        f"table ({args.vocab}, {args.dim}) {table.dtype}, {args.num_ids} int32 ids; "
        f"median per call, microseconds; ratios vs {BASELINE} from this run"
    )

    wall = time.perf_counter()
    candidates = build_candidates(args.vocab, args.dim)
    warm_up_and_check(candidates, table, ids)
    print(f"compiled and checked against {BASELINE} in {time.perf_counter() - wall:.1f} s")
    rounds = {"forward": args.forward_repeats, "forward_backward": args.repeats}
    samples = measure(candidates, table, ids, rounds)

    results = {workload: summarize(by_name) for workload, by_name in samples.items()}
    print(format_table(results))
    print("\n'x take' = median / median of jnp.take; 'paired' = median of per-round ratios")
    lines = verdict(samples, args.tolerance)
    print("\n" + "\n".join(lines))
    print(f"\ntotal {time.perf_counter() - wall:.1f} s")
    if args.json:
        common.write_json(
            args.json,
            {
                "meta": meta,
                "results": results,
                "verdict": lines,
                "samples_us": common.scaled_samples(samples, "us"),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
