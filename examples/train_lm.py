"""jaxembed end to end: a byte-level language model on Python's own standard library.

What it does, with nothing to download (the data are the `.py` files every CPython ships):

1. Pretrains a small causal transformer on some stdlib packages (json, http, email). Tokens
   are bytes shifted by one, so id 0 is free for padding: `jaxembed.Embedding(257, d,
   mask_zero=True)` embeds them, its mask drives the attention, and its `attend` gives the
   output logits through the same (tied) table.
2. Enables LoRA on that embedding (`jaxembed.enable_lora`) and fine-tunes *only the adapter*
   on a different package (unittest); every other weight stays bit-identical.
3. Merges the adapter into the table (`jaxembed.merge_lora`) and checks the merged model
   gives the LoRA model's outputs.
4. Saves params with orbax after pretraining, after fine-tuning (LoRA weights included) and
   after merging; restores each into a freshly built model and checks the outputs are
   identical.
5. Prints a table of held-out loss before/after fine-tuning, trainable parameters (full vs
   LoRA) and time per step, and writes `loss_curves.png`.

Run (defaults take about two minutes on two CPU cores; the same code runs on GPU and TPU):

    pip install -e ".[examples]" && python examples/train_lm.py
    python examples/train_lm.py --help
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed

try:
    import orbax.checkpoint as ocp
    from matplotlib.figure import Figure  # renders PNG without pyplot: no display needed
    from tqdm.auto import tqdm
except ImportError as error:  # the example's extras are not part of jaxembed's dependencies
    raise SystemExit(
        f"{error.name} is missing: install the example's extras with "
        '`pip install -e ".[examples]"` (orbax-checkpoint, tqdm, matplotlib).'
    ) from error

PAD = 0
VOCAB_SIZE = 257  # 256 byte values, shifted by one so that id 0 means padding
PRETRAIN_PACKAGES = ("json", "http", "email")
FINETUNE_PACKAGES = ("unittest",)
HOLD_OUT_EVERY = 4  # every 4th file of a domain (sorted by path) is held out for evaluation,
HOLD_OUT_MAX_SHARE = 0.25  # as long as held-out files stay under a quarter of the bytes
Params = dict[str, Any]


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The example's flags; the defaults are the ~2 minute CPU run described above."""
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


# ----------------------------------------------------------------------------------------
# Data: the standard library's own source files
# ----------------------------------------------------------------------------------------


@dataclass
class Domain:
    """One corpus (a few stdlib packages), split by file into training and held-out text."""

    name: str
    train: np.ndarray  # (num_sequences, seq_len + 1) int32, padded with PAD
    held_out: np.ndarray
    train_files: list[pathlib.Path]
    held_out_files: list[pathlib.Path]


