"""Row-wise optimizers on a vocab-sharded table (`P("model", None)`) with data-parallel ids:
`jaxembed.sharding.vocab_parallel_update` on 8 simulated CPU devices, 2x4 meshes with Explicit
and Auto axes.

Each shard updates only the rows it owns; results equal the unsharded `optimizer.update`, the
outputs keep the table's sharding, and the compiled step moves only id- and row-sized arrays:
no collective is as large as one table shard, where a dense step all-reduces a shard-sized
gradient (the control).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
from jaxembed import _hlo

assert jax.device_count() == 8, "run as `pytest tests/multidevice` (its conftest makes 8 devices)"

# A table shard (V/4 rows) outweighs a step's row_grads (8 x 6 rows), so that "no collective
# as large as a shard" separates row-sized traffic from shard-sized traffic.
V, D = 1024, 16
SHARD_BYTES = V // 4 * D * 4
STEPS = 3
OPTIMIZERS = {
    "sgd": lambda: jaxembed.sparse.sgd(0.1),
    "adagrad": lambda: jaxembed.sparse.adagrad(0.1),
    "rowwise_adagrad": lambda: jaxembed.sparse.rowwise_adagrad(0.1),
    "lazy_adam": lambda: jaxembed.sparse.lazy_adam(0.01),
}
KINDS = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}

kinds = pytest.mark.parametrize("kind", list(KINDS))


def make_mesh(kind):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(KINDS[kind],) * 2)


# Host (NumPy) data: every eager JAX op is one more XLA compile on a slow CPU.
def step_ids(step):
    """(8, 6) ids with duplicates inside a data shard and across the two data shards."""
    ids = np.random.default_rng(10 + step).integers(0, V, (8, 6), dtype=np.int32)
    ids[:, 0] = step  # one id in every row of both halves of the batch
    ids[[0, 7], 1] = V - 1
    ids[3, 2] = ids[3, 3]
    return ids


def step_grads(step):
    return np.random.default_rng(20 + step).standard_normal((8, 6, D), dtype=np.float32)


def put(mesh, array, *spec):
    return jax.device_put(array, NamedSharding(mesh, P(*spec)))


def place(mesh, table, state):
    """The table and the state's rows split over "model", the count replicated."""
    rows = tuple(put(mesh, a, "model", *(None,) * (a.ndim - 1)) for a in state.rows)
    return put(mesh, table, "model", None), jaxembed.sparse.RowwiseState(
        put(mesh, state.count), rows
    )


def place_batch(mesh, ids, row_grads):
    """The ids and row_grads split over "data"."""
    return put(mesh, ids, "data", None), put(mesh, row_grads, "data", None, None)


def sharded_update(optimizer, mesh, **kwargs):
    return functools.partial(
        jaxembed.sharding.vocab_parallel_update,
        optimizer,
        vocab_axis="model",
        mesh=mesh,
        batch_axes="data",
        **kwargs,
    )


def initial_table():
    return np.random.default_rng(0).standard_normal((V, D), dtype=np.float32)


@functools.cache
def unsharded(name):
    """The table and state after STEPS unsharded updates (shared by both kinds of mesh)."""
    optimizer = OPTIMIZERS[name]()
    table = initial_table()
    state = optimizer.init(table)
    update = jax.jit(optimizer.update)
    for step in range(STEPS):
        table, state = update(table, state, step_ids(step), step_grads(step))
    return jax.device_get((table, state))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@kinds
def test_equals_unsharded_update_and_keeps_shardings(name, kind):
    optimizer = OPTIMIZERS[name]()
    mesh = make_mesh(kind)
    sharded_table, sharded_state = place(mesh, initial_table(), optimizer.init(initial_table()))
    sharded_step = jax.jit(sharded_update(optimizer, mesh))
    for step in range(STEPS):
        sharded_table, sharded_state = sharded_step(
            sharded_table, sharded_state, *place_batch(mesh, step_ids(step), step_grads(step))
        )
    table, state = unsharded(name)
    rows = NamedSharding(mesh, P("model", None))
    assert sharded_table.sharding == rows
    assert [a.sharding.spec[0] for a in sharded_state.rows] == ["model"] * len(state.rows)
    assert sharded_state.count.sharding.is_fully_replicated
    if kind == "explicit":
        assert jax.typeof(sharded_table).sharding.spec == P("model", None)
    # Every device sees the step's ids in the unsharded order: the same sums, the same numbers.
    tolerance = {"rtol": 0, "atol": 0} if name == "sgd" else {"rtol": 1e-6, "atol": 0}
    chex.assert_trees_all_close(
        jax.device_get((sharded_table, sharded_state)), (table, state), **tolerance
    )
    assert int(sharded_state.count) == STEPS


