"""`jaxembed.sparse`: row-wise optimizers and `value_and_row_grads`.

The contract: `sgd` and `adagrad` give dense optax's numbers; `rowwise_adagrad` and
`lazy_adam` follow their published formulas (checked against NumPy written here); only the
touched rows of the table and of the state change, bit for bit; an id outside the table never
writes anything; a compiled, donated step never builds an `(input_dim, output_dim)` buffer.

Small tables (50 x 4), batches of one shape, and each jitted function built once (`_jitted`)
keep the compilations few.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.experimental import checkify

import jaxembed
from jaxembed import sparse

V, D = 50, 4  # the table of every small test
HOT = 12  # the batches draw their valid ids from [0, HOT): rows HOT.. are never touched
BAD_IDS = (-1, V, V + 5)
# Row 2 and bad ids only, in the shape of `_batches` (one compiled update per config).
BAD_BATCH = jnp.array([[2, -1, V, V + 5, 2, -1], [V, -7, V + 5, 2, V + 100, V]])

OPTIMIZERS = {
    "sgd": lambda: sparse.sgd(0.1),
    "adagrad": lambda: sparse.adagrad(0.1),
    "rowwise_adagrad": lambda: sparse.rowwise_adagrad(0.1),
    "lazy_adam": lambda: sparse.lazy_adam(0.1),
}
NAMES = tuple(OPTIMIZERS)


@functools.cache
def _optimizer(name):
    return OPTIMIZERS[name]()


@functools.cache
def _jitted(name, out_of_range="error"):
    """One jitted `update` per (optimizer, policy), reused by every test."""
    return jax.jit(functools.partial(_optimizer(name).update, out_of_range=out_of_range))


def _table(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(V, D)), jnp.float32)


def _batches(steps=5, seed=0, bad=True):
    """`steps` (ids, row_grads) pairs, ids of shape (2, 6): each batch repeats an id three
    times and, with `bad`, holds the ids -1, V and V + 5."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        ids = rng.integers(0, HOT, size=(2, 6)).astype(np.int32)
        ids[0, 1] = ids[1, 0] = ids[0, 0]  # a triple duplicate
        if bad:
            ids[0, 3], ids[1, 4], ids[1, 5] = BAD_IDS
        grads = rng.normal(size=(2, 6, D)).astype(np.float32)
        batches.append((jnp.asarray(ids), jnp.asarray(grads)))
    return batches


def _dense_grad(ids, row_grads):
    """The dense gradient of the table, `zeros.at[valid_ids].add(valid_row_grads)`: ids
    outside the table contribute nothing (sent to row V and dropped, which keeps one shape)."""
    valid = (ids >= 0) & (ids < V)
    return jnp.zeros((V, D)).at[jnp.where(valid, ids, V)].add(row_grads, mode="drop")


def _run_sparse(update, optimizer, table, batches):
    state = optimizer.init(table)
    for ids, grads in batches:
        table, state = update(table, state, ids, grads)
    return table, state


def _run_dense(tx, table, batches):
    step = jax.jit(lambda t, s, ids, g: _dense_step(tx, t, s, _dense_grad(ids, g)))
    state = tx.init(table)
    for ids, grads in batches:
        table, state = step(table, state, ids, grads)
    return table, state


def _dense_step(tx, table, state, grads):
    updates, state = tx.update(grads, state, table)
    return optax.apply_updates(table, updates), state


def _assert_bits_equal(actual, expected, rows=slice(None)):
    """Bit-identical float32 arrays (NaN and -0.0 included), on `rows` only if given. NumPy
    indexing: masking JAX arrays eagerly would compile a gather per shape."""
    actual, expected = np.asarray(actual)[rows], np.asarray(expected)[rows]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


def _changed_rows(new, old):
    """Indices of the rows (first dim) in which `new` differs from `old`."""
    new, old = np.asarray(new), np.asarray(old)
    return np.flatnonzero((new != old).reshape(len(new), -1).any(axis=1)).tolist()


