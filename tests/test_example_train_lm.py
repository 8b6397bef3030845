"""The main example, `examples/train_lm.py`, run in-process at a tiny size (seconds, not minutes).

One run (module-scoped fixture) is checked for what the example promises: the losses go down,
the plot is written, the orbax checkpoints round-trip, LoRA fine-tuning changes the adapter
and nothing else, and the merged model gives the LoRA model's outputs.
"""

import pathlib

import numpy as np
import pytest

# The example's extras (`pip install -e ".[examples]"`); without them there is nothing to test.
for extra in ("orbax.checkpoint", "tqdm", "matplotlib"):
    pytest.importorskip(extra)

import jax  # noqa: E402

import jaxembed  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = [
    "--steps-pretrain", "30",
    "--steps-finetune", "15",
    "--batch-size", "8",
    "--seq-len", "32",
    "--d-model", "32",
    "--layers", "1",
    "--heads", "2",
    "--lora-rank", "2",
    "--lr", "1e-2",  # a tiny model, few steps: learn fast
    "--eval-every", "15",
    "--eval-sequences", "16",
    "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("train_lm")


@pytest.fixture(scope="module")
def run(example, tmp_path_factory):
    return example.main([*TINY, "--out", str(tmp_path_factory.mktemp("train_lm"))])


def leaves_by_path(tree):
    return {
        jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_pretraining_loss_goes_down(run):
    losses = run["pretrain"].train_loss
    assert len(losses) == 30
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    source = run["domains"][0]
    held_out = run["pretrain"].eval_loss[source]
    assert held_out[-1] < held_out[0]


def test_lora_improves_the_fine_tuning_domain(run):
    target = run["domains"][1]
    assert run["eval_after"][target] < run["eval_before"][target]


def test_plot_is_a_png(run):
    assert run["plot"].name == "loss_curves.png"
    assert run["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_round_trip(run, example):
    assert run["checkpoints_ok"] == {"pretrained": True, "lora": True, "merged": True}
    # And restored from disk independently of the example's own check, leaf by leaf.
    for name, params in run["params"].items():
        restored = example.restore_params(
            run["checkpoint_dir"] / name, jax.tree.map(np.asarray, params)
        )
        expected, got = leaves_by_path(params), leaves_by_path(restored)
        assert expected.keys() == got.keys()
        for path, leaf in expected.items():
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf), err_msg=path)


def test_lora_checkpoint_holds_the_adapter(run):
    token_embed = run["params"]["lora"]["token_embed"]
    assert set(token_embed) == {"embeddings", *jaxembed.lora.LORA_KEYS}
    assert set(run["params"]["merged"]["token_embed"]) == {"embeddings"}


def test_fine_tuning_trains_the_adapter_only(run):
    pretrained = leaves_by_path(run["params"]["pretrained"])
    lora = leaves_by_path(run["params"]["lora"])
    adapter = {path for path in lora if any(key in path for key in jaxembed.lora.LORA_KEYS)}
    assert len(adapter) == 2
    assert set(lora) - adapter == set(pretrained)
    for path, leaf in pretrained.items():  # bit-identical, the table included
        np.testing.assert_array_equal(np.asarray(lora[path]), np.asarray(leaf), err_msg=path)
    b = lora["['token_embed']['lora_embeddings_b']"]
    assert np.abs(np.asarray(b)).max() > 0  # B starts at zero: nonzero means it trained
    lora_count = sum(np.size(lora[path]) for path in adapter)
    assert run["trainable_params"]["lora"] == lora_count


def test_merged_model_matches_unmerged_lora_model(run):
    assert run["merge_ok"]
    assert run["merge_max_diff"] < 1e-4
    merged = run["params"]["merged"]["token_embed"]["embeddings"]
    pretrained = run["params"]["pretrained"]["token_embed"]["embeddings"]
    assert not np.array_equal(np.asarray(merged), np.asarray(pretrained))


def test_help_lists_the_flags(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for flag in (
        "--steps-pretrain",
        "--steps-finetune",
        "--batch-size",
        "--seq-len",
        "--d-model",
        "--layers",
        "--lora-rank",
        "--lora-alpha",
        "--out",
        "--seed",
    ):
        assert flag in usage
