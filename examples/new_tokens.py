"""New tokens for a pretrained model: chat markers added to the main example's byte-level LM.

Read it top to bottom; it teaches four things.

1. `jaxembed.resize` grows the pretrained (257, d) table of `train_lm.ByteLM` by two rows,
   `<user>` = 257 and `<bot>` = 258, initialized as the mean of the old rows. Old rows are kept
   bit for bit, so the tied model's logits for old tokens over the old vocabulary are too.
2. `jaxembed.enable_trainable_tokens` trains a `(2, d)` delta for exactly the new ids, alone or
   beside a LoRA adapter (`jaxembed.enable_lora`); `jaxembed.lora.split_trainable` keeps the
   table and the rest of the model frozen. Trained on a small synthetic dialogue corpus whose
   turns start with the markers, the model learns to predict them at turn boundaries. Without
   LoRA the old tokens' embeddings, and so the old vocabulary's logits on old text, stay
   bit-identical; LoRA adapts every row, so with it they change, by design.
3. The model reads its token table through the pure functions (`jaxembed.apply`,
   `jaxembed.attend`, `jaxembed.attend_cross_entropy`), which handle a plain table, LoRA and
   trainable tokens alike: no model code changes when the table grows an adapter.
4. `jaxembed.merge_trainable_tokens` and `jaxembed.merge_lora` fold it all into a plain
   (259, d) table with the same outputs.

The byte data, the model and the training loop are the main example's (`train_lm.py`,
`_lm_data.py`, `_lm_harness.py`); `_chat_harness.py` holds the dialogue corpus, the flags, the
marker metrics and the printing.

Run (about half a minute on two CPU cores, `--quick` about 20 s; the same code runs on GPU):

    pip install -e ".[examples]" && python examples/new_tokens.py [--quick]
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the helpers beside this file

import _lm_data as data
from _lm_data import PAD, PRETRAIN_PACKAGES, VOCAB_SIZE

try:  # the example's extras, as train_lm.py's
    import _chat_harness as chat
    import _lm_harness as harness
    import train_lm
except ImportError as error:
    raise SystemExit(
        f"{error.name} is missing: install the example's extras with "
        '`pip install -e ".[examples]"` (orbax-checkpoint, tqdm, matplotlib).'
    ) from error

Params = dict[str, Any]

# The new tokens take the ids right after the byte vocabulary (0 = padding, 1..256 = bytes).
MARKERS = {"user": VOCAB_SIZE, "bot": VOCAB_SIZE + 1}  # <user> = 257, <bot> = 258
NEW_IDS = sorted(MARKERS.values())
GROWN_VOCAB = VOCAB_SIZE + len(NEW_IDS)


class Body(nn.Module):
    """`train_lm.ByteLM` between its token lookup and its tied logits: position embeddings,
    the causal blocks and the final norm, with ByteLM's submodule names, so ByteLM's params
    (less "token_embed") are this module's params."""

    max_len: int
    num_layers: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        positions = jaxembed.Embedding(
            self.max_len, x.shape[-1], out_of_range="clip", name="position_embed"
        )
        attention_mask = nn.combine_masks(
            nn.make_causal_mask(mask), nn.make_attention_mask(mask, mask)
        )
        x = x + positions(jnp.arange(x.shape[-2]))
        for _ in range(self.num_layers):
            x = train_lm.Block(self.num_heads)(x, attention_mask)
        return nn.LayerNorm()(x)


@dataclasses.dataclass(frozen=True)
class GrownLM:
    """ByteLM with its token table as a plain jaxembed params dict, of any size and with
    whatever it holds (LoRA, trainable tokens, both, neither), read by the pure functions.

    Applied as a linen module is (`apply({"params": params}, ids[, targets])`), so the main
    example's `fit`, `masked_loss` and `make_logits_fn` take it as they take ByteLM.
    """

    body: Body
    lora_alpha: float

    def apply(self, variables: dict, ids: jax.Array, targets: jax.Array | None = None) -> Any:
        """`(batch, length)` ids -> tied logits `(batch, length, vocabulary)`, or with
        `targets` the mean cross-entropy over real (non-padding) targets."""
        params = dict(variables["params"])
        table = params.pop("token_embed")  # the rest is the body's
        vectors = jaxembed.apply(table, ids, out_of_range="clip", lora_alpha=self.lora_alpha)
        mask = jaxembed.compute_mask(ids, mask_zero=True)
        hidden = self.body.apply({"params": params}, vectors, mask)
        if targets is None:
            return jaxembed.attend(table, hidden, lora_alpha=self.lora_alpha)
        return jaxembed.attend_cross_entropy(
            table, hidden, targets, where=targets != PAD, lora_alpha=self.lora_alpha
        )


