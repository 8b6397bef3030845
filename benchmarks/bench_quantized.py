"""Benchmark: jaxembed's quantized tables against keras.layers.Embedding quantized the same way.

Measures, in one run on the default JAX device, a `(--vocab, --dim)` table (default
262144 x 1024: 1 GiB in float32) stored four ways: float32, int8 (a scale per row), int4 (a
scale per row) and int4 grouped (a scale and an int8 zero point per block of `--block-size`
columns, default 128). jaxembed's quantized tables come from `jaxembed.quantize(params, mode,
block_size=...)` (jitted); Keras's from `keras.layers.Embedding(vocab, dim)` on the JAX
backend, its table set to the same float32 values, then `layer.quantize("int8")` or
`layer.quantize("int4", config=Int4QuantizationConfig(block_size=None | 128))`. The stored
integers, scales and zero points of both are compared (jaxembed rounds as Keras 3.15 does).

1. parameter bytes: every array of the table (values + scales (+ zero points)), over the
   float32 table's bytes. Keras's grouped layer also holds `g_idx`, a float32 `(dim,)`
   column-to-group map, counted in its bytes.
2. lookup: `--num-ids` int32 ids in range, `jaxembed.apply(params, ids, out_of_range="fill")`
   (what the default "error" compiles to under `jax.jit`; `jnp.take`'s mode, which Keras uses)
   against `layer.stateless_call(trainable, non_trainable, ids)`, each under `jax.jit`.
3. QLoRA train step: a rank `--rank` adapter (A `(vocab, rank)` from he_uniform, B random and
   nonzero, the same A and B for every table and both libraries), loss `mean((out - target)**2)`
   against a fixed random target, forward + backward + `optax.adam(1e-3)` on A and B only, one
   jitted function each. jaxembed differentiates the trainable half of
   `jaxembed.lora.split_trainable(params)` (A and B: a quantized table is always frozen),
   looking up with out_of_range="clip"; Keras differentiates `stateless_call` w.r.t. its
   trainable variables (A and B) after `layer.enable_lora(rank)` on the quantized layer.
   The float32 table with a LoRA adapter is timed too, for reference (there Keras builds
   `E + A @ B` over the whole vocabulary on every call, 2 GiB of temp at the default size;
   jaxembed gathers rows of A). Keras's float32 step is timed by itself after the others
   (`--keras-float-step-repeats`): XLA:CPU returns a call's GiB-sized temp buffers to the OS
   after the call has returned, and in the round-robin the step timed after it paid for that
   (Keras's int8 step measured 40-60 ms or 170-250 ms, bimodally, in a first version).
4. attend: a `(--queries, dim)` float32 query against every quantized table,
   `jaxembed.attend(q_params, query)` (dequantizes one chunk of rows at a time) against the
   naive `query @ jaxembed.dequantize(q_params)["embeddings"].T`, both jitted, and
   `jaxembed.attend` on the float32 table for reference. Keras's Embedding has no attend.
   Each attend call follows a 0.3 s pause (untimed), for the same reason: the naive attend
   frees 1 GiB of temp.

Every function is compiled ahead of time (`jax.jit(f).lower(*args).compile()`, whose
`memory_analysis().temp_size_in_bytes` is reported as "temp") and called twice; then the
outputs are checked (jaxembed against Keras: lookups, loss and the new A and B of one step,
within `--tolerance` wherever the two libraries stored the same integers, else the differences
are only reported; jaxembed.attend against the naive attend), and the candidates of a section
are timed round-robin with `common.time_round_robin` (one call + `block_until_ready` per
sample, the first one called rotating every round). Reported: median ms per call, quartiles,
minimum, minor page faults per call, and ratios as the ratio of medians with the paired ratio
(median over rounds of the per-round ratio, which cancels slow drift) beside it; the verdicts
decide on the paired ratio.

Targets: int4 parameter bytes (values + scales, + zero points when grouped) <= 0.14x float32;
int8 <= 0.26x; jaxembed's int8 and int4 lookups (both int4 formats) <= 1.3x jaxembed's float32
lookup; jaxembed.attend on a quantized table with compiled temp below one float32 copy of the
table where the naive attend materializes one. Keras's figures are reported beside jaxembed's,
not judged.

Memory: the float32 table is held by jaxembed and by Keras's float32 layer (1 GiB each at the
default size); Keras's `quantize` converts its float table to NumPy and rounds it there (a few
GiB while it runs); the naive attend and Keras's float32 LoRA step each need over 1 GiB of
temp. The default run peaked at 6.3 GiB resident.

Usage:
    python benchmarks/bench_quantized.py                 # defaults: V=262144, D=1024, 4096 ids
    python benchmarks/bench_quantized.py --json quantized.json
    python benchmarks/bench_quantized.py --quick         # smoke run, small sizes
"""

