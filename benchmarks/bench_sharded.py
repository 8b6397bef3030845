"""Benchmark: the compiled sharded train step of jaxembed against flax.linen.Embed.

On `--mesh` (data, model) simulated CPU devices (8 by default, through
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set before JAX starts unless XLA_FLAGS
is already set), with a `(--vocab, --dim)` float32 table sharded by `--layout`:

    vocab: P("model", None)    dim: P(None, "model")    both: P("model", "data")

and `(--batch, --seq)` int32 ids sharded P("data", None), it builds one jitted train step per
variant: loss + gradient + `optax.adam(1e-3)` update, the params and optimizer state donated.
The loss is a tied-embedding language-model cross-entropy: `h = lookup(ids)`, `logits =
attend(h)` (`h @ table.T`), mean over tokens of `logsumexp(logits) - logits[next id]` (the
target logit is picked with an `arange == target` mask: optax's integer-label cross-entropy
uses `take_along_axis`, which Explicit axes refuse on vocab-sharded logits). Variants:

* `jaxembed full`: `jaxembed.apply(..., out_of_range="clip")` + `jaxembed.attend`, the table
  trained.
* `jaxembed LoRA rN`: the same on params with a rank-N adapter (B random, so it counts); only
  A and B are differentiated and optimized (`jaxembed.lora.split_trainable` / `combine`).
* `jaxembed vocab_parallel`: the lookup through `jaxembed.sharding.vocab_parallel_apply`
  (`jax.shard_map`, one psum), attend as above; `jaxembed LoRA rN vocab_parallel` likewise.
  Only for layouts whose rows are split over "model" (vocab, both).
* `flax.linen.Embed`: `__call__` for the lookup (`jnp.take`), `attend` for the logits, the
  same table sharding.

each on an Auto mesh (`jax.jit` given in_shardings/out_shardings) and on an Explicit mesh
(shardings carried by the arrays' types, the step traced under `jax.set_mesh`). A variant
that cannot be traced or compiled (flax's `jnp.take` on an Explicit mesh) is a row naming the
error type.

Before anything is measured, every variant's first step is checked against the same step
on one device, unsharded: the loss (rtol 1e-5) and the updated trainable params.

For each compiled step it reports `compiled.memory_analysis()` (argument, output, aliased
and temp bytes: on simulated CPU devices these are the figures of the per-device SPMD
program), the collectives in `compiled.as_text()` (count of all-gather, all-reduce,
reduce-scatter, all-to-all and collective-permute, and the bytes of their result buffers per
device: the sum over every collective of the size of its result shape(s)), whether any
all-gather's result is a whole `(vocab, dim)` table (or LoRA's `(vocab, rank)` A), and the
median step time over `--repeats` steps timed round-robin. The simulated devices share 2 CPU
cores: the times are only indicative, not what 8 real devices would take.

Usage:
    python benchmarks/bench_sharded.py      # 2x4 mesh, vocab layout: 1.5-2 min on 2 shared cores
    python benchmarks/bench_sharded.py --mesh 1x8 --layout both --json sharded.json
"""

from __future__ import annotations

import os

# Before JAX starts: XLA reads the simulated device count once, when the CPU backend starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import contextlib
import dataclasses
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
from jaxembed import _hlo

LAYOUTS = {"vocab": P("model", None), "dim": P(None, "model"), "both": P("model", "data")}
KINDS = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
VARIANTS = ("full", "lora", "vp", "lora_vp", "flax")
SHORT = {
    "all-gather": "AG",
    "all-reduce": "AR",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
}  # the collectives counted, in _hlo.COLLECTIVE_OPS's order, as the tables name them
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "jaxembed")  # the versions reported
LEARNING_RATE = 1e-3
MiB = 2**20
MEMORY = ("argument", "output", "alias", "temp")  # the memory_analysis() figures reported