def _assert_only_rows_changed(old, new, rows):
    """`(table, state)` pairs: the table's `rows` all moved, and every other row of the table
    and of each state array kept every bit."""
    (old_table, old_state), (new_table, new_state) = old, new
    others = np.ones(V, bool)
    others[list(rows)] = False
    assert _changed_rows(new_table, old_table) == sorted(rows)
    _assert_bits_equal(new_table, old_table, others)
    for old_rows, new_rows in zip(old_state.rows, new_state.rows, strict=True):
        _assert_bits_equal(new_rows, old_rows, others)
    assert int(new_state.count) == int(old_state.count) + 1


def _touched(batches):
    ids = np.concatenate([np.asarray(ids).ravel() for ids, _ in batches])
    return np.unique(ids[(ids >= 0) & (ids < V)])


class TestDenseOptaxEquality:
    """`sgd` and `adagrad` are dense optax on the touched rows, ids outside the table ignored.

    Tolerances: sgd is `row - lr * g` in both, so exact, allowing 1 ulp for the order in
    which duplicate gradients are summed; adagrad has the same terms in the same order, checked
    at rtol 1e-6 (XLA may fuse the rsqrt differently in the two programs).
    """

    @pytest.mark.parametrize("out_of_range", ["error", "fill", "clip"])
    def test_sgd(self, out_of_range):
        batches = _batches()
        table, state = _run_sparse(
            _jitted("sgd", out_of_range), _optimizer("sgd"), _table(), batches
        )
        expected, _ = _run_dense(optax.sgd(0.1), _table(), batches)
        np.testing.assert_array_max_ulp(np.asarray(table), np.asarray(expected), maxulp=1)
        assert int(state.count) == len(batches)
        untouched = np.setdiff1d(np.arange(V), _touched(batches))
        assert len(untouched) >= V - HOT
        _assert_bits_equal(table, _table(), untouched)

    @pytest.mark.parametrize("out_of_range", ["error", "fill", "clip"])
    def test_adagrad(self, out_of_range):
        batches = _batches()
        table, state = _run_sparse(
            _jitted("adagrad", out_of_range), _optimizer("adagrad"), _table(), batches
        )
        expected, dense_state = _run_dense(optax.adagrad(0.1), _table(), batches)
        chex.assert_trees_all_close(table, expected, rtol=1e-6, atol=0)
        (sum_of_squares,) = state.rows
        chex.assert_trees_all_close(sum_of_squares, dense_state[0].sum_of_squares, rtol=1e-6)
        untouched = np.setdiff1d(np.arange(V), _touched(batches))
        _assert_bits_equal(table, _table(), untouched)
        np.testing.assert_array_equal(np.asarray(sum_of_squares)[untouched], np.float32(0.1))

    def test_adagrad_hyperparameters(self):
        optimizer = sparse.adagrad(0.3, initial_accumulator_value=0.0, eps=1e-3)
        batches = _batches(steps=3)
        table, _ = _run_sparse(jax.jit(optimizer.update), optimizer, _table(), batches)
        tx = optax.adagrad(0.3, initial_accumulator_value=0.0, eps=1e-3)
        expected, _ = _run_dense(tx, _table(), batches)
        chex.assert_trees_all_close(table, expected, rtol=1e-6, atol=0)

    def test_sgd_with_a_schedule(self):
        schedule = optax.linear_schedule(0.5, 0.05, transition_steps=4)
        optimizer = sparse.sgd(schedule)
        batches = _batches()
        table, state = _run_sparse(jax.jit(optimizer.update), optimizer, _table(), batches)
        assert int(state.count) == len(batches)
        expected, _ = _run_dense(optax.sgd(schedule), _table(), batches)
        np.testing.assert_array_max_ulp(np.asarray(table), np.asarray(expected), maxulp=1)
        # The schedule really varied: a constant 0.5 gives other numbers.
        constant, _ = _run_dense(optax.sgd(0.5), _table(), batches)
        assert not np.allclose(table, constant)


