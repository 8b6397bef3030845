"""The layer config: one validated list of arguments behind both Flax modules."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxembed
import jaxembed.nnx
from jaxembed import _config


def linen_arguments():
    fields = dataclasses.fields(jaxembed.Embedding)
    return {f.name: f.default for f in fields if f.name not in ("parent", "name")}


def nnx_arguments():
    parameters = inspect.signature(jaxembed.nnx.Embedding.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name not in ("self", "rngs")}


def config_arguments():
    return {f.name: f.default for f in dataclasses.fields(_config.LayerConfig)}


class TestOneArgumentList:
    def test_linen_fields_and_nnx_keywords_are_the_config_in_order(self):
        assert list(linen_arguments()) == list(_config.NAMES)
        assert list(nnx_arguments()) == list(_config.NAMES)

    def test_same_defaults_everywhere(self):
        expected = {
            name: (None if default is dataclasses.MISSING else default)
            for name, default in config_arguments().items()
        }
        for arguments in (linen_arguments(), nnx_arguments()):
            got = {
                name: (
                    None if default in (dataclasses.MISSING, inspect.Parameter.empty) else default
                )
                for name, default in arguments.items()
            }
            assert got == expected


class TestLayerConfig:
    def test_frozen(self):
        config = _config.LayerConfig(10, 4)
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.input_dim = 5

    def test_validates_every_argument(self):
        with pytest.raises(ValueError, match="`out_of_range` must be one of"):
            _config.LayerConfig(10, 4, out_of_range="wrap")
        with pytest.raises(ValueError, match="`lora_rank` must be a positive integer"):
            _config.LayerConfig(10, 4, lora_rank=0)

    def test_weights_are_copied_once_and_read_only(self):
        weights = np.ones((10, 4))
        config = _config.LayerConfig(10, 4, weights=weights)
        assert config.weights is not weights and not config.weights.flags.writeable
        assert config.weights.dtype == np.float32
        again = _config.LayerConfig(**config.arguments())
        assert again.weights is config.weights  # no second check or copy


class TestLinenKeepsOneCheckedCopy:
    def test_clones_in_apply_reuse_the_checked_weights(self):
        weights = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
        layer = jaxembed.Embedding(50, 8, weights=weights)
        variables = layer.init(jax.random.key(0), jnp.arange(3))
        seen = layer.apply(variables, method=lambda module: module.weights)
        assert seen is layer.weights and seen is not weights
        np.testing.assert_array_equal(variables["params"]["embeddings"].value, weights)


class TestNnxAgreesWithLinen:
    def test_lora_alpha_without_rank_is_kept_for_a_later_adapter(self):
        layer = jaxembed.nnx.Embedding(10, 4, lora_alpha=8.0, rngs=nnx.Rngs(0))
        assert layer.lora_alpha == 8.0 and layer.lora_rank is None
        module, _ = layer.to_linen()
        assert module.lora_alpha == 8.0
        layer.enable_lora(2, rngs=nnx.Rngs(1))
        assert layer.lora_rank == 2 and layer.lora_alpha == 8.0

    def test_lora_rank_follows_the_adapter(self):
        layer = jaxembed.nnx.Embedding(10, 4, lora_rank=3, rngs=nnx.Rngs(0))
        assert layer.lora_rank == 3
        layer.merge_lora()
        assert layer.lora_rank is None and not hasattr(layer, "lora_embeddings_a")