# ----------------------------------------------------------------------------- the model


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer targets, without a gather on the logits."""
    logits = logits.astype(jnp.float32)
    picked = jnp.arange(logits.shape[-1]) == targets[..., None]
    target_logit = jnp.sum(jnp.where(picked, logits, 0.0), axis=-1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logit)


def next_ids(ids: jax.Array) -> jax.Array:
    return jnp.roll(ids, -1, axis=1)


def jaxembed_loss(params: dict, ids: jax.Array) -> jax.Array:
    h = jaxembed.apply(params, ids, out_of_range="clip")
    return cross_entropy(jaxembed.attend(params, h), next_ids(ids))


def vocab_parallel_loss(mesh: jax.sharding.Mesh) -> Callable[[dict, jax.Array], jax.Array]:
    def loss(params: dict, ids: jax.Array) -> jax.Array:
        h = jaxembed.sharding.vocab_parallel_apply(
            params, ids, mesh=mesh, vocab_axis="model", batch_axes="data", out_of_range="clip"
        )
        return cross_entropy(jaxembed.attend(params, h), next_ids(ids))

    return loss


def flax_loss(vocab: int, dim: int) -> Callable[[dict, jax.Array], jax.Array]:
    module = nn.Embed(vocab, dim)

    def loss(variables: dict, ids: jax.Array) -> jax.Array:
        h = module.apply(variables, ids)
        return cross_entropy(module.apply(variables, h, method="attend"), next_ids(ids))

    return loss


def train_step(loss: Callable, tx: optax.GradientTransformation, frozen: bool) -> Callable:
    """(trainable, opt_state, [frozen,] ids) -> (trainable, opt_state, loss)."""

    def update(trainable, opt_state, ids, frozen_params=None):
        def objective(t):
            params = t if frozen_params is None else jaxembed.lora.combine(t, frozen_params)
            return loss(params, ids)

        value, grads = jax.value_and_grad(objective)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    if frozen:
        return lambda trainable, opt_state, frozen_params, ids: update(
            trainable, opt_state, ids, frozen_params
        )
    return lambda trainable, opt_state, ids: update(trainable, opt_state, ids)


# ----------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    kind: str
    status: str = "ok"
    error: str = ""
    compiled: Any = None
    state: tuple = ()
    static_args: tuple = ()
    ids: Any = None
    mesh: Any = None
    reference: str = "full"
    memory: dict[str, int] = field(default_factory=dict)
    collectives: list[_hlo.Collective] = field(default_factory=list)
    loss: float = float("nan")
    loss_error: float = float("nan")
    param_error: float = float("nan")
    times: list[float] = field(default_factory=list)

    def call(self) -> jax.Array:
        with jax.set_mesh(self.mesh) if self.kind == "explicit" else contextlib.nullcontext():
            trainable, opt_state, loss = self.compiled(*self.state, *self.static_args, self.ids)
        self.state = (trainable, opt_state)
        return loss


def param_shardings(mesh, layout: str) -> dict[str, NamedSharding]:
    rows, cols = LAYOUTS[layout]
    return {
        "embeddings": NamedSharding(mesh, P(rows, cols)),
        "embedding": NamedSharding(mesh, P(rows, cols)),  # flax.linen.Embed's name
        "lora_embeddings_a": NamedSharding(mesh, P(rows, None)),
        "lora_embeddings_b": NamedSharding(mesh, P(None, cols)),
    }


def tree_shardings(tree: Any, by_name: dict[str, NamedSharding], mesh) -> Any:
    """A sharding per leaf: by the leaf's dict key (params, Adam's mu and nu), else replicated;
    None stays None (the halves of `split_trainable`)."""

    def pick(path, leaf):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names and names[-1] in by_name and getattr(leaf, "ndim", 0) == 2:
            return by_name[names[-1]]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, tree)


def place(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def build_variant(
    name: str,
    kind: str,
    args,
    mesh,
    layout: str,
    params: dict,
    lora_params: dict,
    ids: np.ndarray,
    tx,
) -> Variant:
    variant = Variant(name=label(name, args.lora_rank), kind=kind, mesh=mesh)
    variant.reference = "lora" if name in ("lora", "lora_vp") else "full"
    by_name = param_shardings(mesh, layout)
    if name == "flax":
        loss, trainable, frozen = (
            flax_loss(args.vocab, args.dim),
            {"params": {"embedding": params["embeddings"]}},
            None,
        )
    elif name == "full":
        loss, trainable, frozen = jaxembed_loss, params, None
    elif name == "vp":
        loss, trainable, frozen = vocab_parallel_loss(mesh), params, None
    else:
        loss = jaxembed_loss if name == "lora" else vocab_parallel_loss(mesh)
        trainable, frozen = jaxembed.lora.split_trainable(lora_params)
    step = train_step(loss, tx, frozen is not None)
    ids_sharding = NamedSharding(mesh, P("data", None))
    t_sh = tree_shardings(trainable, by_name, mesh)
    s_sh = tree_shardings(jax.eval_shape(tx.init, trainable), by_name, mesh)
    f_sh = tree_shardings(frozen, by_name, mesh) if frozen is not None else None
    scalar = NamedSharding(mesh, P())
    try:
        trainable = place(trainable, t_sh)
        static = (place(frozen, f_sh),) if frozen is not None else ()
        variant.ids = jax.device_put(ids, ids_sharding)
        if kind == "auto":
            opt_state = jax.jit(tx.init, out_shardings=s_sh)(trainable)
            in_sh = (t_sh, s_sh, *((f_sh,) if static else ()), ids_sharding)
            jitted = jax.jit(
                step, in_shardings=in_sh, out_shardings=(t_sh, s_sh, scalar), donate_argnums=(0, 1)
            )
            compiled = jitted.lower(trainable, opt_state, *static, variant.ids).compile()
        else:
            with jax.set_mesh(mesh):
                opt_state = jax.jit(tx.init)(trainable)
                jitted = jax.jit(step, donate_argnums=(0, 1))
                compiled = jitted.lower(trainable, opt_state, *static, variant.ids).compile()
    except Exception as error:  # a variant that fails to trace or compile is a row
        variant.status = "fails"
        variant.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return variant
    variant.compiled, variant.state, variant.static_args = compiled, (trainable, opt_state), static
    variant.memory = common.memory_bytes(compiled, MEMORY)
    variant.collectives = _hlo.collectives(compiled.as_text())
    return variant


def label(name: str, rank: int) -> str:
    return {
        "full": "jaxembed full",
        "lora": f"jaxembed LoRA r{rank}",
        "vp": "jaxembed vocab_parallel",
        "lora_vp": f"jaxembed LoRA r{rank} vocab_parallel",
        "flax": "flax.linen.Embed",
    }[name]


def reference_steps(params, lora_params, ids, tx) -> dict[str, dict[str, Any]]:
    """One unsharded step on one device per reference (full table, LoRA): loss, new params,
    and the compiled memory of the one-device program."""
    device = jax.devices()[0]
    out = {}
    for key, source, frozen in (("full", params, False), ("lora", lora_params, True)):
        if frozen:
            trainable, frozen_params = jaxembed.lora.split_trainable(source)
            static = (jax.device_put(frozen_params, device),)
        else:
            trainable, static = source, ()
        trainable = jax.device_put(trainable, device)
        opt_state = jax.jit(tx.init)(trainable)
        ids_d = jax.device_put(ids, device)
        compiled = (
            jax.jit(train_step(jaxembed_loss, tx, frozen))
            .lower(trainable, opt_state, *static, ids_d)
            .compile()
        )
        new, _, loss = compiled(trainable, opt_state, *static, ids_d)
        out[key] = {
            "loss": float(loss),
            "params": {k: np.asarray(v) for k, v in new.items() if v is not None},
            "memory": common.memory_bytes(compiled, MEMORY),
        }
    return out


def check(variant: Variant, reference: dict[str, Any], rtol: float, param_atol: float) -> None:
    """First step of the variant against the unsharded step: loss and new trainable params."""
    loss = variant.call()
    variant.loss = float(loss)
    variant.loss_error = abs(variant.loss - reference["loss"])
    trainable = variant.state[0]
    if "params" in trainable:  # flax's {"params": {"embedding": ...}}
        new = {"embeddings": trainable["params"]["embedding"]}
    else:
        new = {k: v for k, v in trainable.items() if v is not None}
    variant.param_error = max(
        float(np.max(np.abs(np.asarray(new[k]) - reference["params"][k]))) for k in new
    )
    if variant.loss_error > rtol * abs(reference["loss"]) or variant.param_error > param_atol:
        raise AssertionError(
            f"{variant.name} ({variant.kind}) disagrees with the unsharded step: loss "
            f"{variant.loss} vs {reference['loss']}, max |param diff| {variant.param_error:.2e}"
        )


# ----------------------------------------------------------------------------- report


def counts(variant: Variant) -> dict[str, int]:
    return {op: sum(c.op == op for c in variant.collectives) for op in _hlo.COLLECTIVE_OPS}


def full_table_gathered(variant: Variant, args: argparse.Namespace) -> bool:
    """Whether an all-gather of the step results in a whole table or a whole LoRA A."""
    wholes = [(args.vocab, args.dim), (args.vocab, args.lora_rank)]
    return any(
        c.op == "all-gather" and any(c.has_shape(whole) for whole in wholes)
        for c in variant.collectives
    )


def summary_row(variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """A variant's figures, for the JSON output."""
    row = {"variant": variant.name, "kind": variant.kind, "status": variant.status}
    if variant.status != "ok":
        return {**row, "error": variant.error}
    return {
        **row,
        "loss": variant.loss,
        "loss_abs_error": variant.loss_error,
        "param_max_abs_error": variant.param_error,
        "memory_bytes": variant.memory,
        "collective_counts": counts(variant),
        "collective_bytes": sum(c.nbytes for c in variant.collectives),
        "full_table_all_gather": full_table_gathered(variant, args),
        "collectives": [dataclasses.asdict(c) for c in variant.collectives],
        "median_step_s": statistics.median(variant.times) if variant.times else None,
        "step_times_s": variant.times,
    }


