"""Benchmark: a batch mixing n stacked LoRA adapters against a batch with one ordinary adapter.

`jaxembed.enable_lora(params, key, rank, num_adapters=n)` stacks n adapters (A `(n, vocab,
rank)`, B `(n, rank, dim)`); `apply(params, ids, adapter_ids=...)` and `attend(params, query,
adapter_ids=...)` give example `i` adapter `adapter_ids[i]` (-1: the base table alone). Timed,
in one run on the default JAX device, with a `(--vocab, --dim)` float32 table, rank `--rank`
adapters (B random, so that nothing folds away) and a `(--batch, --seq)` int32 batch, each
function jitted:

1. apply: the lookup of the batch;
2. attend: tied logits of `(--batch, --queries, dim)` query vectors against all V rows;
3. gradient: `jax.value_and_grad` of `mean((apply(...) - target)**2)` w.r.t. the adapters
   (the trainable half of `jaxembed.lora.split_trainable`), no optimizer;
4. attend, decode: attend on `(--decode-batch, 1, dim)` queries (one new token for each of
   many sequences, as in serving), adapter ids 0..n-1 and -1..n-1 over the batch;

each for: one ordinary adapter (`enable_lora` without `num_adapters`) on the `(batch, seq)`
ids (or `(batch, queries, dim)` query), the same adapter on the ids (query) flattened to one
batch axis (the same numbers; see below), and `--num-adapters` stacked adapters with
`adapter_ids` = 0..n-1 (every adapter used) and = -1, 0..n-2 (the base table mixed in).
The stacked adapters are `lora.stack_adapters` of n adapters, the first of them the ordinary
one: before timing, the examples that use adapter 0 (and -1) are checked to match the ordinary
adapter (and the base table), and the two one-adapter gradients to agree.

Target (the issue's): a batch mixing the stacked adapters costs at most 3x a batch with one
ordinary adapter, checked on each function against the faster of the two one-adapter
variants (the stricter baseline), ratios of medians. Then the compiled temp bytes
(`jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`) of each function
at n = 1, 4, 16 stacked adapters: target, they do not grow with n. (They grow with the batch
instead: the stacked attend gathers each example's whole A, `examples * vocab * rank` floats,
which the decode-shaped section, many examples of one query each, shows.)

Why the flattened baseline: on XLA:CPU (jax 0.10.2) the gradient of B through the ordinary
adapter's `einsum("...r,rd->...d")` with two batch axes compiles to a transposed dot that is
many times slower than the same contraction over flattened ids; the second one-adapter row
measures that.

Timing: every function is compiled and called once; then a section's candidates run
round-robin (the first one timed rotates every round), one call + `block_until_ready` per
sample; medians, the ratio of medians (the verdict decides on it) and the paired ratio.

Usage:
    python benchmarks/bench_adapters.py            # V=32768, D=1024: 1-2 min on 2 cores
    python benchmarks/bench_adapters.py --quick    # V=8192, D=256, fewer rounds
    python benchmarks/bench_adapters.py --json adapters.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np

import jaxembed
from jaxembed.lora import combine, split_trainable

TARGET = 3.0  # stacked / one adapter must be <= this
MEMORY_COUNTS = (1, 4, 16)  # numbers of stacked adapters whose compiled temp bytes are shown
QUICK = {
    "vocab": 8192,
    "dim": 256,
    "batch": 16,
    "seq": 32,
    "rounds": 20,
    "attend_rounds": 8,
    "decode_batch": 64,
    "decode_rounds": 5,
}
RECORDED_ARGS = (
    "vocab",
    "dim",
    "rank",
    "num_adapters",
    "batch",
    "seq",
    "queries",
    "rounds",
    "attend_rounds",
    "decode_batch",
    "decode_rounds",
    "quick",
)
FUNCTIONS = ("apply", "attend", "gradient")
DECODE = "attend, decode"
ONE, ONE_FLAT = "one adapter", "one adapter, flat batch"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32768, help="table rows")
    parser.add_argument("--dim", type=int, default=1024, help="table columns")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--num-adapters", type=int, default=16, help="stacked adapters, n")
    parser.add_argument("--batch", type=int, default=16, help="examples per batch")
    parser.add_argument("--seq", type=int, default=128, help="ids per example (apply, gradient)")
    parser.add_argument("--queries", type=int, default=8, help="query vectors per example (attend)")
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds, apply and gradient")
    parser.add_argument("--attend-rounds", type=int, default=15, help="timed rounds, attend")
    parser.add_argument(
        "--decode-batch",
        type=int,
        default=256,
        help="examples of one query each for the decode-shaped attend (0 skips it)",
    )
    parser.add_argument("--decode-rounds", type=int, default=8, help="timed rounds, decode")
    args = common.parse_with_quick(parser, QUICK, argv)
    if args.num_adapters > min(args.batch, args.decode_batch or args.batch):
        parser.error("--num-adapters must be <= --batch and --decode-batch (all are used)")
    return args


# ----------------------------------------------------------------------------- functions


def forward(params, ids, adapter_ids=None):
    return jaxembed.apply(params, ids, out_of_range="clip", adapter_ids=adapter_ids)


def logits(params, query, adapter_ids=None):
    return jaxembed.attend(params, query, adapter_ids=adapter_ids)


def gradient(trainable, frozen, ids, target, adapter_ids=None):
    def loss_fn(trainable):
        out = forward(combine(trainable, frozen), ids, adapter_ids)
        return jnp.mean(jnp.square(out - target.reshape(out.shape)))

    return jax.value_and_grad(loss_fn)(trainable)


def random_adapter(key: jax.Array, vocab: int, dim: int, rank: int) -> dict[str, jax.Array]:
    a_key, b_key = jax.random.split(key)
    adapter = jaxembed.lora.init_lora(a_key, vocab, dim, rank)
    # B starts at zero in LoRA; make it random so that no part of the delta folds away.
    adapter["lora_embeddings_b"] = 0.1 * jax.random.normal(b_key, (rank, dim), jnp.float32)
    return adapter


class Candidate:
    """A jitted function, the arguments it is timed with, and its compiled form."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = jax.jit(fn), args
        self.compiled = self.fn.lower(*args).compile()
        self.temp_bytes = common.memory_bytes(self.compiled, ["temp"])["temp"]
        self.output = jax.block_until_ready(self.compiled(*args))

    def __call__(self) -> Any:
        return self.compiled(*self.args)