@kinds
def test_compiled_step_moves_only_ids_and_rows(kind):
    mesh = make_mesh(kind)
    optimizer = jaxembed.sparse.lazy_adam(0.01)  # the largest state: two table-sized moments
    table = initial_table()
    args = (
        *place(mesh, table, optimizer.init(table)),
        *place_batch(mesh, step_ids(0), step_grads(0)),
    )
    found = _hlo.collectives(_hlo.compiled_text(sharded_update(optimizer, mesh), *args))
    # The ids and row_grads, all-gathered over "data", and nothing else.
    assert sorted(c.shapes for c in found) == [("f32[8,6,16]",), ("s32[8,6]",)], found
    assert all(c.op == "all-gather" and c.group_size == 2 for c in found), found
    assert max(c.nbytes for c in found) < SHARD_BYTES

    # Control: a dense step on the same table all-reduces its shard-sized gradient over
    # "data", and the same search sees it.
    table, _, ids, row_grads = args

    def dense_sgd(table, ids, row_grads):
        grad = jax.grad(lambda t: jnp.sum(jaxembed.apply({"embeddings": t}, ids) * row_grads))
        return table - 0.1 * grad(table)

    dense = _hlo.collectives(_hlo.compiled_text(dense_sgd, table, ids, row_grads))
    assert max(c.nbytes for c in dense) >= SHARD_BYTES, dense