def format_table(variants: list[Variant], references: dict, args: argparse.Namespace) -> str:
    """A row per variant (and per unsharded reference step): compiled memory in MiB, the
    collectives counted by kind and their bytes, a whole-table all-gather, the step time."""
    columns = [
        ("variant", "<36"),
        ("mesh", "<8"),
        ("|dloss|", ">8"),
        *((name, ">6") for name in ("arg", "out", "alias", "temp")),
        ("AG", ">3"),  # one space wider: two before it
        ("AR", ">2"),
        ("RS", ">2"),
        ("A2A", ">3"),
        ("CP", ">2"),
        ("coll MiB", ">8"),
        ("full AG", ">7"),
        ("step ms", ">8"),
    ]
    rows: list[list[Any] | str] = []
    for key, name in (("full", "1 device, unsharded (reference)"), ("lora", "  ... its LoRA step")):
        rows.append([name, "-", "-", *mib_cells(references[key]["memory"])])
    for v in variants:
        if v.status != "ok":
            rows.append(f"{v.name:<36} {v.kind:<8} fails with {v.error.split(':')[0]}")
            continue
        rows.append(
            [
                v.name,
                v.kind,
                f"{v.loss_error:.1e}",
                *mib_cells(v.memory),
                *counts(v).values(),
                f"{sum(c.nbytes for c in v.collectives) / MiB:.2f}",
                "YES" if full_table_gathered(v, args) else "no",
                f"{statistics.median(v.times) * 1e3:.0f}" if v.times else "-",
            ]
        )
    return common.format_table(columns, rows)