def _rowwise_adagrad_reference(table, batches, lr, eps=1e-8, initial=0.0):
    """FBGEMM's row-wise Adagrad in float64: per unique id, acc += mean(g**2),
    row -= lr * g / (sqrt(acc) + eps)."""
    table = np.asarray(table, np.float64).copy()
    acc = np.full(V, initial)
    for ids, grads in batches:
        ids, grads = np.asarray(ids).ravel(), np.asarray(grads, np.float64).reshape(-1, D)
        for i in np.unique(ids[(ids >= 0) & (ids < V)]):
            g = grads[ids == i].sum(axis=0)
            acc[i] += np.mean(g**2)
            table[i] -= lr * g / (np.sqrt(acc[i]) + eps)
    return table, acc


def _lazy_adam_reference(table, batches, lr, b1=0.9, b2=0.999, eps=1e-8):
    """TensorFlow's LazyAdam in float64: t is the global step (1 first); only the rows of the
    batch's unique ids, and their moments, change."""
    table = np.asarray(table, np.float64).copy()
    m, v = np.zeros((V, D)), np.zeros((V, D))
    for t, (ids, grads) in enumerate(batches, start=1):
        ids, grads = np.asarray(ids).ravel(), np.asarray(grads, np.float64).reshape(-1, D)
        rate = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        for i in np.unique(ids[(ids >= 0) & (ids < V)]):
            g = grads[ids == i].sum(axis=0)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g**2
            table[i] -= rate * m[i] / (np.sqrt(v[i]) + eps)
    return table, m, v


class TestNumpyReferences:
    """`rowwise_adagrad` and `lazy_adam` against the formulas, in float64 NumPy.

    rtol 1e-5 for float32 arithmetic, except LazyAdam's table: its bias correction
    `sqrt(1 - b2**t)` is computed in float32 (as TensorFlow and optax do), and the rounding of
    `b2**t` (~6e-8) is amplified by the cancellation to ~3e-5 / t relative in the step size;
    the table is checked at rtol 1e-4 (a wrong `t` or formula is off by far more).
    """

    def test_rowwise_adagrad(self):
        batches = _batches(steps=6, seed=1)
        table, state = _run_sparse(
            _jitted("rowwise_adagrad"), _optimizer("rowwise_adagrad"), _table(), batches
        )
        expected, acc = _rowwise_adagrad_reference(_table(), batches, lr=0.1)
        np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.rows[0], acc, rtol=1e-5, atol=0)

    def test_rowwise_adagrad_hyperparameters(self):
        optimizer = sparse.rowwise_adagrad(0.5, initial_accumulator_value=0.2, eps=1e-2)
        batches = _batches(steps=3, seed=2)
        table, state = _run_sparse(jax.jit(optimizer.update), optimizer, _table(), batches)
        expected, acc = _rowwise_adagrad_reference(_table(), batches, lr=0.5, eps=1e-2, initial=0.2)
        np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.rows[0], acc, rtol=1e-5, atol=0)

    def test_lazy_adam(self):
        batches = _batches(steps=6, seed=3)
        table, state = _run_sparse(_jitted("lazy_adam"), _optimizer("lazy_adam"), _table(), batches)
        expected, m, v = _lazy_adam_reference(_table(), batches, lr=0.1)
        np.testing.assert_allclose(table, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state.rows[0], m, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state.rows[1], v, rtol=1e-5, atol=1e-9)
        assert int(state.count) == len(batches)

    def test_lazy_adam_differs_from_dense_adam_on_rare_rows(self):
        # Row 0 is seen at step 1 only: dense Adam keeps moving it on momentum, LazyAdam not.
        first = jnp.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
        batches = [(first, jnp.ones((2, 6, D))), (jnp.ones((2, 6), jnp.int32), jnp.ones((2, 6, D)))]
        update, optimizer = _jitted("lazy_adam"), _optimizer("lazy_adam")
        table, _ = _run_sparse(update, optimizer, _table(), batches)
        after_first, _ = _run_sparse(update, optimizer, _table(), batches[:1])
        _assert_bits_equal(table, after_first, 0)
        dense, _ = _run_dense(optax.adam(0.1), _table(), batches)
        assert not np.allclose(np.asarray(dense)[0], np.asarray(after_first)[0])


