"""jaxembed.interop.keras: Keras Embedding layers and weights files <-> jaxembed params.

In memory, every format goes both ways (Keras layer -> `from_keras` -> jaxembed's functions and
modules, and params -> `to_keras` -> a Keras layer) with equal outputs. On disk, files written
by Keras itself (`model.save`, `model.save_weights`) are read back exactly, and files written
by `write_keras_weights` are loaded by Keras with equal outputs.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"

import shutil
import zipfile

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxembed
import jaxembed.nnx
from jaxembed.interop.keras import (
    assign_to_keras,
    from_keras,
    list_keras_embeddings,
    read_keras_weights,
    to_keras,
    write_keras_weights,
)

assert keras.backend.backend() == "jax", (
    "keras was imported with another backend before this module; run with KERAS_BACKEND=jax"
)

V, D, RANK = 20, 256, 4  # D = 256: two blocks of Keras's default int4 block size, 128
IDS = np.array([[0, 1, 2, 3], [4, 5, 6, 19]], np.int32)
FORMATS = ["int8", "int4", "int4/128"]
QUANTIZED_KEYS = {"embeddings_int8", "embeddings_int4", "embeddings_scale", "embeddings_zero"}


def random_table(input_dim=V, output_dim=D, seed=0):
    """Rows of mixed signs and widely different norms (every int4 block holds both signs)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(input_dim, output_dim)) * rng.uniform(0.1, 2.0, (input_dim, 1))
    return table.astype(np.float32)


def random_adapter(input_dim=V, output_dim=D, rank=RANK, seed=1):
    rng = np.random.default_rng(seed)
    return (
        (0.1 * rng.normal(size=(input_dim, rank))).astype(np.float32),
        (0.1 * rng.normal(size=(rank, output_dim))).astype(np.float32),
    )


def keras_quantize(layer, fmt):
    mode, _, block = fmt.partition("/")
    config = None
    if mode == "int4":
        config = keras.quantizers.Int4QuantizationConfig(block_size=int(block) if block else None)
    layer.quantize(mode, config=config)
    return layer


def keras_layer(fmt=None, *, lora_alpha=None, table=None, **kwargs):
    """A built Keras Embedding holding `table`, quantized in `fmt`, with a random LoRA
    adapter when `lora_alpha` is given."""
    table = random_table() if table is None else table
    layer = keras.layers.Embedding(*table.shape, weights=table, **kwargs)
    if fmt is not None:
        keras_quantize(layer, fmt)
    if lora_alpha is not None:
        layer.enable_lora(RANK, lora_alpha=lora_alpha)
        a, b = random_adapter(table.shape[0], table.shape[1])
        layer.lora_embeddings_a.assign(a)
        layer.lora_embeddings_b.assign(b)
    return layer


def keras_arrays(layer):
    """The layer's stored arrays under jaxembed's keys."""
    mode = layer.quantization_mode
    if mode is None:
        arrays = {"embeddings": layer._embeddings}
    else:
        arrays = {
            f"embeddings_{mode}": layer._embeddings,
            "embeddings_scale": layer.embeddings_scale,
        }
        if getattr(layer, "embeddings_zero", None) is not None:
            arrays["embeddings_zero"] = layer.embeddings_zero
    if layer.lora_enabled:
        arrays["lora_embeddings_a"] = layer.lora_embeddings_a
        arrays["lora_embeddings_b"] = layer.lora_embeddings_b
    return {key: np.asarray(value) for key, value in arrays.items()}


def assert_arrays_equal(params, expected):
    assert set(params) == set(expected)
    for key, value in expected.items():
        assert np.asarray(params[key]).dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(np.asarray(params[key]), np.asarray(value), err_msg=key)


def linen_output(config, params, ids):
    module = jaxembed.Embedding(**config)
    variables = {
        "params": {k: v for k, v in params.items() if k not in QUANTIZED_KEYS},
        "quantized": {k: v for k, v in params.items() if k in QUANTIZED_KEYS},
    }
    return module.apply(variables, ids)


def nnx_output(config, params, ids):
    layer = jaxembed.nnx.Embedding(**config, rngs=nnx.Rngs(0))
    for key, value in params.items():
        variable = getattr(layer, key)
        assert variable.shape == value.shape and variable.dtype == value.dtype, key
        variable[...] = value
    return layer(ids)


def dequantized_rows(layer):
    """Keras has no attend: its whole table, as its lookup dequantizes (and adds LoRA to) it."""
    return np.asarray(layer(np.arange(layer.input_dim, dtype=np.int32)))


