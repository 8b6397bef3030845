"""examples/sharded_finetune.py on 8 simulated CPU devices, once per mesh axis type.

XLA fixes the device count when JAX's backend starts, and this process has started it with
one device, hence a subprocess per run; the example writes its results with `--json`.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "sharded_finetune.py"
ENV = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",  # 8 simulated devices even where an accelerator is present
}
STEPS, VOCAB, DIM, RANK, BATCH, SEQ_LEN = 12, 4096, 64, 8, 16, 32


def run_example(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module", params=["explicit", "auto"])
def run(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded_finetune") / "results.json"
    result = run_example(
        "--axis-types", request.param,
        "--steps", str(STEPS),
        "--vocab-size", str(VOCAB),
        "--dim", str(DIM),
        "--rank", str(RANK),
        "--batch-size", str(BATCH),
        "--seq-len", str(SEQ_LEN),
        "--json", str(path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return request.param, json.loads(path.read_text()), result.stdout


def test_runs_on_an_8_device_mesh(run):
    axis_types, results, stdout = run
    assert results["device_count"] == 8
    assert results["platform"] == "cpu"
    assert results["mesh"] == {"shape": {"data": 2, "model": 4}, "axis_types": axis_types}
    assert "'data': 2, 'model': 4" in stdout


def test_params_and_ids_are_placed_as_promised(run):
    _, results, _ = run
    placements = results["placements"]
    expected = {
        "embeddings": ("P('model', None)", [VOCAB // 4, DIM]),
        "lora_embeddings_a": ("P('model', None)", [VOCAB // 4, RANK]),
        "lora_embeddings_b": ("P(None, None)", [RANK, DIM]),
        "ids": ("P('data', None)", [BATCH // 2, SEQ_LEN + 1]),
        "adam mu[lora_embeddings_a]": ("P('model', None)", [VOCAB // 4, RANK]),
    }
    for name, (spec, block) in expected.items():
        assert placements[name]["spec"] == spec, name
        assert placements[name]["block"] == block, name


def test_loss_decreases(run):
    _, results, stdout = run
    losses = results["losses"]
    assert len(losses) == STEPS
    assert np.all(np.isfinite(losses))
    assert results["loss_decreased"] is True
    assert losses[-1] < 0.8 * losses[0]
    assert abs(losses[0] - np.log(VOCAB)) < 0.1  # B starts at zero: a uniform guess at first
    assert f"step {STEPS:3d}  loss" in stdout


def test_only_the_adapter_trains(run):
    _, results, _ = run
    assert results["table_unchanged"] is True
    assert results["trainable_params"] == VOCAB * RANK + RANK * DIM
    assert results["optimizer_state_floats"] == 2 * results["trainable_params"]  # no table


def test_no_all_gather_of_the_full_table(run):
    _, results, _ = run
    assert results["full_table_shape"] == f"f32[{VOCAB},{DIM}]"
    assert f"f32[{VOCAB},{DIM}]" not in results["all_gathered_shapes"]
    assert f"f32[{VOCAB},{RANK}]" not in results["all_gathered_shapes"]
    assert results["table_all_gathered"] is False
    assert results["lora_a_all_gathered"] is False
    assert results["collectives"], "a data- and vocab-parallel step must communicate"
    # The same search does find a deliberate gather of the table.
    assert results["control_gather_detected"] is True


def test_vocab_parallel_apply_equals_apply(run):
    _, results, _ = run
    assert results["vocab_parallel_equal"] is True
    assert results["vocab_parallel_max_abs_diff"] <= 1e-6
    # One psum of the looked-up rows and one of A's rank-r rows, never the table.
    gathered = [shape for op, shape in results["vocab_parallel_collectives"] if op == "all-gather"]
    assert f"f32[{VOCAB},{DIM}]" not in gathered


def test_help_lists_the_flags():
    result = run_example("--help", timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in (
        "--axis-types",
        "--steps",
        "--vocab-size",
        "--dim",
        "--rank",
        "--batch-size",
        "--seq-len",
        "--data-parallel",
        "--json",
    ):
        assert flag in result.stdout


def test_refuses_a_vocabulary_the_model_axis_does_not_divide():
    result = run_example("--vocab-size", "4097", "--steps", "1", timeout=120)
    assert result.returncode != 0
    assert "divisible by the 'model' axis size 4" in result.stderr