class TestUntouchedRows:
    """Rows the batch does not name keep every bit, in the table and in the state."""

    @pytest.mark.parametrize("name", NAMES)
    def test_bit_identical(self, name):
        update, optimizer = _jitted(name), _optimizer(name)
        # Two steps first so that the state's rows are not at their initial values.
        table, state = _run_sparse(update, optimizer, _table(), _batches(steps=2, seed=4))
        # The batches' shape, so the compiled update is reused; -1 and V write nothing.
        ids = jnp.array([[1, 3, 3, 7, 1, -1], [7, 7, 3, 1, V, 1]])
        new = update(table, state, ids, jnp.ones((2, 6, D)))
        _assert_only_rows_changed((table, state), new, [1, 3, 7])
        for old_rows, new_rows in zip(state.rows, new[1].rows, strict=True):
            assert _changed_rows(new_rows, old_rows) == [1, 3, 7]

    @pytest.mark.parametrize("name", NAMES)
    def test_state_layout(self, name):
        table = _table()
        state = _optimizer(name).init(table)
        assert isinstance(state, sparse.RowwiseState)
        chex.assert_shape(state.count, ())
        expected = {
            "sgd": [],
            "adagrad": [(V, D)],
            "rowwise_adagrad": [(V,)],
            "lazy_adam": [(V, D), (V, D)],
        }[name]
        assert [array.shape for array in state.rows] == expected
        for array in state.rows:
            assert array.dtype == jnp.float32


class TestOutOfRange:
    """A bad id never writes a row or its state; "error" also reports it."""

    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("out_of_range", ["fill", "clip"])
    def test_bad_ids_write_nothing(self, name, out_of_range):
        update, optimizer = _jitted(name, out_of_range), _optimizer(name)
        table = _table()
        state = optimizer.init(table)
        # "clip" reads negative ids as row 0 and ids >= V as row V - 1: neither may move.
        new = update(table, state, BAD_BATCH, jnp.ones((2, 6, D)))
        _assert_only_rows_changed((table, state), new, [2])

    # Two optimizers (one state array; two): each needs its own checkified compilation.
    @pytest.mark.parametrize("name", ["rowwise_adagrad", "lazy_adam"])
    def test_error_under_checkify_writes_nothing_and_names_the_id(self, name):
        checked = jax.jit(checkify.checkify(_optimizer(name).update))
        table = _table()
        state = _optimizer(name).init(table)
        ids = jnp.array([[2, V + 5, 2, 2, 2, 2], [2, 2, V, 2, 2, 2]])
        err, new = checked(table, state, ids, jnp.ones((2, 6, D)))
        # The smallest bad id is named.
        with pytest.raises(checkify.JaxRuntimeError, match=rf"got id {V}\b"):
            err.throw()
        _assert_only_rows_changed((table, state), new, [2])
        err, new = checked(table, state, BAD_BATCH, jnp.ones((2, 6, D)))
        with pytest.raises(checkify.JaxRuntimeError, match=r"got id -7\b"):
            err.throw()
        _assert_only_rows_changed((table, state), new, [2])
        # Valid ids: no error.
        err, _ = checked(table, state, jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6, D)))
        assert err.get() is None

    @pytest.mark.parametrize("ids", [np.array([3, V + 5]), jnp.array([[3], [-2]])])
    def test_error_eagerly_raises_naming_the_id(self, ids):
        table = _table()
        optimizer = _optimizer("adagrad")
        bad = int(np.asarray(ids)[(np.asarray(ids) < 0) | (np.asarray(ids) >= V)][0])
        with pytest.raises(IndexError, match=rf"got id {bad}\b"):
            optimizer.update(table, optimizer.init(table), ids, jnp.ones((*ids.shape, D)))

    def test_error_under_plain_jit_compiles_and_writes_nothing(self):
        update, optimizer = _jitted("lazy_adam"), _optimizer("lazy_adam")
        table = _table()
        state = optimizer.init(table)
        new = update(table, state, BAD_BATCH, jnp.ones((2, 6, D)))
        _assert_only_rows_changed((table, state), new, [2])
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new))

    # Eager calls: the id handling is shared by the four optimizers (`_rowwise`), so two of
    # them (no state; two moments) cover it without compiling every primitive four times.
    @pytest.mark.parametrize("name", ["sgd", "lazy_adam"])
    def test_empty_ids(self, name):
        optimizer = _optimizer(name)
        table = _table()
        state = optimizer.init(table)
        new = optimizer.update(table, state, jnp.zeros((0,), jnp.int32), jnp.zeros((0, D)))
        _assert_only_rows_changed((table, state), new, [])

    @pytest.mark.parametrize("name", ["sgd", "lazy_adam"])
    def test_rank_zero_ids(self, name):
        optimizer = _optimizer(name)
        table = _table()
        state = optimizer.init(table)
        new = optimizer.update(table, state, jnp.int32(6), jnp.full(D, 2.0))
        _assert_only_rows_changed((table, state), new, [6])
        # First step with g = 2: sgd moves the row by -lr * g = -0.2, LazyAdam by
        # -lr * sign(g) = -0.1 (up to eps).
        step = {"sgd": -0.2, "lazy_adam": -0.1}[name]
        np.testing.assert_allclose(np.asarray(new[0])[6], np.asarray(table)[6] + step, atol=1e-6)

    def test_unknown_policy(self):
        optimizer = _optimizer("sgd")
        table = _table()
        with pytest.raises(ValueError, match="out_of_range"):
            optimizer.update(
                table, optimizer.init(table), jnp.array([1]), jnp.ones((1, D)), out_of_range="x"
            )


