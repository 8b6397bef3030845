"""Data for `train_lm.py`: Python's own standard library as padded byte sequences.

Nothing to download: the data are the `.py` files every CPython ships. A domain is a few stdlib
packages, split by whole file into training and held-out text, cut at line breaks into
sequences of varying length and padded with `PAD`, so the batches really are padded and the
mask from `mask_zero=True` really matters.
"""

from __future__ import annotations

import math
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

PAD = 0
VOCAB_SIZE = 257  # 256 byte values, shifted by one so that id 0 means padding
PRETRAIN_PACKAGES = ("json", "http", "email")
FINETUNE_PACKAGES = ("unittest",)
HOLD_OUT_EVERY = 4  # every 4th file of a domain (sorted by path) is held out for evaluation,
HOLD_OUT_MAX_SHARE = 0.25  # as long as held-out files stay under a quarter of the bytes


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
    return Domain(
        name="+".join(packages),
        train=to_sequences(train, seq_len),
        held_out=to_sequences(held_out, seq_len),
        train_files=train,
        held_out_files=held_out,
    )


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


def eval_batches(sequences: np.ndarray, count: int, batch_size: int) -> list[np.ndarray]:
    """At most `count` held-out sequences, spread evenly over all held-out files (caps
    evaluation time), cut into equal batches. The last batch is filled with all-PAD rows,
    which carry no weight in the loss, so every batch has the same shape (one compilation)."""
    if len(sequences) > count:
        sequences = sequences[np.linspace(0, len(sequences) - 1, count).round().astype(int)]
    total = math.ceil(len(sequences) / batch_size) * batch_size
    padded = np.full((total, sequences.shape[1]), PAD, dtype=np.int32)
    padded[: len(sequences)] = sequences
    return list(padded.reshape(-1, batch_size, sequences.shape[1]))