def candidates_for(
    params: dict[str, jax.Array], ids: jax.Array, query: jax.Array, target: jax.Array, aids: Any
) -> dict[str, Candidate]:
    """apply, attend and gradient on these params (`aids`: adapter ids, or None)."""
    trainable, frozen = split_trainable(params)
    extra = () if aids is None else (aids,)
    return {
        "apply": Candidate(forward, params, ids, *extra),
        "attend": Candidate(logits, params, query, *extra),
        "gradient": Candidate(gradient, trainable, frozen, ids, target, *extra),
    }


def decode_candidates(args, one, stacked, key) -> dict[str, Candidate]:
    """attend on `(decode_batch, 1, dim)` queries (one new token per sequence, as in
    decoding): the stacked path gathers each example's whole A, `(vocab, rank)`."""
    n, batch = args.num_adapters, args.decode_batch
    query = jax.random.normal(key, (batch, 1, args.dim), jnp.float32)
    every = jnp.arange(batch, dtype=jnp.int32) % n
    with_base = jnp.arange(batch, dtype=jnp.int32) % (n + 1) - 1
    return {
        ONE: Candidate(logits, one, query),
        ONE_FLAT: Candidate(logits, one, query.reshape(batch, args.dim)),
        f"{n} adapters, ids 0..{n - 1}": Candidate(logits, stacked, query, every),
        f"{n} adapters, ids -1..{n - 1}": Candidate(logits, stacked, query, with_base),
    }


