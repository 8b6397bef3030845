"""jaxembed.interop.peft against PEFT's LoRA embedding layout and forward, without torch.

Adapter files are built here as `PeftModel.save_pretrained` writes them (huggingface/peft:
`lora.Embedding` in src/peft/tuners/lora/layer.py, keys from `get_peft_model_state_dict` in
src/peft/utils/save_and_load.py), and PEFT's forward is computed in NumPy:
`E[ids] + scaling * lora_embedding_A.T[ids] @ lora_embedding_B.T`, scaling = alpha / r, or
alpha / sqrt(r) with rsLoRA. One test loads the files with PEFT itself when torch and peft are
installed, and skips otherwise.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxembed
from jaxembed.interop import peft as peft_io

V, D, R, ALPHA = 50, 12, 4, 8
MODULE = "model.embed_tokens"
PREFIX = f"base_model.model.{MODULE}"


def peft_config(**overrides):
    """An adapter_config.json as PEFT (0.13+) writes it for a LoRA on `model.embed_tokens`."""
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "some/model",
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": ALPHA,
        "lora_bias": False,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": R,
        "rank_pattern": {},
        "revision": None,
        "target_modules": ["embed_tokens"],
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_dora": False,
        "use_rslora": False,
    }
    return {**config, **overrides}


def peft_weights(seed=0, rank=R, vocab=V, features=D):
    """PEFT's `lora_embedding_A` (r, V) and `lora_embedding_B` (D, r), float32."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rank, vocab)).astype(np.float32)
    b = rng.normal(size=(features, rank)).astype(np.float32)
    return a, b


def base_table(seed=1, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(V, D)).astype(dtype)


def write_adapter(directory, a, b, config, module=MODULE, extra=None):
    """An adapter directory in PEFT's layout: adapter name removed, no ".weight" suffix."""
    tensors = {
        f"base_model.model.{module}.lora_embedding_A": a,
        f"base_model.model.{module}.lora_embedding_B": b,
        **(extra or {}),
    }
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def scaling(alpha, rank, use_rslora):
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def peft_forward(table, a, b, ids, scale):
    """PEFT's `lora.Embedding.forward`: base rows plus `(A.T[ids] @ B.T) * scaling`, float64."""
    table = np.asarray(table, np.float64)
    return table[ids] + scale * (a.T.astype(np.float64)[ids] @ b.T.astype(np.float64))


IDS = np.array([[0, 3, 49, 3], [7, 8, 9, 10]])


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_forward_equals_peft(tmp_path, use_rslora, dtype):
    a, b = peft_weights()
    table = base_table(dtype=dtype)
    write_adapter(tmp_path, a, b, peft_config(use_rslora=use_rslora))
    params, config = peft_io.from_peft(tmp_path, base=table)
    assert config == {"lora_rank": R, "lora_alpha": ALPHA, "use_rslora": use_rslora}
    rows = jaxembed.apply(
        params, IDS, lora_alpha=config["lora_alpha"], use_rslora=config["use_rslora"]
    )
    expected = peft_forward(table, a, b, IDS, scaling(ALPHA, R, use_rslora))
    assert rows.shape == (*IDS.shape, D) and rows.dtype == dtype
    if dtype == np.float32:
        np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-5)
    else:  # the float32 sum rounded once to bfloat16 (PEFT's result.to(torch_result_dtype))
        np.testing.assert_allclose(np.asarray(rows, np.float32), expected, rtol=2**-7, atol=1e-2)
        assert params["embeddings"].dtype == jnp.bfloat16


