"""Everything `train_lm.py` needs around its lesson: the command line, the training loop with
its progress bar and held-out evaluations, the loss-curve plot and the final summary.

No jaxembed call is made here: the loop runs any jitted step on any params pytree.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from _lm_data import FINETUNE_PACKAGES, PAD, PRETRAIN_PACKAGES, VOCAB_SIZE, Domain
from matplotlib.figure import Figure  # renders PNG without pyplot: no display needed
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The example's flags; the defaults are the ~2 minute CPU run described in train_lm.py."""
    parser = argparse.ArgumentParser(
        description=(
            "Byte-level language model on the Python standard library's source: pretrain, "
            "LoRA fine-tune the jaxembed Embedding on another package, merge, checkpoint."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--steps-pretrain", type=int, default=600, help="pretraining steps")
    add("--steps-finetune", type=int, default=150, help="LoRA fine-tuning steps")
    add("--batch-size", type=int, default=16, help="sequences per batch")
    add("--seq-len", type=int, default=128, help="max bytes per sequence (shorter are padded)")
    add("--d-model", type=int, default=128, help="embedding and model width")
    add("--layers", type=int, default=2, help="transformer blocks")
    add("--heads", type=int, default=4, help="attention heads")
    add("--lora-rank", type=int, default=8, help="rank of the LoRA adapter")
    add("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (scale alpha/rank)")
    add("--lr", type=float, default=2e-3, help="peak learning rate, pretraining")
    add("--lora-lr", type=float, default=2e-2, help="peak learning rate, LoRA fine-tuning")
    add("--eval-every", type=int, default=75, help="steps between held-out evaluations")
    add("--eval-sequences", type=int, default=128, help="held-out sequences per domain")
    add(
        "--pretrain-packages",
        default=",".join(PRETRAIN_PACKAGES),
        help="comma-separated stdlib packages to pretrain on",
    )
    add(
        "--finetune-packages",
        default=",".join(FINETUNE_PACKAGES),
        help="comma-separated stdlib packages to fine-tune on",
    )
    add("--out", type=pathlib.Path, default=pathlib.Path("outputs/train_lm"), help="output folder")
    add("--seed", type=int, default=0, help="seed for initialization and batch order")
    add("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in (
        "steps_pretrain",
        "steps_finetune",
        "batch_size",
        "seq_len",
        "d_model",
        "layers",
        "heads",
        "lora_rank",
        "eval_every",
        "eval_sequences",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    return args


def describe_run(source: Domain, target: Domain, args: argparse.Namespace) -> None:
    """What the user is about to watch: the data, where it comes from, and the model."""
    print(
        f"Python {sys.version.split()[0]} standard library, JAX on "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    )
    for role, domain in (("pretrain", source), ("fine-tune", target)):
        print(
            f"  {role:<9}  {domain.name}: {len(domain.train_files)} files, "
            f"{len(domain.train):,} padded sequences of up to {args.seq_len + 1} bytes"
        )
        print(
            f"  {'':<9}  held out: {', '.join(p.name for p in domain.held_out_files)} "
            f"({len(domain.held_out):,} sequences)"
        )
    print(
        f"Model: jaxembed.Embedding({VOCAB_SIZE}, {args.d_model}, mask_zero=True) -> "
        f"{args.layers} causal attention blocks ({args.heads} heads) -> tied logits via "
        f"attend; LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g}"
    )


# ----------------------------------------------------------------------------------------
# Training loop and evaluation
# ----------------------------------------------------------------------------------------


def schedule(peak: float, steps: int) -> optax.Schedule:
    """Linear warmup (5%) then cosine decay to 10% of peak."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(1, steps // 20), max(2, steps), end_value=peak / 10
    )


def make_evaluator(
    loss_fn: Callable[[Any, np.ndarray], tuple[jax.Array, jax.Array]],
    eval_sets: dict[str, list[np.ndarray]],
) -> Callable[[Any], dict[str, float]]:
    """params -> held-out loss per real byte (nats) for each domain of `eval_sets`, weighted
    by byte count across batches. `loss_fn(params, batch)` gives (mean loss, byte count)."""
    loss_fn = jax.jit(loss_fn)

    def evaluate(params: Any) -> dict[str, float]:
        result = {}
        for name, batches in eval_sets.items():
            totals = [loss_fn(params, batch) for batch in batches]
            nats = sum(float(loss) * float(count) for loss, count in totals)
            result[name] = nats / max(sum(float(count) for _, count in totals), 1.0)
        return result

    return evaluate


@dataclass
class Curves:
    """What a training phase recorded, for the plot and the final table."""

    train_loss: list[float]
    eval_steps: list[int]
    eval_loss: dict[str, list[float]]  # domain name -> held-out loss at each eval step
    step_seconds: list[float]
    tokens: int  # real (non-padding) target bytes trained on

    def step_time(self) -> float:
        """Median seconds per step: robust to the first step, which includes compilation."""
        return float(np.median(self.step_seconds))

    def tokens_per_second(self) -> float:
        """Real bytes per second at the median step time."""
        return self.tokens / len(self.step_seconds) / self.step_time()


def train(
    name: str,
    step: Callable,
    state: tuple[Any, Any],
    batches: Iterator[np.ndarray],
    steps: int,
    evaluate: Callable[[Any], dict[str, float]],
    args: argparse.Namespace,
) -> tuple[Any, Curves]:
    """Runs `steps` steps of `step` on `state` = (trainable params, optimizer state) with a
    progress bar showing loss and tokens/s, evaluating held-out loss every `--eval-every`.
    Returns the trained params and what was recorded."""
    curves = Curves([], [], {}, [], 0)

    def record_eval(at: int, params: Any) -> None:
        curves.eval_steps.append(at)
        for domain, loss in evaluate(params).items():
            curves.eval_loss.setdefault(domain, []).append(loss)

    record_eval(0, state[0])
    bar = tqdm(range(1, steps + 1), desc=name, unit="step", disable=args.quiet)
    bar.set_postfix_str("compiling the step")
    window_tokens, window_start = 0, time.perf_counter()
    for i in bar:
        batch = next(batches)
        real_tokens = int((batch[:, 1:] != PAD).sum())
        start = time.perf_counter()
        params, opt_state, loss = step(*state, batch)
        loss = float(loss)  # waits for the step: the timing below is the real compute time
        curves.step_seconds.append(time.perf_counter() - start)
        state = (params, opt_state)
        curves.train_loss.append(loss)
        curves.tokens += real_tokens
        window_tokens += real_tokens
        if i == 1:  # compilation is not throughput: measure from the second step
            window_tokens, window_start = 0, time.perf_counter()
        elif i % 10 == 0 or i == steps:
            rate = window_tokens / (time.perf_counter() - window_start)
            bar.set_postfix_str(f"loss {loss:.3f}  {rate:,.0f} tok/s")
            window_tokens, window_start = 0, time.perf_counter()
        if i % args.eval_every == 0 or i == steps:
            record_eval(i, params)
            window_start = time.perf_counter()  # evaluation time is not training throughput
    bar.close()
    return state[0], curves


def count_params(tree: Any) -> int:
    """Number of scalars in a params tree (`None` halves of a split count nothing)."""
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------
# Plot and summary
# ----------------------------------------------------------------------------------------


def plot_curves(
    path: pathlib.Path, pretrain: Curves, finetune: Curves, domains: Sequence[str], switch: int
) -> None:
    """Training loss per step (left) and held-out loss per domain (right), pretraining and
    LoRA fine-tuning on one step axis."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    zoomed = []  # values the y range must show: everything after the first steps' plunge
    for curves, offset, label, color in (
        (pretrain, 0, f"pretrain ({domains[0]})", "tab:blue"),
        (finetune, switch, f"LoRA fine-tune ({domains[1]})", "tab:orange"),
    ):
        steps = offset + np.arange(1, len(curves.train_loss) + 1)
        smoothed = smooth(curves.train_loss)
        left.plot(steps, curves.train_loss, color=color, alpha=0.25, linewidth=0.8)
        left.plot(steps, smoothed, color=color, label=label)
        zoomed += [*smoothed[len(smoothed) // 10 :], *curves.train_loss[len(smoothed) // 10 :]]
    left.set(title="training loss", xlabel="step", ylabel="loss (nats per byte)")
    for domain, color in zip(domains, ("tab:blue", "tab:orange"), strict=True):
        steps = [*pretrain.eval_steps, *(switch + s for s in finetune.eval_steps[1:])]
        losses = [*pretrain.eval_loss[domain], *finetune.eval_loss[domain][1:]]
        right.plot(steps, losses, "o-", color=color, label=f"held-out {domain}")
        zoomed += losses[1:]
    right.set(title="held-out loss", xlabel="step")
    # The untrained model's loss (about ln 257 = 5.5) would flatten everything else.
    low, high = min(zoomed), max(zoomed)
    left.set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))
    for axis in (left, right):
        axis.axvline(switch, color="gray", linestyle="--", linewidth=1)
        axis.text(
            switch,
            0.98,
            " LoRA starts",
            transform=axis.get_xaxis_transform(),
            va="top",
            color="gray",
        )
        axis.grid(alpha=0.3)
        axis.legend(loc="lower left")
    fig.suptitle(
        "jaxembed byte-level LM on Python's standard library: pretraining, then "
        "LoRA on the embedding only"
    )
    fig.savefig(path, dpi=120)


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """Exponential moving average, bias-corrected so the curve starts at the first value."""
    out, average = np.empty(len(values)), 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out[i] = average / (1 - weight ** (i + 1))
    return out


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned text: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(
    domains: Sequence[str],
    before: dict[str, float],
    after: dict[str, float],
    pretrain: Curves,
    finetune: Curves,
    full: int,
    lora: int,
) -> str:
    """The final summary: held-out loss before/after fine-tuning, then training cost."""
    loss_rows = [
        ["held-out loss (nats/byte)", *domains],
        ["after pretraining", *(f"{before[d]:.3f}" for d in domains)],
        ["after LoRA fine-tune + merge", *(f"{after[d]:.3f}" for d in domains)],
        ["change", *(f"{after[d] - before[d]:+.3f}" for d in domains)],
    ]
    cost_rows = [["", "pretrain", "LoRA fine-tune"]]
    cost_rows.append(
        ["trainable parameters", f"{full:,}", f"{lora:,} ({100 * lora / full:.1f}% of {full:,})"]
    )
    cost_rows.append(
        [
            "time per step (median)",
            *(f"{1000 * c.step_time():.1f} ms" for c in (pretrain, finetune)),
        ]
    )
    cost_rows.append(["tokens/s", *(f"{c.tokens_per_second():,.0f}" for c in (pretrain, finetune))])
    return format_table(loss_rows) + "\n\n" + format_table(cost_rows)


def print_summary(result: dict[str, Any], started: float) -> None:
    """The closing output, from what `train_lm.main` returns: the results table, then whether
    each check passed and where the files went, then the total time since `started`."""
    print()
    print(
        results_table(
            result["domains"],
            result["eval_before"],
            result["eval_after"],
            result["pretrain"],
            result["finetune"],
            result["trainable_params"]["full"],
            result["trainable_params"]["lora"],
        )
    )
    print(
        "(LoRA trades some of the pretraining domain for the fine-tuning one; the unmerged "
        "checkpoint keeps the base weights: jaxembed.lora.remove_lora gets them back.)"
    )
    print()
    verdict = {True: "ok", False: "FAILED"}
    checks = {name: verdict[ok] for name, ok in result["checkpoints_ok"].items()}
    print(
        f"merged == unmerged LoRA outputs: {verdict[result['merge_ok']]} "
        f"(max |diff| {result['merge_max_diff']:.1e})"
    )
    print(
        f"checkpoints restore identical outputs: pretrained {checks['pretrained']}, "
        f"lora {checks['lora']}, merged {checks['merged']}  -> {result['checkpoint_dir']}"
    )
    print(f"loss curves -> {result['plot']}")
    print(f"total time: {time.perf_counter() - started:.0f} s")
