"""jaxembed across 2 processes equals jaxembed in one: every scenario, on a global mesh of
2 processes x 4 simulated CPU devices, with the data built per host (GitHub issue 17).

The module's fixture runs `equivalence_worker.py` once as the two processes (joined by
`jax.distributed`, gloo collectives over localhost; see `scenarios.py` for the data, the
scenario functions and the cases). This pytest process, with its single CPU device, computes
each scenario's single-process reference from the same global data with the same function
(unsharded inputs, no mesh). Each scenario's test then checks, for every mesh, kind of axes
and table layout it ran on:

* both processes' results equal the reference: exactly where no floating-point arithmetic
  is involved (integers, plain lookups: a gather, and in a vocab-parallel program a sum with
  zeros), else within float32 rounding (rtol 1e-5; atol 1e-6, 1e-5 for logits of size ~20);
* the two processes' results are identical. Each gathers the same global arrays, so for
  sharded results this is bookkeeping; for replicated ones (losses, LoRA's B, counts) each
  process reads its own copy, which independent hosts could compute differently.

The metadata tests check that the run was really multi-host: devices are ordered by
process and each mesh spans the processes along the axis its name says; each process
supplied only the batch rows its devices hold (one half of the batch where "data" spans the
hosts); each process read only the table blocks its devices hold (one half of the rows where
"model" spans the hosts, and of the columns for a dim-parallel table); results keep the
shardings jaxembed promises on Explicit axes; and the compiled lookup and LoRA step never
all-gather the table, while a deliberate gather is found by the same search.
"""

import functools
import json

import jax
import numpy as np
import pytest
import scenarios
from scenarios import CASES, LAYOUTS, Case, D, V
from workers import NUM_PROCESSES, run_workers