BIG_V, BIG_D, BATCH = 65536, 64, 512
DENSE_BYTES = BIG_V * BIG_D * 4  # one (V, D) float32 buffer


def _big_inputs():
    table = jax.ShapeDtypeStruct((BIG_V, BIG_D), jnp.float32)
    ids = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
    row_grads = jax.ShapeDtypeStruct((BATCH, BIG_D), jnp.float32)
    return table, ids, row_grads


def _temp_bytes(fn, *args):
    compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


class TestCompiledMemory:
    """A donated step's scratch memory is a small fraction of one (V, D) buffer; the dense
    optax step, the control, needs at least that."""

    @pytest.mark.parametrize("name", NAMES)
    def test_update(self, name):
        optimizer = _optimizer(name)
        table, ids, row_grads = _big_inputs()
        state = jax.eval_shape(optimizer.init, table)
        assert _temp_bytes(optimizer.update, table, state, ids, row_grads) < DENSE_BYTES / 8

    def test_value_and_row_grads_then_update(self):
        optimizer = _optimizer("adagrad")
        table, ids, row_grads = _big_inputs()
        state = jax.eval_shape(optimizer.init, table)

        def step(table, state, ids, targets):
            loss, grads = sparse.value_and_row_grads(
                lambda rows, targets: jnp.mean((rows - targets) ** 2),
                {"embeddings": table},
                ids,
                targets,
            )
            table, state = optimizer.update(table, state, ids, grads)
            return loss, table, state

        assert _temp_bytes(step, table, state, ids, row_grads) < DENSE_BYTES / 8

    def test_dense_optax_control(self):
        tx = optax.adagrad(0.1)
        table, ids, row_grads = _big_inputs()
        state = jax.eval_shape(tx.init, table)

        def step(table, state, ids, row_grads):
            return _dense_step(tx, table, state, jnp.zeros_like(table).at[ids].add(row_grads))

        assert _temp_bytes(step, table, state, ids, row_grads) >= DENSE_BYTES / 8

    def test_rowwise_adagrad_state_is_one_float_per_row(self):
        table, _, _ = _big_inputs()
        state = jax.eval_shape(_optimizer("rowwise_adagrad").init, table)
        leaves = jax.tree.leaves(state)
        total = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
        assert total == BIG_V * 4 + 4  # V float32 accumulators + an int32 count