def test_params_are_the_transposed_matrices_in_float32(tmp_path):
    a, b = peft_weights()
    write_adapter(tmp_path, a.astype(np.float16), b.astype(jnp.bfloat16), peft_config())
    params, _ = peft_io.from_peft(tmp_path)
    assert sorted(params) == ["lora_embeddings_a", "lora_embeddings_b"]
    assert params["lora_embeddings_a"].dtype == params["lora_embeddings_b"].dtype == jnp.float32
    np.testing.assert_array_equal(params["lora_embeddings_a"], a.astype(np.float16).T)
    np.testing.assert_array_equal(
        params["lora_embeddings_b"], b.astype(jnp.bfloat16).astype(np.float32).T
    )


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_attend_and_merge_with_the_returned_config(tmp_path, use_rslora):
    a, b = peft_weights(seed=2)
    table = base_table(seed=3)
    write_adapter(tmp_path, a, b, peft_config(use_rslora=use_rslora, lora_alpha=6))
    params, config = peft_io.from_peft(tmp_path, base={"embeddings": table})
    options = {"lora_alpha": config["lora_alpha"], "use_rslora": config["use_rslora"]}
    merged_peft = table.astype(np.float64) + scaling(6, R, use_rslora) * (
        a.T.astype(np.float64) @ b.T.astype(np.float64)
    )
    query = np.random.default_rng(4).normal(size=(3, D)).astype(np.float32)
    np.testing.assert_allclose(
        jaxembed.attend(params, query, **options), query @ merged_peft.T, rtol=1e-4, atol=1e-4
    )
    merged = jaxembed.merge_lora(params, **options)
    assert sorted(merged) == ["embeddings"]
    np.testing.assert_allclose(merged["embeddings"], merged_peft, rtol=1e-5, atol=1e-5)
    restored = jaxembed.lora.unmerge_lora(
        merged, {k: params[k] for k in ("lora_embeddings_a", "lora_embeddings_b")}, **options
    )
    np.testing.assert_allclose(restored["embeddings"], table, atol=1e-5)


def trained_params(rank=R, seed=5):
    base = jaxembed.init(jax.random.key(seed), V, D)
    return jaxembed.enable_lora(base, jax.random.key(seed + 1), rank=rank, b_initializer="normal")


@pytest.mark.parametrize(
    ("lora_alpha", "use_rslora", "expected_alpha"),
    [(None, False, R), (16, True, 16), (12.5, False, 12.5), (None, True, R)],
)
def test_round_trip_is_exact(tmp_path, lora_alpha, use_rslora, expected_alpha):
    params = trained_params()
    out = peft_io.to_peft(
        params, tmp_path / "adapter", lora_alpha=lora_alpha, use_rslora=use_rslora, module=MODULE
    )
    assert out == tmp_path / "adapter"
    loaded, config = peft_io.from_peft(out, base=params["embeddings"])
    assert config == {"lora_rank": R, "lora_alpha": expected_alpha, "use_rslora": use_rslora}
    assert sorted(loaded) == sorted(params)
    for key, value in params.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    ours = jaxembed.apply(params, IDS, lora_alpha=lora_alpha, use_rslora=use_rslora)
    again = jaxembed.apply(
        loaded, IDS, lora_alpha=config["lora_alpha"], use_rslora=config["use_rslora"]
    )
    np.testing.assert_array_equal(again, ours)


def test_written_files_are_peft_layout(tmp_path):
    params = trained_params()
    peft_io.to_peft(
        params, tmp_path, lora_alpha=32, module="model.embed_tokens", base_model_name_or_path="m/x"
    )
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == [f"{PREFIX}.lora_embedding_A", f"{PREFIX}.lora_embedding_B"]
    assert tensors[f"{PREFIX}.lora_embedding_A"].shape == (R, V)
    assert tensors[f"{PREFIX}.lora_embedding_B"].shape == (D, R)
    assert all(t.dtype == np.float32 for t in tensors.values())
    np.testing.assert_array_equal(
        tensors[f"{PREFIX}.lora_embedding_A"], np.asarray(params["lora_embeddings_a"]).T
    )
    with safe_open(tmp_path / "adapter_model.safetensors", framework="np") as file:
        assert file.metadata() == {"format": "pt"}
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True)  # as save_pretrained
    assert config["peft_type"] == "LORA" and config["task_type"] is None
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (R, 32, False)
    assert config["target_modules"] == ["model.embed_tokens"]
    assert config["base_model_name_or_path"] == "m/x" and config["inference_mode"] is True
    assert config["use_dora"] is False and config["lora_dropout"] == 0.0
    assert config["bias"] == "none" and config["rank_pattern"] == config["alpha_pattern"] == {}


def test_saved_embedding_layer_is_the_base(tmp_path):
    params = trained_params()
    peft_io.to_peft(params, tmp_path, module="embed_tokens", save_embedding_layers=True)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(
        tensors["base_model.model.embed_tokens.base_layer.weight"], params["embeddings"]
    )
    loaded, _ = peft_io.from_peft(tmp_path)  # no base=: the saved table
    np.testing.assert_array_equal(loaded["embeddings"], params["embeddings"])
    other = np.zeros((V, D), np.float32)
    assert not np.asarray(peft_io.from_peft(tmp_path, base=other)[0]["embeddings"]).any()