from __future__ import annotations

import argparse
import gc
import os
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
from keras.src.quantizers.quantization_config import Int4QuantizationConfig

import jaxembed
from jaxembed.lora import combine, split_trainable

FLOAT = "float32"
BYTES_TARGETS = {"int8": 0.26, "int4": 0.14}  # params bytes / float32 bytes, by mode
LOOKUP_TARGET = 1.3  # jaxembed quantized lookup <= this x jaxembed float32 lookup
LEARNING_RATE = 1e-3
SETTLE_S = 0.5  # pause before each timed section
ATTEND_SETTLE_S = 0.3  # pause before each attend call: the naive one frees 1 GiB of temp
MEMORY_FIELDS = ("temp", "argument", "output")
# The command-line values the JSON's metadata records, in this order.
RECORDED_ARGS = (
    "vocab",
    "dim",
    "num_ids",
    "block_size",
    "rank",
    "queries",
    "lookup_repeats",
    "step_repeats",
    "keras_float_step_repeats",
    "attend_repeats",
    "quick",
)


@dataclass
class Candidate:
    """A compiled function and the arguments it is timed with."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    compiled: Any = field(default=None, repr=False)
    memory: dict[str, int] = field(default_factory=dict)

    def compile(self) -> None:
        """AOT-compiles (for memory_analysis), then calls it twice (compile, settle)."""
        self.compiled = jax.jit(self.fn).lower(*self.args).compile()
        self.memory = common.memory_bytes(self.compiled, MEMORY_FIELDS)
        for _ in range(2):
            jax.block_until_ready(self())

    def __call__(self) -> Any:
        return self.compiled(*self.args)


def formats(block_size: int) -> dict[str, tuple[str, int | None] | None]:
    """{label: (mode, block_size)}, None for the float32 table."""
    return {
        FLOAT: None,
        "int8": ("int8", None),
        "int4": ("int4", None),
        f"int4/{block_size}": ("int4", block_size),
    }


def table_bytes(arrays: list[Any]) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def mse(out: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(out - target))


def max_abs_diff(x: Any, y: Any) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))


# ----------------------------------------------------------------------------- tables


@dataclass
class Tables:
    """The tables of every format, both libraries', and what building them took."""

    params: dict[str, dict[str, jax.Array]]
    """jaxembed's params per format label."""
    layers: dict[str, keras.layers.Embedding]
    """Keras's layer per format label (quantized with `layer.quantize`)."""
    quantize_s: dict[str, dict[str, float]] = field(default_factory=dict)
    differ: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per quantized format, {params key: elements that differ from Keras's variable} (all 0:
    bit-identical)."""
    keras_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes of every variable of Keras's layer, per format (before LoRA is enabled)."""


def keras_layer(table: jax.Array, fmt: tuple[str, int | None] | None) -> keras.layers.Embedding:
    """keras.layers.Embedding holding `table`, quantized in `fmt` (None: float32)."""
    vocab, dim = table.shape
    # "zeros": no time spent drawing a table that is overwritten below.
    layer = keras.layers.Embedding(vocab, dim, embeddings_initializer="zeros")
    layer.build((None,))
    (variable,) = layer.variables
    variable.assign(table)
    if fmt is not None:
        mode, block = fmt
        config = None if mode == "int8" else Int4QuantizationConfig(block_size=block)
        layer.quantize(mode, config=config)
    return layer


def keras_arrays(layer: keras.layers.Embedding) -> dict[str, Any]:
    """{variable name: value} of a Keras layer."""
    return {v.name: v.value for v in layer.variables}


def storage_differences(params: dict[str, jax.Array], layer: keras.layers.Embedding) -> dict:
    """{params key: how many elements differ from Keras's array} (values, scales, zeros)."""
    theirs = keras_arrays(layer)
    counts = {}
    for key, ours in params.items():
        other = np.asarray(theirs["embeddings" if key.startswith("embeddings_int") else key])
        ours = np.asarray(ours)
        same_type = other.dtype == ours.dtype and other.shape == ours.shape
        counts[key] = int(np.count_nonzero(ours != other)) if same_type else ours.size
    return counts