class TestDonation:
    def test_donated_inputs_are_consumed(self):
        name = "lazy_adam"  # a table and two state arrays to donate
        optimizer = _optimizer(name)
        ids, grads = _batches(steps=1)[0]
        expected, expected_state = _jitted(name)(_table(), optimizer.init(_table()), ids, grads)
        table = _table()
        state = optimizer.init(table)
        donated = jax.jit(optimizer.update, donate_argnums=(0, 1))
        new_table, new_state = donated(table, state, ids, grads)
        assert table.is_deleted()
        assert all(array.is_deleted() for array in state.rows)
        _assert_bits_equal(new_table, expected)
        chex.assert_trees_all_equal(new_state, expected_state)


class TestCheckpointing:
    def test_restore_and_continue_is_bit_identical(self, tmp_path):
        update, optimizer = _jitted("lazy_adam"), _optimizer("lazy_adam")
        batches = _batches(steps=4, seed=5)
        uninterrupted = _run_sparse(update, optimizer, _table(), batches)

        table, state = _run_sparse(update, optimizer, _table(), batches[:2])
        path = tmp_path / "checkpoint"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, {"table": table, "state": state})
        target = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, {"table": _table(), "state": optimizer.init(_table())}
        )
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path, target)
        table, state = restored["table"], restored["state"]
        assert isinstance(state, sparse.RowwiseState)
        assert int(state.count) == 2  # the count drives LazyAdam's bias correction
        for ids, grads in batches[2:]:
            table, state = update(table, state, ids, grads)
        _assert_bits_equal(table, uninterrupted[0])
        chex.assert_trees_all_equal(state, uninterrupted[1])


class TestValueAndRowGrads:
    def _loss(self, rows, targets):
        return jnp.sum((rows - targets) ** 2 * jnp.arange(1.0, D + 1))

    def test_equals_the_gradient_with_respect_to_the_rows(self):
        params = {"embeddings": _table()}
        ids = jnp.array([[1, 4, 4], [0, 9, 1]])
        targets = jnp.full((2, 3, D), 0.5)
        loss, row_grads = sparse.value_and_row_grads(self._loss, params, ids, targets)
        rows = jaxembed.apply(params, ids)
        chex.assert_trees_all_close(loss, self._loss(rows, targets), rtol=1e-6)
        chex.assert_trees_all_close(row_grads, jax.grad(self._loss)(rows, targets), rtol=1e-6)
        chex.assert_shape(row_grads, (2, 3, D))
        # And the dense gradient of the table is their scatter-add: same training signal.
        dense = jax.grad(lambda p: self._loss(jaxembed.apply(p, ids), targets))(params)
        chex.assert_trees_all_close(
            dense["embeddings"], jnp.zeros((V, D)).at[ids].add(row_grads), rtol=1e-6
        )

    def test_has_aux(self):
        params = {"embeddings": _table()}
        ids = jnp.array([3, 3, 8])

        def loss_fn(rows, scale):
            return scale * jnp.sum(rows**2), {"norm": jnp.linalg.norm(rows)}

        (loss, aux), row_grads = sparse.value_and_row_grads(loss_fn, params, ids, 2.0, has_aux=True)
        rows = jaxembed.apply(params, ids)
        chex.assert_trees_all_close(loss, 2.0 * jnp.sum(rows**2), rtol=1e-6)
        chex.assert_trees_all_close(aux["norm"], jnp.linalg.norm(rows), rtol=1e-6)
        chex.assert_trees_all_close(row_grads, 4.0 * rows, rtol=1e-6)

    def test_out_of_range_is_passed_to_the_lookup(self):
        params = {"embeddings": _table()}
        with pytest.raises(IndexError, match=f"got id {V}"):
            sparse.value_and_row_grads(jnp.sum, params, jnp.array([1, V]))
        loss, row_grads = sparse.value_and_row_grads(
            jnp.sum, params, jnp.array([1, V]), out_of_range="clip"
        )
        chex.assert_trees_all_close(loss, jnp.sum(params["embeddings"][jnp.array([1, V - 1])]))
        chex.assert_trees_all_equal(row_grads, jnp.ones((2, D)))

    def test_training_step_reduces_the_loss(self):
        optimizer = sparse.adagrad(0.5)
        table = _table()
        ids, targets = jnp.array([[1, 2, 2], [7, 1, 30]]), jnp.zeros((2, 3, D))

        @jax.jit
        def step(table, state):
            loss, row_grads = sparse.value_and_row_grads(
                lambda rows: jnp.mean((rows - targets) ** 2), {"embeddings": table}, ids
            )
            return loss, *optimizer.update(table, state, ids, row_grads)

        state = optimizer.init(table)
        losses = []
        for _ in range(5):
            loss, table, state = step(table, state)
            losses.append(float(loss))
        assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]


