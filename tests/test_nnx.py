"""The flax.nnx module: same numbers as the pure functions and linen, LoRA through LoRAParam."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxembed
import jaxembed.nnx
from jaxembed import lora

IDS = jnp.array([[1, 2, 0], [4, 0, 3]])
WEIGHTS = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)


def make(**kwargs):
    kwargs.setdefault("out_of_range", "clip")
    return jaxembed.nnx.Embedding(5, 3, rngs=nnx.Rngs(0), **kwargs)


def with_adapter(layer, seed=1):
    """Gives the layer a nonzero B so LoRA changes outputs and gradients."""
    layer.lora_embeddings_b[...] = jax.random.normal(
        jax.random.key(seed), layer.lora_embeddings_b.shape
    )
    return layer


class TestSameNumbersEverywhere:
    @pytest.mark.parametrize("lora_rank", [None, 2])
    def test_outputs_and_gradients_equal_across_apis(self, lora_rank):
        layer = make(weights=WEIGHTS, lora_rank=lora_rank, lora_alpha=4.0 if lora_rank else None)
        if lora_rank:
            with_adapter(layer)
        params = layer.params()
        module, variables = layer.to_linen()
        query = jnp.ones((2, 3))

        outputs = [
            jaxembed.apply(params, IDS, out_of_range="clip", lora_alpha=layer.lora_alpha),
            module.apply(variables, IDS),
            layer(IDS),
        ]
        for out in outputs[1:]:
            np.testing.assert_array_equal(out, outputs[0])
        np.testing.assert_allclose(
            layer.attend(query),
            jaxembed.attend(params, query, lora_alpha=layer.lora_alpha),
            rtol=1e-6,
        )

        def functional_loss(p):
            return jnp.sum(
                jaxembed.apply(p, IDS, out_of_range="clip", lora_alpha=layer.lora_alpha) ** 2
            )

        grads_functional = jax.grad(functional_loss)(params)
        grads_linen = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, IDS) ** 2))(params)
        grads_nnx = nnx.grad(lambda m: jnp.sum(m(IDS) ** 2))(layer)
        chex.assert_trees_all_close(grads_linen, grads_functional)
        chex.assert_trees_all_close(
            {name: grads_nnx[name][...] for name in grads_functional}, grads_functional
        )

    def test_jit_and_no_jit(self):
        layer = make()
        np.testing.assert_array_equal(nnx.jit(lambda m, i: m(i))(layer, IDS), layer(IDS))

    def test_dtype_and_param_dtype(self):
        layer = make(dtype=jnp.bfloat16, param_dtype=jnp.float16)
        chex.assert_type(layer.embeddings[...], jnp.float16)
        chex.assert_type(layer(IDS), jnp.bfloat16)

    def test_mask(self):
        np.testing.assert_array_equal(make(mask_zero=True).compute_mask(IDS), IDS != 0)
        assert make().compute_mask(IDS) is None

    def test_default_out_of_range_is_error(self):
        layer = jaxembed.nnx.Embedding(5, 3, rngs=nnx.Rngs(0))
        with pytest.raises(IndexError, match=r"\[0, 5\); got id 5"):
            layer(jnp.array([5]))


class TestMetadata:
    def test_variable_types_and_sharding_axes(self):
        layer = make(lora_rank=2)
        assert type(layer.embeddings) is nnx.Param
        assert type(layer.lora_embeddings_a) is nnx.LoRAParam
        assert layer.embeddings.get_metadata()["out_sharding"] == ("vocab", "embed")
        assert layer.lora_embeddings_a.get_metadata()["out_sharding"] == ("vocab", None)
        assert layer.lora_embeddings_b.get_metadata()["out_sharding"] == (None, "embed")
        specs = nnx.get_partition_spec(nnx.state(layer))
        assert specs["embeddings"].get_value() == jax.sharding.PartitionSpec("vocab", "embed")

    def test_adapter_float32_with_bf16_table(self):
        layer = make(lora_rank=2, param_dtype=jnp.bfloat16)
        chex.assert_type(layer.embeddings[...], jnp.bfloat16)
        chex.assert_type(layer.lora_embeddings_a[...], jnp.float32)


class TestLoRA:
    def test_enable_then_merge(self):
        layer = make(weights=WEIGHTS)
        before = layer(IDS)
        layer.enable_lora(2, lora_alpha=6.0, rngs=nnx.Rngs(3))
        np.testing.assert_array_equal(layer(IDS), before)  # B starts at zero
        with_adapter(layer)
        with_lora = layer(IDS)
        assert not np.allclose(with_lora, before)
        layer.merge_lora(safe_merge=True)
        assert layer.lora_rank is None and not hasattr(layer, "lora_embeddings_a")
        assert nnx.state(layer, nnx.LoRAParam) == nnx.State({})
        np.testing.assert_allclose(layer(IDS), with_lora, rtol=1e-5, atol=1e-6)
        layer.enable_lora(3, rngs=nnx.Rngs(4))  # a new adapter after merging
        assert layer.lora_rank == 3

    def test_keras_reference_case(self):
        base = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], np.float32)
        a = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]], np.float32)
        b = np.array([[0.5, 0.5], [0.6, 0.6]], np.float32)
        layer = jaxembed.nnx.Embedding(
            3, 2, weights=base, lora_rank=2, lora_alpha=3.0, rngs=nnx.Rngs(0)
        )
        layer.lora_embeddings_a[...] = a
        layer.lora_embeddings_b[...] = b
        np.testing.assert_allclose(layer(jnp.arange(3)), base + 1.5 * a @ b, rtol=1e-6)

    def test_grad_with_diffstate_touches_only_the_adapter(self):
        layer = with_adapter(make(lora_rank=2))
        grads = nnx.grad(lambda m: jnp.sum(m(IDS) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(
            layer
        )
        assert sorted(grads.keys()) == ["lora_embeddings_a", "lora_embeddings_b"]

    def test_trainable_filter(self):
        layer = make(lora_rank=2)
        assert sorted(nnx.state(layer, jaxembed.nnx.trainable(layer)).keys()) == [
            "lora_embeddings_a",
            "lora_embeddings_b",
        ]
        plain = make()
        assert sorted(nnx.state(plain, jaxembed.nnx.trainable(plain)).keys()) == ["embeddings"]


class Model(nnx.Module):
    def __init__(self, lora_rank, rngs):
        self.tokens = jaxembed.nnx.Embedding(
            64, 8, lora_rank=lora_rank, out_of_range="clip", embeddings_regularizer="l2", rngs=rngs
        )
        self.head = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, ids):
        return self.head(self.tokens(ids))


def train(model, wrt, steps=20):
    ids = jax.random.randint(jax.random.key(0), (8, 6), 0, 64)
    target = jax.random.normal(jax.random.key(1), (8, 6, 8))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=wrt)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            task = jnp.mean((model(ids) - target) ** 2)
            return task + model.tokens.regularization_penalty()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(steps)]
    return losses, optimizer


class TestTraining:
    def test_full_training_loss_goes_down(self):
        losses, _ = train(Model(None, nnx.Rngs(0)), nnx.Param)
        assert losses[-1] < losses[0]

    @pytest.mark.parametrize("wrt", ["lora_only", "keras_trainable"])
    def test_lora_training_keeps_table_bit_identical(self, wrt):
        model = Model(4, nnx.Rngs(0))
        table = np.array(model.tokens.embeddings[...])
        filter_ = nnx.LoRAParam if wrt == "lora_only" else jaxembed.nnx.trainable(model)
        losses, optimizer = train(model, filter_)
        assert losses[-1] < losses[0]
        np.testing.assert_array_equal(model.tokens.embeddings[...], table)
        sizes = [leaf.size for leaf in jax.tree.leaves(nnx.state(optimizer))]
        assert 64 * 8 not in sizes  # no optimizer state shaped like the table

    def test_constraint_after_each_step(self):
        model = jaxembed.nnx.Embedding(
            16,
            4,
            embeddings_constraint="non_neg",
            embeddings_initializer="ones",
            out_of_range="clip",
            rngs=nnx.Rngs(0),
        )
        tx = optax.chain(optax.sgd(1.0), jaxembed.keep_embeddings_constrained("non_neg"))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer):
            grads = nnx.grad(lambda m: jnp.sum(m(jnp.arange(16)) * 5.0))(model)
            optimizer.update(model, grads)

        step(model, optimizer)
        assert float(model.embeddings[...].min()) == 0.0

    def test_compiled_lora_step_has_no_vocab_by_dim_buffer(self):
        input_dim, output_dim = 8192, 256
        model = jaxembed.nnx.Embedding(
            input_dim, output_dim, lora_rank=4, out_of_range="clip", rngs=nnx.Rngs(0)
        )
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)
        ids = jnp.arange(64)

        def step(graphdef, state):
            model, optimizer = nnx.merge(graphdef, state)
            grads = nnx.grad(
                lambda m: jnp.mean(m(ids) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)
            )(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer), nnx.LoRAParam, nnx.OptState)

        graphdef, state = nnx.split((model, optimizer))
        memory = jax.jit(step).lower(graphdef, state).compile().memory_analysis()
        assert memory.temp_size_in_bytes < input_dim * output_dim * 4 / 4


class TestConversion:
    @pytest.mark.parametrize("lora_rank", [None, 3])
    def test_linen_to_nnx_and_back(self, lora_rank):
        lora_alpha = 2.0 if lora_rank else None
        module = jaxembed.Embedding(
            5,
            3,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            out_of_range="clip",
            param_dtype=jnp.bfloat16,
        )
        variables = module.init(jax.random.key(0), IDS)
        if lora_rank:
            variables = nn.unbox(variables)
            variables["params"][lora.LORA_B] = jnp.ones((3, 3))
        layer = jaxembed.nnx.Embedding.from_linen(module, variables)
        np.testing.assert_array_equal(layer(IDS), module.apply(variables, IDS))
        chex.assert_type(layer.embeddings[...], jnp.bfloat16)
        assert layer.lora_rank == lora_rank
        back_module, back_variables = layer.to_linen()
        chex.assert_trees_all_equal(back_variables, nn.unbox(variables))
        np.testing.assert_array_equal(back_module.apply(back_variables, IDS), layer(IDS))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_dim": 3.7}, "`input_dim` must be a positive integer.*3.7"),
        ({"output_dim": -1}, "`output_dim` must be a positive integer.*-1"),
        ({"embeddings_initializer": "nope"}, "Unknown `embeddings_initializer`"),
        ({"embeddings_regularizer": "nope"}, "Unknown `embeddings_regularizer`"),
        ({"embeddings_constraint": "nope"}, "Unknown `embeddings_constraint`"),
        ({"weights": np.ones((3, 5))}, r"\(5, 3\).*\(3, 5\)"),
        ({"lora_rank": 0}, "`lora_rank` must be a positive integer"),
        ({"lora_rank": 2, "lora_alpha": -1}, "`lora_alpha` must be a finite positive number"),
        ({"lora_rank": 2, "embeddings_constraint": "non_neg"}, "LoRA is incompatible"),
        ({"mask_zero": None}, "`mask_zero` must be one of"),
        ({"out_of_range": "wrap"}, "`out_of_range` must be one of"),
        ({"dtype": jnp.int32}, "`dtype` must be a floating-point dtype"),
    ],
)
def test_bad_arguments_same_errors_as_linen(kwargs, match):
    arguments = {"input_dim": 5, "output_dim": 3, **kwargs}
    with pytest.raises(ValueError, match=match) as nnx_error:
        jaxembed.nnx.Embedding(**arguments, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError) as linen_error:
        jaxembed.Embedding(**arguments)
    assert str(nnx_error.value) == str(linen_error.value)


def test_lora_errors():
    layer = make(lora_rank=2)
    with pytest.raises(ValueError, match="already enabled"):
        layer.enable_lora(2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="LoRA is incompatible"):
        make(embeddings_constraint="max_norm").enable_lora(2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs params holding a LoRA adapter"):
        make().merge_lora()
    with pytest.raises(TypeError, match="`ids` must hold integers"):
        layer(jnp.array([0.5]))
