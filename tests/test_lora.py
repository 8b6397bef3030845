"""LoRA: Keras parity, gather-first lookup, merge/unmerge/remove, and freezing without waste."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import id_arrays

import jaxembed
from jaxembed import lora

KEY = jax.random.key(0)
# Keras's own LoRA test case.
BASE = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], np.float32)
A = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]], np.float32)
B = np.array([[0.5, 0.5], [0.6, 0.6]], np.float32)
KERAS_CASE = {"embeddings": BASE, "lora_embeddings_a": A, "lora_embeddings_b": B}


def random_lora_params(input_dim=50, output_dim=6, rank=3, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = jaxembed.init(
        keys[0], input_dim, output_dim, param_dtype=dtype, embeddings_initializer="normal"
    )
    params = jaxembed.enable_lora(params, keys[1], rank)
    # B starts at zero; make it nonzero so the adapter matters.
    params["lora_embeddings_b"] = jax.random.normal(keys[2], (rank, output_dim))
    return params


def naive_table(params, lora_alpha=None):
    rank = params["lora_embeddings_a"].shape[1]
    scale = (lora_alpha or rank) / rank
    return params["embeddings"] + scale * params["lora_embeddings_a"] @ params["lora_embeddings_b"]


class TestKerasParity:
    def test_keras_reference_case(self, variant):
        out = variant(functools.partial(jaxembed.apply, lora_alpha=3.0, out_of_range="clip"))(
            KERAS_CASE, jnp.arange(3)
        )
        np.testing.assert_allclose(out, BASE + 1.5 * A @ B, rtol=1e-6)

    def test_linen_module_with_weights_and_alpha(self):
        # weights= together with lora_rank fails in Keras; it works here, and alpha is kept.
        layer = jaxembed.Embedding(3, 2, weights=BASE, lora_rank=2, lora_alpha=3.0)
        variables = nn.unbox(layer.init(KEY, jnp.arange(3)))
        np.testing.assert_array_equal(variables["params"]["embeddings"], BASE)
        variables["params"].update(lora_embeddings_a=A, lora_embeddings_b=B)
        np.testing.assert_allclose(
            layer.apply(variables, jnp.arange(3)), BASE + 1.5 * A @ B, rtol=1e-6
        )

    @pytest.mark.parametrize("lora_alpha", [None, 3.0, 16])
    def test_equals_keras_layer(self, lora_alpha):
        params = random_lora_params()
        keras_layer = keras.layers.Embedding(50, 6)
        keras_layer.build()
        keras_layer.embeddings.assign(params["embeddings"])
        keras_layer.enable_lora(3, lora_alpha=lora_alpha)
        keras_layer.lora_embeddings_a.assign(params["lora_embeddings_a"])
        keras_layer.lora_embeddings_b.assign(params["lora_embeddings_b"])
        ids = np.array([[0, 49, 7], [3, 3, 12]])
        np.testing.assert_allclose(
            jaxembed.apply(params, ids, lora_alpha=lora_alpha),
            np.asarray(keras_layer(ids)),
            rtol=1e-5,
            atol=1e-6,
        )
        # Keras regularizes the trainable weights only: A and B, not the frozen table.
        penalty = jaxembed.regularization_penalty(params, "l2")
        expected = 0.01 * (
            np.sum(np.square(params["lora_embeddings_a"]))
            + np.sum(np.square(params["lora_embeddings_b"]))
        )
        np.testing.assert_allclose(penalty, expected, rtol=1e-5)

    def test_keras_initial_adapter_statistics(self):
        params = jaxembed.enable_lora(jaxembed.init(KEY, 4096, 4), KEY, rank=8)
        a, b = params["lora_embeddings_a"], params["lora_embeddings_b"]
        chex.assert_type((a, b), jnp.float32)
        limit = np.sqrt(6.0 / 4096)  # he_uniform with fan_in = input_dim
        assert float(jnp.abs(a).max()) <= limit
        assert float(jnp.abs(a).max()) > 0.95 * limit
        np.testing.assert_array_equal(b, np.zeros((8, 4)))

    def test_adapter_float32_whatever_the_table_dtype(self):
        params = jaxembed.enable_lora(jaxembed.init(KEY, 10, 4, param_dtype=jnp.bfloat16), KEY, 2)
        chex.assert_type(params["embeddings"], jnp.bfloat16)
        chex.assert_type((params["lora_embeddings_a"], params["lora_embeddings_b"]), jnp.float32)
        layer = jaxembed.Embedding(10, 4, lora_rank=2, param_dtype=jnp.bfloat16)
        variables = nn.unbox(layer.init(KEY, jnp.arange(3)))["params"]
        chex.assert_type(variables["lora_embeddings_a"], jnp.float32)
        chex.assert_type(variables["embeddings"], jnp.bfloat16)


class TestLookupAndAttend:
    @given(
        ids=id_arrays(0, 49),
        lora_alpha=st.one_of(st.none(), st.floats(0.5, 64.0)),
    )
    @settings(max_examples=25, deadline=None)
    def test_property_apply_equals_naive_and_merged(self, ids, lora_alpha):
        params = random_lora_params()
        out = jaxembed.apply(params, ids, lora_alpha=lora_alpha)
        chex.assert_shape(out, (*ids.shape, 6))
        np.testing.assert_allclose(out, naive_table(params, lora_alpha)[ids], rtol=1e-5, atol=1e-5)
        merged = jaxembed.merge_lora(params, lora_alpha=lora_alpha)
        np.testing.assert_allclose(jaxembed.apply(merged, ids), out, rtol=1e-5, atol=1e-5)

    @given(seed=st.integers(0, 2**16), lora_alpha=st.one_of(st.none(), st.floats(0.5, 32.0)))
    @settings(max_examples=15, deadline=None)
    def test_property_gradients_equal_naive_formula(self, seed, lora_alpha):
        params = random_lora_params(seed=seed)
        ids = jax.random.randint(jax.random.key(seed), (4, 5), 0, 50)
        target = jnp.ones((4, 5, 6))

        def gather_first(adapter):
            out = jaxembed.apply(
                {**params, **adapter}, ids, lora_alpha=lora_alpha, out_of_range="clip"
            )
            return jnp.sum((out - target) ** 2)

        def naive(adapter):
            return jnp.sum((naive_table({**params, **adapter}, lora_alpha)[ids] - target) ** 2)

        adapter = {k: params[k] for k in lora.LORA_KEYS}
        chex.assert_trees_all_close(
            jax.grad(gather_first)(adapter), jax.grad(naive)(adapter), rtol=1e-4, atol=1e-5
        )

    def test_out_of_range_policies_cover_the_adapter(self):
        params = random_lora_params()
        assert bool(
            jnp.isnan(jaxembed.apply(params, jnp.array([-1, 50]), out_of_range="fill")).all()
        )
        np.testing.assert_allclose(
            jaxembed.apply(params, jnp.array([60]), out_of_range="clip"),
            naive_table(params)[jnp.array([49])],
            rtol=1e-5,
        )
        with pytest.raises(IndexError, match="got id 50"):
            jaxembed.apply(params, jnp.array([50]))

    def test_attend_with_lora_equals_naive(self, variant):
        params = random_lora_params()
        query = jax.random.normal(KEY, (2, 3, 6))
        logits = variant(functools.partial(jaxembed.attend, lora_alpha=6.0))(params, query)
        np.testing.assert_allclose(logits, query @ naive_table(params, 6.0).T, rtol=1e-4, atol=1e-5)

    def test_bf16_output(self):
        params = random_lora_params(dtype=jnp.bfloat16)
        chex.assert_type(jaxembed.apply(params, jnp.array([1]), dtype=jnp.bfloat16), jnp.bfloat16)
        chex.assert_type(jaxembed.apply(params, jnp.array([1])), jnp.bfloat16)

    @pytest.mark.parametrize("function", ["apply", "attend"])
    def test_never_builds_the_vocab_by_dim_delta(self, function):
        input_dim, output_dim = 8192, 256
        params = random_lora_params(input_dim, output_dim, rank=4)
        if function == "apply":
            fn = functools.partial(jaxembed.apply, out_of_range="clip")
            arg = jnp.zeros((16,), jnp.int32)
            budget = input_dim * output_dim * 4  # one float32 V x D buffer
        else:
            fn = jaxembed.attend
            arg = jnp.ones((2, output_dim))
            budget = input_dim * output_dim * 4
        compiled = jax.jit(fn).lower(params, arg).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < budget / 4
        naive = jax.jit(lambda p, i: naive_table(p)[i]).lower(params, jnp.zeros((16,), int))
        assert naive.compile().memory_analysis().temp_size_in_bytes >= budget  # test can fail


class TestMergeUnmergeRemove:
    def test_merge_casts_back_to_table_dtype_and_drops_adapter(self):
        params = random_lora_params(dtype=jnp.bfloat16)
        merged = jaxembed.merge_lora(params, lora_alpha=2.0)
        assert sorted(merged) == ["embeddings"]
        chex.assert_type(merged["embeddings"], jnp.bfloat16)
        expected = params["embeddings"].astype(jnp.float32) + (2.0 / 3) * (
            params["lora_embeddings_a"] @ params["lora_embeddings_b"]
        )
        np.testing.assert_array_equal(merged["embeddings"], expected.astype(jnp.bfloat16))

    def test_merge_keeps_input_intact(self):
        params = random_lora_params()
        before = jax.tree.map(np.array, params)
        jaxembed.merge_lora(params)
        chex.assert_trees_all_equal(params, before)

    def test_safe_merge(self):
        params = random_lora_params()
        params["lora_embeddings_b"] = params["lora_embeddings_b"].at[0, 0].set(jnp.inf)
        jaxembed.merge_lora(params)  # without the option, non-finite values pass through
        with pytest.raises(ValueError, match=r"safe_merge=True.*50 NaN or infinite"):
            jaxembed.merge_lora(params, safe_merge=True)
        from jax.experimental import checkify

        merge = jax.jit(checkify.checkify(functools.partial(jaxembed.merge_lora, safe_merge=True)))
        error, _ = merge(params)
        with pytest.raises(checkify.JaxRuntimeError, match="NaN or infinite"):
            error.throw()

    def test_unmerge_round_trip(self):
        params = random_lora_params()
        adapter = {k: params[k] for k in lora.LORA_KEYS}
        merged = jaxembed.merge_lora(params, lora_alpha=5.0)
        restored = lora.unmerge_lora(merged, adapter, lora_alpha=5.0)
        chex.assert_trees_all_close(restored, params, atol=1e-6)

    def test_remove(self):
        params = random_lora_params()
        removed = lora.remove_lora(params)
        assert sorted(removed) == ["embeddings"]
        assert removed["embeddings"] is params["embeddings"]


class TestErrors:
    @pytest.mark.parametrize("rank", [0, -2, 2.5, "4", None, True])
    def test_rank_must_be_positive_int(self, rank):
        params = jaxembed.init(KEY, 10, 4)
        with pytest.raises(ValueError, match=f"`rank` must be a positive integer.*{rank!r}"):
            jaxembed.enable_lora(params, KEY, rank)

    @pytest.mark.parametrize("rank", [0, 1.5])
    def test_module_lora_rank(self, rank):
        with pytest.raises(ValueError, match=f"`lora_rank` must be a positive integer.*{rank}"):
            jaxembed.Embedding(10, 4, lora_rank=rank)

    @pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), "8"])
    def test_lora_alpha_must_be_positive(self, alpha):
        with pytest.raises(ValueError, match="`lora_alpha` must be a finite positive number"):
            jaxembed.Embedding(10, 4, lora_rank=2, lora_alpha=alpha)
        with pytest.raises(ValueError, match="`lora_alpha` must be a finite positive number"):
            jaxembed.apply(random_lora_params(), jnp.array([1]), lora_alpha=alpha)

    def test_traced_lora_alpha_names_the_fix(self):
        params = random_lora_params()
        apply = jax.jit(
            lambda p, alpha: jaxembed.apply(
                p, jnp.array([1]), lora_alpha=alpha, out_of_range="clip"
            )
        )
        with pytest.raises(ValueError, match="lora_alpha=a traced value.*static_argnames"):
            apply(params, 3.0)

    def test_enable_twice(self):
        params = random_lora_params()
        with pytest.raises(ValueError, match=r"already enabled.*rank 3.*Received: rank=2"):
            jaxembed.enable_lora(params, KEY, 2)

    def test_lora_with_constraint(self):
        with pytest.raises(ValueError, match="LoRA is incompatible with embedding constraints"):
            jaxembed.Embedding(10, 4, lora_rank=2, embeddings_constraint="max_norm")
        params = random_lora_params()
        with pytest.raises(ValueError, match="apply_constraint: LoRA is incompatible"):
            jaxembed.apply_constraint(params, "non_neg")
        tx = jaxembed.keep_embeddings_constrained("non_neg")
        with pytest.raises(ValueError, match="keep_embeddings_constrained: LoRA is incompatible"):
            tx.update(params, tx.init(params), params)

    @pytest.mark.parametrize("function", [jaxembed.merge_lora, lora.remove_lora])
    def test_needs_an_adapter(self, function):
        match = r"needs params holding a LoRA adapter.*\['embeddings'\]"
        with pytest.raises(ValueError, match=match):
            function(jaxembed.init(KEY, 10, 4))

    def test_half_an_adapter_or_wrong_shapes(self):
        params = random_lora_params()
        del params["lora_embeddings_b"]
        with pytest.raises(ValueError, match="not its partner"):
            jaxembed.apply(params, jnp.array([1]))
        params = random_lora_params()
        params["lora_embeddings_b"] = jnp.ones((2, 6))
        with pytest.raises(ValueError, match=r"\(50, 3\) and \(2, 6\)"):
            jaxembed.apply(params, jnp.array([1]))

    def test_unmerge_needs_merged_params(self):
        params = random_lora_params()
        with pytest.raises(ValueError, match="still hold one"):
            lora.unmerge_lora(params, {k: params[k] for k in lora.LORA_KEYS})


class Model(nn.Module):
    """A whole Flax model: a jaxembed layer beside other layers."""

    lora_rank: int | None = 4

    @nn.compact
    def __call__(self, ids):
        x = jaxembed.Embedding(
            512, 16, lora_rank=self.lora_rank, out_of_range="clip", name="tokens"
        )(ids)
        return nn.Dense(16)(x)


def train(params, tx, loss_fn, steps=15, use_split=True, adapters_only=False):
    if use_split:
        trainable, frozen = lora.split_trainable(params, adapters_only=adapters_only)
    else:
        trainable, frozen = params, None

    def full(trainable):
        return lora.combine(trainable, frozen) if use_split else trainable

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(full(t)))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    opt_state = tx.init(trainable)
    losses = []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    return full(trainable), losses, step, opt_state, trainable


class TestTraining:
    ids = jax.random.randint(KEY, (8, 12), 0, 512)
    target = jax.random.normal(jax.random.key(1), (8, 12, 16))

    def loss_fn(self, params):
        return jnp.mean((Model().apply({"params": params}, self.ids) - self.target) ** 2)

    @pytest.mark.parametrize("use_split", [True, False])
    def test_only_the_adapter_trains(self, use_split):
        params = Model().init(KEY, self.ids)["params"]
        tx = optax.adam(1e-2) if use_split else jaxembed.freeze_lora_base(optax.adam(1e-2))
        trained, losses, *_ = train(params, tx, self.loss_fn, use_split=use_split)
        assert losses[-1] < losses[0]
        before, after = nn.unbox(params), nn.unbox(trained)
        np.testing.assert_array_equal(
            after["tokens"]["embeddings"], before["tokens"]["embeddings"]
        )  # bit-identical
        assert not np.array_equal(
            after["tokens"]["lora_embeddings_b"], before["tokens"]["lora_embeddings_b"]
        )
        assert not np.array_equal(after["Dense_0"]["kernel"], before["Dense_0"]["kernel"])

    def test_labels_for_a_whole_model(self):
        params = Model().init(KEY, self.ids)["params"]
        labels = nn.unbox(lora.trainable_labels(params))
        assert labels["tokens"] == {
            "embeddings": "frozen",
            "lora_embeddings_a": "trainable",
            "lora_embeddings_b": "trainable",
        }
        assert set(jax.tree.leaves(labels["Dense_0"])) == {"trainable"}
        plain = Model(lora_rank=None).init(KEY, self.ids)["params"]
        assert set(jax.tree.leaves(lora.trainable_labels(plain))) == {"trainable"}

    def test_adapters_only(self):
        params = Model().init(KEY, self.ids)["params"]
        labels = nn.unbox(lora.trainable_labels(params, adapters_only=True))
        assert labels["tokens"] == {
            "embeddings": "frozen",
            "lora_embeddings_a": "trainable",
            "lora_embeddings_b": "trainable",
        }
        assert set(jax.tree.leaves(labels["Dense_0"])) == {"frozen"}
        for use_split in (True, False):
            tx = (
                optax.adam(1e-2)
                if use_split
                else jaxembed.freeze_lora_base(optax.adam(1e-2), adapters_only=True)
            )
            if use_split:
                trainable, _ = lora.split_trainable(params, adapters_only=True)
                assert nn.unbox(trainable)["Dense_0"]["kernel"] is None
            trained, losses, *_ = train(
                params, tx, self.loss_fn, use_split=use_split, adapters_only=True
            )
            assert losses[-1] < losses[0]
            before, after = nn.unbox(params), nn.unbox(trained)
            np.testing.assert_array_equal(after["Dense_0"]["kernel"], before["Dense_0"]["kernel"])
            np.testing.assert_array_equal(
                after["tokens"]["embeddings"], before["tokens"]["embeddings"]
            )

    def test_no_optimizer_state_for_the_table(self):
        params = Model().init(KEY, self.ids)["params"]
        table_size = 512 * 16
        for use_split, tx in [
            (True, optax.adam(1e-2)),
            (False, jaxembed.freeze_lora_base(optax.adam(1e-2))),
        ]:
            *_, opt_state, _ = train(params, tx, self.loss_fn, steps=1, use_split=use_split)
            sizes = [leaf.size for leaf in jax.tree.leaves(opt_state)]
            assert table_size not in sizes, (use_split, sizes)

    @pytest.mark.parametrize("use_split", [True, False])
    def test_compiled_step_has_no_vocab_by_dim_buffer(self, use_split):
        input_dim, output_dim, rank = 8192, 256, 4
        params = random_lora_params(input_dim, output_dim, rank)
        ids = jax.random.randint(KEY, (64,), 0, input_dim)

        def loss_fn(params):
            return jnp.mean(jaxembed.apply(params, ids, out_of_range="clip") ** 2)

        tx = optax.adam(1e-3) if use_split else jaxembed.freeze_lora_base(optax.adam(1e-3))
        *_, step, opt_state, trainable = train(params, tx, loss_fn, steps=1, use_split=use_split)
        memory = step.lower(trainable, opt_state).compile().memory_analysis()
        table_bytes = input_dim * output_dim * 4
        assert memory.temp_size_in_bytes < table_bytes / 4

        # The naive step (Keras's formula) does hold such a buffer: the check can fail.
        adapter = {k: params[k] for k in lora.LORA_KEYS}

        @jax.jit
        def naive_step(adapter):
            return jax.grad(lambda a: jnp.mean(naive_table({**params, **a})[ids] ** 2))(adapter)

        naive = naive_step.lower(adapter).compile().memory_analysis()
        assert naive.temp_size_in_bytes >= table_bytes