def package_files(packages: Sequence[str]) -> list[pathlib.Path]:
    """The `.py` files of stdlib packages, tests excluded, sorted so the split is stable."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for package in packages:
        root = stdlib / package
        if not root.is_dir():
            raise SystemExit(f"stdlib package {package!r} not found under {stdlib}")
        files += [
            path
            for path in root.rglob("*.py")
            if not any(part in ("test", "tests") for part in path.relative_to(root).parts)
        ]
    if len(files) < 2:
        raise SystemExit(
            f"{', '.join(packages)}: found {len(files)} .py file(s) under {stdlib}; this "
            "example needs Python's source files (some minimal installs ship only .pyc)."
        )
    return sorted(files)


def encode(text: bytes) -> np.ndarray:
    """Bytes -> ids 1..256: shifted by one so that 0 stays free for padding."""
    return np.frombuffer(text, dtype=np.uint8).astype(np.int32) + 1


def chunk_lines(source: bytes, max_bytes: int) -> list[bytes]:
    """Packs whole lines into chunks of at most `max_bytes` bytes (longer lines are cut).

    Chunks end at line breaks, so their lengths vary: the batches really are padded, and the
    mask from `mask_zero=True` really matters.
    """
    chunks, current = [], b""
    for line in source.splitlines(keepends=True):
        for start in range(0, len(line), max_bytes):
            piece = line[start : start + max_bytes]
            if len(current) + len(piece) > max_bytes:
                chunks.append(current)
                current = b""
            current += piece
    chunks.append(current)
    return [chunk for chunk in chunks if len(chunk) > 1]  # a pair (input, target) at least


def to_sequences(files: Sequence[pathlib.Path], seq_len: int) -> np.ndarray:
    """Files -> `(num_sequences, seq_len + 1)` ids, padded at the end with PAD.

    One extra position because inputs are `[:, :-1]` and next-byte targets `[:, 1:]`.
    """
    chunks = [c for path in files for c in chunk_lines(path.read_bytes(), seq_len + 1)]
    sequences = np.full((len(chunks), seq_len + 1), PAD, dtype=np.int32)
    for row, chunk in enumerate(chunks):
        sequences[row, : len(chunk)] = encode(chunk)
    return sequences


def hold_out(files: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    """Every HOLD_OUT_EVERY-th file, skipping any that would push the held-out share past
    HOLD_OUT_MAX_SHARE of the bytes (one big file, such as unittest's mock.py, would
    otherwise take half the domain). Whole files, so held-out text is code the model has
    never seen, not unseen windows of seen files. Deterministic for a given Python version."""
    sizes = {path: path.stat().st_size for path in files}
    budget, chosen = HOLD_OUT_MAX_SHARE * sum(sizes.values()), []
    for path in files[HOLD_OUT_EVERY - 1 :: HOLD_OUT_EVERY]:
        if sum(sizes[p] for p in chosen) + sizes[path] <= budget:
            chosen.append(path)
    return chosen or [min(files, key=sizes.__getitem__)]


def load_domain(packages: Sequence[str], seq_len: int) -> Domain:
    """Reads a domain's files, split into training and held-out files, as padded sequences."""
    files = package_files(packages)
    held_out = hold_out(files)
    train = [path for path in files if path not in held_out]
    domain = Domain(
        name="+".join(packages),
        train=to_sequences(train, seq_len),
        held_out=to_sequences(held_out, seq_len),
        train_files=train,
        held_out_files=held_out,
    )
    # The data are checked once, eagerly, where an out-of-range id would raise at once; the
    # model itself then uses out_of_range="clip" (see ByteLM).
    for ids in (domain.train, domain.held_out):
        jaxembed.functional.check_in_range(ids, VOCAB_SIZE)
    return domain


def evenly_spaced(sequences: np.ndarray, count: int) -> np.ndarray:
    """A deterministic subset spread over all held-out files (caps evaluation time)."""
    if len(sequences) <= count:
        return sequences
    return sequences[np.linspace(0, len(sequences) - 1, count).round().astype(int)]


