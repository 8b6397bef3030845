"""examples/qlora.py runs end to end (tiny sizes, in-process) and its claims hold."""

import numpy as np
import pytest

import jaxembed

# DIM >= 100 keeps the per-row scales (4 bytes a row) under 1% of a float32 row: int8 then
# stays within 0.26x of float32 and per-row int4 within 0.14x.
VOCAB, DIM, BLOCK, RANK, FINETUNE_STEPS = 400, 128, 32, 4, 80


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("qlora")


@pytest.fixture(scope="module")
def result(example):
    argv = [
        f"--vocab-size={VOCAB}",
        f"--dim={DIM}",
        f"--block-size={BLOCK}",
        f"--rank={RANK}",
        "--lora-alpha=8",
        "--classes=4",
        "--train-samples=8000",
        "--held-out-samples=4000",
        "--pretrain-steps=80",
        f"--finetune-steps={FINETUNE_STEPS}",
        "--batch-size=256",
    ]
    return example.main(argv)


def test_formats_and_bytes(result):
    tables = result["tables"]
    assert list(tables) == ["float32", "int8", "int4", f"int4/{BLOCK}"]
    formats = [jaxembed.quantization.quantization_format(p) for p in tables.values()]
    assert formats == [None, "int8", "int4", f"int4/{BLOCK}"]
    sizes = {name: entry["bytes"] for name, entry in result["formats"].items()}
    assert sizes == {
        "float32": VOCAB * DIM * 4,
        "int8": VOCAB * (DIM + 4),  # one byte a value, a float32 scale a row
        "int4": VOCAB * (DIM // 2 + 4),  # two values a byte
        f"int4/{BLOCK}": VOCAB * (DIM // 2 + (DIM // BLOCK) * 5),  # scale + zero a block
    }
    ratios = {name: entry["ratio"] for name, entry in result["formats"].items()}
    assert ratios["int8"] <= 0.26
    assert ratios["int4"] <= 0.14
    assert ratios["int4"] < ratios[f"int4/{BLOCK}"] < ratios["int8"] < ratios["float32"] == 1.0


def test_quantizing_keeps_held_out_loss(result):
    losses = {name: entry["held_out_loss"] for name, entry in result["formats"].items()}
    assert losses["float32"] < 0.9 * np.log(4)  # pretraining learned something
    assert abs(losses["int8"] - losses["float32"]) < 1e-3
    for name in ("int4", f"int4/{BLOCK}"):
        assert abs(losses[name] - losses["float32"]) < 0.02


def test_finetune_loss_decreases(result):
    losses = result["finetune_losses"]
    assert len(losses) == FINETUNE_STEPS
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert result["finetune_loss_after"] < 0.5 * result["finetune_loss_before"]


def test_quantized_arrays_bit_identical(result):
    assert result["frozen_unchanged"] is True
    int4, lora = result["tables"]["int4"], result["lora"]
    assert sorted(lora) == sorted([*int4, *jaxembed.lora.LORA_KEYS])
    for name, stored in int4.items():
        assert lora[name].dtype == stored.dtype
        assert np.array_equal(lora[name], stored), name
    # Only A and B have Adam state: two moments each, float32, plus a step count.
    assert result["adapter_bytes"] == 4 * (VOCAB * RANK + RANK * DIM)
    assert result["optimizer_state_bytes"] == 2 * result["adapter_bytes"] + 4


def test_merge_requantizes(result):
    merged, merged_float = result["merged"], result["merged_float"]
    assert jaxembed.quantization.quantization_format(merged) == "int4"
    assert not jaxembed.lora.has_lora(merged)
    assert jaxembed.quantization.quantization_format(merged_float) is None
    assert merged_float["embeddings"].dtype == np.float32
    unmerged = result["finetune_loss_after"]
    # The float merge is the unmerged adapter up to rounding; requantizing to int4 costs
    # about what quantizing the float table cost.
    assert abs(result["merged_float_loss"] - unmerged) < 1e-4
    assert abs(result["merged_loss"] - unmerged) < 0.01


def test_help(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    assert "--block-size" in capsys.readouterr().out
