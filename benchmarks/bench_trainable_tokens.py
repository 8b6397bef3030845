"""Benchmark: a trainable-tokens train step against full-table fine-tuning.

`jaxembed.enable_trainable_tokens(params, token_ids)` freezes the table and trains a `(K,
output_dim)` delta on K rows; `jaxembed.lora.split_trainable` then hands the optimizer the
delta alone. Timed, in one run on the default JAX device, with a `(--vocab, --dim)` float32
table and a `(--batch, --seq)` int32 batch (every 8th id one of min(K) new tokens, so that the
delta gets a gradient; the others random rows below the new tokens):

1. embedding step: `jax.value_and_grad` of `mean((apply(params, ids) - target)**2)`, then
   `optax.adam(1e-3)` and `optax.apply_updates`, one jitted function with the trainable
   params and the Adam state donated; (a) full-table fine-tuning (the whole table trains,
   dense Adam) against (b) trainable tokens, K = each of `--num-tokens` (the table frozen,
   only the delta and its Adam state). Target: full / tokens >= 20x (each K).
2. tied-head step: the same, with a tied output head: the last `--head-positions` hidden
   rows of every sequence go through `jaxembed.attend(params, hidden)` (all V logits) and
   softmax cross-entropy against random labels. attend is O(V) for both (the tokens' step
   still multiplies by the whole frozen table, forward and for the hidden rows' gradient),
   so this line is reported with its ratio and no target.

Also printed: the Adam state bytes of each, and the compiled temp bytes of each step
(`memory_analysis`). Before timing, the first loss of the full and the tokens step (the delta
starts at zero) are checked to agree. Timing: each step is compiled (`lower().compile()`)
and called once; then the steps of a section run round-robin (the first one timed rotates
every round), one call + `block_until_ready` per sample, each after an untimed `--settle`
pause (XLA:CPU returns the full step's large temp buffers to the OS after it returned, which
the call timed next would pay for); the median is reported with the ratio of medians (the
verdict decides on it) and the paired ratio (median over rounds of the per-round ratio).

Usage:
    python benchmarks/bench_trainable_tokens.py          # V=32768, D=1024: about 1 min, 2 cores
    python benchmarks/bench_trainable_tokens.py --quick  # V=8192, D=256, fewer rounds
    python benchmarks/bench_trainable_tokens.py --json tokens.json
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
import optax

import jaxembed
from jaxembed.lora import combine, split_trainable

TARGET = 20.0  # full-table step / trainable-tokens step must be >= this
LEARNING_RATE = 1e-3
TOKEN_EVERY = 8  # every 8th id of the batch is one of the trainable tokens
QUICK = {"vocab": 8192, "dim": 256, "batch": 8, "seq": 64, "rounds": 10, "head_rounds": 5}
RECORDED_ARGS = (
    "vocab",
    "dim",
    "batch",
    "seq",
    "num_tokens",
    "head_positions",
    "rounds",
    "head_rounds",
    "settle",
    "quick",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32768, help="table rows")
    parser.add_argument("--dim", type=int, default=1024, help="table columns")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="ids per sequence")
    parser.add_argument(
        "--num-tokens", type=int, nargs="+", default=[16, 64], help="K, trainable token counts"
    )
    parser.add_argument(
        "--head-positions",
        type=int,
        default=8,
        help="hidden rows per sequence through the tied head (0 skips the tied-head section)",
    )
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds, embedding step")
    parser.add_argument("--head-rounds", type=int, default=10, help="timed rounds, tied head")
    parser.add_argument("--settle", type=float, default=0.05, help="untimed pause per call, s")
    args = common.parse_with_quick(parser, QUICK, argv)
    return args


# ----------------------------------------------------------------------------- steps


class Stepper:
    """A compiled train step and the state it threads: each call donates the trainable params
    and Adam state and keeps the new ones (the step returns the loss for `block_until_ready`)."""

    def __init__(self, step: Callable[..., Any], trainable: Any, frozen: Any, batch: tuple):
        self.tx = optax.adam(LEARNING_RATE)
        self.opt_state = self.tx.init(trainable)
        self.trainable, self.frozen, self.batch = trainable, frozen, batch
        self.opt_state_bytes = tree_bytes(self.opt_state)
        jitted = jax.jit(step, static_argnums=0, donate_argnums=(1, 2))
        start = time.perf_counter()
        self.compiled = jitted.lower(self.tx, trainable, self.opt_state, frozen, *batch).compile()
        self.compile_s = time.perf_counter() - start
        self.temp_bytes = common.memory_bytes(self.compiled, ["temp"])["temp"]
        self.first_loss = float(self())

    def __call__(self) -> jax.Array:
        self.trainable, self.opt_state, loss = self.compiled(
            self.trainable, self.opt_state, self.frozen, *self.batch
        )
        return loss


def tree_bytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def embedding_step(tx, trainable, opt_state, frozen, ids, target):
    """MSE of the lookup against a target, Adam on the trainable half."""

    def loss_fn(trainable):
        out = jaxembed.apply(combine(trainable, frozen), ids, out_of_range="clip")
        return jnp.mean(jnp.square(out - target))

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def make_head_step(positions: int) -> Callable[..., Any]:
    def head_step(tx, trainable, opt_state, frozen, ids, labels):
        """The last `positions` hidden rows of each sequence through the tied head (attend),
        softmax cross-entropy against labels; Adam on the trainable half."""

        def loss_fn(trainable):
            params = combine(trainable, frozen)
            hidden = jaxembed.apply(params, ids, out_of_range="clip")[:, -positions:]
            logits = jaxembed.attend(params, hidden)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return head_step


def full_split(table: jax.Array) -> tuple[dict, dict]:
    """The whole table trains: its own copy (the step donates it)."""
    return {"embeddings": jnp.copy(table)}, {"embeddings": None}


def tokens_split(table: jax.Array, token_ids: np.ndarray) -> tuple[dict, dict]:
    params = jaxembed.enable_trainable_tokens({"embeddings": table}, token_ids)
    return split_trainable(params)


def set_up(args: argparse.Namespace) -> tuple[dict[str, dict[str, Stepper]], dict[str, Any]]:
    """{section: {name: Stepper}} and the token ids used, all compiled and called once."""
    table_key, ids_key, pick_key, target_key, label_key = jax.random.split(jax.random.key(0), 5)
    table = jaxembed.init(table_key, args.vocab, args.dim)["embeddings"]
    rng = np.random.default_rng(0)
    k_max = max(args.num_tokens)
    # New tokens appended at the end of the vocabulary (chat markers, say); the batch uses
    # min(K) of them, which every K's set holds, so that every K sees the same batch.
    all_token_ids = np.arange(args.vocab - k_max, args.vocab)
    used = rng.permutation(all_token_ids)[: min(args.num_tokens)]
    # The other ids are ordinary rows (below the K_max new ones).
    ids = jax.random.randint(ids_key, (args.batch, args.seq), 0, args.vocab - k_max, jnp.int32)
    picks = jax.random.choice(pick_key, jnp.asarray(used, jnp.int32), ids[:, ::TOKEN_EVERY].shape)
    ids = ids.at[:, ::TOKEN_EVERY].set(picks)
    target = jax.random.normal(target_key, (args.batch, args.seq, args.dim), jnp.float32)
    token_sets = {
        k: np.sort(np.concatenate([used, np.setdiff1d(all_token_ids, used)[: k - used.size]]))
        for k in args.num_tokens
    }

    sections: dict[str, dict[str, Stepper]] = {"embedding step": {}}
    emb = sections["embedding step"]
    emb["full table"] = Stepper(embedding_step, *full_split(table), (ids, target))
    for k, token_ids in token_sets.items():
        emb[f"tokens K={k}"] = Stepper(
            embedding_step, *tokens_split(table, token_ids), (ids, target)
        )
    if args.head_positions > 0:
        labels = jax.random.randint(label_key, (args.batch, args.head_positions), 0, args.vocab)
        step = make_head_step(args.head_positions)
        k = max(args.num_tokens)
        sections["tied-head step"] = {
            "full table": Stepper(step, *full_split(table), (ids, labels)),
            f"tokens K={k}": Stepper(step, *tokens_split(table, token_sets[k]), (ids, labels)),
        }
    return sections, {k: v.tolist() for k, v in token_sets.items()}


def check_agreement(sections: dict[str, dict[str, Stepper]], used: int) -> list[str]:
    """The first losses (delta zero) of each section's steps agree, and the first embedding
    step moved the delta rows of the `used` tokens in the batch and no others; raises if
    not."""
    lines = []
    for section, steppers in sections.items():
        losses = {name: s.first_loss for name, s in steppers.items()}
        full = losses["full table"]
        worst = max(abs(v - full) / max(abs(full), 1e-12) for v in losses.values())
        if worst > 1e-5:
            raise AssertionError(f"{section}: first losses disagree: {losses}")
        lines.append(f"{section}: first loss {full:.6f} on every step (max rel diff {worst:.1e})")
    # After that first step, exactly the delta rows of the tokens in the batch have moved.
    moved = {
        name: int(jnp.sum(jnp.any(s.trainable["trainable_tokens_delta"] != 0, axis=-1)))
        for name, s in sections["embedding step"].items()
        if name != "full table"
    }
    if len(set(moved.values()) | {used}) != 1:
        raise AssertionError(f"delta rows moved by one step: {moved}, expected {used} each")
    lines.append(f"one embedding step moves the delta rows of the {used} tokens in the batch")
    return lines


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    wall = time.perf_counter()
    meta = common.start_run(args, RECORDED_ARGS)
    print(
        f"table ({args.vocab}, {args.dim}) float32, ids ({args.batch}, {args.seq}) int32 (every "
        f"{TOKEN_EVERY}th a trainable token), K = {', '.join(map(str, args.num_tokens))}; "
        f"optax.adam({LEARNING_RATE:g}), params and Adam state donated; tied head on the last "
        f"{args.head_positions} positions of each sequence; median per call in ms"
        + ("; --quick" if args.quick else "")
    )
    sections, token_sets = set_up(args)
    agreement = check_agreement(sections, min(args.num_tokens))
    print(f"set up and compiled in {time.perf_counter() - wall:.1f} s; " + "; ".join(agreement))

    samples = {}
    for section, steppers in sections.items():
        rounds = args.rounds if section == "embedding step" else args.head_rounds
        start = time.perf_counter()
        samples[section], _ = common.time_round_robin(steppers, rounds, settle_s=args.settle)
        print(f"{section}: {rounds} rounds in {time.perf_counter() - start:.0f} s")

    rows, ratio_of, checks = [], {}, []
    for section, steppers in sections.items():
        full = samples[section]["full table"]
        for name, stepper in steppers.items():
            s = common.quartile_summary(samples[section][name], "ms")
            ratio = common.ratios(full, samples[section][name])
            ratio_text = "" if name == "full table" else common.format_ratio(ratio)
            rows.append(
                [
                    f"{section}: {name}",
                    f"{s['median_ms']:.2f}",
                    f"{s['p25_ms']:.2f}-{s['p75_ms']:.2f}",
                    f"{s['min_ms']:.2f}",
                    ratio_text,
                    common.mib(stepper.opt_state_bytes),
                    common.mib(stepper.temp_bytes),
                ]
            )
            if name != "full table":
                ratio_of[f"{section}: full / {name}"] = ratio
                if section == "embedding step":
                    checks.append(
                        (
                            ratio["of_medians"] >= TARGET,
                            f"embedding step, full table / {name} >= {TARGET:g}x: "
                            f"{common.format_ratio(ratio)}",
                        )
                    )
    columns = [
        ("section: step", "<30"),
        ("median ms", ">10"),
        ("p25-p75 ms", ">16"),
        ("min ms", ">9"),
        ("full / this", ">24"),
        ("Adam state", ">14"),
        ("temp", ">12"),
    ]
    print("\n" + common.format_table(columns, rows))
    for name, ratio in ratio_of.items():
        if name.startswith("tied-head"):
            print(f"\n{name}: {common.format_ratio(ratio)} (no target: attend is O(V) for both)")
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
                "token_ids": token_sets,
                "agreement": agreement,
                "results": {
                    section: {
                        name: {
                            **common.quartile_summary(samples[section][name], "ms"),
                            "opt_state_bytes": s.opt_state_bytes,
                            "temp_bytes": s.temp_bytes,
                            "compile_s": s.compile_s,
                        }
                        for name, s in steppers.items()
                    }
                    for section, steppers in sections.items()
                },
                "ratios": ratio_of,
                "verdict": lines,
                "samples_ms": common.scaled_samples(samples, "ms"),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