def make_tables(args: argparse.Namespace) -> Tables:
    """jaxembed's float32 table (Keras's initializer, uniform +-0.05) and its quantized
    copies; Keras's layers of the same table, quantized by Keras."""
    float_params = jaxembed.init(jax.random.key(args.seed), args.vocab, args.dim)
    jax.block_until_ready(float_params)  # not charged to the first quantize timed below
    tables = Tables(params={FLOAT: float_params}, layers={})
    for label, fmt in formats(args.block_size).items():
        times = {}
        if fmt is not None:
            mode, block = fmt
            quantize = jax.jit(
                lambda p, mode=mode, block=block: jaxembed.quantize(p, mode, block_size=block)
            )
            compiled = quantize.lower(float_params).compile()
            start = time.perf_counter()
            tables.params[label] = jax.block_until_ready(compiled(float_params))
            times["jaxembed"] = time.perf_counter() - start
        start = time.perf_counter()
        tables.layers[label] = keras_layer(float_params["embeddings"], fmt)
        times["keras"] = time.perf_counter() - start
        if fmt is not None:
            tables.differ[label] = storage_differences(tables.params[label], tables.layers[label])
        tables.keras_bytes[label] = table_bytes(list(keras_arrays(tables.layers[label]).values()))
        tables.quantize_s[label] = times
        gc.collect()
    return tables


# ----------------------------------------------------------------------------- sections


def lookup_candidates(tables: Tables, ids: jax.Array) -> dict[str, Candidate]:
    def ours(params, ids):
        return jaxembed.apply(params, ids, out_of_range="fill")

    candidates = {}
    for label, params in tables.params.items():
        candidates[f"jaxembed {label}"] = Candidate(f"jaxembed {label}", ours, (params, ids))
    for label, layer in tables.layers.items():
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def theirs(trainable, non_trainable, ids, layer=layer):
            out, _ = layer.stateless_call(trainable, non_trainable, ids)
            return out

        name = f"keras {label}"
        candidates[name] = Candidate(name, theirs, (trainable, non_trainable, ids))
    return candidates


def check_lookups(candidates: dict[str, Candidate], labels: list[str], tol: dict) -> dict:
    """jaxembed's rows equal Keras's per format (within `tol[label]`); the quantization error
    against float32."""
    reference = np.asarray(candidates[f"jaxembed {FLOAT}"]())
    agreement = {}
    for label in labels:
        ours = np.asarray(candidates[f"jaxembed {label}"]())
        theirs = np.asarray(candidates[f"keras {label}"]())
        diff = max_abs_diff(ours, theirs)
        if not diff <= tol[label]:
            raise SystemExit(f"lookup {label}: jaxembed and Keras differ by {diff:.3g}")
        agreement[label] = {"vs_keras": diff, "vs_float32": max_abs_diff(ours, reference)}
    return agreement


def lora_adapter(args: argparse.Namespace) -> dict[str, jax.Array]:
    """A from Keras's he_uniform; B random (LoRA starts it at zero: nothing would fold away)."""
    a_key, b_key = jax.random.split(jax.random.key(args.seed + 1))
    adapter = jaxembed.lora.init_lora(a_key, args.vocab, args.dim, args.rank)
    adapter["lora_embeddings_b"] = 0.1 * jax.random.normal(b_key, (args.rank, args.dim))
    return adapter


