"""Everything `new_tokens.py` needs around its lesson: the command line, a tiny synthetic
dialogue corpus whose turns start with chat markers, the marker metrics and the printing.

No jaxembed call is made here. The byte encoding, the pretraining data, the training loop and
its progress bars are the main example's (`_lm_data.py`, `_lm_harness.py`, `train_lm.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from _lm_data import PAD, encode
from _lm_harness import format_table

# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

SIZES = {  # name: (default, --quick)
    "steps_pretrain": (400, 200),
    "steps_finetune": (150, 100),
    "batch_size": (16, 16),
    "seq_len": (64, 64),
    "d_model": (64, 48),
    "layers": (2, 1),
    "heads": (4, 2),
    "dialogues": (600, 300),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The example's flags. The defaults take about half a minute on two CPU cores,
    `--quick` (the test's size) about half that; any size flag overrides either."""
    parser = argparse.ArgumentParser(
        description=(
            "Add chat markers to the main example's byte-level LM: jaxembed.resize, trainable "
            "tokens (+ LoRA) fine-tuned on a synthetic dialogue corpus, merge."
        )
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="smaller model, fewer steps (the test's size)")
    helps = {
        "steps_pretrain": "pretraining steps (every weight of a fresh ByteLM)",
        "steps_finetune": "fine-tuning steps, per run (trainable tokens, then tokens + LoRA)",
        "batch_size": "sequences per batch",
        "seq_len": "max ids per sequence (shorter are padded)",
        "d_model": "embedding and model width",
        "layers": "transformer blocks",
        "heads": "attention heads",
        "dialogues": "synthetic training dialogues (a quarter as many are held out)",
    }
    for name, (default, quick) in SIZES.items():
        flag = "--" + name.replace("_", "-")
        add(flag, type=int, default=None, help=f"{helps[name]} ({default}; --quick {quick})")
    add("--lora-rank", type=int, default=4, help="rank of the LoRA adapter (%(default)s)")
    add("--lora-alpha", type=float, default=8.0, help="LoRA scale numerator (%(default)s)")
    add("--lr", type=float, default=3e-3, help="peak learning rate, pretraining (%(default)s)")
    add(
        "--finetune-lr",
        type=float,
        default=3e-2,
        help="peak learning rate, fine-tuning (%(default)s)",
    )
    add("--seed", type=int, default=0, help="seed for params, data and batches (%(default)s)")
    add("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name, (default, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lora_rank < 1:
        parser.error("--lora-rank must be at least 1")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    # The main example's loop reads this; it is given no held-out sets here (main scores the
    # models itself, from their logits), so its evaluations cost nothing.
    args.eval_every = max(args.steps_pretrain, args.steps_finetune)
    return args


# ----------------------------------------------------------------------------------------
# A synthetic dialogue corpus
# ----------------------------------------------------------------------------------------

QUESTIONS = (  # (user turn, bot turn); {x} is a variable name
    ("how do I sort {x}?", "sorted({x})"),
    ("how long is {x}?", "len({x})"),
    ("how do I reverse {x}?", "{x}[::-1]"),
    ("how do I copy {x}?", "{x}.copy()"),
    ("what type is {x}?", "type({x})"),
    ("how do I print {x}?", "print({x})"),
    ("what is the sum of {x}?", "sum({x})"),
    ("what is the largest of {x}?", "max({x})"),
    ("how do I empty {x}?", "{x}.clear()"),
)
GREETINGS = (("hi", "hello! ask me about python."), ("hello", "hi! what do you need?"))
THANKS = (("thanks", "you're welcome."), ("great, bye", "bye!"))
NAMES = ("items", "data", "values", "words", "rows", "names", "lines", "numbers", "keys", "xs")


def dialogues(count: int, rng: np.random.Generator) -> list[list[tuple[str, str]]]:
    """`count` dialogues, each a list of (speaker, text) turns, speaker "user" or "bot",
    alternating from "user": maybe a greeting, one to three questions, maybe thanks."""
    out = []
    for _ in range(count):
        pairs = [GREETINGS[rng.integers(len(GREETINGS))]] if rng.random() < 0.4 else []
        for _ in range(rng.integers(1, 4)):
            question, answer = QUESTIONS[rng.integers(len(QUESTIONS))]
            name = NAMES[rng.integers(len(NAMES))]
            pairs.append((question.format(x=name), answer.format(x=name)))
        if rng.random() < 0.4:
            pairs.append(THANKS[rng.integers(len(THANKS))])
        out.append([turn for user, bot in pairs for turn in (("user", user), ("bot", bot))])
    return out


def encode_turn(speaker: str, text: str, markers: Mapping[str, int]) -> np.ndarray:
    """One turn as ids: its speaker's marker, then the text's bytes (ids 1..256), then a line
    break; the next turn's marker follows the line break."""
    return np.concatenate([[markers[speaker]], encode(f"{text}\n".encode())]).astype(np.int32)


def to_sequences(
    corpus: Sequence[list[tuple[str, str]]], markers: Mapping[str, int], seq_len: int
) -> np.ndarray:
    """Dialogues -> `(num_sequences, seq_len + 1)` ids, padded with PAD: whole turns are packed
    while they fit, so every sequence starts with a marker and a dialogue may span several."""
    rows: list[list[int]] = []
    for dialogue in corpus:
        row: list[int] = []
        for speaker, text in dialogue:
            turn = encode_turn(speaker, text, markers)[: seq_len + 1].tolist()
            if len(row) + len(turn) > seq_len + 1:
                rows.append(row)
                row = []
            row += turn
        rows.append(row)
    sequences = np.full((len(rows), seq_len + 1), PAD, dtype=np.int32)
    for i, row in enumerate(rows):
        sequences[i, : len(row)] = row
    return sequences


PROMPT = [("user", "how do I sort names?")]
"""The start of a dialogue whose next token the models predict at the end."""


def render(ids: Sequence[int], markers: Mapping[str, int]) -> str:
    """Ids back to text, markers spelled `<user>` and `<bot>`, padding dropped."""
    names = {token: f"<{speaker}>" for speaker, token in markers.items()}
    out = []
    for token in map(int, ids):
        if token in names:
            out.append(names[token])
        elif token != PAD:
            out.append(bytes([token - 1]).decode("latin-1"))
    return "".join(out)


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float64: a probability of 1e-9 stays one."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def scores(
    logits_fn: Callable[[Any, np.ndarray], np.ndarray],
    params: Any,
    held_out: Mapping[str, Sequence[np.ndarray]],
    markers: Mapping[str, int],
) -> dict[str, float]:
    """Held-out loss (nats per real target) on each set of `held_out`, and on the "dialogue"
    set the mean probability of the right marker at turn boundaries (the targets that are
    markers: the next speaker's, after the line break that ends a turn)."""
    marker_ids = np.array(sorted(markers.values()))
    result = {}
    for name, batches in held_out.items():
        chosen, at_markers = [], []
        for batch in batches:
            targets = batch[:, 1:]
            real = targets != PAD
            log_probs = log_softmax(logits_fn(params, batch)[real])
            chosen.append(np.take_along_axis(log_probs, targets[real][:, None], axis=-1)[:, 0])
            at_markers.append(np.isin(targets[real], marker_ids))
        chosen, at_markers = np.concatenate(chosen), np.concatenate(at_markers)
        result[f"{name}_loss"] = float(-chosen.mean())
        if at_markers.any():
            result["marker_probability"] = float(np.exp(chosen[at_markers]).mean())
    return result


