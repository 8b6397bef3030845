"""Everything `sparse_training.py` needs around its lesson: the command line, the data (lines of
the Python standard library as word and hashed-bigram ids), the training loop with its progress
bar, held-out evaluation, step timing and the final summary.

No jaxembed call is made here: the loop runs any jitted step on any state.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from _lm_data import hold_out, package_files
from _lm_harness import format_table
from tqdm.auto import tqdm

PAD, UNKNOWN = 0, 1  # row 0: padding (masked out of the bag); row 1: a word not in the vocabulary
# Present in every CPython since 3.10, on every platform (tkinter and idlelib are optional).
PACKAGES = (
    "asyncio", "concurrent", "ctypes", "email", "html", "http", "importlib", "json",
    "logging", "multiprocessing", "unittest", "urllib", "wsgiref", "xml", "xmlrpc",
)  # fmt: skip
TOKEN = re.compile(r"\w+|[^\w\s]+")  # identifiers, keywords, numbers; runs of punctuation

# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

DEFAULTS = {"steps": 800, "vocab": 2**18, "dense_steps": 20, "eval_samples": 4096}
QUICK = {"steps": 300, "vocab": 2**17, "dense_steps": 8, "eval_samples": 1024}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The example's flags; the defaults are the <30 s CPU run, `--quick` a ~10 s one."""
    parser = argparse.ArgumentParser(
        description=(
            "Classify which stdlib package a line of Python comes from, with a bag of "
            "embeddings over a large table of words and hashed bigrams, trained row-sparse "
            "with jaxembed.sparse; a few dense optax steps of the same model for comparison."
        ),
    )
    add = parser.add_argument

    def sized(name: str, text: str) -> None:  # a flag whose default --quick shrinks
        key = name.lstrip("-").replace("-", "_")
        add(name, type=int, help=f"{text} (default {DEFAULTS[key]:,}; {QUICK[key]:,} with --quick)")

    sized("--steps", "sparse training steps")
    sized("--vocab", "rows of the table: padding, unknown, words, then hashed-bigram buckets")
    sized("--dense-steps", "dense optax steps, timed for comparison (the first compiles)")
    sized("--eval-samples", "held-out samples evaluated before and after training")
    add("--quick", action="store_true", help="a smaller, faster run (the sizes above)")
    add(
        "--optimizer",
        choices=("rowwise_adagrad", "lazy_adam"),
        default="rowwise_adagrad",
        help="jaxembed.sparse optimizer for the table (default %(default)s)",
    )
    add(
        "--lr",
        type=float,
        help="table learning rate (default 0.05 rowwise_adagrad, 0.003 lazy_adam)",
    )
    add("--head-lr", type=float, default=0.003, help="optax.adam's, for the head (%(default)s)")
    add("--words", type=int, default=16384, help="most frequent words given a row (%(default)s)")
    add("--dim", type=int, default=64, help="embedding dimension (%(default)s)")
    add("--batch-size", type=int, default=256, help="samples per step (%(default)s)")
    add("--lines", type=int, default=2, help="consecutive non-blank lines per sample (%(default)s)")
    add("--max-words", type=int, default=32, help="words kept per sample (%(default)s)")
    add(
        "--packages",
        default=",".join(PACKAGES),
        help="comma-separated stdlib packages: the classes",
    )
    add("--seed", type=int, default=0, help="for the params and the batch order (%(default)s)")
    add("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "rowwise_adagrad" else 0.003
    for key in (*DEFAULTS, "words", "dim", "batch_size", "lines", "max_words"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.vocab < 4:
        parser.error("--vocab must be at least 4 (padding, unknown, a word, a bucket)")
    args.packages = [p for p in args.packages.split(",") if p]
    if len(args.packages) < 2:
        parser.error("--packages needs at least two packages (the classes)")
    return args


# ----------------------------------------------------------------------------------------
# Data: lines of the standard library as word and hashed-bigram ids
# ----------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Samples of `lines` consecutive non-blank lines, labelled with their package.

    `train_ids` / `held_out_ids` are `(samples, 2 * max_words - 1)` int32, padded with PAD:
    a sample's word ids (the `words` most frequent training words, else UNKNOWN), then one
    hashed-bigram id per pair of neighbouring words (all pairs, known words or not).
    """

    classes: list[str]
    train_ids: np.ndarray
    train_labels: np.ndarray
    held_out_ids: np.ndarray
    held_out_labels: np.ndarray
    words: int  # rows [2, 2 + words) hold words
    buckets: int  # rows [2 + words, vocab) hold hashed bigrams
    files: tuple[int, int]  # training and held-out files


def read_samples(path: Any, lines: int, max_words: int) -> list[list[str]]:
    """A file's non-blank lines in groups of `lines`, as token lists of at most `max_words`."""
    text = path.read_text(encoding="utf-8", errors="replace")
    rows = [line for line in text.splitlines() if line.strip()]
    groups = (TOKEN.findall(" ".join(rows[i : i + lines])) for i in range(0, len(rows), lines))
    return [tokens[:max_words] for tokens in groups if len(tokens) >= 2]


def load_corpus(args: argparse.Namespace) -> Corpus:
    """Reads the packages, holds out whole files (as `_lm_data` does for train_lm.py), builds
    the vocabulary from the training files only and turns every sample into ids."""
    train, held_out, files = [], [], [0, 0]
    for label, package in enumerate(args.packages):
        paths = package_files([package])
        held = set(hold_out(paths))
        for path in paths:
            split = held_out if path in held else train
            split += [(tokens, label) for tokens in read_samples(path, args.lines, args.max_words)]
            files[path in held] += 1
    counts = collections.Counter(token for tokens, _ in train for token in tokens)
    words = min(args.words, len(counts), (args.vocab - 2) // 2)
    word_ids = {w: 2 + i for i, (w, _) in enumerate(counts.most_common(words))}
    buckets = args.vocab - 2 - words

    def featurize(samples: list[tuple[list[str], int]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(samples), 2 * args.max_words - 1), PAD, np.int32)
        for row, (tokens, _) in enumerate(samples):
            bigrams = [
                2 + words + zlib.crc32(f"{a} {b}".encode()) % buckets  # stable across runs
                for a, b in itertools.pairwise(tokens)
            ]
            features = [word_ids.get(token, UNKNOWN) for token in tokens] + bigrams
            ids[row, : len(features)] = features
        return ids, np.array([label for _, label in samples], np.int32)

    train_ids, train_labels = featurize(train)
    held_out_ids, held_out_labels = featurize(held_out)
    return Corpus(
        classes=args.packages,
        train_ids=train_ids,
        train_labels=train_labels,
        held_out_ids=held_out_ids,
        held_out_labels=held_out_labels,
        words=words,
        buckets=buckets,
        files=(files[0], files[1]),
    )


def random_batches(
    ids: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled (ids, labels) batches, reshuffled every epoch (shapes stay static)."""
    if len(ids) < batch_size:
        order = np.resize(np.arange(len(ids)), batch_size)
        ids, labels = ids[order], labels[order]
    while True:
        order = rng.permutation(len(ids))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = order[start : start + batch_size]
            yield ids[chosen], labels[chosen]


def describe_run(corpus: Corpus, args: argparse.Namespace) -> None:
    """What the user is about to watch: the data, the table and the two steps compared."""
    print(
        f"Python {sys.version.split()[0]} standard library, JAX on "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    )
    print(
        f"  {len(corpus.classes)} packages (the classes): {', '.join(corpus.classes)}\n"
        f"  {len(corpus.train_ids):,} training samples of {args.lines} line(s) from "
        f"{corpus.files[0]} files, {len(corpus.held_out_ids):,} held out from whole other "
        f"files ({corpus.files[1]})"
    )
    print(
        f"Table: {args.vocab:,} x {args.dim} = padding + unknown + {corpus.words:,} words + "
        f"{corpus.buckets:,} hashed-bigram buckets ({4 * args.vocab * args.dim / 2**20:.0f} MiB)"
        f"; head: {args.dim} -> {len(corpus.classes)} (optax.adam)"
    )


# ----------------------------------------------------------------------------------------
# Training loop, timing and evaluation
# ----------------------------------------------------------------------------------------


@dataclass
class Log:
    """What a training run recorded."""

    losses: list[float]
    seconds: list[float]  # per step, the first one compiling
    rows: list[int]  # distinct ids per batch: the table rows a sparse step writes

    def ms_per_step(self) -> float:
        return median_ms(self.seconds)


def train(
    step: Callable,
    state: tuple[Any, ...],
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    steps: int,
    *,
    desc: str,
    quiet: bool,
    touched: np.ndarray | None = None,
) -> tuple[tuple[Any, ...], Log]:
    """Runs `*state, loss = step(*state, ids, labels)` `steps` times with a progress bar
    showing the loss and the time per step. Marks every id of every batch in `touched`, if
    given. Returns the final state and what was recorded."""
    log = Log([], [], [])
    bar = tqdm(range(1, steps + 1), desc=desc, unit="step", disable=quiet)
    bar.set_postfix_str("compiling the step")
    for i in bar:
        ids, labels = next(batches)
        if touched is not None:
            touched[ids] = True
        log.rows.append(len(np.unique(ids)))
        start = time.perf_counter()
        *state, loss = step(*state, ids, labels)
        log.losses.append(float(loss))  # waits for the step: the time is the real compute
        log.seconds.append(time.perf_counter() - start)
        if i == 2 or i % 10 == 0 or i == steps:  # step 1 compiles: its time is not shown
            recent = np.mean(log.losses[-10:])
            bar.set_postfix_str(f"loss {recent:.3f}  {log.ms_per_step():.1f} ms/step")
    bar.close()
    return tuple(state), log


def median_ms(seconds: Sequence[float]) -> float:
    """Median milliseconds per step, the first (compiling) step left out when there are more."""
    return 1000 * float(np.median(seconds[1:] if len(seconds) > 1 else seconds))


def make_evaluator(
    logits_fn: Callable, ids: np.ndarray, labels: np.ndarray, count: int, batch_size: int
) -> Callable[..., tuple[float, float]]:
    """`evaluate(*params) -> (mean loss, accuracy)` of `logits_fn(*params, ids)` on about
    `count` held-out samples, spread evenly over the held-out files, in whole batches (one
    compilation)."""
    total = max(batch_size, min(count, len(ids)) // batch_size * batch_size)
    chosen = np.resize(
        np.linspace(0, len(ids) - 1, min(total, len(ids))).round().astype(int), total
    )
    ids, labels = ids[chosen], labels[chosen]

    @jax.jit
    def batch_totals(params: Any, ids: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
        logits = logits_fn(*params, ids)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        return nll, (logits.argmax(-1) == labels).sum()

    def evaluate(*params: Any) -> tuple[float, float]:
        totals = [
            batch_totals(params, ids[s : s + batch_size], labels[s : s + batch_size])
            for s in range(0, total, batch_size)
        ]
        nll = sum(float(nll) for nll, _ in totals)
        return nll / total, sum(int(right) for _, right in totals) / total

    return evaluate


def nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (an optimizer state, say)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def mib(count: int) -> str:
    return f"{count / 2**20:,.2f} MiB"


# ----------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------


def print_summary(result: dict[str, Any], started: float) -> None:
    """The closing output, from what `sparse_training.main` returns."""
    args, sparse, dense = result["args"], result["sparse"], result["dense"]
    (loss_before, accuracy_before), (loss_after, accuracy_after) = (
        result["eval_before"],
        result["eval_after"],
    )
    window = max(1, min(50, len(sparse.losses) // 5))
    first, last = np.mean(sparse.losses[:window]), np.mean(sparse.losses[-window:])
    quality = [
        ["", "before", "after", "change"],
        ["held-out loss (nats)", f"{loss_before:.3f}", f"{loss_after:.3f}",
         f"{loss_after - loss_before:+.3f}"],
        ["held-out accuracy", f"{accuracy_before:.1%}", f"{accuracy_after:.1%}",
         f"{100 * (accuracy_after - accuracy_before):+.1f} pt"],
        [f"training loss (mean of {window} steps)", f"{first:.3f}", f"{last:.3f}",
         f"{last - first:+.3f}"],
    ]  # fmt: skip
    sparse_ms, dense_ms = sparse.ms_per_step(), dense.ms_per_step()
    cost = [
        ["", f"sparse: jaxembed.sparse.{args.optimizer}", f"dense: {result['dense_name']}"],
        ["time per step (median)", f"{sparse_ms:.2f} ms", f"{dense_ms:.2f} ms"],
        ["steps run", f"{len(sparse.losses):,}", f"{len(dense.losses):,}"],
        ["optimizer state (table + head)", *map(mib, result["state_bytes"])],
        ["table rows written per step", f"{np.mean(sparse.rows):,.0f}", f"{args.vocab:,}"],
    ]
    print()
    print(format_table(quality))
    print()
    print(format_table(cost))
    print(f"(the sparse step is {dense_ms / sparse_ms:.1f}x faster here; the table alone is "
          f"{mib(4 * args.vocab * args.dim)})")  # fmt: skip
    print()
    verdict = {True: "ok", False: "FAILED"}
    print(
        f"rows no batch touched ({1 - result['touched'].mean():.1%} of the table) are "
        f"bit-identical after training: {verdict[result['untouched_identical']]}"
    )
    print(f"total time: {time.perf_counter() - started:.0f} s")
