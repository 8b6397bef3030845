"""examples/new_tokens.py runs end to end (`--quick`, in-process) and its claims hold.

One run (module-scoped fixture) is checked for what the example promises: growing the table
keeps the old rows and the old vocabulary's logits bit for bit; fine-tuning changes the delta
(and LoRA's A, B) and nothing else; without LoRA the old tokens' embeddings and logits stay
bit-identical; the models learn to predict the markers; merging keeps the outputs.
"""

import contextlib
import io

import numpy as np
import pytest

# The example's extras (`pip install -e ".[examples]"`), as for train_lm.py.
for extra in ("orbax.checkpoint", "tqdm", "matplotlib"):
    pytest.importorskip(extra)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxembed  # noqa: E402

OLD_VOCAB, USER, BOT = 257, 257, 258
RUNS = ("tokens", "tokens + LoRA")


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("new_tokens")


@pytest.fixture(scope="module")
def run(example):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = example.main(["--quick", "--quiet"])
    return result, printed.getvalue()


def leaves_by_path(tree):
    return {
        jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_every_check_passes_and_is_printed(run):
    result, printed = run
    assert result["ok"] is True
    assert "all checks: ok" in printed
    assert "FAILED" not in printed
    assert "<user>" in printed and "<bot>" in printed  # the sample dialogue, rendered


def test_markers_are_the_ids_after_the_byte_vocabulary(example, run):
    result, _ = run
    assert example.MARKERS == {"user": USER, "bot": BOT}
    d_model = result["args"].d_model
    assert result["params"]["grown"]["embeddings"].shape == (OLD_VOCAB + 2, d_model)
    for name in RUNS:
        table = result["params"][name]["token_embed"]
        assert table["trainable_tokens_ids"].tolist() == [USER, BOT]
        assert table["trainable_tokens_delta"].shape == (2, d_model)
    assert set(result["params"]["tokens"]["token_embed"]) == {
        "embeddings",
        "trainable_tokens_ids",
        "trainable_tokens_delta",
    }
    assert jaxembed.lora.has_lora(result["params"]["tokens + LoRA"]["token_embed"])


def test_growing_keeps_old_rows_and_old_logits(run):
    result, _ = run
    pretrained = result["params"]["pretrained"]["token_embed"]["embeddings"]
    grown = result["params"]["grown"]["embeddings"]
    np.testing.assert_array_equal(np.asarray(grown[:OLD_VOCAB]), np.asarray(pretrained))
    # init="mean": the new rows are the mean of the old ones.
    mean = np.asarray(pretrained).mean(axis=0)
    np.testing.assert_allclose(np.asarray(grown[OLD_VOCAB:]), [mean, mean], rtol=1e-6, atol=1e-7)
    assert result["old_rows_kept"] is True
    assert result["old_logits_kept"] == {"grown": True, "tokens": True, "tokens + LoRA": True}


def test_fine_tuning_changes_the_delta_and_adapter_only(run):
    result, _ = run
    prefix = "token_embed/"
    expected = {
        "tokens": [prefix + "trainable_tokens_delta"],
        "tokens + LoRA": [
            prefix + "lora_embeddings_a",
            prefix + "lora_embeddings_b",
            prefix + "trainable_tokens_delta",
        ],
    }
    pretrained = leaves_by_path(result["params"]["pretrained"])
    grown = result["params"]["grown"]["embeddings"]
    for name in RUNS:
        check = result["checks"][name]
        assert check["changed_leaves"] == expected[name]
        assert check["only_trainable_changed"] is True
        tuned = result["params"][name]
        # Independently of the example's check: the grown table and the whole transformer.
        np.testing.assert_array_equal(
            np.asarray(tuned["token_embed"]["embeddings"]), np.asarray(grown)
        )
        for path, leaf in leaves_by_path(tuned).items():
            if "token_embed" not in path:
                np.testing.assert_array_equal(
                    np.asarray(leaf), np.asarray(pretrained[path]), err_msg=path
                )
        assert np.abs(np.asarray(tuned["token_embed"]["trainable_tokens_delta"])).max() > 0
    delta = result["params"]["tokens"]["token_embed"]["trainable_tokens_delta"]
    assert result["rows"]["tokens"]["trainable"] == delta.size
    d_model, rank = result["args"].d_model, result["args"].lora_rank
    lora_size = (OLD_VOCAB + 2) * rank + rank * d_model
    assert result["rows"]["tokens + LoRA"]["trainable"] == delta.size + lora_size


def test_old_tokens_unchanged_without_lora_changed_with_it(run):
    result, _ = run
    old_ids = jnp.arange(OLD_VOCAB)
    before = jaxembed.apply(result["params"]["pretrained"]["token_embed"], old_ids)
    alpha = result["args"].lora_alpha
    tokens_only = jaxembed.apply(result["params"]["tokens"]["token_embed"], old_ids)
    np.testing.assert_array_equal(np.asarray(tokens_only), np.asarray(before))
    assert result["checks"]["tokens"]["old_rows_max_change"] == 0
    assert result["checks"]["tokens"]["old_logits_equal"] is True
    with_lora = jaxembed.apply(
        result["params"]["tokens + LoRA"]["token_embed"], old_ids, lora_alpha=alpha
    )
    assert np.abs(np.asarray(with_lora - before)).max() > 0  # by design
    assert result["checks"]["tokens + LoRA"]["old_rows_max_change"] > 0


def test_models_learn_the_markers(run):
    result, _ = run
    rows = result["rows"]
    untrained = rows["grown, untrained"]
    assert untrained["marker_probability"] < 0.01  # the mean row: a marker is a surprise
    for name in RUNS:
        assert rows[name]["marker_probability"] > max(0.2, 100 * untrained["marker_probability"])
        assert rows[name]["dialogue_loss"] < untrained["dialogue_loss"] - 0.2
        losses = result["losses"][name]
        assert len(losses) == result["args"].steps_finetune
        assert np.mean(losses[-10:]) < np.mean(losses[:10])
    # LoRA adapts every row: the dialogues fit better, the code worse.
    assert rows["tokens + LoRA"]["dialogue_loss"] < rows["tokens"]["dialogue_loss"]
    assert rows["tokens + LoRA"]["code_loss"] > rows["tokens"]["code_loss"]
    # After "<user>...?\n" the next token: not a marker before, <bot> likely after.
    next_tokens = {name: dict(top) for name, top in result["next_tokens"].items()}
    assert "<bot>" not in next_tokens["grown, untrained"]
    for name in RUNS:
        assert next_tokens[name].get("<bot>", 0.0) > 0.3


def test_merged_tables_give_the_unmerged_outputs(run):
    result, _ = run
    d_model = result["args"].d_model
    for name in RUNS:
        check = result["checks"][name]
        assert check["merged_keys"] == ["embeddings"]
        assert check["merged_shape"] == (OLD_VOCAB + 2, d_model)
        assert check["merge_ok"] is True
        assert check["merge_max_diff"] < 1e-4
    # Merging trainable tokens alone writes their two rows and no other.
    table = result["params"]["tokens"]["token_embed"]
    merged = jaxembed.merge_trainable_tokens(table)["embeddings"]
    grown = result["params"]["grown"]["embeddings"]
    np.testing.assert_array_equal(np.asarray(merged[:OLD_VOCAB]), np.asarray(grown[:OLD_VOCAB]))
    np.testing.assert_allclose(
        np.asarray(merged[OLD_VOCAB:]),
        np.asarray(grown[OLD_VOCAB:] + table["trainable_tokens_delta"]),
        rtol=1e-6,
    )


def test_help(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