def next_tokens(
    logits_fn: Callable[[Any, np.ndarray], np.ndarray],
    params: Any,
    turns: Sequence[tuple[str, str]],
    markers: Mapping[str, int],
    shape: tuple[int, int],
    k: int = 3,
) -> list[tuple[str, float]]:
    """The `k` likeliest next tokens after `turns` (as text, with their probabilities). The
    prompt fills the first row of a `shape` batch: the shape the logits were compiled for."""
    prompt = np.concatenate([encode_turn(speaker, text, markers) for speaker, text in turns])
    batch = np.full(shape, PAD, dtype=np.int32)
    batch[0, : len(prompt)] = prompt
    probs = np.exp(log_softmax(logits_fn(params, batch)[0, len(prompt) - 1]))
    top = np.argsort(-probs)[:k]
    return [(render([token], markers) or "<pad>", float(probs[token])) for token in top]


# ----------------------------------------------------------------------------------------
# Params trees
# ----------------------------------------------------------------------------------------


def path_name(path: tuple[Any, ...]) -> str:
    """A params path as `token_embed/embeddings`."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def leaf_paths(tree: Any) -> list[str]:
    """The paths of a tree's leaves (`None`, the other half of a split, is no leaf)."""
    return [path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def changed_leaves(before: Any, after: Any) -> list[str]:
    """The paths of the leaves that differ between two params trees of one structure: bit
    for bit, so a leaf that moved by one ulp counts."""
    return [
        path_name(path)
        for (path, old), new in zip(
            jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after), strict=True
        )
        if not np.array_equal(np.asarray(old), np.asarray(new))
    ]


