"""Checkpointing across processes: orbax saves the sharded params and optimizer states of a
2-process run, and a fresh 2-process run restores them and resumes training bit for bit.

`checkpoint_worker.py` trains a LoRA adapter (optax Adam, tied logits) and a row-sparse table
(`jaxembed.sparse.lazy_adam` through `vocab_parallel_update`) on a 2 x 4 mesh spanning both
processes. The "uninterrupted" launch trains every step and saves a checkpoint midway; the
"resume" launch, in new processes, restores that checkpoint into abstract arrays carrying
the intended shardings and trains the remaining steps. Checked here:

* the resumed final state equals the uninterrupted one bit for bit, every leaf (params,
  Adam moments and count, the sparse table and its moments and count), in both processes,
  and so do the losses of the resumed steps;
* the restored state equals the state that was saved, bit for bit, at the saved step count;
* the restored arrays carry the intended shardings (vocab-indexed arrays split by rows over
  "model", the rest replicated), the layout the uninterrupted run trained and saved with;
* the checkpoint holds data written by each process (orbax's `ocdbt.process_<i>` folders);
* the equality is not trivial: training changed the state and the losses, and two controls
  from the same restored state (one other batch, a one-ulp nudge of one element) end
  elsewhere, so the comparison would see a restore that is off by one batch or one ulp.
"""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
from workers import run_workers

PROCESSES = (0, 1)
MODES = ("uninterrupted", "resume")
# The leaves of the checkpointed state, as the worker flattens them (jax.tree_util.keystr).
LORA_A, LORA_B = "['lora_embeddings_a']", "['lora_embeddings_b']"
LEAVES = {
    "['lora']['trainable']" + LORA_A,
    "['lora']['trainable']" + LORA_B,
    "['lora']['adam'][0].count",
    "['lora']['adam'][0].mu" + LORA_A,
    "['lora']['adam'][0].mu" + LORA_B,
    "['lora']['adam'][0].nu" + LORA_A,
    "['lora']['adam'][0].nu" + LORA_B,
    "['sparse']['table']",
    "['sparse']['state'].count",
    "['sparse']['state'].rows[0]",
    "['sparse']['state'].rows[1]",
}
# What the training moves: the controls must change each of these.
TRAINED_PARAMS = ("['lora']['trainable']" + LORA_A, "['lora']['trainable']" + LORA_B)
TRAINED_PARAMS += ("['sparse']['table']",)


def expected_spec(leaf):
    """Arrays indexed by the vocabulary (table, A, their moments) split by rows over "model";
    B (rank x D) and the step counts replicated."""
    if leaf.endswith(".count"):
        return "P()"
    if leaf.endswith(LORA_B):
        return "P(None, None)"
    return "P('model', None)"


