"""jaxembed end to end: a byte-level language model on Python's own standard library.

Read it top to bottom; it teaches four things.

1. A model on `jaxembed.Embedding(257, d, mask_zero=True)`: its `compute_mask` drives the
   attention, and its `attend` gives the output logits through the same (tied) table.
2. LoRA: `jaxembed.enable_lora` adds an adapter to that table and
   `jaxembed.lora.split_trainable` makes it the only thing that trains, on another package.
3. `jaxembed.merge_lora` folds the adapter into the table: the plain model, same outputs.
4. Checkpoints with orbax (LoRA weights included), restored into freshly built models.

Beside it, `_lm_data.py` turns the `.py` files every CPython ships into padded byte
sequences (nothing to download), and `_lm_harness.py` holds the flags, the training loop with
its progress bar, the plot (`loss_curves.png`) and the final table.

Run (defaults take about two minutes on two CPU cores; the same code runs on GPU and TPU):

    pip install -e ".[examples]" && python examples/train_lm.py
    python examples/train_lm.py --help
"""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed

# The helpers beside this file: `python examples/train_lm.py` puts its folder on sys.path,
# importing the file by path (as the tests do) does not.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _lm_data as data
from _lm_data import PAD, VOCAB_SIZE

try:  # the example's extras are not jaxembed's dependencies; the harness needs tqdm, matplotlib
    import _lm_harness as harness
    import orbax.checkpoint as ocp
except ImportError as error:
    raise SystemExit(
        f"{error.name} is missing: install the example's extras with "
        '`pip install -e ".[examples]"` (orbax-checkpoint, tqdm, matplotlib).'
    ) from error

Params = dict[str, Any]


class Block(nn.Module):
    """Pre-norm transformer block: masked self-attention, then an MLP."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(h, mask=attention_mask)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(h)))


class ByteLM(nn.Module):
    """Causal byte-level LM whose input embedding and output layer are one jaxembed table.

    With `lora_rank` set, the same architecture expects the table plus a LoRA adapter in its
    params, and adds the low-rank delta in both the lookup and the tied logits.
    """

    max_len: int
    d_model: int
    num_layers: int
    num_heads: int
    lora_rank: int | None = None
    lora_alpha: float | None = None

    @nn.compact
    def __call__(self, ids: jax.Array, targets: jax.Array | None = None) -> jax.Array:
        """`(batch, length)` ids, 0 = padding -> `(batch, length, VOCAB_SIZE)` logits, or
        with `targets` the mean next-byte cross-entropy over the real (non-padding) targets."""
        if ids.shape[-1] > self.max_len:  # static shape: fails at trace time, not silently
            raise ValueError(f"sequences of {ids.shape[-1]} ids exceed max_len={self.max_len}")
        # "clip": main checks the data eagerly once, so clipping never changes an id and the
        # jitted steps skip even the NaN fill of the default "error" policy.
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
        hidden = nn.LayerNorm()(x)
        if targets is None:
            return tokens.attend(hidden)
        # Tied logits and their cross-entropy fused: the (batch, length, vocab) logits and
        # their gradient are never materialized.
        return tokens.attend_cross_entropy(hidden, targets, where=targets != PAD)


def init_params(model: ByteLM, key: jax.Array) -> Params:
    """Fresh params as a plain dict: unboxed, the tree is simple to edit (enable_lora),
    optimize and checkpoint."""
    return nn.unbox(model.init(key, jnp.ones((1, model.max_len), jnp.int32))["params"])


def masked_loss(model: ByteLM, params: Params, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-byte cross-entropy over real bytes only, and how many there were."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    loss = model.apply({"params": params}, inputs, targets)
    return loss, (targets != PAD).sum().astype(loss.dtype)


def fit(name, model, params, tx, batches, steps, eval_sets, args, *, adapters_only=False):
    """Trains `params` for `steps` steps: every weight, or with `adapters_only=True` the LoRA
    adapter alone (classic LoRA: attention, MLP, norms, positions and the table stay frozen).
    Returns the params, whole again, and the curves for the plot and the table."""
    # Gradients and optimizer state exist for the trainable half only, and the frozen half is
    # an input of the compiled step but not an output, so no step can change it.
    trainable, frozen = jaxembed.lora.split_trainable(params, adapters_only=adapters_only)

    def loss_of(trainable: Params, frozen: Params, batch: jax.Array) -> Any:
        return masked_loss(model, jaxembed.lora.combine(trainable, frozen), batch)

    @jax.jit
    def step(trainable: Params, opt_state: Any, batch: jax.Array, frozen: Params) -> Any:
        (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    evaluate = harness.make_evaluator(partial(masked_loss, model), eval_sets)
    trainable, curves = harness.train(
        name,
        # `frozen` goes in as an argument: closed over, it would be baked in as constants.
        lambda trainable, opt_state, batch: step(trainable, opt_state, batch, frozen),
        (trainable, tx.init(trainable)),
        batches,
        steps,
        lambda trainable: evaluate(jaxembed.lora.combine(trainable, frozen)),
        args,
    )
    return jaxembed.lora.combine(trainable, frozen), curves


def make_logits_fn(model: ByteLM) -> Callable[[Params, np.ndarray], np.ndarray]:
    """Jitted (params, sequences) -> logits for the inputs, as NumPy (compiled once per model)."""
    apply = jax.jit(lambda params, inputs: model.apply({"params": params}, inputs))
    return lambda params, batch: np.asarray(apply(params, batch[:, :-1]))


def restore_params(path: pathlib.Path, target: Params) -> Params:
    """Restores params saved by orbax; `target` gives the structure, shapes and dtypes."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path.resolve(), target)