def lookup(params, config, ids=IDS):
    return jaxembed.apply(
        params, ids, lora_alpha=config.get("lora_alpha"), dtype=config.get("dtype")
    )


# --------------------------------------------------------------------------------------------
# In memory: Keras layer -> params and config -> jaxembed, and back
# --------------------------------------------------------------------------------------------


class TestFromKeras:
    def test_float_layer_with_options(self):
        layer = keras_layer(
            mask_zero=True,
            embeddings_initializer="glorot_normal",
            embeddings_regularizer="l2",
            embeddings_constraint="non_neg",
        )
        params, config = from_keras(layer)
        assert_arrays_equal(params, keras_arrays(layer))
        assert config == {
            "input_dim": V,
            "output_dim": D,
            "mask_zero": True,
            "param_dtype": "float32",
            "embeddings_initializer": "glorot_normal",
            "embeddings_regularizer": "l2",
            "embeddings_constraint": "non_neg",
        }
        expected = np.asarray(layer(IDS))
        np.testing.assert_array_equal(lookup(params, config), expected)
        np.testing.assert_array_equal(linen_output(config, params, IDS), expected)
        np.testing.assert_array_equal(nnx_output(config, params, IDS), expected)
        np.testing.assert_array_equal(
            jaxembed.Embedding(**config).compute_mask(IDS), np.asarray(layer.compute_mask(IDS))
        )
        query = np.random.default_rng(2).normal(size=(3, D)).astype(np.float32)
        np.testing.assert_allclose(
            jaxembed.attend(params, query), query @ dequantized_rows(layer).T, rtol=1e-5, atol=1e-5
        )
        # the regularizer's penalty is Keras's
        np.testing.assert_allclose(
            jaxembed.regularization_penalty(params, config["embeddings_regularizer"]),
            float(layer.embeddings_regularizer(layer._embeddings)),
            rtol=1e-6,
        )

        back = to_keras(params, **config)
        assert back.get_config()["embeddings_constraint"]["class_name"] == "NonNeg"
        assert back.mask_zero and back.embeddings_regularizer.get_config() == {"l2": 0.01}
        np.testing.assert_array_equal(np.asarray(back(IDS)), expected)

    def test_lora(self):
        layer = keras_layer(lora_alpha=8.0)
        params, config = from_keras(layer)
        assert_arrays_equal(params, keras_arrays(layer))
        assert (config["lora_rank"], config["lora_alpha"]) == (RANK, 8.0)
        # Keras adds A @ B to the whole table, jaxembed to the gathered rows: float rounding
        expected = np.asarray(layer(IDS))
        tolerance = {"rtol": 1e-6, "atol": 1e-6}
        np.testing.assert_allclose(lookup(params, config), expected, **tolerance)
        np.testing.assert_allclose(linen_output(config, params, IDS), expected, **tolerance)
        np.testing.assert_allclose(nnx_output(config, params, IDS), expected, **tolerance)
        query = np.random.default_rng(2).normal(size=(3, D)).astype(np.float32)
        np.testing.assert_allclose(
            jaxembed.attend(params, query, lora_alpha=config["lora_alpha"]),
            query @ dequantized_rows(layer).T,
            rtol=1e-4,
            atol=1e-4,
        )

        back = to_keras(params, **config)
        assert back.lora_enabled and back.lora_rank == RANK and back.lora_alpha == 8.0
        assert_arrays_equal(keras_arrays(back), keras_arrays(layer))
        np.testing.assert_array_equal(np.asarray(back(IDS)), expected)

    def test_lora_alpha_is_the_one_keras_computes_with(self):
        """Keras 3.10+'s build re-enables LoRA with alpha = rank, whatever the constructor's
        lora_alpha: from_keras reports the alpha the layer uses."""
        layer = keras.layers.Embedding(V, D, lora_rank=RANK, lora_alpha=8.0)
        layer.build()
        assert layer.lora_alpha == RANK  # the quirk
        layer.lora_embeddings_b.assign(random_adapter()[1])
        params, config = from_keras(layer)
        assert config["lora_alpha"] == float(RANK)
        np.testing.assert_allclose(
            lookup(params, config), np.asarray(layer(IDS)), rtol=1e-6, atol=1e-6
        )

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_quantized(self, fmt):
        layer = keras_layer(fmt)
        params, config = from_keras(layer)
        assert_arrays_equal(params, keras_arrays(layer))
        assert config["quantization"] == fmt
        assert jaxembed.quantization.quantization_format(params) == fmt
        assert "embeddings_constraint" not in config and "dtype" not in config
        expected = np.asarray(layer(IDS))
        np.testing.assert_array_equal(lookup(params, config), expected)
        np.testing.assert_array_equal(linen_output(config, params, IDS), expected)
        np.testing.assert_array_equal(nnx_output(config, params, IDS), expected)
        query = np.random.default_rng(2).normal(size=(3, D)).astype(np.float32)
        np.testing.assert_allclose(
            jaxembed.attend(params, query), query @ dequantized_rows(layer).T, rtol=1e-5, atol=1e-4
        )

        back = to_keras(params, **config)
        assert back.dtype_policy.name == layer.dtype_policy.name
        assert_arrays_equal(keras_arrays(back), keras_arrays(layer))
        np.testing.assert_array_equal(np.asarray(back(IDS)), expected)

    def test_qlora(self):
        layer = keras_layer("int4/128", lora_alpha=2.0)
        params, config = from_keras(layer)
        assert_arrays_equal(params, keras_arrays(layer))
        assert (config["quantization"], config["lora_rank"], config["lora_alpha"]) == (
            "int4/128",
            RANK,
            2.0,
        )
        expected = np.asarray(layer(IDS))
        np.testing.assert_allclose(lookup(params, config), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(linen_output(config, params, IDS), expected, atol=1e-6)
        np.testing.assert_allclose(nnx_output(config, params, IDS), expected, atol=1e-6)
        back = to_keras(params, **config)
        assert back.lora_alpha == 2.0
        assert_arrays_equal(keras_arrays(back), keras_arrays(layer))
        np.testing.assert_array_equal(np.asarray(back(IDS)), expected)

    def test_int4_block_larger_than_the_row_is_one_group(self):
        """Keras's default int4 (blocks of 128) on a 64-column table: one group padded with
        zeros, which jaxembed holds exactly as blocks of 64."""
        layer = keras.layers.Embedding(V, 64, weights=random_table(output_dim=64))
        layer.quantize("int4")
        params, config = from_keras(layer)
        assert config["quantization"] == "int4/64"
        np.testing.assert_array_equal(lookup(params, config), np.asarray(layer(IDS)))

    @pytest.mark.parametrize(
        ("policy", "expected"),
        [
            ("mixed_bfloat16", {"param_dtype": "float32", "dtype": "bfloat16"}),
            ("bfloat16", {"param_dtype": "bfloat16"}),
        ],
    )
    def test_dtype_policy(self, policy, expected):
        layer = keras_layer(dtype=policy)
        params, config = from_keras(layer)
        assert {k: config.get(k) for k in ("param_dtype", "dtype") if k in config} == expected
        out = np.asarray(layer(IDS))
        assert out.dtype == jnp.bfloat16
        got = linen_output(config, params, IDS)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), out)
        back = to_keras(params, **config)
        assert back.dtype_policy.name == policy
        np.testing.assert_array_equal(np.asarray(back(IDS)), out)

    def test_identifiers(self):
        class Custom(keras.initializers.Initializer):
            def __call__(self, shape, dtype=None):
                return keras.ops.zeros(shape, dtype)

        layer = keras.layers.Embedding(
            V,
            8,
            embeddings_initializer=keras.initializers.VarianceScaling(scale=2.0, mode="fan_out"),
            embeddings_regularizer=keras.regularizers.L1L2(),  # Keras's default: 0, 0
            embeddings_constraint=keras.constraints.MaxNorm(3.0, axis=1),
        )
        layer.build()
        _, config = from_keras(layer)
        table = jnp.asarray(random_table(V, 8))
        # non-default hyperparameters: jaxembed's function of that name, called with them
        assert float(config["embeddings_regularizer"](table)) == 0.0
        np.testing.assert_allclose(
            config["embeddings_constraint"](table),
            np.asarray(layer.embeddings_constraint(table)),
            rtol=1e-6,
        )
        drawn = config["embeddings_initializer"](jax.random.key(0), (V, 8))
        assert drawn.shape == (V, 8)
        # and back to Keras: jaxembed's functions, called on Keras's variables
        layer = keras.layers.Embedding(V, 8, embeddings_regularizer=keras.regularizers.L2(0.1))
        layer.build()
        params, config = from_keras(layer)
        back = to_keras(params, **config)
        back(IDS), layer(IDS)
        np.testing.assert_allclose(np.asarray(back.losses), np.asarray(layer.losses), rtol=1e-6)
        # default ones: the name; custom classes: left out
        layer = keras.layers.Embedding(
            V, 8, embeddings_initializer=Custom(), embeddings_constraint="max_norm"
        )
        layer.build()
        _, config = from_keras(layer)
        assert "embeddings_initializer" not in config
        assert config["embeddings_constraint"] == "max_norm"
        jaxembed.Embedding(**config)  # every value is an argument jaxembed takes

    def test_every_jaxembed_name_goes_to_keras_and_back(self):
        arguments = {
            "embeddings_initializer": jaxembed.initializers,
            "embeddings_regularizer": jaxembed.regularizers,
            "embeddings_constraint": jaxembed.constraints,
        }
        for argument, module in arguments.items():
            for name in module.NAMES:
                layer = to_keras({"embeddings": random_table(output_dim=4)}, **{argument: name})
                _, config = from_keras(layer)
                # the same function: a name of the same meaning (aliases become canonical)
                assert isinstance(config[argument], str), (argument, name)
                if argument != "embeddings_initializer":  # penalties, projections: equal
                    table = jnp.asarray(random_table(output_dim=4))
                    np.testing.assert_allclose(
                        module.get(config[argument])(table), module.get(name)(table), rtol=1e-6
                    )

    def test_refuses_a_subclass_with_variables_of_its_own(self):
        class Reversible(keras.layers.Embedding):
            def build(self, input_shape=None):
                super().build(input_shape)
                self.reverse = self.add_weight(
                    shape=(self.output_dim, self.input_dim), name="reverse"
                )

        layer = Reversible(V, 8, name="rev")
        layer.build()
        with pytest.raises(ValueError, match=r"'rev' \(Reversible\) holds variables .*reverse"):
            from_keras(layer)