# ----------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------


def yes(ok: bool) -> str:
    return "ok" if ok else "FAILED"


def describe_run(sample: np.ndarray, markers: Mapping[str, int], args: argparse.Namespace) -> None:
    """What the user is about to watch: the device, the model size and a sample of the
    dialogue corpus."""
    print(
        f"JAX on {jax.devices()[0].device_kind} ({jax.default_backend()}); ByteLM d_model "
        f"{args.d_model}, {args.layers} block(s); {args.dialogues} training dialogues, e.g."
    )
    for line in render(sample, markers).rstrip("\n").split("\n"):
        print(f"     {line}")


def results_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """One row per model: held-out dialogue loss, the right marker's probability at turn
    boundaries, held-out code loss and the number of trained parameters."""
    table = [["held-out scores", "dialogue loss", "P(marker)", "code loss", "trained params"]]
    for name, row in rows.items():
        trained = row.get("trainable")
        table.append(
            [
                name,
                f"{row['dialogue_loss']:.3f}",
                f"{row['marker_probability']:.4f}",
                f"{row['code_loss']:.3f}",
                f"{trained:,}" if trained else "-",
            ]
        )
    return "\n".join("   " + line for line in format_table(table).split("\n"))


def print_checks(result: dict[str, Any]) -> None:
    """The closing output, from what `new_tokens.main` gathered: what trained, what stayed
    bit for bit, whether merging kept the outputs, and the next token after a prompt."""
    checks = result["checks"]
    width = max(map(len, [*checks, *result["next_tokens"]])) + 1
    print("\n4. Checks")
    print("   what fine-tuning changed, bit for bit:")
    for name, check in checks.items():
        changed = ", ".join(path.rsplit("/", 1)[-1] for path in check["changed_leaves"])
        print(f"     {name + ':':<{width}}  {changed}")
    frozen = len(next(iter(checks.values()))["frozen_leaves"])
    verdicts = [f"{name} {yes(check['only_trainable_changed'])}" for name, check in checks.items()]
    print(
        f"     and nothing else, the grown table and the transformer ({frozen} arrays): "
        + ", ".join(verdicts)
    )
    print("   the old tokens after fine-tuning:")
    for name, check in checks.items():
        change = check["old_rows_max_change"]
        if check["lora"]:
            print(
                f"     {name + ':':<{width}}  embeddings changed, by design (LoRA adapts every "
                f"row): max |change| {change:.3f}"
            )
        else:
            print(f"     {name + ':':<{width}}  embeddings bit-identical: {yes(change == 0)}")
            print(
                f"     {'':<{width}}  old vocabulary's logits on code == pretrained ByteLM's: "
                f"{yes(check['old_logits_equal'])}"
            )
    print("   merge_trainable_tokens (+ merge_lora): a plain table, same outputs as unmerged:")
    for name, check in checks.items():
        print(
            f"     {name + ':':<{width}}  {check['merged_keys']} {check['merged_shape']}: "
            f"{yes(check['merge_ok'])} (max |logit diff| {check['merge_max_diff']:.1e})"
        )
    prompt = "".join(f"<{speaker}>{text}\n" for speaker, text in PROMPT)
    print(f"\n5. The likeliest next tokens after {prompt!r}")
    for name, top in result["next_tokens"].items():
        shown = "  ".join(f"{token!r} {p:.2f}" for token, p in top)
        print(f"     {name + ':':<{width}}  {shown}")


def all_ok(result: dict[str, Any]) -> bool:
    """Every claim of the printout: bit-identical where promised, merges exact, and both
    fine-tunes better at the markers and on the dialogues than the untrained grown model."""
    rows, checks = result["rows"], result["checks"]
    before = rows["grown, untrained"]
    return (
        result["old_rows_kept"]
        and all(result["old_logits_kept"].values())
        and all(check["only_trainable_changed"] and check["merge_ok"] for check in checks.values())
        and checks["tokens"]["old_rows_max_change"] == 0
        and checks["tokens"]["old_logits_equal"]
        and all(
            rows[name]["marker_probability"] > before["marker_probability"]
            and rows[name]["dialogue_loss"] < before["dialogue_loss"]
            for name in checks
        )
    )