@dataclasses.dataclass
class Runs:
    checkpoint: pathlib.Path  # the saved step's folder
    arrays: dict  # (mode, process) -> {name: array}
    meta: dict  # (mode, process) -> the worker's JSON

    def group(self, mode, process, group):
        """{leaf: array} of one group ("final", "at_save", "control_...") of one process."""
        prefix = group + "/"
        found = self.arrays[mode, process]
        return {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both launches, one after the other: the resume in fresh processes, reading only the
    checkpoint folder the first launch left."""
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    out = tmp_path_factory.mktemp("out")
    for mode in MODES:
        run_workers("checkpoint_worker.py", mode, checkpoints, out)
    arrays, meta = {}, {}
    for mode in MODES:
        for process in PROCESSES:
            with np.load(out / f"{mode}_process_{process}.npz") as data:
                arrays[mode, process] = dict(data)
            meta[mode, process] = json.loads((out / f"{mode}_process_{process}.json").read_text())
    save_step = meta["uninterrupted", 0]["save_step"]
    return Runs(checkpoints / f"step_{save_step}", arrays, meta)


def differing(left, right):
    """The leaves whose arrays are not bit-identical (dtype, shape and every bit)."""
    assert left.keys() == right.keys()
    return sorted(
        k for k in left if left[k].dtype != right[k].dtype or not np.array_equal(left[k], right[k])
    )


@pytest.mark.parametrize("process", PROCESSES)
def test_resumed_final_state_is_bit_identical(runs, process):
    uninterrupted = runs.group("uninterrupted", process, "final")
    resumed = runs.group("resume", process, "final")
    assert set(uninterrupted) == LEAVES  # both models, params and optimizer states
    assert differing(resumed, uninterrupted) == []
    # Both processes gathered the same global arrays.
    assert differing(resumed, runs.group("resume", 1 - process, "final")) == []


@pytest.mark.parametrize("process", PROCESSES)
def test_resumed_losses_are_bit_identical(runs, process):
    meta = runs.meta["resume", process]
    uninterrupted = runs.arrays["uninterrupted", process]["losses"]  # (steps, [lora, sparse])
    resumed = runs.arrays["resume", process]["losses"]
    assert uninterrupted.shape == (meta["steps"], 2)
    assert resumed.shape == (meta["steps"] - meta["save_step"], 2)
    np.testing.assert_array_equal(resumed, uninterrupted[meta["save_step"] :], strict=True)


@pytest.mark.parametrize("process", PROCESSES)
def test_restored_state_is_the_saved_state(runs, process):
    saved = runs.group("uninterrupted", process, "at_save")
    restored = runs.group("resume", process, "at_save")
    assert differing(restored, saved) == []
    save_step = runs.meta["resume", process]["save_step"]
    assert runs.meta["resume", process]["restored_counts"] == {
        "lora_adam": save_step,
        "sparse": save_step,
    }


@pytest.mark.parametrize("process", PROCESSES)
def test_restored_arrays_carry_the_intended_shardings(runs, process):
    expected = {leaf: expected_spec(leaf) for leaf in LEAVES}
    resume = runs.meta["resume", process]
    assert resume["restored_specs"] == expected
    assert resume["final_specs"] == expected  # the resumed steps keep the layout
    # The layout the uninterrupted run initialised, trained and saved with.
    uninterrupted = runs.meta["uninterrupted", process]
    assert uninterrupted["initial_specs"] == expected
    assert uninterrupted["final_specs"] == expected


def test_each_process_loaded_its_own_rows(runs):
    # One "data" row of the mesh per process: half of each batch.
    assert runs.meta["resume", 0]["local_batch_rows"] == [0, 1, 2, 3]
    assert runs.meta["resume", 1]["local_batch_rows"] == [4, 5, 6, 7]


def test_checkpoint_holds_data_written_by_both_processes(runs):
    assert (runs.checkpoint / "commit_success.txt").is_file()  # a finished save
    for process in PROCESSES:
        # With OCDBT, each process writes the shards it holds into its own folder.
        data = [f for f in (runs.checkpoint / f"ocdbt.process_{process}").rglob("*") if f.is_file()]
        assert any(f.parent.name == "d" and f.stat().st_size > 0 for f in data), data
    # What each process saw right after the save, in agreement.
    layouts = [runs.meta["uninterrupted", p]["checkpoint_layout"] for p in PROCESSES]
    assert layouts[0] == layouts[1]
    assert sorted(layouts[0]) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert all(folder["bytes"] > 0 for folder in layouts[0].values())


def test_training_changed_state_and_losses(runs):
    """Resuming is not trivially equal: the resumed steps moved every leaf, and the losses."""
    saved = runs.group("uninterrupted", 0, "at_save")
    final = runs.group("uninterrupted", 0, "final")
    assert differing(saved, final) == sorted(LEAVES)
    meta = runs.meta["uninterrupted", 0]
    for count in ("['lora']['adam'][0].count", "['sparse']['state'].count"):
        assert (saved[count], final[count]) == (meta["save_step"], meta["steps"])
    lora, sparse = runs.arrays["uninterrupted", 0]["losses"].T
    assert lora[-1] < lora[0]  # the adapter learns the cyclic pattern
    assert len(set(sparse.tolist())) == len(sparse)


@pytest.mark.parametrize("control", ["other_batch", "nudged"])
def test_controls_are_not_bit_identical(runs, control):
    """The same resume from the same restored state, with one other batch at the first
    resumed step, or with one element of A and of the sparse table one ulp up: the
    comparison above would tell them from the uninterrupted run."""
    final = runs.group("uninterrupted", 0, "final")
    changed = runs.group("resume", 0, f"control_{control}")
    assert set(TRAINED_PARAMS) <= set(differing(changed, final))
