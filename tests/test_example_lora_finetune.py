"""examples/lora_finetune.py runs end to end (tiny sizes, in-process) and its claims hold."""

import numpy as np
import pytest

VOCAB, DIM, RANK = 300, 16, 4


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("lora_finetune")


@pytest.fixture(scope="module")
def run(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_out")
    argv = [
        f"--vocab-size={VOCAB}",
        f"--dim={DIM}",
        f"--rank={RANK}",
        "--classes=4",
        "--lora-alpha=8",
        "--pretrain-steps=60",
        "--finetune-steps=60",
        "--batch-size=128",
        f"--out={out}",
    ]
    return example.main(argv), out


def test_finetune_loss_decreases(run):
    result, _ = run
    losses = result["finetune_losses"]
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert result["finetune_accuracy_after"] > result["finetune_accuracy_before"]


def test_base_table_unchanged(run):
    result, _ = run
    assert result["base_unchanged"] is True


def test_parameter_counts(run):
    result, _ = run
    assert result["trainable_params"] == VOCAB * RANK + RANK * DIM
    assert result["total_params"] == VOCAB * DIM + result["trainable_params"]
    # Adam's mu and nu for A and B only: the frozen table has no optimizer state.
    assert result["optimizer_state_floats"] == 2 * result["trainable_params"]


def test_merged_matches_unmerged(run):
    result, _ = run
    assert result["merge_max_abs_diff"] < 1e-5
    # Same predictions, up to a token whose top two logits tie within rounding.
    assert abs(result["merged_accuracy"] - result["finetune_accuracy_after"]) <= 1 / VOCAB


def test_saved_files_reload_equal(run):
    result, out = run
    assert result["merged_reload_equal"] is True
    assert result["adapter_reload_equal"] is True
    assert (out / "merged.npz").is_file() and (out / "adapter.npz").is_file()
    with np.load(out / "adapter.npz") as adapter:
        assert adapter["lora_embeddings_a"].shape == (VOCAB, RANK)
        assert adapter["lora_embeddings_b"].shape == (RANK, DIM)
        assert float(adapter["lora_alpha"]) == 8.0
    with np.load(out / "merged.npz") as merged:
        assert merged.files == ["embeddings"]


def test_help(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out
