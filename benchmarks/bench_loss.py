"""Benchmark: jaxembed.attend_cross_entropy (fused, chunked) against the materialized logits.

Times, in one run on the default JAX device, forward+backward of the tied-logits softmax
cross-entropy of `--tokens` query vectors against a `(V, --dim)` float32 table, for every V
of `--vocabs`, each side `jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))` (gradients
w.r.t. the params and the query):

    fused         jaxembed.attend_cross_entropy(params, query, labels, chunk_size=...)
    materialized  optax.softmax_cross_entropy_with_integer_labels(
                      jaxembed.attend(params, query), labels).mean()

Before timing, both sides' losses and gradients are compared (max |diff|; the run stops if
one exceeds `--tolerance` relative to the largest value). Then the sides of one V are timed
round-robin (`common.time_round_robin`, `--repeats` rounds). Reported per V: median ms, the
compiled temp bytes (`memory_analysis().temp_size_in_bytes`), and fused/materialized for both
(time: ratio of medians, and the paired ratio the verdict decides on). The materialized side
is not run where its compiled footprint (arguments + outputs + temp) exceeds 90% of the
memory available (its temp is still reported).

Targets: fused temp <= 5% of the materialized temp at V >= 131072; fused time <= 1.5x the
materialized time on CPU, wherever the materialized side fits in memory.

`--chunk-sizes 512 1024 none` times one fused side per chunk size (none = the default,
about 8 MiB of logits per chunk), by default at V=131072 only.

Usage:
    python benchmarks/bench_loss.py --json loss.json        # V = 32768, 131072, 262144
    python benchmarks/bench_loss.py --chunk-sizes 512 1024 2048 4096 none
    python benchmarks/bench_loss.py --quick                 # smoke run, small sizes
"""

from __future__ import annotations

import argparse
import sys
import time

import common
import jax
import numpy as np
import optax

import jaxembed

MATERIALIZED = "materialized"
MEMORY_TARGET = 0.05  # fused temp <= 5% of the materialized temp ...
MEMORY_TARGET_FROM_V = 131072  # ... at V >= this
TIME_TARGET = 1.5  # fused time <= 1.5x materialized (on CPU)
LIBRARIES = ("jax", "jaxlib", "optax", "jaxembed")
MEMORY_FIELDS = ("temp", "argument", "output")


def materialized_loss(params, query, labels):
    logits = jaxembed.attend(params, query)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def fused_loss(chunk_size: int | None):
    return lambda p, q, labels: jaxembed.attend_cross_entropy(p, q, labels, chunk_size=chunk_size)


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo; unreadable: assume it fits."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        return 2**63 - 1


# ----------------------------------------------------------------------------- setup / check


def setup(vocab: int, args: argparse.Namespace):
    """Params, query, labels; and {name: compiled value_and_grad} with its memory bytes."""
    keys = jax.random.split(jax.random.key(args.seed), 3)
    params = jaxembed.init(keys[0], vocab, args.dim)
    query = jax.random.normal(keys[1], (args.tokens, args.dim))
    labels = jax.random.randint(keys[2], (args.tokens,), 0, vocab)
    losses = {f"fused chunk={c or 'default'}": fused_loss(c) for c in args.chunk_sizes}
    losses[MATERIALIZED] = materialized_loss
    compiled, memory = {}, {}
    for name, loss in losses.items():
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        compiled[name] = step.lower(params, query, labels).compile()
        memory[name] = common.memory_bytes(compiled[name], MEMORY_FIELDS)
    return (params, query, labels), compiled, memory


def max_diffs(out, reference) -> dict[str, float]:
    """max |diff| of the loss and of each gradient, also relative to the reference's max |x|."""
    (loss, (d_params, d_query)), (ref_loss, (ref_params, ref_query)) = out, reference
    pairs = {"loss": (loss, ref_loss), "d_query": (d_query, ref_query)}
    pairs["d_table"] = (d_params["embeddings"], ref_params["embeddings"])
    diffs = {}
    for name, (x, y) in pairs.items():
        x, y = np.asarray(x), np.asarray(y)
        diffs[name] = float(np.max(np.abs(x - y)))
        diffs[f"{name}_rel"] = diffs[name] / max(float(np.max(np.abs(y))), 1e-30)
    return diffs


# ----------------------------------------------------------------------------- measure


def measure_vocab(vocab: int, args: argparse.Namespace) -> dict:
    inputs, compiled, memory = setup(vocab, args)
    footprint = sum(memory[MATERIALIZED].values())  # temp + arguments + outputs
    fits = footprint <= 0.9 * available_bytes()
    diffs = {}
    if not fits:
        del compiled[MATERIALIZED]
    else:
        reference = jax.device_get(compiled[MATERIALIZED](*inputs))
        for name, fn in compiled.items():
            if name != MATERIALIZED:
                diffs[name] = max_diffs(jax.device_get(fn(*inputs)), reference)
                bad = {k: v for k, v in diffs[name].items() if k.endswith("_rel")}
                if max(bad.values()) > args.tolerance:
                    raise SystemExit(f"V={vocab} {name} disagrees with {MATERIALIZED}: {bad}")
        del reference
    jax.block_until_ready([fn(*inputs) for fn in compiled.values()])  # warm up
    calls = {name: (lambda fn=fn: fn(*inputs)) for name, fn in compiled.items()}
    time.sleep(0.5)
    samples, faults = common.time_round_robin(calls, args.repeats)
    return {
        "vocab": vocab,
        "materialized_fits": fits,
        "materialized_footprint_bytes": footprint,
        "memory_bytes": memory,
        "max_abs_diff": diffs,
        "timing_ms": {name: common.quartile_summary(t, "ms") for name, t in samples.items()},
        "minor_faults_median": {name: int(np.median(f)) for name, f in faults.items()},
        "samples_s": samples,
    }