class TestToKeras:
    @pytest.mark.parametrize("fmt", [None, *FORMATS])
    def test_jaxembed_params(self, fmt):
        params = jaxembed.init(None, V, D, weights=random_table(seed=3))
        if fmt is not None:
            mode, _, block = fmt.partition("/")
            params = jaxembed.quantize(params, mode, block_size=int(block) if block else None)
        layer = to_keras(params, mask_zero=True, name="tokens")
        assert layer.name == "tokens" and layer.built and not layer.lora_enabled
        assert_arrays_equal(keras_arrays(layer), params)
        np.testing.assert_array_equal(np.asarray(layer(IDS)), jaxembed.apply(params, IDS))

    def test_lora_scale_and_rslora(self):
        table = random_table(seed=4)
        a, b = random_adapter()
        params = {"embeddings": table, "lora_embeddings_a": a, "lora_embeddings_b": b}
        for lora_alpha, use_rslora, scale in [
            (None, False, 1.0),
            (8.0, False, 2.0),
            (8.0, True, 4.0),
        ]:
            layer = to_keras(params, lora_alpha=lora_alpha, use_rslora=use_rslora)
            expected = table[IDS] + scale * a[IDS] @ b
            np.testing.assert_allclose(np.asarray(layer(IDS)), expected, rtol=1e-6, atol=1e-6)
            assert layer.get_config()["lora_rank"] == RANK

    def test_lora_rank_without_adapter_enables_a_fresh_one(self):
        params = {"embeddings": random_table()}
        layer = to_keras(params, lora_rank=2, lora_alpha=6.0)
        assert layer.lora_enabled and layer.lora_rank == 2 and layer.lora_alpha == 6.0
        np.testing.assert_array_equal(np.asarray(layer(IDS)), params["embeddings"][IDS])  # B = 0

    def test_module_config_round_trip(self):
        """A jaxembed module's own arguments go to to_keras as they are."""
        module = jaxembed.Embedding(V, D, mask_zero=True, lora_rank=RANK, lora_alpha=8.0)
        params = dict(nn.meta.unbox(module.init(jax.random.key(0), IDS))["params"])
        params["lora_embeddings_b"] = jnp.asarray(random_adapter()[1])
        config = module._config.arguments()
        layer = to_keras(params, **config)
        np.testing.assert_allclose(
            np.asarray(layer(IDS)), module.apply({"params": params}, IDS), rtol=1e-6, atol=1e-6
        )

    def test_trainable_tokens_and_stacked_adapters_are_refused(self, tmp_path):
        """A Keras layer has one adapter and no trainable tokens: never silently dropped."""
        params = {"embeddings": random_table()}
        with_tokens = jaxembed.enable_trainable_tokens(params, [3])
        with pytest.raises(ValueError, match="to_keras does not support trainable tokens"):
            to_keras(with_tokens)
        with pytest.raises(ValueError, match="to_keras does not support trainable tokens"):
            to_keras(params, trainable_token_ids=(3,))  # a linen module's arguments
        stacked = jaxembed.enable_lora(params, jax.random.key(0), RANK, num_adapters=2)
        with pytest.raises(ValueError, match="to_keras takes one LoRA adapter.*select_adapter"):
            to_keras(stacked)
        with pytest.raises(ValueError, match="to_keras takes one LoRA adapter.*select_adapter"):
            to_keras(params, num_lora_adapters=2)
        with pytest.raises(ValueError, match="write_keras_weights does not support trainable"):
            write_keras_weights(with_tokens, tmp_path / "unused.weights.h5")
        assert not (tmp_path / "unused.weights.h5").exists()

    def test_assign_into_a_model(self):
        model = keras.Sequential(
            [keras.Input((4,), dtype="int32"), keras.layers.Embedding(V, D), keras.layers.Dense(2)]
        )
        embedding, dense = model.layers
        params = jaxembed.init(None, V, D, weights=random_table(seed=5))
        assign_to_keras(embedding, params)
        np.testing.assert_array_equal(np.asarray(embedding(IDS)), jaxembed.apply(params, IDS))
        kernel, bias = (np.asarray(w) for w in dense.weights)
        np.testing.assert_allclose(
            np.asarray(model(IDS)),
            np.asarray(jaxembed.apply(params, IDS)) @ kernel + bias,
            atol=1e-5,
        )
        # params without an adapter zero a LoRA layer's A and B, as Keras's loading does
        embedding.enable_lora(RANK)
        embedding.lora_embeddings_b.assign(random_adapter()[1])
        assign_to_keras(embedding, params)
        assert not np.asarray(embedding.lora_embeddings_b).any()
        np.testing.assert_array_equal(np.asarray(embedding(IDS)), jaxembed.apply(params, IDS))