def set_up(args: argparse.Namespace) -> tuple[dict, dict, list[str]]:
    """{function: {candidate: Candidate}}, {n: {function: temp bytes}}, agreement lines."""
    keys = jax.random.split(jax.random.key(0), 5 + args.num_adapters)
    base = jaxembed.init(keys[0], args.vocab, args.dim)
    ids = jax.random.randint(keys[1], (args.batch, args.seq), 0, args.vocab, jnp.int32)
    query = jax.random.normal(keys[2], (args.batch, args.queries, args.dim), jnp.float32)
    target = jax.random.normal(keys[3], (args.batch, args.seq, args.dim), jnp.float32)
    adapters = [random_adapter(k, args.vocab, args.dim, args.rank) for k in keys[5:]]
    one = {**base, **adapters[0]}
    stacked = {**base, **jaxembed.lora.stack_adapters(adapters)}
    n = args.num_adapters
    every = jnp.arange(args.batch, dtype=jnp.int32) % n  # 0..n-1 (then again)
    with_base = (jnp.arange(args.batch, dtype=jnp.int32) % n) - 1  # -1, 0..n-2 (then again)

    by_variant = {
        ONE: candidates_for(one, ids, query, target, None),
        ONE_FLAT: candidates_for(
            one, ids.reshape(-1), query.reshape(-1, args.dim), target.reshape(-1, args.dim), None
        ),
        f"{n} adapters, ids 0..{n - 1}": candidates_for(stacked, ids, query, target, every),
        f"{n} adapters, ids -1..{n - 2}": candidates_for(stacked, ids, query, target, with_base),
    }
    agreement = check_agreement(by_variant, base, ids, query, every, with_base, args)
    sections = {
        function: {variant: cands[function] for variant, cands in by_variant.items()}
        for function in FUNCTIONS
    }
    if args.decode_batch:
        sections[DECODE] = decode_candidates(args, one, stacked, keys[2])

    temp: dict[str, dict[str, int]] = {
        "one": {f: c.temp_bytes for f, c in by_variant[ONE].items()},
        "one, flat": {f: c.temp_bytes for f, c in by_variant[ONE_FLAT].items()},
    }
    for count in MEMORY_COUNTS:
        params = jaxembed.enable_lora(base, keys[4], args.rank, num_adapters=count)
        params["lora_embeddings_b"] = jnp.ones_like(params["lora_embeddings_b"])
        aids = jnp.arange(args.batch, dtype=jnp.int32) % (count + 1) - 1
        trainable, frozen = split_trainable(params)
        functions: dict[str, tuple[Callable[..., Any], tuple]] = {
            "apply": (forward, (params, ids, aids)),
            "attend": (logits, (params, query, aids)),
            "gradient": (gradient, (trainable, frozen, ids, target, aids)),
        }
        temp[f"n={count}"] = {
            name: common.memory_bytes(jax.jit(fn).lower(*fargs).compile(), ["temp"])["temp"]
            for name, (fn, fargs) in functions.items()
        }
    return sections, temp, agreement