# ----------------------------------------------------------------------------- report


def report(results: list[dict], args: argparse.Namespace, platform: str):
    columns = [
        ("V", ">7"),
        ("variant", "<20"),
        ("median ms", ">10"),
        ("p25-p75 ms", ">15"),
        ("f/m time", ">9"),
        ("paired", ">7"),
        ("temp MiB", ">10"),
        ("f/m temp", ">9"),
        ("faults", ">8"),
    ]
    rows, checks, diff_lines = [], [], []
    for r in results:
        vocab, mem, timing = r["vocab"], r["memory_bytes"], r["timing_ms"]
        mat_temp = mem[MATERIALIZED]["temp"]
        for name in mem:
            temp = mem[name]["temp"]
            row = [vocab, name]
            if name in timing:
                t = timing[name]
                row += [f"{t['median_ms']:.1f}", f"{t['p25_ms']:.1f}-{t['p75_ms']:.1f}"]
            else:
                row += ["not run", "does not fit"]
            fused_side = name != MATERIALIZED
            if fused_side and r["materialized_fits"]:
                ratio = common.ratios(r["samples_s"][name], r["samples_s"][MATERIALIZED])
                row += [f"{ratio['of_medians']:.2f}x", f"{ratio['paired']:.2f}x"]
                if platform == "cpu":
                    checks.append(
                        (
                            ratio["paired"] <= TIME_TARGET,
                            f"V={vocab} {name} time <= {TIME_TARGET}x materialized: "
                            + common.format_ratio(ratio),
                        )
                    )
            else:
                row += ["", ""]
            row += [f"{temp / 2**20:.1f}", f"{temp / mat_temp:.3f}" if fused_side else ""]
            row.append(r["minor_faults_median"].get(name, ""))
            rows.append(row)
            if fused_side and vocab >= MEMORY_TARGET_FROM_V:
                checks.append(
                    (
                        temp <= MEMORY_TARGET * mat_temp,
                        f"V={vocab} {name} temp <= {MEMORY_TARGET:.0%} of materialized: "
                        f"{temp / 2**20:.1f} / {mat_temp / 2**20:.1f} MiB = {temp / mat_temp:.2%}",
                    )
                )
        for name, d in r["max_abs_diff"].items():
            diff_lines.append(
                f"V={vocab} {name}: max |diff| loss {d['loss']:.1e}, d_table {d['d_table']:.1e}"
                f" ({d['d_table_rel']:.1e} of max), d_query {d['d_query']:.1e}"
                f" ({d['d_query_rel']:.1e} of max)"
            )
        if not r["materialized_fits"]:
            diff_lines.append(
                f"V={vocab}: materialized not run: footprint "
                f"{r['materialized_footprint_bytes'] / 2**30:.2f} GiB > 90% of available memory"
            )
    if platform != "cpu":
        diff_lines.append(f"time target not checked: it applies on CPU (device is {platform})")
    table = common.format_table(columns, rows)
    return table, diff_lines, common.verdict_lines(checks)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--vocabs", type=int, nargs="+", help="V (default 32768 131072 262144)")
    parser.add_argument("--dim", type=int, default=256, help="D, table columns and query width")
    parser.add_argument("--tokens", type=int, default=2048, help="query vectors (labels)")
    parser.add_argument(
        "--chunk-sizes",
        nargs="+",
        default=["none"],
        help="fused chunk_size values to time (none = the default); "
        "more than one sweeps them, at V=131072 unless --vocabs is given",
    )
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds per V")
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="max |diff| / max |reference|"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, 3 rounds")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.chunk_sizes = [None if c.lower() == "none" else int(c) for c in args.chunk_sizes]
    if args.vocabs is None:
        full = [131072] if len(args.chunk_sizes) > 1 else [32768, 131072, 262144]
        args.vocabs = [8192, 32768] if args.quick else full
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 512), min(args.repeats, 3)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (for quartiles)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = common.run_metadata(
        LIBRARIES,
        vocabs=args.vocabs,
        dim=args.dim,
        tokens=args.tokens,
        chunk_sizes=args.chunk_sizes,
        repeats=args.repeats,
        quick=args.quick,
    )
    print("\n".join(common.header_lines(meta, LIBRARIES, load=common.load_average())))
    print(
        f"date {meta['date']}; forward+backward (value_and_grad w.r.t. params and query), "
        f"{args.tokens} tokens, D={args.dim} float32, V={args.vocabs}; {args.repeats} rounds"
    )
    wall = time.perf_counter()
    results = []
    for vocab in args.vocabs:
        results.append(measure_vocab(vocab, args))
        print(f"  V={vocab} done at {time.perf_counter() - wall:.0f} s", flush=True)
    table, notes, verdict = report(results, args, meta["device_platform"])
    print("\n" + table)
    print("f/m = fused / materialized; paired = median of per-round ratios; faults = minor page")
    print("faults per call (median); temp = compiled temp_size_in_bytes\n")
    print("\n".join([*notes, "", *verdict]))
    print(f"\ntotal {time.perf_counter() - wall:.0f} s, load average {common.load_average()}")
    if args.quick:
        print("(--quick: a smoke run; its sizes are too small for the targets to mean much)")
    if args.json:
        for r in results:
            r["samples_ms"] = common.scaled_samples({"s": r.pop("samples_s")}, "ms")["s"]
        common.write_json(args.json, {"meta": meta, "results": results, "verdict": verdict})
    return 0


if __name__ == "__main__":
    sys.exit(main())
