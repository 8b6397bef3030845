"""examples/nnx_lora.py at a tiny size: the NNX LoRA workflow works end to end."""

import pytest


@pytest.fixture(scope="module")
def results(load_example):
    example = load_example("nnx_lora")
    return example.main(["--vocab", "64", "--dim", "16", "--rank", "4", "--steps", "60"])


def test_both_stages_learn(results):
    assert results["pretrain_losses"][-1] < 0.5 * results["pretrain_losses"][0]
    assert results["finetune_losses"][-1] < 0.5 * results["finetune_losses"][0]


def test_only_the_adapter_trains(results):
    assert results["table_unchanged"]
    assert results["adapter_size"] == 64 * 4 + 4 * 16


def test_merge_and_linen_agree(results):
    assert results["merge_diff"] < 1e-4
    assert results["linen_diff"] == 0.0