def round_trip(path, params, model, logits_fn, batch) -> bool:
    """Saves `params` (LoRA weights too, if any), restores them into the structure of a freshly
    built `model` and checks that the restored params give bit-identical logits."""
    with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the write
        checkpointer.save(path.resolve(), params, force=True)
    # Shapes and dtypes are all orbax needs: eval_shape traces init without allocating.
    restored = restore_params(path, jax.eval_shape(partial(init_params, model), jax.random.key(0)))
    return bool(np.array_equal(logits_fn(params, batch), logits_fn(restored, batch)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the whole example; returns what the test checks (losses, params, paths, checks)."""
    args = harness.parse_args(argv)
    started = time.perf_counter()
    checkpoints = args.out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    init_key, lora_key = jax.random.split(jax.random.key(args.seed))

    source = data.load_domain(args.pretrain_packages.split(","), args.seq_len)
    target = data.load_domain(args.finetune_packages.split(","), args.seq_len)
    for ids in (source.train, source.held_out, target.train, target.held_out):
        jaxembed.check_in_range(ids, VOCAB_SIZE)  # eagerly, once: the model can then "clip"
    harness.describe_run(source, target, args)
    domains = (source.name, target.name)
    eval_sets = {
        d.name: data.eval_batches(d.held_out, args.eval_sequences, args.batch_size)
        for d in (source, target)
    }
    probe = eval_sets[target.name][0]  # a fixed held-out batch for comparing outputs

    # One architecture twice: with lora_rank set, the token table expects an adapter beside it.
    model = ByteLM(args.seq_len, args.d_model, args.layers, args.heads)
    lora_model = model.clone(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    logits_fn, lora_logits_fn = make_logits_fn(model), make_logits_fn(lora_model)

    # 1. Pretrain every weight of a fresh model (init jitted: eagerly, every initializer op
    # would compile on its own).
    params = jax.jit(partial(init_params, model))(init_key)
    tx = optax.adamw(harness.schedule(args.lr, args.steps_pretrain), weight_decay=0.01)
    batches = data.random_batches(source.train, args.batch_size, rng)
    pretrained, pretrain_curves = fit(
        "pretrain", model, params, tx, batches, args.steps_pretrain, eval_sets, args
    )
    pretrained_ok = round_trip(checkpoints / "pretrained", pretrained, model, logits_fn, probe)

    # 2. LoRA fine-tuning of the adapter alone. A fresh adapter has B = 0, so it starts from
    # exactly the pretrained model's outputs.
    token_embed = jaxembed.enable_lora(pretrained["token_embed"], lora_key, args.lora_rank)
    tx = optax.adam(harness.schedule(args.lora_lr, args.steps_finetune))
    batches = data.random_batches(target.train, args.batch_size, rng)
    lora_params, finetune_curves = fit(
        "LoRA fine-tune", lora_model, {**pretrained, "token_embed": token_embed}, tx, batches,
        args.steps_finetune, eval_sets, args, adapters_only=True,
    )  # fmt: skip
    lora_ok = round_trip(checkpoints / "lora", lora_params, lora_model, lora_logits_fn, probe)

    # 3. Merge, with the lora_alpha the LoRA model trained with (another scales it wrongly).
    # Full float32 matmuls for the check: GPUs (TF32) and TPUs (bfloat16 passes) otherwise
    # round them, and a 1e-4 tolerance would test that rounding.
    with jax.default_matmul_precision("highest"):
        table = jaxembed.merge_lora(lora_params["token_embed"], lora_alpha=args.lora_alpha)
        merged = {**lora_params, "token_embed": table}
        unmerged_logits = lora_logits_fn(lora_params, probe)
        merged_logits = logits_fn(merged, probe)
    merge_ok = bool(np.allclose(merged_logits, unmerged_logits, atol=1e-4, rtol=1e-4))
    merged_ok = round_trip(checkpoints / "merged", merged, model, logits_fn, probe)

    plot_path = args.out / "loss_curves.png"
    harness.plot_curves(plot_path, pretrain_curves, finetune_curves, domains, args.steps_pretrain)
    adapter, _ = jaxembed.lora.split_trainable(lora_params, adapters_only=True)
    evaluate = harness.make_evaluator(partial(masked_loss, model), eval_sets)
    result = {
        "args": args,
        "domains": domains,
        "pretrain": pretrain_curves,
        "finetune": finetune_curves,
        "eval_before": {name: losses[-1] for name, losses in pretrain_curves.eval_loss.items()},
        "eval_after": evaluate(merged),
        "params": {"pretrained": pretrained, "lora": lora_params, "merged": merged},
        "merge_max_diff": float(np.max(np.abs(merged_logits - unmerged_logits))),
        "merge_ok": merge_ok,
        "checkpoints_ok": {"pretrained": pretrained_ok, "lora": lora_ok, "merged": merged_ok},
        "checkpoint_dir": checkpoints,
        "plot": plot_path,
        "trainable_params": {
            "full": harness.count_params(pretrained),
            "lora": harness.count_params(adapter),
        },
        "ok": merge_ok and pretrained_ok and lora_ok and merged_ok,
    }
    harness.print_summary(result, started)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