# --------------------------------------------------------------------------------------------
# On disk: files written by Keras, read back; files written here, loaded by Keras
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two Keras models saved both ways: a float one (a plain Embedding "tokens", a LoRA one
    "adapted", a Dense) and a quantized one (int8 with LoRA, int4 per row, int4/128)."""
    directory = tmp_path_factory.mktemp("keras")
    ids = keras.Input((4,), dtype="int32")
    tokens = keras.layers.Embedding(V, D, weights=random_table(seed=6), name="tokens")
    adapted = keras_layer(table=random_table(seed=7), lora_alpha=8.0, name="adapted")
    dense = keras.layers.Dense(3)
    float_model = keras.Model(ids, dense(tokens(ids) + adapted(ids)))
    expected = {
        "tokens": {"embeddings": np.asarray(tokens._embeddings)},
        "adapted": {"embeddings": np.asarray(adapted.embeddings)},  # merged, as Keras saves
    }

    ids = keras.Input((4,), dtype="int32")
    layers = {
        "q8": keras_layer("int8", table=random_table(seed=8), lora_alpha=2.0, name="q8"),
        "q4": keras_layer("int4", table=random_table(seed=9), name="q4"),
        "q4_128": keras_layer("int4/128", table=random_table(seed=10), name="q4_128"),
    }
    quantized_model = keras.Model(
        ids, keras.layers.Add()([layer(ids) for layer in layers.values()])
    )
    for name, layer in layers.items():
        values, scale, zero = layer._get_embeddings_with_merged_lora()
        mode = layer.quantization_mode
        arrays = {f"embeddings_{mode}": values, "embeddings_scale": scale, "embeddings_zero": zero}
        expected[name] = {k: np.asarray(v) for k, v in arrays.items() if v is not None}

    paths = {}
    for label, model in [("float", float_model), ("quantized", quantized_model)]:
        paths[label, "keras"] = directory / f"{label}.keras"
        paths[label, "h5"] = directory / f"{label}.weights.h5"
        model.save(paths[label, "keras"])
        model.save_weights(paths[label, "h5"])
    return {"paths": paths, "expected": expected, "float_model": float_model, "layers": layers}


CASES = [
    ("float", "tokens"),
    ("float", "adapted"),
    ("quantized", "q8"),
    ("quantized", "q4"),
    ("quantized", "q4_128"),
]


class TestReadKerasFiles:
    @pytest.mark.parametrize("kind", ["keras", "h5"])
    @pytest.mark.parametrize(("model", "name"), CASES, ids=[name for _, name in CASES])
    def test_reads_what_keras_saved(self, saved, model, name, kind):
        params = read_keras_weights(saved["paths"][model, kind], name)
        assert_arrays_equal(params, saved["expected"][name])

    def test_lists_the_embeddings(self, saved):
        for kind in ("keras", "h5"):
            assert list_keras_embeddings(saved["paths"]["float", kind]) == ["tokens", "adapted"]
            assert list_keras_embeddings(saved["paths"]["quantized", kind]) == [
                "q8",
                "q4",
                "q4_128",
            ]

    def test_outputs_and_layer_paths(self, saved):
        path = saved["paths"]["quantized", "h5"]
        for name, layer in saved["layers"].items():
            if name != "q8":  # q8 has LoRA in memory, merged and requantized in the file
                params = read_keras_weights(path, name)
                np.testing.assert_array_equal(jaxembed.apply(params, IDS), np.asarray(layer(IDS)))
        # the group's path in the file reads the same layer as its name
        by_path = read_keras_weights(path, "layers/embedding_1")
        assert_arrays_equal(by_path, read_keras_weights(path, "q4"))

    def test_quantization_hint(self, saved):
        path = saved["paths"]["quantized", "h5"]
        assert "embeddings_int4" in read_keras_weights(path, "q4", quantization="int4")
        assert "embeddings_zero" in read_keras_weights(path, "q4_128", quantization="int4")
        with pytest.raises(ValueError, match=r"holds a int4/128 table; quantization='int4/64'"):
            read_keras_weights(path, "q4_128", quantization="int4/64")
        with pytest.raises(ValueError, match=r"holds a int8 table; quantization='int4'"):
            read_keras_weights(saved["paths"]["quantized", "keras"], "q8", quantization="int4")

    def test_bfloat16_table_saved_by_keras(self, tmp_path):
        layer = keras.layers.Embedding(V, 8, dtype="bfloat16", name="half")
        model = keras.Sequential([keras.Input((4,), dtype="int32"), layer])
        path = tmp_path / "half.weights.h5"
        model.save_weights(path)
        params = read_keras_weights(path, "half")
        assert params["embeddings"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(params["embeddings"]), np.asarray(layer._embeddings)
        )

    def test_per_row_values_that_fit_both_modes_ask_for_the_mode(self, tmp_path):
        path = tmp_path / "tiny.weights.h5"
        values = np.array([[127, 0], [0, 0]], np.int8)  # int8 [127, 0] or int4 [-1, 7, 0, 0]
        with h5py_file(path, "w") as h5:
            group = h5.create_group("vars")
            group.attrs["name"] = "tiny"
            group["0"], group["1"] = values, np.ones(2, np.float32)
        with pytest.raises(ValueError, match=r'could be int8.*fit both. Pass quantization="int8"'):
            read_keras_weights(path, "tiny")
        assert read_keras_weights(path, "tiny", quantization="int4")["embeddings_int4"].shape == (
            2,
            2,
        )


def h5py_file(path, mode):
    import h5py

    return h5py.File(path, mode)


def random_params(fmt, seed=11, adapter=False):
    params = jaxembed.init(None, V, D, weights=random_table(seed=seed))
    if fmt == "bfloat16":
        params = {"embeddings": params["embeddings"].astype(jnp.bfloat16)}
    elif fmt is not None:
        mode, _, block = fmt.partition("/")
        params = jaxembed.quantize(params, mode, block_size=int(block) if block else None)
    if adapter:
        a, b = random_adapter(seed=seed)
        params = {**params, "lora_embeddings_a": a, "lora_embeddings_b": b}
    return params


def keras_target(fmt, dtype=None):
    """A built Keras layer of the format (as `write_keras_weights`'s docstring says)."""
    layer = keras.layers.Embedding(V, D, dtype=dtype)
    layer.build()
    if fmt not in (None, "bfloat16"):
        keras_quantize(layer, fmt)
    return layer


class TestWriteKerasWeights:
    @pytest.mark.parametrize("fmt", [None, "bfloat16", *FORMATS])
    def test_keras_loads_it(self, tmp_path, fmt):
        params = random_params(fmt)
        dtype = "bfloat16" if fmt == "bfloat16" else None
        expected = np.asarray(jaxembed.apply(params, IDS))

        path = tmp_path / "layer.weights.h5"
        write_keras_weights(params, path, layer_name="tokens")
        layer = keras_target(fmt, dtype)
        keras.saving.load_weights(layer, path)
        assert_arrays_equal(keras_arrays(layer), params)
        np.testing.assert_array_equal(np.asarray(layer(IDS)), expected)
        assert list_keras_embeddings(path) == ["tokens"]
        assert_arrays_equal(read_keras_weights(path, "tokens"), params)

        path = tmp_path / "model.weights.h5"
        write_keras_weights(params, path, layer_path="layers/embedding")
        model = keras.Sequential([keras.Input((4,), dtype="int32"), keras_target(fmt, dtype)])
        model.load_weights(path)
        np.testing.assert_array_equal(np.asarray(model(IDS)), expected)

    @pytest.mark.parametrize("fmt", [None, "int4/128"])
    def test_lora_is_merged_as_keras_saves(self, tmp_path, fmt):
        params = random_params(fmt, adapter=True)
        path = tmp_path / "merged.weights.h5"
        write_keras_weights(params, path, lora_alpha=8.0)
        merged = jaxembed.merge_lora(params, lora_alpha=8.0)
        assert_arrays_equal(read_keras_weights(path, "embedding"), merged)
        layer = keras_target(fmt)
        keras.saving.load_weights(layer, path)
        np.testing.assert_array_equal(np.asarray(layer(IDS)), jaxembed.apply(merged, IDS))

    def test_updates_one_layer_of_a_model_file(self, saved, tmp_path):
        path = tmp_path / "float.weights.h5"
        shutil.copy(saved["paths"]["float", "h5"], path)
        params = random_params(None, seed=12)
        write_keras_weights(params, path, layer_name="tokens", mode="a")
        model = keras.saving.load_model(saved["paths"]["float", "keras"])
        model.load_weights(path)
        tokens = model.get_layer("tokens")
        np.testing.assert_array_equal(np.asarray(tokens(IDS)), jaxembed.apply(params, IDS))
        assert_arrays_equal(read_keras_weights(path, "adapted"), saved["expected"]["adapted"])
        original = saved["float_model"].layers[-1].weights
        for got, want in zip(model.layers[-1].weights, original, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --------------------------------------------------------------------------------------------
# Errors: each names what was expected and what was found
# --------------------------------------------------------------------------------------------


class TestErrors:
    def test_missing_or_non_embedding_layer_in_a_file(self, saved):
        path = saved["paths"]["float", "h5"]
        with pytest.raises(
            ValueError, match=r"no layer 'foo' in float.weights.h5; found: \['tokens', 'adapted'\]"
        ):
            read_keras_weights(path, "foo")
        archive = saved["paths"]["float", "keras"]
        with pytest.raises(ValueError, match=r"no layer 'foo' in float.keras \(model.weights.h5\)"):
            read_keras_weights(archive, "foo")
        dense = saved["float_model"].layers[-1].name
        with pytest.raises(
            ValueError, match=rf"'{dense}' .* does not hold an Embedding's .*0: shape"
        ):
            read_keras_weights(path, dense)

    def test_bad_files(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="No such Keras weights file"):
            read_keras_weights(tmp_path / "missing.keras", "embedding")
        text = tmp_path / "notes.weights.h5"
        text.write_text("not hdf5")
        with pytest.raises(ValueError, match="neither a .keras archive nor an HDF5"):
            list_keras_embeddings(text)
        archive = tmp_path / "other.keras"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("config.json", "{}")
        with pytest.raises(ValueError, match=r"without model.weights.h5.*\['config.json'\]"):
            list_keras_embeddings(archive)

    def test_keras_formats_jaxembed_cannot_hold(self, tmp_path):
        layer = keras.layers.Embedding(V, 192, weights=random_table(output_dim=192))
        layer.quantize("int4")  # blocks of 128 over 192 columns: the second one padded
        with pytest.raises(
            ValueError, match=r"blocks of 128 columns, which do not divide output_dim=192"
        ):
            from_keras(layer)
        model = keras.Sequential([keras.Input((4,), dtype="int32"), layer])
        path = tmp_path / "padded.weights.h5"
        model.save_weights(path)
        with pytest.raises(ValueError, match=r"blocks of 128 columns, which do not divide"):
            read_keras_weights(path, layer.name)
        odd = keras.layers.Embedding(V, 7, weights=random_table(output_dim=7))
        keras_quantize(odd, "int4")
        with pytest.raises(ValueError, match=r"odd output_dim=7"):
            from_keras(odd)
        path = tmp_path / "odd.keras"  # the archive's config gives output_dim
        keras.Sequential([keras.Input((4,), dtype="int32"), odd]).save(path)
        with pytest.raises(ValueError, match=r"is int4 with an odd output_dim=7"):
            read_keras_weights(path, odd.name)

    def test_from_keras_wants_a_built_embedding(self):
        with pytest.raises(
            TypeError, match=r"expects a keras.layers.Embedding. Received: .*Dense 'head'"
        ):
            from_keras(keras.layers.Dense(3, name="head"))
        with pytest.raises(ValueError, match=r"'lazy' is not built.*layer.build\(\)"):
            from_keras(keras.layers.Embedding(V, D, name="lazy"))

    def test_assign_mismatches(self):
        layer = keras.layers.Embedding(V, D, name="target")
        layer.build()
        with pytest.raises(
            ValueError, match=r"\(20, 8\) table; Keras layer 'target' is .* \(20, 256\)"
        ):
            assign_to_keras(layer, {"embeddings": random_table(output_dim=8)})
        with pytest.raises(
            ValueError, match=r"hold a int8 table; Keras layer 'target' holds a float"
        ):
            assign_to_keras(layer, random_params("int8"))
        with pytest.raises(
            TypeError, match=r"dtype float16; Keras layer 'target' stores .* float32"
        ):
            assign_to_keras(layer, {"embeddings": random_table().astype(np.float16)})
        layer.enable_lora(2)
        with pytest.raises(
            ValueError, match=r"rank-4 LoRA adapter; Keras layer 'target' has LoRA of rank 2"
        ):
            assign_to_keras(layer, random_params(None, adapter=True))
        with pytest.raises(ValueError, match=r"lora_embeddings_b.*\(rank, output_dim\)"):
            assign_to_keras(
                layer, {**random_params(None, adapter=True), "lora_embeddings_b": np.zeros((4, 3))}
            )

    def test_assign_checks_everything_before_writing(self):
        layer = keras.layers.Embedding(V, D, embeddings_constraint="non_neg", name="kept")
        layer.build()
        before = np.asarray(layer._embeddings)
        with pytest.raises(ValueError, match=r"LoRA is incompatible with embedding constraints"):
            assign_to_keras(layer, random_params(None, adapter=True))
        np.testing.assert_array_equal(np.asarray(layer._embeddings), before)
        assert not layer.lora_enabled

    def test_to_keras_mismatches(self):
        params = random_params(None)
        with pytest.raises(
            ValueError, match=r"`output_dim`=64 does not match params, whose table is \(20, 256\)"
        ):
            to_keras(params, output_dim=64)
        with pytest.raises(
            ValueError, match=r"`quantization`='int8' does not match params, which hold a float"
        ):
            to_keras(params, quantization="int8")
        with pytest.raises(ValueError, match=r"`weights` must be None"):
            to_keras(params, weights=random_table())
        with pytest.raises(TypeError, match=r"`param_dtype`=bfloat16 does not match .* float32"):
            to_keras(params, param_dtype="bfloat16")
        with pytest.raises(
            ValueError, match=r"no dtype policy with variables in bfloat16 and outputs in float32"
        ):
            to_keras({"embeddings": params["embeddings"].astype(jnp.bfloat16)}, dtype="float32")
        with pytest.raises(
            ValueError, match=r"`lora_rank`=2 does not match params, whose adapter has rank 4"
        ):
            to_keras(random_params(None, adapter=True), lora_rank=2)
        with pytest.raises(ValueError, match=r"LoRA is incompatible with embedding constraints"):
            to_keras(params, lora_rank=2, embeddings_constraint="max_norm")
        with pytest.raises(ValueError, match=r"`lora_rank` must be a positive integer"):
            to_keras(params, lora_rank=0)
        with pytest.raises(ValueError, match=r"params must hold one table|must be a dict holding"):
            to_keras({"table": params["embeddings"]})

    def test_write_mismatches(self, saved, tmp_path):
        params = random_params(None)
        with pytest.raises(ValueError, match=r"end in '.weights.h5'. Received: path='.*table.h5'"):
            write_keras_weights(params, tmp_path / "table.h5")
        path = tmp_path / "float.weights.h5"
        shutil.copy(saved["paths"]["float", "h5"], path)
        with pytest.raises(
            ValueError,
            match=r"holds variables \[0: \(20, 256\) float32\]; params give "
            r"\[0: \(20, 256\) int8, 1: \(20,\) float32\]",
        ):
            write_keras_weights(random_params("int8"), path, layer_name="tokens", mode="a")
        with pytest.raises(ValueError, match=r"no layer 'foo' in float.weights.h5"):
            write_keras_weights(params, path, layer_name="foo", mode="a")
