"""torch's `padding_idx` in jaxembed: what the padding row costs the lookup and its gradient.

`jaxembed.apply(params, ids, padding_idx=p)` reads row p as stored and cuts its gradient (a
select on the rows' cotangent); the forward compiles to the same program as without it.
Timed: the jitted lookup and `jax.grad` of a sum of squares of it, with and without
`padding_idx`, a quarter of the ids being the padding id (padded batches), round-robin,
medians and paired ratios. Target: no measurable cost (within 10%, the noise of this machine).

Run: python benchmarks/bench_padding.py [--vocab 32768 --dim 1024 --num-ids 4096]
"""

from __future__ import annotations

import argparse
import functools
import time

import common
import jax
import jax.numpy as jnp

import jaxembed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32768, help="table rows")
    parser.add_argument("--dim", type=int, default=1024, help="table columns")
    parser.add_argument("--num-ids", type=int, default=4096, help="ids per call")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = common.run_metadata(common.LIBRARIES)
    print("\n".join(common.header_lines(meta, common.LIBRARIES, load=common.load_average())))
    params = jaxembed.init(jax.random.key(0), args.vocab, args.dim)
    ids = jax.random.randint(jax.random.key(1), (args.num_ids,), 1, args.vocab)
    ids = ids.at[::4].set(0)  # a quarter of the batch is padding

    def lookup(padding_idx):
        return jax.jit(functools.partial(jaxembed.apply, padding_idx=padding_idx))

    def gradient(padding_idx):
        def loss(params, ids):
            return jnp.sum(jaxembed.apply(params, ids, padding_idx=padding_idx) ** 2)

        return jax.jit(jax.grad(loss))

    calls = {}
    for name, make in (("lookup", lookup), ("gradient", gradient)):
        for padding_idx in (None, 0):
            fn = make(padding_idx)
            jax.block_until_ready(fn(params, ids))
            calls[(name, padding_idx)] = functools.partial(fn, params, ids)
    start = time.perf_counter()
    samples, _ = common.time_round_robin(calls, args.rounds)
    print(
        f"table ({args.vocab}, {args.dim}) float32, {args.num_ids} ids, a quarter of them the "
        f"padding id; {args.rounds} rounds in {time.perf_counter() - start:.0f} s\n"
    )
    rows, checks = [], []
    for name in ("lookup", "gradient"):
        base, padded = samples[(name, None)], samples[(name, 0)]
        ratio = common.ratios(padded, base)
        for label, times in (("without padding_idx", base), ("padding_idx=0", padded)):
            summary = common.quartile_summary(times, "ms")
            rows.append(
                (f"{name}, {label}", f"{summary['median_ms']:.2f}", f"{summary['min_ms']:.2f}")
            )
        rows.append((f"{name}: padded / plain", common.format_ratio(ratio), ""))
        checks.append(
            (ratio["paired"] <= 1.1, f"{name} with padding_idx: {common.format_ratio(ratio)}")
        )
    columns = [("call", "<32"), ("median ms", ">22"), ("min ms", ">8")]
    print(common.format_table(columns, rows))
    print()
    print("\n".join(common.verdict_lines(checks)))


if __name__ == "__main__":
    main()