def mib_cells(memory: dict[str, int]) -> list[str]:
    """The MEMORY figures in MiB, one decimal."""
    return [f"{memory[name] / MiB:.1f}" for name in MEMORY]


def axis_of_group(size: int | None, mesh_shape: dict[str, int]) -> str:
    """The mesh axis (or "all") a replica group of `size` devices spans, in words."""
    if size is None:
        return "?"
    if size == 1:
        return "1 device (a no-op)"
    if size == math.prod(mesh_shape.values()) and all(s > 1 for s in mesh_shape.values()):
        return "all"
    names = [name for name, s in mesh_shape.items() if s == size]
    return names[0] if len(names) == 1 else f"{size} devices"


def format_collectives(variants: list[Variant], mesh_shape: dict[str, int]) -> str:
    """A line per variant: each collective's result shape(s) and the mesh axis it spans."""
    lines = []
    for v in variants:
        if v.status != "ok":
            lines.append(f"{v.name} ({v.kind}): {v.error}")
            continue
        parts = []
        for c in v.collectives:
            shapes = c.shapes[0] if len(c.shapes) == 1 else f"({', '.join(c.shapes)})"
            if c.op == "collective-permute":
                parts.append(f"CP {shapes} (device pairs)")
            else:
                parts.append(
                    f"{SHORT[c.op]} {shapes} over {axis_of_group(c.group_size, mesh_shape)}"
                )
        lines.append(f"{v.name} ({v.kind}): " + ("; ".join(parts) or "none"))
    return "\n".join(lines)