def check_agreement(by_variant, base, ids, query, every, with_base, args) -> list[str]:
    """Examples using stacked adapter 0 match the ordinary adapter, those using -1 the base
    table; the flat and the batched one-adapter gradients agree. Raises if not."""
    n = args.num_adapters
    one = by_variant[ONE]
    plain_apply = jaxembed.apply(base, ids, out_of_range="clip")
    plain_attend = jaxembed.attend(base, query)
    worst = {}
    for name, aids in (
        (f"{n} adapters, ids 0..{n - 1}", every),
        (f"{n} adapters, ids -1..{n - 2}", with_base),
    ):
        cands = by_variant[name]
        for function, reference, plain in (
            ("apply", one["apply"].output, plain_apply),
            ("attend", one["attend"].output, plain_attend),
        ):
            out = cands[function].output
            uses0, uses_base = np.asarray(aids == 0), np.asarray(aids == -1)
            diffs = [float(jnp.max(jnp.abs(out[uses0] - reference[uses0])))]
            if uses_base.any():
                diffs.append(float(jnp.max(jnp.abs(out[uses_base] - plain[uses_base]))))
            worst[f"{name} {function}"] = max(diffs)
    (loss, grads), (flat_loss, flat_grads) = (
        one["gradient"].output,
        by_variant[ONE_FLAT]["gradient"].output,
    )
    grad_diff = max(
        float(jnp.max(jnp.abs(g - f)) / jnp.max(jnp.abs(f)))
        for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(flat_grads), strict=True)
    )
    tolerance = 1e-3
    if max(worst.values()) > tolerance or grad_diff > 1e-4 or abs(loss - flat_loss) > 1e-5:
        raise AssertionError(f"disagreement: {worst}, gradient rel diff {grad_diff}")
    return [
        f"stacked adapter 0 (and -1) match the ordinary adapter (and the base table): max |diff| "
        f"{max(worst.values()):.1e}",
        f"one-adapter gradients, batched and flat ids, agree: max rel diff {grad_diff:.1e}",
    ]


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    wall = time.perf_counter()
    meta = common.start_run(args, RECORDED_ARGS)
    print(
        f"table ({args.vocab}, {args.dim}) float32, rank {args.rank}, {args.num_adapters} "
        f"stacked adapters; apply and gradient on ({args.batch}, {args.seq}) int32 ids, attend "
        f"on ({args.batch}, {args.queries}, {args.dim}) queries, decode-shaped attend on "
        f"({args.decode_batch}, 1, {args.dim}); median per call in ms"
        + ("; --quick" if args.quick else "")
    )
    sections, temp, agreement = set_up(args)
    print(f"set up and compiled in {time.perf_counter() - wall:.1f} s; " + "; ".join(agreement))

    samples = {}
    for function, cands in sections.items():
        rounds = {"attend": args.attend_rounds, DECODE: args.decode_rounds}.get(
            function, args.rounds
        )
        start = time.perf_counter()
        samples[function], _ = common.time_round_robin(cands, rounds)
        print(f"{function}: {rounds} rounds in {time.perf_counter() - start:.0f} s")

    rows, checks, ratio_of = [], [], {}
    for function, by_variant in samples.items():
        one, flat = by_variant[ONE], by_variant[ONE_FLAT]
        baseline_name = ONE if common.ratio_of_medians(one, flat) <= 1 else ONE_FLAT
        baseline = by_variant[baseline_name]
        for variant, times in by_variant.items():
            s = common.quartile_summary(times, "ms")
            ratio = common.ratios(times, one)
            strict = common.ratios(times, baseline)
            ratio_of[f"{function}: {variant} / {ONE}"] = ratio
            ratio_of[f"{function}: {variant} / {baseline_name}"] = strict
            rows.append(
                [
                    f"{function}: {variant}",
                    f"{s['median_ms']:.2f}",
                    f"{s['p25_ms']:.2f}-{s['p75_ms']:.2f}",
                    f"{s['min_ms']:.2f}",
                    common.format_ratio(ratio),
                    common.format_ratio(strict),
                    common.mib(sections[function][variant].temp_bytes),
                ]
            )
            if variant not in (ONE, ONE_FLAT):
                checks.append(
                    (
                        strict["of_medians"] <= TARGET,
                        f"{function}, {variant} / {baseline_name} <= {TARGET:g}x: "
                        f"{common.format_ratio(strict)} (/ {ONE}: {common.format_ratio(ratio)})",
                    )
                )
    columns = [
        ("function: candidate", "<42"),
        ("median ms", ">10"),
        ("p25-p75 ms", ">16"),
        ("min ms", ">9"),
        ("/ one adapter", ">24"),
        ("/ faster one-adapter", ">24"),
        ("temp", ">12"),
    ]
    print("\n" + common.format_table(columns, rows))

    print("\ncompiled temp bytes (memory_analysis) by number of stacked adapters")
    mem_rows = [
        [name, *(f"{by_fn[f]} ({common.mib(by_fn[f])})" for f in FUNCTIONS)]
        for name, by_fn in temp.items()
    ]
    print(common.format_table([("adapters", "<10"), *((f, ">26") for f in FUNCTIONS)], mem_rows))
    for function in FUNCTIONS:
        counts = [temp[f"n={c}"][function] for c in MEMORY_COUNTS]
        checks.append(
            (
                # attend's one-hot spread is examples x positions x n x rank floats: tiny
                # beside the logits, so "flat" allows 1% + 64 KiB.
                max(counts) <= 1.01 * counts[0] + 64 * 1024,
                f"{function} temp flat in n, within 1% (n={', '.join(map(str, MEMORY_COUNTS))}): "
                + ", ".join(common.mib(c) for c in counts),
            )
        )
    lines = common.verdict_lines(checks)
    if args.quick:
        lines.append("(--quick sizes: the target is stated for V=32768, D=1024)")
    print("\n" + "\n".join(lines))
    common.finish_run(meta, wall)
    if args.json:
        common.write_json(
            args.json,
            {
                "meta": meta,
                "agreement": agreement,
                "results": {
                    function: {
                        variant: {
                            **common.quartile_summary(times, "ms"),
                            "temp_bytes": sections[function][variant].temp_bytes,
                        }
                        for variant, times in by_variant.items()
                    }
                    for function, by_variant in samples.items()
                },
                "ratios": ratio_of,
                "temp_bytes": temp,
                "verdict": lines,
                "samples_ms": common.scaled_samples(samples, "ms"),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