class TestBadInput:
    """Clear errors that name the argument."""

    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize(
        "table, error",
        [
            (np.ones((V,), np.float32), ValueError),
            (np.ones((2, V, D), np.float32), ValueError),
            (np.ones((V, D), np.int32), TypeError),
        ],
        ids=["1-D", "3-D", "integer"],
    )
    def test_table(self, name, table, error):
        optimizer = _optimizer(name)
        with pytest.raises(error, match="`table`"):
            optimizer.init(table)
        with pytest.raises(error, match="`table`"):
            optimizer.update(table, optimizer.init(_table()), jnp.array([1]), jnp.ones((1, D)))

    @pytest.mark.parametrize(
        "row_grads, error",
        [
            (np.ones((2, D), np.float32), ValueError),  # ids.shape is (1,)
            (np.ones((1, D + 1), np.float32), ValueError),
            (np.ones((1, D), np.int32), TypeError),
        ],
        ids=["batch", "output_dim", "integer"],
    )
    def test_row_grads(self, row_grads, error):
        optimizer = _optimizer("adagrad")
        table = _table()
        with pytest.raises(error, match="`row_grads`"):
            optimizer.update(table, optimizer.init(table), jnp.array([1]), row_grads)

    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("learning_rate", [-0.1, float("nan"), float("inf"), "0.1"])
    def test_learning_rate(self, name, learning_rate):
        with pytest.raises(ValueError, match="`learning_rate`"):
            getattr(sparse, name)(learning_rate)

    @pytest.mark.parametrize(
        "factory, argument",
        [
            (
                lambda: sparse.adagrad(0.1, initial_accumulator_value=-1.0),
                "initial_accumulator_value",
            ),
            (lambda: sparse.adagrad(0.1, eps=float("nan")), "eps"),
            (lambda: sparse.rowwise_adagrad(0.1, eps=-1e-8), "eps"),
            (lambda: sparse.lazy_adam(0.1, b1=-0.9), "b1"),
            (lambda: sparse.lazy_adam(0.1, b2=float("nan")), "b2"),
        ],
    )
    def test_hyperparameters(self, factory, argument):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            factory()

    @pytest.mark.parametrize("ids", [jnp.array([1.0]), [1.5], np.array([True])])
    def test_ids(self, ids):
        optimizer = _optimizer("sgd")
        table = _table()
        with pytest.raises(TypeError, match="`ids`"):
            optimizer.update(table, optimizer.init(table), ids, jnp.ones((1, D)))

    @pytest.mark.parametrize(
        "state_from, table_shape",
        [("rowwise_adagrad", (V, D)), ("lazy_adam", (V, D)), ("adagrad", (V + 10, D))],
        ids=["other optimizer", "other optimizer (two moments)", "other table"],
    )
    def test_state(self, state_from, table_shape):
        state = _optimizer(state_from).init(jnp.zeros(table_shape))
        with pytest.raises(ValueError, match="`state`"):
            _optimizer("adagrad").update(_table(), state, jnp.array([1]), jnp.ones((1, D)))