def with_table(params: Params, table: Params) -> Params:
    """The model's params with another token table."""
    return {**params, "token_embed": table}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the whole example; returns what the test checks (scores, checks, params)."""
    args = chat.parse_args(argv)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    init_key, lora_key = jax.random.split(jax.random.key(args.seed))

    # Data: stdlib code (the main example's pretraining domain: bytes only) and dialogues in
    # which every turn starts with its speaker's marker. Checked once, eagerly: "clip" is safe.
    code = data.load_domain(PRETRAIN_PACKAGES, args.seq_len)
    train_dialogues, held_out_dialogues = (
        chat.to_sequences(chat.dialogues(count, rng), MARKERS, args.seq_len)
        for count in (args.dialogues, max(1, args.dialogues // 4))
    )
    jaxembed.check_in_range(code.train, VOCAB_SIZE)
    jaxembed.check_in_range(train_dialogues, GROWN_VOCAB)
    held_out = {
        "dialogue": data.eval_batches(held_out_dialogues, 256, args.batch_size),
        "code": data.eval_batches(code.held_out, 64, args.batch_size),
    }
    code_probe, dialogue_probe = held_out["code"][0], held_out["dialogue"][0]
    chat.describe_run(train_dialogues[0], MARKERS, args)

    # 1. Pretrain the main example's model, every weight, on bytes: a (257, d) table.
    byte_lm = train_lm.ByteLM(args.seq_len, args.d_model, args.layers, args.heads)
    params = jax.jit(partial(train_lm.init_params, byte_lm))(init_key)
    tx = optax.adamw(harness.schedule(args.lr, args.steps_pretrain), weight_decay=0.01)
    batches = data.random_batches(code.train, args.batch_size, rng)
    pretrained, pretrain = train_lm.fit(
        "pretrain", byte_lm, params, tx, batches, args.steps_pretrain, {}, args
    )
    byte_logits_fn = train_lm.make_logits_fn(byte_lm)
    pretrained_logits = byte_logits_fn(pretrained, code_probe)
    code_loss = chat.scores(byte_logits_fn, pretrained, {"code": held_out["code"]}, MARKERS)
    print(
        f"\n1. Pretrained ByteLM on {code.name}: training loss {pretrain.train_loss[0]:.2f} -> "
        f"{pretrain.train_loss[-1]:.2f}, held-out {code_loss['code_loss']:.3f} nats/byte"
    )

    # 2. Grow the table by the two markers; their rows start as the mean of the old rows.
    # Then two ways to train them: a (2, d) delta on exactly the new rows (the table frozen),
    # and the same beside a LoRA adapter on the whole table. A fresh delta and a fresh B are
    # zeros: neither changes an output before training.
    grown = jaxembed.resize(pretrained["token_embed"], GROWN_VOCAB, init="mean")
    starts = {
        "tokens": jaxembed.enable_trainable_tokens(grown, NEW_IDS),
        "tokens + LoRA": jaxembed.enable_trainable_tokens(
            jaxembed.enable_lora(grown, lora_key, args.lora_rank), NEW_IDS
        ),
    }
    model = GrownLM(Body(args.seq_len, args.layers, args.heads), args.lora_alpha)
    logits_fn = train_lm.make_logits_fn(model)
    # Bit for bit: the old rows, and the old vocabulary's logits on code (old tokens only).
    old_rows_kept = bool(
        np.array_equal(grown["embeddings"][:VOCAB_SIZE], pretrained["token_embed"]["embeddings"])
    )
    old_logits_kept = {
        name: bool(
            np.array_equal(
                logits_fn(with_table(pretrained, table), code_probe)[..., :VOCAB_SIZE],
                pretrained_logits,
            )
        )
        for name, table in {"grown": grown, **starts}.items()
    }
    print(
        f"\n2. jaxembed.resize: table {pretrained['token_embed']['embeddings'].shape} -> "
        f"{grown['embeddings'].shape}, <user> = {MARKERS['user']}, <bot> = {MARKERS['bot']}"
    )
    print(f"   old rows bit-identical: {chat.yes(old_rows_kept)}")
    print(
        "   old vocabulary's logits on code == ByteLM's, bit for bit: "
        + ", ".join(f"{name} {chat.yes(ok)}" for name, ok in old_logits_kept.items())
    )

    # 3. Fine-tune each on the dialogues. `adapters_only=True` trains the delta (and A, B)
    # and freezes every other leaf: the grown table and the whole transformer.
    untrained = with_table(pretrained, grown)
    rows = {"grown, untrained": chat.scores(logits_fn, untrained, held_out, MARKERS)}
    tuned: dict[str, Params] = {}
    losses: dict[str, list[float]] = {"pretrain": pretrain.train_loss}
    checks: dict[str, dict[str, Any]] = {}
    batches = data.random_batches(train_dialogues, args.batch_size, rng)
    print("\n3. Fine-tune on the dialogues: the delta (and LoRA's A, B) only, Adam")
    for name, table in starts.items():
        start = with_table(pretrained, table)
        trainable, frozen = jaxembed.lora.split_trainable(start, adapters_only=True)
        tx = optax.adam(harness.schedule(args.finetune_lr, args.steps_finetune))
        tuned[name], curves = train_lm.fit(
            name, model, start, tx, batches, args.steps_finetune, {}, args, adapters_only=True
        )
        losses[name] = curves.train_loss
        rows[name] = chat.scores(logits_fn, tuned[name], held_out, MARKERS)
        rows[name]["trainable"] = harness.count_params(trainable)
        changed = chat.changed_leaves(start, tuned[name])
        checks[name] = {
            "changed_leaves": changed,
            "frozen_leaves": chat.leaf_paths(frozen),
            "only_trainable_changed": changed == chat.leaf_paths(trainable),
        }
    print(chat.results_table(rows))
    print(
        f"   (loss in nats per token; code = {code.name}. Without LoRA the code loss moves only\n"
        "   through the new columns' share of the softmax: the old columns' logits are unchanged.)"
    )

    # 4. The old tokens after fine-tuning, then merging: E[new ids] += delta, E += s * A @ B.
    old_ids = jnp.arange(VOCAB_SIZE)
    old_rows = jaxembed.apply(pretrained["token_embed"], old_ids)
    for name, params in tuned.items():
        table = params["token_embed"]
        merged = jaxembed.merge_trainable_tokens(table)
        if jaxembed.lora.has_lora(merged):
            merged = jaxembed.merge_lora(merged, lora_alpha=args.lora_alpha)
        # Full float32 matmuls (GPUs' TF32 would round the two sums differently).
        with jax.default_matmul_precision("highest"):
            unmerged_logits = logits_fn(params, dialogue_probe)
            merged_logits = logits_fn(with_table(params, merged), dialogue_probe)
        rows_now = jaxembed.apply(table, old_ids, lora_alpha=args.lora_alpha)
        old_logits = logits_fn(params, code_probe)[..., :VOCAB_SIZE]
        checks[name] |= {
            "lora": jaxembed.lora.has_lora(table),
            "old_rows_max_change": float(jnp.abs(rows_now - old_rows).max()),
            "old_logits_equal": bool(np.array_equal(old_logits, pretrained_logits)),
            "merged_keys": sorted(merged),
            "merged_shape": tuple(merged["embeddings"].shape),
            "merge_max_diff": float(np.abs(merged_logits - unmerged_logits).max()),
            "merge_ok": bool(np.allclose(merged_logits, unmerged_logits, atol=1e-4, rtol=1e-4)),
        }

    # 5. What each model expects after a user's turn.
    next_tokens = {
        name: chat.next_tokens(logits_fn, params, chat.PROMPT, MARKERS, code_probe.shape)
        for name, params in {"grown, untrained": untrained, **tuned}.items()
    }
    result = {
        "args": args,
        "params": {"pretrained": pretrained, "grown": grown, **tuned},
        "pretrained_code_loss": code_loss["code_loss"],
        "old_rows_kept": old_rows_kept,
        "old_logits_kept": old_logits_kept,
        "losses": losses,
        "rows": rows,
        "checks": checks,
        "next_tokens": next_tokens,
    }
    chat.print_checks(result)
    result["ok"] = chat.all_ok(result)
    print(
        f"\nall checks: {chat.yes(result['ok'])}; total time {time.perf_counter() - started:.0f} s"
    )
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