def step_candidates(
    tables: Tables,
    adapter: dict[str, jax.Array],
    ids: jax.Array,
    target: jax.Array,
    tx: optax.GradientTransformation,
) -> dict[str, Candidate]:
    """jaxembed's and Keras's train steps on A and B, per table; enables LoRA on Keras's
    layers (their lookups are not timed again after this)."""

    def ours(trainable, opt_state, frozen, ids, target):
        def loss_fn(trainable):
            out = jaxembed.apply(combine(trainable, frozen), ids, out_of_range="clip")
            return mse(out, target)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    candidates = {}
    for label, params in tables.params.items():
        trainable, frozen = split_trainable({**params, **adapter})
        assert sorted(k for k, v in trainable.items() if v is not None) == sorted(adapter)
        args = (trainable, tx.init(trainable), frozen, ids, target)
        candidates[f"jaxembed {label}"] = Candidate(f"jaxembed {label}", ours, args)
    for label, layer in tables.layers.items():
        layer.enable_lora(len(adapter["lora_embeddings_b"]))
        layer.lora_embeddings_a.assign(adapter["lora_embeddings_a"])
        layer.lora_embeddings_b.assign(adapter["lora_embeddings_b"])
        names = [v.name for v in layer.trainable_variables]
        assert names == ["lora_embeddings_a", "lora_embeddings_b"], names
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def theirs(trainable, opt_state, non_trainable, ids, target, layer=layer):
            def loss_fn(trainable):
                out, _ = layer.stateless_call(trainable, non_trainable, ids)
                return mse(out, target)

            loss, grads = jax.value_and_grad(loss_fn)(trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss

        args = (trainable, tx.init(trainable), non_trainable, ids, target)
        candidates[f"keras {label}"] = Candidate(f"keras {label}", theirs, args)
    return candidates


def check_steps(candidates: dict[str, Candidate], labels: list[str], tol: dict) -> dict:
    """One step from the same A and B: the same loss and new A and B in both libraries
    (within `tol[label]`, relative to the loss where it exceeds 1)."""
    agreement = {}
    for label in labels:
        new_ours, _, loss_ours = candidates[f"jaxembed {label}"]()
        new_theirs, _, loss_theirs = candidates[f"keras {label}"]()
        diffs = {"loss": max_abs_diff(loss_ours, loss_theirs)}
        for i, key in enumerate(("lora_embeddings_a", "lora_embeddings_b")):
            before = candidates[f"jaxembed {label}"].args[0][key]
            assert max_abs_diff(new_ours[key], before) > 0, f"{label}: {key} did not move"
            diffs[key] = max_abs_diff(new_ours[key], new_theirs[i])
        if not max(diffs.values()) <= tol[label] * max(1.0, float(loss_ours)):
            raise SystemExit(f"train step {label}: jaxembed and Keras differ: {diffs}")
        agreement[label] = {**diffs, "loss_jaxembed": float(loss_ours)}
    return agreement


def attend_candidates(tables: Tables, query: jax.Array) -> dict[str, Candidate]:
    def ours(params, query):
        return jaxembed.attend(params, query)

    def naive(params, query):
        return query @ jaxembed.dequantize(params)["embeddings"].T

    candidates = {}
    for label, params in tables.params.items():
        candidates[f"jaxembed {label}"] = Candidate(f"jaxembed {label}", ours, (params, query))
        if label != FLOAT:
            candidates[f"naive {label}"] = Candidate(f"naive {label}", naive, (params, query))
    return candidates


def check_attends(candidates: dict[str, Candidate], labels: list[str], tol: float) -> dict:
    """jaxembed.attend against the naive attend, relative to the largest logit."""
    agreement = {}
    for label in labels:
        ours, theirs = candidates[f"jaxembed {label}"](), candidates[f"naive {label}"]()
        diff = max_abs_diff(ours, theirs)
        relative = diff / max(float(jnp.max(jnp.abs(theirs))), 1e-30)
        if not relative <= tol:
            raise SystemExit(f"attend {label}: jaxembed and naive differ by {relative:.3g}")
        agreement[label] = {"max_abs_diff": diff, "relative": relative}
    return agreement


# ----------------------------------------------------------------------------- measure


def run_section(
    title: str,
    candidates: dict[str, Candidate],
    check: Callable[[dict[str, Candidate]], dict],
    rounds: int,
    wall: float,
    *,
    settle_s: float = 0.0,
    alone: tuple[str, ...] = (),
    alone_rounds: int = 0,
) -> dict[str, Any]:
    """Compiles, checks and times one section: the candidates round-robin (`settle_s` before
    each call), except those named in `alone`, each timed by itself afterwards."""
    start = time.perf_counter()
    for candidate in candidates.values():
        candidate.compile()
    compile_s = time.perf_counter() - start
    agreement = check(candidates)
    time.sleep(SETTLE_S)
    together = {name: c for name, c in candidates.items() if name not in alone}
    samples, faults = common.time_round_robin(together, rounds, settle_s=settle_s)
    for name in alone:
        time.sleep(SETTLE_S)
        by_itself = common.time_round_robin({name: candidates[name]}, alone_rounds)
        samples[name], faults[name] = by_itself[0][name], by_itself[1][name]
    print(
        f"  {title}: compiled in {compile_s:.1f} s, timed {rounds} rounds, done at "
        f"{time.perf_counter() - wall:.0f} s",
        flush=True,
    )
    return {
        "compile_s": compile_s,
        "agreement": agreement,
        "memory_bytes": {name: c.memory for name, c in candidates.items()},
        "samples_s": {name: samples[name] for name in candidates},
        "faults": faults,
        "alone": list(alone),
        "settle_s": settle_s,
    }


# ----------------------------------------------------------------------------- report


def bytes_report(tables: Tables, args: argparse.Namespace) -> tuple[str, list, dict]:
    float_bytes = args.vocab * args.dim * 4
    rows, checks, figures = [], [], {}
    for label in tables.params:
        kind = jaxembed.quantization.is_quantized(tables.params[label])
        ours = table_bytes(list(tables.params[label].values()))
        theirs = tables.keras_bytes[label]
        figures[label] = {"jaxembed": ours, "keras": theirs}
        differ = sum(tables.differ[label].values()) if kind else 0
        identical = ("yes" if not differ else f"NO ({differ})") if kind else ""
        rows.append(
            [
                label,
                " + ".join(f"{v.dtype}{list(v.shape)}" for v in tables.params[label].values()),
                mib(ours),
                f"{ours / float_bytes:.4f}",
                mib(theirs),
                f"{theirs / float_bytes:.4f}",
                identical,
            ]
        )
        mode = label.split("/")[0]
        if mode in BYTES_TARGETS:
            target = BYTES_TARGETS[mode]
            checks.append(
                (
                    ours <= target * float_bytes,
                    f"{label} parameter bytes <= {target}x float32: {mib(ours)} / "
                    f"{mib(float_bytes)} MiB = {ours / float_bytes:.4f}x",
                )
            )
    columns = [
        ("format", "<9"),
        ("jaxembed arrays", "<56"),
        ("MiB", ">7"),
        ("x f32", ">7"),
        ("keras MiB", ">9"),
        ("x f32", ">7"),
        ("same ints", ">10"),
    ]
    return common.format_table(columns, rows), checks, figures


def timing_rows(section: dict, baseline: str, peer: Callable[[str], str]) -> list:
    """Rows per candidate: median, quartiles, minimum, ratio to the baseline and to its
    peer (each of medians, then paired), compiled temp, faults per call."""
    samples, faults, memory = section["samples_s"], section["faults"], section["memory_bytes"]
    rows = []
    for name, times in samples.items():
        s = common.quartile_summary(times, "ms")
        row = [name, f"{s['median_ms']:.2f}", f"{s['p25_ms']:.2f}-{s['p75_ms']:.2f}"]
        row.append(f"{s['min_ms']:.2f}")
        for other in (baseline, peer(name)):
            if other not in samples or other == name:
                row += ["", ""]
            elif name in section["alone"] or other in section["alone"]:  # not the same rounds
                row += [f"{common.ratio_of_medians(times, samples[other]):.2f}x", "-"]
            else:
                r = common.ratios(times, samples[other])
                row += [f"{r['of_medians']:.2f}x", f"{r['paired']:.2f}x"]
        row += [mib(memory[name]["temp"]), f"{statistics.median(faults[name]):.0f}"]
        rows.append(row)
    return rows


TIMING_COLUMNS = [
    ("median ms", ">10"),
    ("p25-p75 ms", ">16"),
    ("min ms", ">9"),
    ("/base", ">7"),
    ("paired", ">7"),
    ("/peer", ">7"),
    ("paired", ">7"),
    ("temp MiB", ">9"),
    ("faults", ">7"),
]


def other_library(name: str) -> str:
    library, label = name.split(" ", 1)
    return f"{'keras' if library == 'jaxembed' else 'jaxembed'} {label}"


def naive_peer(name: str) -> str:
    library, label = name.split(" ", 1)
    return f"{'naive' if library == 'jaxembed' else 'jaxembed'} {label}"


def report(results: dict, tables: Tables, args: argparse.Namespace) -> tuple[list[str], list]:
    labels = list(formats(args.block_size))
    quantized = labels[1:]
    lines, checks = [], []
    table, bytes_checks, results["bytes"] = bytes_report(tables, args)
    lines += ["", f"parameter bytes (float32 table: {mib(args.vocab * args.dim * 4)} MiB)", table]
    checks += bytes_checks

    base = f"jaxembed {FLOAT}"
    for section, title, peer in (
        ("lookup", f"lookup, {args.num_ids} ids", other_library),
        ("step", f"QLoRA train step, rank {args.rank}, adam on A and B", other_library),
        ("attend", f"attend, query ({args.queries}, {args.dim})", naive_peer),
    ):
        r = results[section]
        rounds = len(r["samples_s"][base])
        title = f"{title} (n={rounds})"
        columns = [(title, f"<{max(len(title), 20)}"), *TIMING_COLUMNS]
        rows = timing_rows(r, base, peer)
        lines += ["", common.format_table(columns, rows)]
        for name in r["alone"]:
            n = len(r["samples_s"][name])
            lines.append(f"({name}: timed by itself after the round-robin, n={n}; paired: -)")
        if r["settle_s"]:
            lines.append(f"(a {r['settle_s']:g} s pause, not timed, before every call)")
    lines += [
        "",
        f"/base = median / median of '{base}' in the same section; /peer = jaxembed vs Keras",
        "(lookup, step) or jaxembed vs naive (attend), either way round; paired = median of",
        "per-round ratios; temp = compiled temp_size_in_bytes; faults = minor page faults per",
        "call (median)",
    ]

    lookup = results["lookup"]["samples_s"]
    for label in quantized:
        r = common.ratios(lookup[f"jaxembed {label}"], lookup[base])
        checks.append(
            (
                r["paired"] <= LOOKUP_TARGET,
                f"jaxembed {label} lookup <= {LOOKUP_TARGET}x jaxembed float32: "
                + common.format_ratio(r),
            )
        )
    float_bytes = args.vocab * args.dim * 4
    memory = results["attend"]["memory_bytes"]
    for label in quantized:
        ours, naive = memory[f"jaxembed {label}"]["temp"], memory[f"naive {label}"]["temp"]
        text = (
            f"jaxembed {label} attend temp < one float32 table ({mib(float_bytes)} MiB): "
            f"{mib(ours)} MiB; naive {mib(naive)} MiB"
        )
        if naive >= float_bytes:
            checks.append((ours < float_bytes, text + " (materializes it)"))
        else:
            lines.append(f"(not judged: {text}, which does not materialize the table)")
    return lines, checks


def agreement_lines(results: dict, tables: Tables) -> list[str]:
    lookup, step = results["lookup"]["agreement"], results["step"]["agreement"]
    attend = results["attend"]["agreement"]
    lines = ["stored integers, scales and zero points of jaxembed.quantize vs Keras's quantize:"]
    for label, counts in tables.differ.items():
        sizes = {k: v.size for k, v in tables.params[label].items()}
        text = ", ".join(f"{k} {n} of {sizes[k]}" for k, n in counts.items() if n)
        lines.append(f"  {label}: " + (f"DIFFERENT: {text} elements" if text else "bit-identical"))
    lines.append("lookup max |diff| jaxembed vs Keras (and vs the float32 rows):")
    lines.append(
        "  "
        + ", ".join(
            f"{label} {d['vs_keras']:.1e} ({d['vs_float32']:.1e})" for label, d in lookup.items()
        )
    )
    lines.append("train step max |diff| jaxembed vs Keras, loss / new A / new B:")
    lines.append(
        "  "
        + ", ".join(
            f"{label} {d['loss']:.1e} / {d['lora_embeddings_a']:.1e} / {d['lora_embeddings_b']:.1e}"
            for label, d in step.items()
        )
    )
    lines.append("attend max |diff| jaxembed vs naive (relative to the largest logit):")
    lines.append(
        "  "
        + ", ".join(
            f"{label} {d['max_abs_diff']:.1e} ({d['relative']:.1e})" for label, d in attend.items()
        )
    )
    times = ", ".join(
        f"{label} {t['jaxembed']:.2f} / {t['keras']:.2f}"
        if "jaxembed" in t
        else f"{label} - / {t['keras']:.2f}"
        for label, t in tables.quantize_s.items()
    )
    lines.append(
        f"building the tables, s (jaxembed jitted quantize after compiling / Keras layer + "
        f"quantize): {times}"
    )
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--vocab", type=int, default=262144, help="table rows (input_dim)")
    parser.add_argument("--dim", type=int, default=1024, help="table columns (output_dim)")
    parser.add_argument("--num-ids", type=int, default=4096, help="ids per lookup and step")
    parser.add_argument("--block-size", type=int, default=128, help="grouped int4 block")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the train step")
    parser.add_argument("--queries", type=int, default=64, help="query vectors of attend")
    parser.add_argument("--lookup-repeats", type=int, default=40, help="rounds of lookups")
    parser.add_argument("--step-repeats", type=int, default=20, help="rounds of train steps")
    parser.add_argument(
        "--keras-float-step-repeats",
        type=int,
        default=5,
        help="calls of Keras's float32 LoRA step, timed by itself (it is slow)",
    )
    parser.add_argument("--attend-repeats", type=int, default=8, help="rounds of attends")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="agreement tolerance")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: V=8192, D=256, 512 ids, 3 rounds"
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.dim, args.num_ids = 8192, 256, 512
        args.lookup_repeats = args.step_repeats = args.attend_repeats = 3
        args.keras_float_step_repeats = 3
    if args.dim % args.block_size or args.block_size % 2 or args.dim % 2:
        parser.error("--dim must be even and divisible by --block-size, which must be even")
    repeats = (args.lookup_repeats, args.step_repeats, args.attend_repeats)
    if min(*repeats, args.keras_float_step_repeats) < 2:
        parser.error("the --*-repeats must be at least 2 (for quartiles)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = common.start_run(args, RECORDED_ARGS)
    print(
        f"date {meta['date']}; table ({args.vocab}, {args.dim}), float32 / int8 / int4 / "
        f"int4 block {args.block_size}; {args.num_ids} int32 ids; LoRA rank {args.rank}, "
        f"optax.adam({LEARNING_RATE:g}); attend query ({args.queries}, {args.dim}); "
        "median per call in ms" + ("; --quick" if args.quick else "")
    )
    wall = time.perf_counter()
    tables = make_tables(args)
    print(f"  tables built at {time.perf_counter() - wall:.0f} s", flush=True)
    labels = list(formats(args.block_size))
    quantized = labels[1:]
    tol = args.tolerance
    # Where the stored integers differ from Keras's, jaxembed's and Keras's rows may differ by
    # a quantization step: reported, not refused.
    keras_tol = {
        label: tol if not sum(tables.differ.get(label, {}).values()) else np.inf for label in labels
    }
    ids_key, target_key, query_key = jax.random.split(jax.random.key(args.seed + 2), 3)
    ids = jax.random.randint(ids_key, (args.num_ids,), 0, args.vocab, dtype=jnp.int32)
    target = jax.random.normal(target_key, (args.num_ids, args.dim), jnp.float32)
    query = jax.random.normal(query_key, (args.queries, args.dim), jnp.float32)
    tx = optax.adam(LEARNING_RATE)

    results = {}
    results["lookup"] = run_section(
        "lookup",
        lookup_candidates(tables, ids),
        lambda c: check_lookups(c, labels, keras_tol),
        args.lookup_repeats,
        wall,
    )
    results["step"] = run_section(
        "train step",
        step_candidates(tables, lora_adapter(args), ids, target, tx),
        lambda c: check_steps(c, labels, keras_tol),
        args.step_repeats,
        wall,
        alone=(f"keras {FLOAT}",),
        alone_rounds=args.keras_float_step_repeats,
    )
    tables.layers.clear()  # Keras's layers (1.5 GiB at the default size) are done with
    gc.collect()
    results["attend"] = run_section(
        "attend",
        attend_candidates(tables, query),
        lambda c: check_attends(c, quantized, tol),
        args.attend_repeats,
        wall,
        settle_s=ATTEND_SETTLE_S,
    )

    lines, checks = report(results, tables, args)
    print("\n" + "\n".join(agreement_lines(results, tables)))
    print("\n".join(lines))
    verdict = common.verdict_lines(checks)
    print("\n" + "\n".join(verdict))
    common.finish_run(meta, wall)
    if args.quick:
        print("(--quick: a smoke run; its sizes are too small for the targets to mean much)")
    if args.json:
        for r in results.values():
            if "samples_s" in r:
                r["samples_ms"] = common.scaled_samples({"s": r.pop("samples_s")}, "ms")["s"]
        payload = {"meta": meta, "quantize_s": tables.quantize_s, "differ": tables.differ}
        common.write_json(args.json, {**payload, **results, "verdict": verdict})
    return 0


if __name__ == "__main__":
    sys.exit(main())
