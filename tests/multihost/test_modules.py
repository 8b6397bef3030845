"""The Flax shells across 2 processes equal the same training in one (modules_worker.py).

NNX: a layer created under the mesh and the logical-axis rules, LoRA trained with
`nnx.jit` and `nnx.Optimizer`; linen: `init` with `out_shardings` from the rules and a jitted
full-table step. Both losses use the fused tied-logits loss method, vocab-parallel by itself
on the Explicit mesh. The pytest process computes the reference with `run(mesh=None)`.
"""

import json

import modules_worker
import numpy as np
import pytest
from workers import NUM_PROCESSES, run_workers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("modules")
    run_workers("modules_worker.py", outdir)
    loaded = []
    for rank in range(NUM_PROCESSES):
        with np.load(outdir / f"process_{rank}.npz") as npz:
            results = {key: npz[key] for key in npz.files}
        loaded.append((results, json.loads((outdir / f"process_{rank}.json").read_text())))
    return loaded


@pytest.fixture(scope="module")
def reference():
    return {key: np.asarray(value) for key, value in modules_worker.run().items()}


@pytest.mark.parametrize("key", ["nnx/losses", "nnx/a", "nnx/b", "linen/losses", "linen/table"])
def test_two_processes_train_as_one(runs, reference, key):
    for results, _ in runs:
        np.testing.assert_allclose(results[key], reference[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(runs[0][0][key], runs[1][0][key])


def test_training_happened(reference):
    assert not np.allclose(reference["nnx/b"], 0)  # LoRA's B starts at zero
    for name in ("nnx", "linen"):
        losses = reference[f"{name}/losses"]
        assert losses[-1] < losses[0], name


def test_the_tables_were_split_over_model_by_the_rules(runs):
    for _, meta in runs:
        assert meta["specs"]["nnx/table"] == "P('model', None)"
        assert meta["specs"]["nnx/a"] == "P('model', None)"
        assert meta["specs"]["linen/table"] == "P('model', None)"
        # "data" spans the hosts: each holds the whole table in 4 blocks, half of the ids.
        assert meta["table_rows_here"] == [[i * 64, (i + 1) * 64] for i in range(4)]
    assert [meta["ids_rows_here"] for _, meta in runs] == [[0, 4], [4, 8]]
    # The NNX table is untouched by LoRA training, equal in both processes to the reference.
    np.testing.assert_array_equal(runs[0][0]["nnx/table"], runs[1][0]["nnx/table"])