def report(
    variants: list[Variant],
    references: dict,
    skipped: list[str],
    args: argparse.Namespace,
) -> None:
    """The table, its legend, the skipped variants and every variant's collectives."""
    print(
        "\nper-device compiled memory (MiB) and collectives of the step; "
        f"median step over {args.repeats} round-robin repeats (8 simulated devices on "
        f"{os.cpu_count()} cores: indicative only)"
    )
    print(format_table(variants, references, args))
    print(
        "AG/AR/RS/A2A/CP: all-gather, all-reduce, reduce-scatter, all-to-all, "
        "collective-permute count; coll MiB: bytes of their per-device result buffers; "
        "full AG: an all-gather result of shape (vocab, dim) or (vocab, rank)"
    )
    for line in skipped:
        print(f"skipped: {line}")
    print("\ncollectives (result shape per device, mesh axis of the replica groups):")
    print(format_collectives(variants, {"data": args.mesh[0], "model": args.mesh[1]}))


# ----------------------------------------------------------------------------- main


def parse_mesh(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected DATAxMODEL, e.g. 2x4; got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring); `variants` and `kinds` become lists."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--mesh",
        type=parse_mesh,
        default="2x4",
        help="(data, model) mesh shape, DATAxMODEL; the product must not exceed the device count",
    )
    parser.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="vocab",
        help="table sharding: vocab=P('model',None), dim=P(None,'model'), both=P('model','data')",
    )
    parser.add_argument("--vocab", type=int, default=32768, help="table rows (input_dim)")
    parser.add_argument("--dim", type=int, default=256, help="table columns (output_dim)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="ids per sequence")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    parser.add_argument(
        "--kinds", default="auto,explicit", help="comma-separated mesh axis types: auto, explicit"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed steps per variant (round-robin); 0 skips timing",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of params and ids")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.kinds = [k for k in args.kinds.split(",") if k]
    if not set(args.variants) <= set(VARIANTS) or not set(args.kinds) <= set(KINDS):
        parser.error(f"--variants from {VARIANTS}, --kinds from {tuple(KINDS)}")
    if math.prod(args.mesh) > jax.device_count():
        parser.error(
            f"--mesh {args.mesh} needs {math.prod(args.mesh)} devices; {jax.device_count()} "
            "available (XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    if min(args.vocab, args.dim, args.batch, args.seq, args.lora_rank) < 1 or args.repeats < 0:
        parser.error("sizes must be positive and --repeats >= 0")
    return args


def set_up(args: argparse.Namespace) -> tuple[dict, dict, np.ndarray]:
    """(params, LoRA params, ids) on the host, from the seed."""
    keys = jax.random.split(jax.random.key(args.seed), 4)
    params = jax.device_get(jaxembed.init(keys[0], args.vocab, args.dim))
    lora_params = jaxembed.enable_lora(params, keys[1], args.lora_rank)
    # A random B, so that the adapter changes the loss and its gradient reaches A.
    lora_params["lora_embeddings_b"] = 0.05 * jax.random.normal(keys[2], (args.lora_rank, args.dim))
    ids = jax.random.randint(keys[3], (args.batch, args.seq), 0, args.vocab, dtype=jnp.int32)
    return params, jax.device_get(lora_params), np.asarray(ids)


def build_and_check(
    args: argparse.Namespace, params: dict, lora_params: dict, ids: np.ndarray, tx, references
) -> tuple[list[Variant], list[str]]:
    """Every variant wanted, on a mesh of each kind wanted, compiled and its first step checked
    against the unsharded one; and a line per variant the layout rules out."""
    variants: list[Variant] = []
    skipped: list[str] = []
    for kind in args.kinds:
        mesh = jax.make_mesh(
            args.mesh,
            ("data", "model"),
            axis_types=(KINDS[kind],) * 2,
            devices=jax.devices()[: math.prod(args.mesh)],
        )
        for name in args.variants:
            if name in ("vp", "lora_vp") and LAYOUTS[args.layout][0] != "model":
                skipped.append(
                    f"{label(name, args.lora_rank)} ({kind}): layout "
                    f"{args.layout} does not split rows over 'model'"
                )
                continue
            variant = build_variant(
                name, kind, args, mesh, args.layout, params, lora_params, ids, tx
            )
            if variant.status == "ok":
                check(
                    variant,
                    references[variant.reference],
                    rtol=1e-5,
                    param_atol=1e-2 * LEARNING_RATE,
                )
            variants.append(variant)
    return variants, skipped


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """Prints what runs where; returns the run's metadata."""
    load = os.getloadavg()[0]
    meta = common.run_metadata(
        libraries=LIBRARIES,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        mesh={"data": args.mesh[0], "model": args.mesh[1]},
        layout=args.layout,
        table_spec=str(LAYOUTS[args.layout]),
        vocab=args.vocab,
        dim=args.dim,
        ids_shape=[args.batch, args.seq],
        lora_rank=args.lora_rank,
        repeats=args.repeats,
        load_average_1min_at_start=load,
    )
    header = common.header_lines(
        meta, LIBRARIES, devices=" simulated by XLA_FLAGS", load=f"{load:.1f}"
    )
    print("\n".join(header))
    print(
        f"mesh (data={args.mesh[0]}, model={args.mesh[1]}), table ({args.vocab}, {args.dim}) "
        f"float32 sharded {LAYOUTS[args.layout]}, ids ({args.batch}, {args.seq}) int32 sharded "
        f"P('data', None); step = tied-logits cross-entropy + grad + adam, params donated"
    )
    return meta


def time_steps(variants: list[Variant], repeats: int) -> None:
    """Appends `repeats` round-robin step times to each variant that compiled."""
    ok = [v for v in variants if v.status == "ok"]
    if repeats:
        # Keyed by position: a variant's name repeats across mesh kinds.
        times, _ = common.time_round_robin(dict(enumerate(v.call for v in ok)), repeats)
        for i, variant in enumerate(ok):
            variant.times.extend(times[i])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = describe(args)

    wall, cpu = time.perf_counter(), common.cpu_seconds()
    params, lora_params, ids = set_up(args)
    tx = optax.adam(LEARNING_RATE)
    references = reference_steps(params, lora_params, ids, tx)
    print(
        f"unsharded one-device reference steps in {time.perf_counter() - wall:.1f} s: "
        f"loss {references['full']['loss']:.6f} (full), {references['lora']['loss']:.6f} "
        f"(LoRA)"
    )
    variants, skipped = build_and_check(args, params, lora_params, ids, tx, references)
    ok = [v for v in variants if v.status == "ok"]
    print(
        f"compiled and checked {len(ok)} variants against the unsharded step in "
        f"{time.perf_counter() - wall:.1f} s (loss rtol 1e-5, new params atol "
        f"{1e-2 * LEARNING_RATE:.0e}); max |dloss| "
        f"{max((v.loss_error for v in ok), default=0):.1e}, max |dparam| "
        f"{max((v.param_error for v in ok), default=0):.1e}"
    )
    time_steps(variants, args.repeats)

    report(variants, references, skipped, args)
    meta.update(wall_s=time.perf_counter() - wall, process_cpu_s=common.cpu_seconds() - cpu)
    print(
        f"\ntotal {meta['wall_s']:.1f} s wall, {meta['process_cpu_s']:.1f} s CPU in this "
        f"process ({meta['process_cpu_s'] / meta['wall_s']:.2f} of {os.cpu_count()} cores "
        "on average; less means they were shared or waited on)"
    )
    if args.json:
        common.write_json(
            args.json,
            {
                "meta": meta,
                "reference": {
                    k: {"loss": r["loss"], "memory_bytes": r["memory"]}
                    for k, r in references.items()
                },
                "results": [summary_row(v, args) for v in variants],
                "skipped": skipped,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
