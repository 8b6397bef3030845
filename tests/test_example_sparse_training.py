"""examples/sparse_training.py, run in-process at a tiny size (seconds): the loss goes down, and
the row-sparse step writes the rows a batch touched and nothing else."""

import numpy as np
import pytest

# The example's extras (`pip install -e ".[examples]"`); without them there is nothing to test.
for extra in ("tqdm", "matplotlib"):
    pytest.importorskip(extra)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxembed  # noqa: E402

VOCAB = 8192
TINY = [
    "--quick",
    "--steps", "80",
    "--vocab", str(VOCAB),
    "--words", "1024",
    "--dim", "16",
    "--batch-size", "64",
    "--dense-steps", "3",
    "--eval-samples", "256",
    "--packages", "json,http,logging,wsgiref",
    "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("sparse_training")


@pytest.fixture(scope="module", params=["rowwise_adagrad", "lazy_adam"])
def run(request, example):
    return example.main([*TINY, "--optimizer", request.param])


def test_loss_goes_down(run):
    losses = run["sparse"].losses
    assert len(losses) == 80
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1
    (loss_before, accuracy_before), (loss_after, accuracy_after) = (
        run["eval_before"],
        run["eval_after"],
    )
    assert loss_after < loss_before
    assert accuracy_after > accuracy_before


def test_untouched_rows_are_bit_identical(run):
    touched, initial, final = run["touched"], run["initial_table"], run["final_table"]
    assert run["untouched_identical"]
    assert 0 < touched.sum() < VOCAB  # neither check below is vacuous
    np.testing.assert_array_equal(final[~touched], initial[~touched])
    changed = np.any(final != initial, axis=1)
    assert changed[touched].mean() > 0.5  # touched rows did train (padding, row 0, never does)
    assert not changed[0]


def test_dense_steps_were_timed(run):
    assert len(run["dense"].losses) == 3
    assert run["sparse"].ms_per_step() > 0 and run["dense"].ms_per_step() > 0
    sparse_bytes, dense_bytes = run["state_bytes"]
    if run["args"].optimizer == "rowwise_adagrad":  # one float per row vs one per entry
        assert sparse_bytes < dense_bytes / 8
    else:  # LazyAdam keeps Adam's two moments
        assert sparse_bytes == dense_bytes


def test_sparse_step_writes_only_the_batch_rows_in_place(example):
    table = jaxembed.init(jax.random.key(0), 1000, 8)["embeddings"]
    head = {"kernel": jnp.ones((8, 3)), "bias": jnp.zeros(3)}
    table_tx, head_tx = jaxembed.sparse.rowwise_adagrad(0.1), optax.adam(1e-2)
    ids = jnp.array([[5, 7, 7, 0], [999, 5, 0, 0]])  # 0 is padding: masked, no gradient
    before = np.array(table)  # a copy: a NumPy view of the buffer would block donation
    step = example.make_sparse_step(table_tx, head_tx)
    state = (table, table_tx.init(table), head, head_tx.init(head))
    new_table, table_state, *_, loss = step(*state, ids, jnp.array([0, 2]))
    changed = np.flatnonzero(np.any(np.asarray(new_table) != before, axis=1))
    assert changed.tolist() == [5, 7, 999]
    (accumulator,) = table_state.rows
    assert np.flatnonzero(np.asarray(accumulator)).tolist() == [5, 7, 999]
    assert np.isfinite(float(loss))
    assert table.is_deleted()  # donated: XLA was free to write the new rows into its buffer


def test_quick_sets_the_sizes_and_flags_override_it(example):
    args = example.harness.parse_args(["--quick", "--steps", "7"])
    assert args.steps == 7
    assert args.vocab == example.harness.QUICK["vocab"]
    assert example.harness.parse_args([]).vocab == example.harness.DEFAULTS["vocab"] >= 100_000


def test_help_lists_the_flags(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--steps", "--vocab", "--quick", "--optimizer", "--dense-steps", "--lr"):
        assert flag in usage