PROCESSES = range(NUM_PROCESSES)
FLOAT_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
LOGITS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
EXACT = {"rtol": 0, "atol": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each process's (results, metadata), by rank, from one launch of the worker."""
    outdir = tmp_path_factory.mktemp("equivalence")
    run_workers("equivalence_worker.py", outdir)
    loaded = []
    for rank in PROCESSES:
        with np.load(outdir / f"process_{rank}.npz") as npz:
            results = {key: npz[key] for key in npz.files}
        loaded.append((results, json.loads((outdir / f"process_{rank}.json").read_text())))
    return loaded


@pytest.fixture(scope="module")
def meta(runs):
    return [m for _, m in runs]


@functools.cache
def reference(scenario: str) -> dict[str, np.ndarray]:
    """The scenario's single-process results: the same function on the whole NumPy data, on
    this process's one device (the vocab-parallel functions, given no mesh, run the plain
    jaxembed function they must equal)."""
    data = scenarios.global_data()
    plain, adapted = scenarios.base_params(data), scenarios.lora_params(data)
    ids, query, body = data["ids"], data["query"], data["body"]
    loss_args = (adapted, query, data["labels"], data["mask"])
    compute = {
        "lookup": lambda: jax.jit(scenarios.lookup)(plain, adapted, ids),
        "vocab_parallel_lookup": lambda: jax.jit(scenarios.vocab_parallel_lookup)(
            plain, adapted, ids
        ),
        "logits": lambda: jax.jit(scenarios.logits)(plain, adapted, query),
        "gradients": lambda: jax.jit(scenarios.gradients)(plain, adapted, body, data["tokens"][0]),
        "lora_training": lambda: scenarios.train_lora(adapted, body, data["tokens"]),
        "sparse_training": lambda: scenarios.train_sparse(
            data["embeddings"], body, data["sparse_ids"]
        ),
        "vocab_parallel_loss": lambda: jax.jit(scenarios.fused_loss)(*loss_args),
        "plain_loss": lambda: reference("vocab_parallel_loss"),
        "plain_sparse_training": lambda: reference("sparse_training"),
        "quantized": lambda: jax.jit(scenarios.quantized)(
            {fmt: scenarios.quantized_params(fmt) for fmt in scenarios.QUANTIZED}, ids, query
        ),
    }[scenario]
    return {key: np.asarray(value) for key, value in compute().items()}


def check(runs, case: Case, names, tolerance=FLOAT_TOLERANCE) -> None:
    """Both processes' results `names` of `case` equal the reference and each other."""
    expected = reference(case.scenario)
    for name in names:
        got = [results[case.key + name] for results, _ in runs]
        where = f"{case.key}{name}"
        np.testing.assert_array_equal(got[0], got[1], err_msg=f"{where}: processes differ")
        assert got[0].dtype == expected[name].dtype, where
        np.testing.assert_allclose(got[0], expected[name], err_msg=where, **tolerance)


def cases(scenario: str):
    return pytest.mark.parametrize("case", CASES[scenario], ids=lambda case: case.id)


@cases("lookup")
def test_lookup(runs, case):
    # The plain lookup is a gather (a masked gather and a sum with zeros when the rows are
    # split): exact. With LoRA, A's rows times B.
    check(runs, case, ["plain"], EXACT)
    check(runs, case, ["lora"])


@cases("vocab_parallel_lookup")
def test_vocab_parallel_lookup(runs, case):
    check(runs, case, ["plain"], EXACT)
    check(runs, case, ["lora"])


@cases("logits")
def test_logits(runs, case):
    check(runs, case, ["plain", "lora"], LOGITS_TOLERANCE)


@cases("gradients")
def test_table_gradient(runs, case):
    check(runs, case, ["loss", "embeddings"])


@cases("gradients")
def test_lora_gradients(runs, case):
    check(runs, case, ["lora_loss", "lora_embeddings_a", "lora_embeddings_b"])


@cases("lora_training")
def test_lora_training(runs, case):
    losses = [f"loss_{i}" for i in range(scenarios.LORA_STEPS)]
    check(runs, case, [*losses, "lora_embeddings_a", "lora_embeddings_b"])
    check(runs, case, ["adam_count"], EXACT)  # a global scalar, initialised under jit
    results, _ = runs[0]
    assert int(results[case.key + "adam_count"]) == scenarios.LORA_STEPS
    start = scenarios.global_data()["lora_embeddings_b"]
    assert not np.allclose(results[case.key + "lora_embeddings_b"], start)  # it trained


@cases("sparse_training")
@pytest.mark.parametrize("optimizer", list(scenarios.SPARSE_OPTIMIZERS))
def test_sparse_training(runs, case, optimizer):
    check_sparse_training(runs, case, optimizer)


@cases("plain_sparse_training")
@pytest.mark.parametrize("optimizer", list(scenarios.SPARSE_OPTIMIZERS))
def test_plain_sparse_training(runs, case, optimizer):
    # optimizer.update with no mesh argument: vocab-parallel by itself on Explicit axes.
    check_sparse_training(runs, case, optimizer)


def check_sparse_training(runs, case, optimizer):
    expected = reference("sparse_training")
    prefix = f"{optimizer}/"
    names = [key for key in expected if key.startswith(prefix)]
    floats = [name for name in names if name != prefix + "count"]
    assert prefix + "table" in floats
    check(runs, case, floats)
    check(runs, case, [prefix + "count"], EXACT)
    # Only the rows the steps touched moved.
    results, _ = runs[0]
    untouched = np.setdiff1d(np.arange(V), scenarios.global_data()["sparse_ids"])
    table = scenarios.global_data()["embeddings"]
    np.testing.assert_array_equal(results[case.key + prefix + "table"][untouched], table[untouched])


@cases("vocab_parallel_loss")
def test_vocab_parallel_loss(runs, case):
    # vocab_parallel_attend_cross_entropy equals the plain attend_cross_entropy in one process.
    check(runs, case, ["loss", "query", *LAYOUTS["vocab"]])


@cases("plain_loss")
def test_plain_loss(runs, case):
    # attend_cross_entropy with no mesh argument: vocab-parallel by itself on Explicit axes.
    check(runs, case, ["loss", "query", *LAYOUTS["vocab"]])


@cases("quantized")
@pytest.mark.parametrize("fmt", list(scenarios.QUANTIZED))
def test_quantized(runs, case, fmt):
    # Without the adapter: integer gathers, then the same dequantization per row: exact.
    check(runs, case, [f"{fmt}/plain_lookup", f"{fmt}/plain_vocab_parallel_lookup"], EXACT)
    check(runs, case, [f"{fmt}/lookup", f"{fmt}/vocab_parallel_lookup"])
    check(runs, case, [f"{fmt}/logits"], LOGITS_TOLERANCE)


# --- The run was multi-host: who held what ------------------------------------------------


def test_every_case_has_results_in_both_processes(runs):
    expected = {
        case.key + name
        for cases_ in CASES.values()
        for case in cases_
        for name in reference(case.scenario)
    }
    for results, _ in runs:
        assert set(results) == expected


def test_devices_belong_to_processes_and_meshes_span_them(meta):
    for rank, m in enumerate(meta):
        assert (m["process_index"], m["process_count"]) == (rank, NUM_PROCESSES)
        owner = dict(map(tuple, m["device_processes"]))
        assert [owner[d] for d in m["local_device_ids"]] == [rank] * 4
        # jax.devices() lists process 0's devices first: what the meshes are built on.
        assert [p for _, p in m["device_processes"]] == [0] * 4 + [1] * 4
        for where, mesh in m["meshes"].items():
            owners = np.array(mesh["owners"])
            if where.startswith("data_across_hosts"):  # (2, 4): "data" row i on process i
                assert mesh["shape"] == {"data": 2, "model": 4}
                np.testing.assert_array_equal(owners, [[0] * 4, [1] * 4])
            else:  # (4, 2): "model" column j on process j
                assert mesh["shape"] == {"data": 4, "model": 2}
                np.testing.assert_array_equal(owners, [[0, 1]] * 4)
            assert [owner[d] for row in mesh["device_ids"] for d in row] == owners.ravel().tolist()


def test_each_process_supplied_only_its_batch_rows(meta):
    for rank, m in enumerate(meta):
        for where, rows in m["batch_rows"].items():
            if where.startswith("data_across_hosts"):
                half = scenarios.BATCH // 2
                assert rows == [[rank * half, (rank + 1) * half]], where
            else:  # every process's devices hold every "data" row
                assert rows == [[0, scenarios.BATCH]], where


def _union(blocks, axis):
    """The [start, stop) ranges a list of blocks covers along `axis`, merged."""
    spans = sorted({tuple(block[axis]) for block in blocks})
    merged = [list(spans[0])]
    for start, stop in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mesh", scenarios.MESHES)
def test_each_process_read_only_its_table_blocks(meta, mesh, layout):
    for rank, m in enumerate(meta):
        blocks = m["blocks"][f"{mesh}/explicit"][f"{layout}/embeddings"]
        assert len(blocks) == 4  # one per local device
        split = 0 if layout == "vocab" else 1  # rows or columns over "model"
        size = (V, D)[split]
        if mesh == "vocab_across_hosts":  # "model" spans the hosts: half the table each
            half = size // 2
            assert _union(blocks, split) == [[rank * half, (rank + 1) * half]]
        else:  # "model" within a host: 4 different quarters, the whole table on each host
            assert len({tuple(b[split]) for b in blocks}) == 4
            assert _union(blocks, split) == [[0, size]]
        assert _union(blocks, 1 - split) == [[0, (V, D)[1 - split]]]


@pytest.mark.parametrize("fmt", list(scenarios.QUANTIZED))
def test_quantized_arrays_split_over_rows_across_processes(meta, fmt):
    for rank, m in enumerate(meta):
        blocks = m["blocks"]["vocab_across_hosts/explicit"]
        arrays = [key for key in blocks if key.startswith(f"quantized_{fmt}/embeddings")]
        assert len(arrays) == (3 if fmt == "int4_block8" else 2)  # values, scale[, zero]
        for key in arrays:
            assert _union(blocks[key], 0) == [[rank * V // 2, (rank + 1) * V // 2]], key


def test_results_keep_their_shardings_on_explicit_axes(meta):
    specs = meta[0]["result_specs"]
    for mesh in scenarios.MESHES:
        for layout, params in LAYOUTS.items():
            key = f"{mesh}/explicit/{layout}/"
            assert specs[f"lookup/{key}lora"].startswith("('data',")  # the ids' batch split
            table_spec = str(tuple(params["embeddings"]))
            assert specs[f"gradients/{key}embeddings"] == table_spec
        key = f"{mesh}/explicit/vocab/"
        for optimizer in scenarios.SPARSE_OPTIMIZERS:
            assert specs[f"sparse_training/{key}{optimizer}/table"] == "('model', None)"
        assert specs[f"vocab_parallel_loss/{key}embeddings"] == "('model', None)"


@pytest.mark.parametrize("case", scenarios.GATHER_CHECKED, ids=lambda c: f"{c.scenario}-{c.id}")
def test_no_all_gather_of_the_table(meta, case):
    for m in meta:
        found = m["hlo"][case.key]
        assert not found["table_gathered"], found["all_gathered"]
        assert not found["lora_a_gathered"], found["all_gathered"]
        # Control: the same search finds a deliberate gather of the table on this mesh.
        assert m["control_gathers_table"][f"{case.mesh}/{case.kind}"]
        # The lookup's all-reduce runs over "model": across both hosts on vocab_across_hosts.
        model = m["meshes"][f"{case.mesh}/{case.kind}"]["shape"]["model"]
        ops = found["collectives"]
        assert any(op == "all-reduce" and size == model for op, _, size in ops), ops