def test_module_choice(tmp_path):
    a, b = peft_weights()
    a2, b2 = peft_weights(seed=9)
    linear = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((R, D), "f4"),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((D, R), "f4"),
    }
    state = {
        "base_model.model.encoder.embed_tokens.lora_embedding_A": a,
        "base_model.model.encoder.embed_tokens.lora_embedding_B": b,
        "base_model.model.decoder.embed_tokens.lora_embedding_A": a2,
        "base_model.model.decoder.embed_tokens.lora_embedding_B": b2,
        **linear,
    }
    config = peft_config()
    with pytest.raises(ValueError, match=r"2 modules.*'decoder.embed_tokens', 'encoder"):
        peft_io.from_peft(state, config)
    with pytest.raises(ValueError, match=r"module='embed_tokens' matches .* by suffix"):
        peft_io.from_peft(state, config, module="embed_tokens")
    with pytest.raises(ValueError, match=r"module='lm_head' is not among them.*Found: \["):
        peft_io.from_peft(state, config, module="lm_head")
    for name in ("decoder.embed_tokens", "base_model.model.decoder.embed_tokens"):
        params, _ = peft_io.from_peft(state, config, module=name)
        np.testing.assert_array_equal(params["lora_embeddings_a"], a2.T)
    one = {k: v for k, v in state.items() if "decoder" not in k}
    params, _ = peft_io.from_peft(one, config)  # the only embedding pair; Linear keys ignored
    np.testing.assert_array_equal(params["lora_embeddings_b"], b.T)
    params, _ = peft_io.from_peft(one, config, module="embed_tokens")  # a unique suffix
    np.testing.assert_array_equal(params["lora_embeddings_a"], a.T)
    unprefixed = {k.removeprefix("base_model.model."): v for k, v in one.items()}
    params, _ = peft_io.from_peft(unprefixed, config, module="encoder.embed_tokens")
    np.testing.assert_array_equal(params["lora_embeddings_a"], a.T)


def test_file_and_config_sources(tmp_path):
    a, b = peft_weights()
    write_adapter(tmp_path, a, b, peft_config(lora_alpha=3))
    weights = tmp_path / "adapter_model.safetensors"
    expected = {"lora_rank": R, "lora_alpha": 3, "use_rslora": False}
    assert peft_io.from_peft(weights)[1] == expected  # the config beside the file
    assert peft_io.from_peft(str(tmp_path))[1] == expected
    state = load_file(weights)
    assert peft_io.from_peft(state, tmp_path / "adapter_config.json")[1] == expected
    assert peft_io.from_peft(state, tmp_path)[1] == expected  # a directory holding it
    override = peft_io.from_peft(tmp_path, {"r": R, "lora_alpha": 5, "use_rslora": True})[1]
    assert override == {"lora_rank": R, "lora_alpha": 5, "use_rslora": True}
    jax_state = {k: jnp.asarray(v) for k, v in state.items()}  # any array type
    params, _ = peft_io.from_peft(jax_state, peft_config())
    np.testing.assert_array_equal(params["lora_embeddings_a"], a.T)


def test_rank_and_alpha_patterns(tmp_path):
    a, b = peft_weights(rank=2)
    config = peft_config(
        r=16,
        lora_alpha=16,
        rank_pattern={"q_proj": 32, "embed_tokens": 2},
        alpha_pattern={"model.embed_tokens": 3, "v_proj": 7},
    )
    write_adapter(tmp_path, a, b, config)
    assert peft_io.from_peft(tmp_path)[1] == {"lora_rank": 2, "lora_alpha": 3, "use_rslora": False}
    # PEFT anchors patterns at a dot: "tokens" does not match "model.embed_tokens".
    write_adapter(tmp_path, a, b, peft_config(r=2, alpha_pattern={"tokens": 99}))
    assert peft_io.from_peft(tmp_path)[1]["lora_alpha"] == ALPHA


def test_training_only_options_and_defaults_are_accepted(tmp_path):
    a, b = peft_weights()
    config = peft_config(
        lora_dropout=0.3, init_lora_weights="gaussian", bias="all", fan_in_fan_out=True
    )
    write_adapter(tmp_path, a, b, config)
    params, _ = peft_io.from_peft(tmp_path)
    np.testing.assert_array_equal(params["lora_embeddings_a"], a.T)
    minimal = {"r": R}  # PEFT's LoraConfig defaults: lora_alpha 8, no rsLoRA
    assert peft_io.from_peft(tmp_path, minimal)[1] == {
        "lora_rank": R,
        "lora_alpha": 8,
        "use_rslora": False,
    }


