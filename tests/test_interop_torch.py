"""jaxembed.interop.torch: an `nn.Embedding`'s state dict (`weight`) in and out, and its
`padding_idx` carried into jaxembed's padding rows (looked up as stored, no gradient)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxembed
from jaxembed.interop import torch as torch_io

V, D = 20, 6


def table(dtype=np.float32, seed=0):
    return np.random.default_rng(seed).normal(size=(V, D)).astype(dtype)


@pytest.mark.parametrize(
    "dtype", [np.float32, jnp.bfloat16, np.float16], ids=["f32", "bf16", "f16"]
)
def test_numpy_state_dict_round_trip(dtype):
    weight = table(dtype)
    params, config = torch_io.from_torch_state_dict({"weight": weight})
    assert config == {"input_dim": V, "output_dim": D, "padding_idx": None}
    assert sorted(params) == ["embeddings"] and params["embeddings"].dtype == dtype
    state = torch_io.to_torch_state_dict(params)
    assert sorted(state) == ["weight"]
    assert isinstance(state["weight"], np.ndarray) and state["weight"].dtype == dtype
    np.testing.assert_array_equal(state["weight"], weight)
    ids = np.array([[3, 0], [19, 3]])
    np.testing.assert_array_equal(jaxembed.apply(params, ids), weight[ids])


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_safetensors_file_round_trip(tmp_path, dtype):
    weight = table(dtype)
    params, _ = torch_io.from_torch_state_dict({"weight": weight})
    path = tmp_path / "model.safetensors"
    state = torch_io.to_torch_state_dict(params, path, prefix="model.embed_tokens")
    assert sorted(state) == ["model.embed_tokens.weight"]
    with safe_open(path, framework="np") as file:
        assert file.metadata() == {"format": "pt"}
    assert load_file(path)["model.embed_tokens.weight"].dtype == dtype
    again, config = torch_io.from_torch_state_dict(str(path), prefix="model.embed_tokens.")
    assert config["input_dim"] == V and config["output_dim"] == D
    assert again["embeddings"].dtype == dtype
    np.testing.assert_array_equal(again["embeddings"], weight)


def test_prefix_picks_the_table_of_a_whole_model(tmp_path):
    weight, other = table(seed=1), table(seed=2)
    model = {
        "model.embed_tokens.weight": weight,
        "lm_head.weight": other,
        "model.norm.weight": np.ones(D, np.float32),
    }
    params, _ = torch_io.from_torch_state_dict(model, prefix="model.embed_tokens.")
    np.testing.assert_array_equal(params["embeddings"], weight)
    save_file(model, tmp_path / "model.safetensors")
    params, _ = torch_io.from_torch_state_dict(tmp_path / "model.safetensors", prefix="lm_head")
    np.testing.assert_array_equal(params["embeddings"], other)


def test_padding_idx_is_carried_into_init_and_apply():
    weight = table()
    params, config = torch_io.from_torch_state_dict({"weight": weight}, padding_idx=-2)
    assert config["padding_idx"] == V - 2  # as torch stores a negative padding_idx
    assert torch_io.from_torch_state_dict({"weight": weight}, padding_idx=3)[1]["padding_idx"] == 3
    # `weights=` are kept as given (nn.Embedding.from_pretrained); a fresh draw zeroes the row.
    kept = jaxembed.init(None, **config, weights=params["embeddings"])
    np.testing.assert_array_equal(kept["embeddings"], weight)
    fresh = jaxembed.init(jax.random.key(0), **config)["embeddings"]
    assert not np.asarray(fresh[V - 2]).any() and np.asarray(fresh[0]).any()
    rows = jaxembed.apply(params, np.array([V - 2, 1]), padding_idx=config["padding_idx"])
    np.testing.assert_array_equal(rows, weight[[V - 2, 1]])  # the stored row, not zeros


def test_jitted_step_leaves_the_padding_row_exactly_unchanged():
    weight = table(seed=3)
    params, config = torch_io.from_torch_state_dict({"weight": weight}, padding_idx=1)
    pad = config["padding_idx"]
    ids = jnp.array([[1, 4, 1, 7], [2, 1, 4, 1]])
    optimizer = optax.adam(1e-2)

    def loss_fn(params):
        return jnp.sum(jaxembed.apply(params, ids, padding_idx=pad) ** 2)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    state = optimizer.init(params)
    new, state, grads = step(params, state)
    grad = np.asarray(grads["embeddings"])
    assert (grad[pad] == 0).all()
    assert np.abs(grad[[2, 4, 7]]).min() > 0  # the other looked-up rows train
    new, _, _ = step(new, state)
    np.testing.assert_array_equal(new["embeddings"][pad], weight[pad])
    assert not np.array_equal(new["embeddings"][4], weight[4])


def test_padding_row_of_lora_a_gets_no_gradient_and_the_module_carries_it():
    params, config = torch_io.from_torch_state_dict({"weight": table()}, padding_idx=0)
    lora = jaxembed.enable_lora(params, jax.random.key(1), rank=2, b_initializer="normal")
    trainable, frozen = jaxembed.lora.split_trainable(lora)
    ids = jnp.array([0, 5, 0, 6])

    def loss_fn(trainable):
        combined = jaxembed.lora.combine(trainable, frozen)
        return jnp.sum(jaxembed.apply(combined, ids, padding_idx=config["padding_idx"]) ** 2)

    grads = jax.jit(jax.grad(loss_fn))(trainable)
    a_grad = np.asarray(grads["lora_embeddings_a"])
    assert (a_grad[0] == 0).all() and np.abs(a_grad[5]).sum() > 0

    layer = jaxembed.Embedding(**config, weights=params["embeddings"])
    variables = nn.unbox(layer.init(jax.random.key(2), ids))
    np.testing.assert_array_equal(variables["params"]["embeddings"], params["embeddings"])
    grads = jax.grad(lambda v: jnp.sum(layer.apply(v, ids) ** 2))(variables)
    embeddings_grad = np.asarray(grads["params"]["embeddings"])
    assert (embeddings_grad[0] == 0).all() and np.abs(embeddings_grad[5]).sum() > 0


def test_torch_module_state_dict_if_installed(tmp_path):
    """With torch installed: a real `nn.Embedding` in and out."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from safetensors.torch import load_file as torch_load_file

    module = torch.nn.Embedding(V, D, padding_idx=0)
    params, config = torch_io.from_torch_state_dict(module.state_dict(), padding_idx=0)
    np.testing.assert_array_equal(params["embeddings"], module.weight.detach().numpy())
    assert config["padding_idx"] == 0
    torch_io.to_torch_state_dict(params, tmp_path / "e.safetensors")
    loaded = torch.nn.Embedding(V, D, padding_idx=0)
    loaded.load_state_dict(torch_load_file(tmp_path / "e.safetensors"))
    assert torch.equal(loaded.weight, module.weight)
    bf16 = module.to(torch.bfloat16).state_dict()
    params, _ = torch_io.from_torch_state_dict(bf16)
    assert params["embeddings"].dtype == jnp.bfloat16