# Both policies that do not raise take the same path ("fill" locally): one compile each.
@pytest.mark.parametrize("kind, policy", [("explicit", "fill"), ("auto", "clip")])
def test_out_of_range_ids_write_nothing(kind, policy):
    mesh = make_mesh(kind)
    optimizer = jaxembed.sparse.adagrad(0.1)
    table = initial_table()
    ids, row_grads = step_ids(0), step_grads(0)
    ids[:, 5] = [-1, V, V + 5, -V, 2 * V, -1, V, 3]
    touched = np.unique(ids[(ids >= 0) & (ids < V)])
    untouched = np.setdiff1d(np.arange(V), touched)
    expected = jax.device_get(
        jax.jit(functools.partial(optimizer.update, out_of_range="fill"))(
            table, optimizer.init(table), ids, row_grads
        )
    )
    args = (*place(mesh, table, optimizer.init(table)), *place_batch(mesh, ids, row_grads))
    new_table, state = jax.device_get(
        jax.jit(sharded_update(optimizer, mesh, out_of_range=policy))(*args)
    )
    chex.assert_trees_all_close((new_table, state), expected, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(new_table[untouched], table[untouched])
    np.testing.assert_array_equal(state.rows[0][untouched], np.float32(0.1))  # as initialized
    assert not np.array_equal(new_table[touched], table[touched])

    # "error": host ids raise before anything runs (naming the first bad id); traced ids
    # report through checkify (on Auto axes: JAX cannot read back a checkify error from a
    # shard_map on Explicit axes), naming the smallest.
    with pytest.raises(IndexError, match="got id -1\\."):
        sharded_update(optimizer, mesh)(*args[:2], ids, row_grads)
    if kind == "auto":
        error, _ = jax.jit(checkify.checkify(sharded_update(optimizer, mesh)))(*args)
        with pytest.raises(checkify.JaxRuntimeError, match=f"got id {-V}\\."):
            error.throw()


def test_ids_split_over_both_axes_and_mesh_from_context():
    mesh = make_mesh("explicit")
    optimizer = jaxembed.sparse.rowwise_adagrad(0.1)
    table = initial_table()
    ids, row_grads = step_ids(1), step_grads(1)
    expected = jax.jit(optimizer.update)(table, optimizer.init(table), ids, row_grads)
    both = NamedSharding(mesh, P(("data", "model")))
    update = functools.partial(
        jaxembed.sharding.vocab_parallel_update,
        optimizer,
        vocab_axis="model",
        batch_axes=("data", "model"),
    )
    with jax.set_mesh(mesh):  # no `mesh=`: the one in context
        new_table, state = jax.jit(update)(
            *place(mesh, table, optimizer.init(table)),
            jax.device_put(ids, both),
            jax.device_put(row_grads, both),
        )
    assert jax.typeof(new_table).sharding.spec == P("model", None)
    chex.assert_trees_all_close(jax.device_get((new_table, state)), expected, rtol=1e-6)


def test_errors_name_the_argument():
    mesh = make_mesh("explicit")
    optimizer = jaxembed.sparse.adagrad(0.1)
    table = initial_table()
    state = optimizer.init(table)
    ids, row_grads = step_ids(0), step_grads(0)
    update = sharded_update(optimizer, mesh)
    with pytest.raises(ValueError, match="`row_grads` must have shape"):
        update(table, state, ids, row_grads[..., :-1])
    with pytest.raises(ValueError, match="`state` must come from `optimizer.init\\(table\\)`"):
        update(table, optimizer.init(table[:8]), ids, row_grads)
    with pytest.raises(ValueError, match="rank >= 1"):
        update(table, state, ids[0, 0], row_grads[0, 0])
    with pytest.raises(ValueError, match="divisible by the size of mesh axis 'model' \\(4\\)"):
        update(table[:10], optimizer.init(table[:10]), ids % 10, row_grads)
    with pytest.raises(ValueError, match="`vocab_axis` must be an axis of the mesh"):
        jaxembed.sharding.vocab_parallel_update(
            optimizer, table, state, ids, row_grads, mesh=mesh, vocab_axis="tensor"
        )
    with pytest.raises(ValueError, match="vocab_parallel_update needs a mesh.*mesh=None"):
        jaxembed.sharding.vocab_parallel_update(
            optimizer, table, state, ids, row_grads, vocab_axis="model"
        )


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", ["rowwise_adagrad", "lazy_adam"])
def test_init_places_the_state_on_the_tables_mesh(name, jitted):
    """Rows split like the table's; the count replicated on the same mesh, a global array (a
    multi-host checkpoint refuses a single-device one), eagerly and under jit."""
    mesh = make_mesh("explicit")
    table = put(mesh, initial_table(), "model", None)
    init = OPTIMIZERS[name]().init
    with jax.set_mesh(mesh):
        state = (jax.jit(init) if jitted else init)(table)
    for array in state.rows:
        assert array.sharding.spec[0] == "model", array.sharding
        assert array.sharding.mesh.shape == mesh.shape
    assert state.count.sharding == NamedSharding(mesh, P()), state.count.sharding
    # The control: a table on one device gives a state on one device.
    single = OPTIMIZERS[name]().init(initial_table())
    assert not isinstance(single.count.sharding, NamedSharding)


# Plain `optimizer.update` on Explicit axes: the split is read from the arrays' types and the
# vocab-parallel update runs by itself, with no argument (a plain jitted step must work); the
# table and the state come back in the layouts they came in.
EXPLICIT_LAYOUTS = {
    "vocab-parallel": (P("model", None), P("data", None)),
    "vocab-parallel, ids whole": (P("model", None), P(None, None)),
    "rows and columns": (P("data", "model"), P("data", None)),
    "table whole, data-parallel ids": (P(None, None), P("data", None)),
    "columns, data-parallel ids": (P(None, "model"), P("data", None)),
}


@pytest.mark.parametrize("layout", list(EXPLICIT_LAYOUTS))
@pytest.mark.parametrize("name", ["sgd", "lazy_adam"])
def test_plain_update_on_explicit_axes(name, layout):
    optimizer = OPTIMIZERS[name]()
    mesh = make_mesh("explicit")
    table_spec, ids_spec = EXPLICIT_LAYOUTS[layout]
    with jax.set_mesh(mesh):
        table = put(mesh, initial_table(), *table_spec)
        state = optimizer.init(table)
        layouts = jax.tree.map(lambda x: x.sharding, (table, state))
        step = jax.jit(optimizer.update)
        for i in range(STEPS):
            ids, grads = (
                put(mesh, step_ids(i), *ids_spec),
                put(mesh, step_grads(i), *ids_spec, None),
            )
            table, state = step(table, state, ids, grads)
    assert jax.tree.map(lambda x: x.sharding, (table, state)) == layouts
    tolerance = {"rtol": 0, "atol": 0} if name == "sgd" else {"rtol": 1e-6, "atol": 0}
    chex.assert_trees_all_close(jax.device_get((table, state)), unsharded(name), **tolerance)
    if table_spec == P("model", None):  # only id- and row-sized traffic, as the explicit call
        text = _hlo.compiled_text(step, table, state, ids, grads)
        assert max((c.nbytes for c in _hlo.collectives(text)), default=0) < SHARD_BYTES