def random_batches(
    sequences: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Endless shuffled batches, reshuffled every epoch (drop-last keeps shapes static)."""
    if len(sequences) < batch_size:
        sequences = np.resize(sequences, (batch_size, sequences.shape[1]))
    while True:
        order = rng.permutation(len(sequences))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield sequences[order[start : start + batch_size]]


def fixed_batches(sequences: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Held-out sequences cut into equal batches; the last is filled with all-PAD rows, which
    carry no weight in the loss, so every batch has the same shape (one compilation)."""
    count = math.ceil(len(sequences) / batch_size) * batch_size
    padded = np.full((count, sequences.shape[1]), PAD, dtype=np.int32)
    padded[: len(sequences)] = sequences
    return list(padded.reshape(-1, batch_size, sequences.shape[1]))


# ----------------------------------------------------------------------------------------
# Model: jaxembed Embedding -> causal transformer -> tied logits via `attend`
# ----------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: masked self-attention, then an MLP."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(h, mask=attention_mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(width)(nn.gelu(nn.Dense(4 * width)(h)))
        return x + h


class ByteLM(nn.Module):
    """Causal byte-level LM whose input embedding and output layer are one jaxembed table.

    With `lora_rank` set, the same architecture expects the token table plus a LoRA adapter
    ("lora_embeddings_a", "lora_embeddings_b") in its params, and adds the low-rank delta in
    both the lookup and the tied logits.
    """

    max_len: int
    d_model: int
    num_layers: int
    num_heads: int
    lora_rank: int | None = None
    lora_alpha: float | None = None

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """`(batch, length)` ids, 0 = padding -> `(batch, length, VOCAB_SIZE)` logits."""
        if ids.shape[-1] > self.max_len:  # static shape: fails at trace time, not silently
            raise ValueError(f"sequences of {ids.shape[-1]} ids exceed max_len={self.max_len}")
        # out_of_range="clip": jaxembed's default "error" policy cannot check traced ids
        # inside jax.jit without wrapping every step in `checkify`. The ids are built by
        # `encode` (bytes + 1) and checked eagerly once in `load_domain`, so clipping never
        # changes an id here and costs nothing.
        tokens = jaxembed.Embedding(
            VOCAB_SIZE,
            self.d_model,
            mask_zero=True,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            out_of_range="clip",
            name="token_embed",
        )
        positions = jaxembed.Embedding(
            self.max_len, self.d_model, out_of_range="clip", name="position_embed"
        )
        mask = tokens.compute_mask(ids)  # True for real bytes, False for padding
        # Causal (no peeking ahead) and padding (no attending to or from padding) at once.
        attention_mask = nn.combine_masks(
            nn.make_causal_mask(ids), nn.make_attention_mask(mask, mask)
        )
        x = tokens(ids) + positions(jnp.arange(ids.shape[-1]))
        for _ in range(self.num_layers):
            x = Block(self.num_heads)(x, attention_mask)
        return tokens.attend(nn.LayerNorm()(x))


def build_model(args: argparse.Namespace, *, lora: bool = False) -> ByteLM:
    """The model for pretraining (no adapter) or for fine-tuning (LoRA on the token table)."""
    return ByteLM(
        max_len=args.seq_len,
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        lora_rank=args.lora_rank if lora else None,
        lora_alpha=args.lora_alpha if lora else None,
    )


def init_params(model: ByteLM, key: jax.Array, seq_len: int) -> Params:
    """Fresh params as a plain dict: `nn.unbox` drops the logical-partitioning boxes, which
    keeps the tree simple to edit (enable_lora), optimize and checkpoint."""
    return nn.unbox(model.init(key, jnp.ones((1, seq_len), jnp.int32))["params"])


def jit_init(model: ByteLM, key: jax.Array, seq_len: int) -> Params:
    """`init_params` compiled once: run eagerly, every initializer op would compile alone."""
    return jax.jit(partial(init_params, model, seq_len=seq_len))(key)


def abstract_params(model: ByteLM, seq_len: int) -> Params:
    """Shapes and dtypes of a model's params, computed without allocating anything: the
    target that tells orbax what to restore."""
    return jax.eval_shape(partial(init_params, model, seq_len=seq_len), jax.random.key(0))


def count_params(tree: Any) -> int:
    """Number of scalars in a params tree (`None` halves of a split count nothing)."""
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------
# Loss and training steps
# ----------------------------------------------------------------------------------------


def masked_loss(model: ByteLM, params: Params, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-byte cross-entropy over real bytes only, and how many there were."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model.apply({"params": params}, inputs)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weights = (targets != PAD).astype(losses.dtype)
    count = weights.sum()
    return (losses * weights).sum() / jnp.maximum(count, 1.0), count


def make_train_step(model: ByteLM, tx: optax.GradientTransformation) -> Callable:
    """Jitted full-model step: (params, opt_state, batch) -> (params, opt_state, loss)."""

    @jax.jit
    def step(params: Params, opt_state: Any, batch: jax.Array) -> tuple[Params, Any, jax.Array]:
        (loss, _), grads = jax.value_and_grad(partial(masked_loss, model), has_aux=True)(
            params, batch
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_adapter_step(model: ByteLM, tx: optax.GradientTransformation, frozen: Params) -> Callable:
    """Jitted LoRA step: (adapter, opt_state, batch) -> (adapter, opt_state, loss).

    Gradients and optimizer state exist for the adapter only. The frozen weights are an
    input of the compiled step but not an output, so no step can change them.
    """

    def loss_of_adapter(
        adapter: Params, frozen: Params, batch: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        return masked_loss(model, jaxembed.lora.combine(adapter, frozen), batch)

    @jax.jit
    def step(
        adapter: Params, opt_state: Any, batch: jax.Array, frozen: Params
    ) -> tuple[Params, Any, jax.Array]:
        (loss, _), grads = jax.value_and_grad(loss_of_adapter, has_aux=True)(adapter, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    # Passed as an argument rather than closed over: closed-over arrays would be baked into
    # the compiled program as constants.
    return lambda adapter, opt_state, batch: step(adapter, opt_state, batch, frozen)


def make_evaluator(model: ByteLM) -> Callable[[Params, list[np.ndarray]], float]:
    """Held-out loss per real byte (nats), weighted by byte count across batches."""
    loss_fn = jax.jit(partial(masked_loss, model))

    def evaluate(params: Params, batches: list[np.ndarray]) -> float:
        totals = [loss_fn(params, batch) for batch in batches]
        nats = sum(float(loss) * float(count) for loss, count in totals)
        return nats / max(sum(float(count) for _, count in totals), 1.0)

    return evaluate


def schedule(peak: float, steps: int) -> optax.Schedule:
    """Linear warmup (5%) then cosine decay to 10% of peak."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(1, steps // 20), max(2, steps), end_value=peak / 10
    )


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
    progress bar showing loss and tokens/s, evaluating held-out loss every `--eval-every`."""
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


# ----------------------------------------------------------------------------------------
# Checkpoints (orbax)
# ----------------------------------------------------------------------------------------


def save_params(path: pathlib.Path, params: Params) -> None:
    """Saves a params tree (plain dict of arrays, LoRA weights included if present)."""
    with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the write
        checkpointer.save(path.resolve(), params, force=True)


def restore_params(path: pathlib.Path, target: Params) -> Params:
    """Restores params saved by `save_params`; `target` gives structure, shapes and dtypes
    (e.g. `abstract_params` of a freshly built model)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path.resolve(), target)


def checkpoint_round_trip(
    path: pathlib.Path, params: Params, model: ByteLM, logits_fn: Callable, batch: np.ndarray
) -> bool:
    """Saves, restores into the structure of a freshly built `model`, and checks that the
    restored params give bit-identical logits (`logits_fn(params, batch)`)."""
    save_params(path, params)
    restored = restore_params(path, abstract_params(model, model.max_len))
    return bool(np.array_equal(logits_fn(params, batch), logits_fn(restored, batch)))


def make_logits_fn(model: ByteLM) -> Callable[[Params, np.ndarray], np.ndarray]:
    """Jitted (params, sequences) -> logits for the inputs, as NumPy (compiled once per model)."""
    apply = jax.jit(lambda params, inputs: model.apply({"params": params}, inputs))
    return lambda params, batch: np.asarray(apply(params, batch[:, :-1]))


# ----------------------------------------------------------------------------------------
# Reporting
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


# ----------------------------------------------------------------------------------------
# The example
# ----------------------------------------------------------------------------------------


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


def pretrain(
    args: argparse.Namespace,
    model: ByteLM,
    key: jax.Array,
    source: Domain,
    eval_sets: dict[str, list[np.ndarray]],
    rng: np.random.Generator,
) -> tuple[Params, Curves]:
    """Trains every weight of a fresh model on the source domain."""
    params = jit_init(model, key, args.seq_len)
    tx = optax.adamw(schedule(args.lr, args.steps_pretrain), weight_decay=0.01)
    evaluate = make_evaluator(model)
    return train(
        "pretrain",
        make_train_step(model, tx),
        (params, tx.init(params)),
        random_batches(source.train, args.batch_size, rng),
        args.steps_pretrain,
        lambda p: {name: evaluate(p, batches) for name, batches in eval_sets.items()},
        args,
    )


def finetune_lora(
    args: argparse.Namespace,
    lora_model: ByteLM,
    pretrained: Params,
    key: jax.Array,
    target: Domain,
    eval_sets: dict[str, list[np.ndarray]],
    rng: np.random.Generator,
) -> tuple[Params, Params, Curves]:
    """Adds a LoRA adapter to the pretrained token table and trains only the adapter on the
    target domain. Returns (all LoRA params, the adapter alone, curves).

    `lora_model` is the pretraining architecture with `lora_rank` set on the token embedding:
    it reads the same params plus the adapter. A fresh adapter has B = 0, so training starts
    from exactly the pretrained model's outputs.
    """
    lora_params = {
        **pretrained,
        "token_embed": jaxembed.enable_lora(pretrained["token_embed"], key, args.lora_rank),
    }
    # Classic LoRA: the adapter alone trains; attention, MLP, norms and positions stay frozen.
    adapter, frozen = jaxembed.lora.split_trainable(lora_params, adapters_only=True)
    tx = optax.adam(schedule(args.lora_lr, args.steps_finetune))
    evaluate = make_evaluator(lora_model)
    adapter, curves = train(
        "LoRA fine-tune",
        make_adapter_step(lora_model, tx, frozen),
        (adapter, tx.init(adapter)),
        random_batches(target.train, args.batch_size, rng),
        args.steps_finetune,
        lambda a: {
            name: evaluate(jaxembed.lora.combine(a, frozen), batches)
            for name, batches in eval_sets.items()
        },
        args,
    )
    return jaxembed.lora.combine(adapter, frozen), adapter, curves


def merge(lora_params: Params, lora_alpha: float) -> Params:
    """The LoRA params with the adapter folded into the token table: the plain model's params.

    `lora_alpha` must be the one the LoRA model trained with (its module attribute), or the
    merged table is scaled wrongly.
    """
    return {
        **lora_params,
        "token_embed": jaxembed.merge_lora(lora_params["token_embed"], lora_alpha=lora_alpha),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the whole example; returns what the test checks (losses, params, paths, checks)."""
    args = parse_args(argv)
    started = time.perf_counter()
    checkpoints = args.out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    init_key, lora_key = jax.random.split(jax.random.key(args.seed))

    source = load_domain(args.pretrain_packages.split(","), args.seq_len)
    target = load_domain(args.finetune_packages.split(","), args.seq_len)
    domains = (source.name, target.name)
    describe_run(source, target, args)
    eval_sets = {
        d.name: fixed_batches(evenly_spaced(d.held_out, args.eval_sequences), args.batch_size)
        for d in (source, target)
    }
    probe = eval_sets[target.name][0]  # a fixed held-out batch for comparing outputs

    model, lora_model = build_model(args), build_model(args, lora=True)
    logits_fn, lora_logits_fn = make_logits_fn(model), make_logits_fn(lora_model)

    pretrained, pretrain_curves = pretrain(args, model, init_key, source, eval_sets, rng)
    pretrained_ok = checkpoint_round_trip(
        checkpoints / "pretrained", pretrained, model, logits_fn, probe
    )

    lora_params, adapter, finetune_curves = finetune_lora(
        args, lora_model, pretrained, lora_key, target, eval_sets, rng
    )
    lora_ok = checkpoint_round_trip(
        checkpoints / "lora", lora_params, lora_model, lora_logits_fn, probe
    )

    # Full float32 matmuls for the check (merge_lora merges at full precision itself): GPUs
    # (TF32) and TPUs (bfloat16 passes) otherwise round float32 matmuls, and a 1e-4 tolerance
    # would test that rounding.
    with jax.default_matmul_precision("highest"):
        merged = merge(lora_params, args.lora_alpha)
        unmerged_logits = lora_logits_fn(lora_params, probe)
        merged_logits = logits_fn(merged, probe)
    merge_diff = float(np.max(np.abs(merged_logits - unmerged_logits)))
    merge_ok = bool(np.allclose(merged_logits, unmerged_logits, atol=1e-4, rtol=1e-4))
    merged_ok = checkpoint_round_trip(checkpoints / "merged", merged, model, logits_fn, probe)

    evaluate = make_evaluator(model)
    before = {name: losses[-1] for name, losses in pretrain_curves.eval_loss.items()}
    after = {name: evaluate(merged, batches) for name, batches in eval_sets.items()}
    plot_path = args.out / "loss_curves.png"
    plot_curves(plot_path, pretrain_curves, finetune_curves, domains, args.steps_pretrain)
    full, lora_count = count_params(pretrained), count_params(adapter)

    print()
    print(results_table(domains, before, after, pretrain_curves, finetune_curves, full, lora_count))
    print(
        "(LoRA trades some of the pretraining domain for the fine-tuning one; the unmerged "
        "checkpoint keeps the base weights: jaxembed.lora.remove_lora gets them back.)"
    )
    print()
    verdict = {True: "ok", False: "FAILED"}
    print(f"merged == unmerged LoRA outputs: {verdict[merge_ok]} (max |diff| {merge_diff:.1e})")
    print(
        f"checkpoints restore identical outputs: pretrained {verdict[pretrained_ok]}, "
        f"lora {verdict[lora_ok]}, merged {verdict[merged_ok]}  -> {checkpoints}"
    )
    print(f"loss curves -> {plot_path}")
    print(f"total time: {time.perf_counter() - started:.0f} s")

    return {
        "args": args,
        "domains": domains,
        "pretrain": pretrain_curves,
        "finetune": finetune_curves,
        "eval_before": before,
        "eval_after": after,
        "params": {"pretrained": pretrained, "lora": lora_params, "merged": merged},
        "merge_max_diff": merge_diff,
        "merge_ok": merge_ok,
        "checkpoints_ok": {"pretrained": pretrained_ok, "lora": lora_ok, "merged": merged_ok},
        "checkpoint_dir": checkpoints,
        "plot": plot_path,
        "trainable_params": {"full": full, "lora": lora_count},
        "ok": merge_ok and pretrained_ok and lora_ok and merged_ok,
    }


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