# --- bad input -----------------------------------------------------------------------------


def test_missing_weight_lists_the_keys(tmp_path):
    state = {"embed.weight": table(), "embed.bias": np.zeros(D, np.float32)}
    with pytest.raises(ValueError, match=r"no 'weight'.*\['embed.bias', 'embed.weight'\]"):
        torch_io.from_torch_state_dict(state)
    with pytest.raises(ValueError, match=r"no 'other.weight'"):
        torch_io.from_torch_state_dict(state, prefix="other")
    save_file(state, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match=r"has no tensor 'weight'.*\['embed.bias'"):
        torch_io.from_torch_state_dict(tmp_path / "s.safetensors")
    many = {f"layer{i}.weight": np.zeros(1, np.float32) for i in range(30)}
    with pytest.raises(ValueError, match=r"\(and 10 more\)"):
        torch_io.from_torch_state_dict(many)


def test_bad_tables():
    with pytest.raises(ValueError, match=r"must be a 2-D \(num_embeddings.*shape \(20,\)"):
        torch_io.from_torch_state_dict({"weight": np.zeros(V, np.float32)})
    with pytest.raises(TypeError, match=r"must be floating-point.*int64"):
        torch_io.from_torch_state_dict({"weight": np.zeros((V, D), np.int64)})
    with pytest.raises(ValueError, match="at least one row"):
        torch_io.from_torch_state_dict({"weight": np.zeros((0, D), np.float32)})


@pytest.mark.parametrize("padding_idx", [V, -V - 1, 1.0, True, "0"])
def test_bad_padding_idx(padding_idx):
    with pytest.raises(ValueError, match=r"padding_idx.*\[-20, 20\)"):
        torch_io.from_torch_state_dict({"weight": table()}, padding_idx=padding_idx)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="pickled torch checkpoint"):
        torch_io.from_torch_state_dict(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="No .safetensors file"):
        torch_io.from_torch_state_dict(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="must be a path"):
        torch_io.from_torch_state_dict(3)
    with pytest.raises(TypeError, match="`prefix` must be a str"):
        torch_io.from_torch_state_dict({"weight": table()}, prefix=None)


def test_to_torch_refuses_adapters_and_quantized_tables():
    params = jaxembed.init(jax.random.key(0), V, D)
    lora = jaxembed.enable_lora(params, jax.random.key(1), rank=2)
    with pytest.raises(ValueError, match=r"without a LoRA adapter.*merge_lora.*to_peft"):
        torch_io.to_torch_state_dict(lora)
    with pytest.raises(ValueError, match=r"quantized.*jaxembed.dequantize"):
        torch_io.to_torch_state_dict(jaxembed.quantize(params, "int8"))
    with pytest.raises(ValueError, match="holding the table under 'embeddings'"):
        torch_io.to_torch_state_dict({"weight": table()})