def test_loads_in_peft_and_reads_peft_saves(tmp_path):
    """With torch and peft installed: our files in PEFT, and PEFT's files in jaxembed."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    peft = pytest.importorskip("peft", reason="peft is not installed")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(V, D)

        def forward(self, ids):
            return self.embed_tokens(ids)

    params = trained_params()
    table = np.asarray(params["embeddings"])

    def fresh_model():
        model = Model()
        with torch.no_grad():
            model.embed_tokens.weight.copy_(torch.from_numpy(table.copy()))
        return model

    peft_io.to_peft(params, tmp_path / "ours", lora_alpha=6, use_rslora=True, module="embed_tokens")
    loaded = peft.PeftModel.from_pretrained(fresh_model(), str(tmp_path / "ours"))
    with torch.no_grad():
        theirs = loaded(torch.from_numpy(IDS)).numpy()
    ours = jaxembed.apply(params, IDS, lora_alpha=6, use_rslora=True)
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)

    config = peft.LoraConfig(
        r=3,
        lora_alpha=5,
        use_rslora=False,
        target_modules=["embed_tokens"],
        init_lora_weights=False,
    )
    trained = peft.get_peft_model(fresh_model(), config)
    trained.save_pretrained(str(tmp_path / "theirs"))
    params2, options = peft_io.from_peft(tmp_path / "theirs", base=table)
    assert options == {"lora_rank": 3, "lora_alpha": 5, "use_rslora": False}
    with torch.no_grad():
        expected = trained(torch.from_numpy(IDS)).numpy()
    np.testing.assert_allclose(
        jaxembed.apply(params2, IDS, lora_alpha=5), expected, rtol=1e-5, atol=1e-5
    )


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("use_dora", True),
        ("layer_replication", [[0, 2], [1, 3]]),
        ("lora_bias", True),
        ("trainable_token_indices", [1, 2]),
        ("use_qalora", True),
        ("alora_invocation_tokens", [5]),
    ],
)
def test_refused_options_are_named(tmp_path, option, value):
    a, b = peft_weights()
    write_adapter(tmp_path, a, b, peft_config(**{option: value}))
    with pytest.raises(ValueError, match=rf"adapter_config\['{option}'\].*cannot be reproduced"):
        peft_io.from_peft(tmp_path)


def test_other_peft_types_are_refused(tmp_path):
    a, b = peft_weights()
    write_adapter(tmp_path, a, b, peft_config(peft_type="ADALORA"))
    with pytest.raises(ValueError, match=r"peft_type.*'LORA'.*Received: peft_type='ADALORA'"):
        peft_io.from_peft(tmp_path)


def test_no_embedding_adapter(tmp_path):
    linear = {"base_model.model.q_proj.lora_A.weight": np.ones((R, D), np.float32)}
    with pytest.raises(ValueError, match=r"No embedding LoRA.*'base_model.model.q_proj.lora_A"):
        peft_io.from_peft(linear, peft_config())
    a, b = peft_weights()
    named = {
        f"{PREFIX}.lora_embedding_A.default": a,
        f"{PREFIX}.lora_embedding_B.default": b,
    }
    with pytest.raises(ValueError, match="still hold an adapter name"):
        peft_io.from_peft(named, peft_config())
    with pytest.raises(ValueError, match="has lora_embedding_A but no lora_embedding_B"):
        peft_io.from_peft({f"{PREFIX}.lora_embedding_A": a}, peft_config())


def test_shape_and_rank_mismatches():
    a, b = peft_weights()
    config = peft_config()
    with pytest.raises(ValueError, match=r"must share r.*\(4, 50\) and \(12, 3\)"):
        peft_io.from_peft(
            {f"{PREFIX}.lora_embedding_A": a, f"{PREFIX}.lora_embedding_B": b[:, :3]}, config
        )
    state = {f"{PREFIX}.lora_embedding_A": a, f"{PREFIX}.lora_embedding_B": b}
    with pytest.raises(ValueError, match=r"rank r=8 .*but its weights have rank 4"):
        peft_io.from_peft(state, peft_config(r=8))
    with pytest.raises(ValueError, match=r"\(50, 12\).*Received: shape \(50, 11\)"):
        peft_io.from_peft(state, config, base=np.zeros((V, D - 1), np.float32))
    with pytest.raises(ValueError, match=r"\(50, 12\).*Received: shape \(49, 12\)"):
        peft_io.from_peft(state, config, base={"embeddings": np.zeros((V - 1, D), np.float32)})
    with pytest.raises(ValueError, match=r"must be a 2-D \(r, num_embeddings\).*shape \(200,\)"):
        peft_io.from_peft({**state, f"{PREFIX}.lora_embedding_A": a.reshape(-1)}, config)
    with pytest.raises(ValueError, match="without a LoRA adapter"):
        peft_io.from_peft(state, config, base=trained_params())


def test_wrong_dtypes():
    a, b = peft_weights()
    state = {f"{PREFIX}.lora_embedding_A": a.astype(np.int32), f"{PREFIX}.lora_embedding_B": b}
    with pytest.raises(TypeError, match=r"lora_embedding_A.*floating-point.*dtype int32"):
        peft_io.from_peft(state, peft_config())
    state = {f"{PREFIX}.lora_embedding_A": a, f"{PREFIX}.lora_embedding_B": b}
    with pytest.raises(TypeError, match=r"`base` must be floating-point.*int64"):
        peft_io.from_peft(state, peft_config(), base=np.zeros((V, D), np.int64))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"lora_alpha": -1}, r"lora_alpha.*positive number.*-1"),
        ({"lora_alpha": "8"}, r"lora_alpha.*positive number"),
        ({"r": 0}, r"rank of module 'model.embed_tokens'.*positive int"),
        ({"use_rslora": "yes"}, r"use_rslora'\] must be true or false"),
        ({"rank_pattern": ["embed_tokens"]}, r"rank_pattern'\] must be a dict"),
    ],
)
def test_bad_config_values(overrides, match):
    a, b = peft_weights()
    state = {f"{PREFIX}.lora_embedding_A": a, f"{PREFIX}.lora_embedding_B": b}
    with pytest.raises(ValueError, match=match):
        peft_io.from_peft(state, peft_config(**overrides))


def test_missing_files_and_config(tmp_path):
    a, b = peft_weights()
    state = {f"{PREFIX}.lora_embedding_A": a, f"{PREFIX}.lora_embedding_B": b}
    with pytest.raises(ValueError, match="pass `adapter_config`"):
        peft_io.from_peft(state)
    with pytest.raises(FileNotFoundError, match="No adapter_model.safetensors"):
        peft_io.from_peft(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickled torch checkpoint"):
        peft_io.from_peft(tmp_path)
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"No adapter_config.json beside"):
        peft_io.from_peft(tmp_path)
    with pytest.raises(TypeError, match=r"must be a path"):
        peft_io.from_peft(42)


def test_to_peft_bad_input(tmp_path):
    params = trained_params()
    base = jaxembed.lora.remove_lora(params)
    with pytest.raises(ValueError, match=r"needs params holding a LoRA adapter.*\['embeddings'\]"):
        peft_io.to_peft(base, tmp_path)
    with pytest.raises(ValueError, match="half a LoRA adapter: 'lora_embeddings_b'"):
        peft_io.to_peft({**base, "lora_embeddings_a": params["lora_embeddings_a"]}, tmp_path)
    for module in ("", "model..embed", 3):
        with pytest.raises(ValueError, match="dotted module path"):
            peft_io.to_peft(params, tmp_path, module=module)
    for alpha in (-2, 0, True, "8"):
        with pytest.raises(ValueError, match="lora_alpha"):
            peft_io.to_peft(params, tmp_path, lora_alpha=alpha)
    with pytest.raises(ValueError, match="use_rslora"):
        peft_io.to_peft(params, tmp_path, use_rslora=1)
    adapter_only = {k: params[k] for k in ("lora_embeddings_a", "lora_embeddings_b")}
    peft_io.to_peft(adapter_only, tmp_path / "ok")  # the table is optional
    with pytest.raises(ValueError, match="save_embedding_layers=True\\) needs the float table"):
        peft_io.to_peft(adapter_only, tmp_path, save_embedding_layers=True)
    mismatched = {**params, "embeddings": np.zeros((V + 1, D), np.float32)}
    with pytest.raises(ValueError, match="LoRA weights must have shapes"):
        peft_io.to_peft(mismatched, tmp_path)
    integer = {**adapter_only, "lora_embeddings_b": np.ones((R, D), np.int32)}
    with pytest.raises(TypeError, match="'lora_embeddings_b' must be floating-point"):
        peft_io.to_peft(integer, tmp_path)
