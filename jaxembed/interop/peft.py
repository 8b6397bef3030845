"""Hugging Face PEFT LoRA adapters of an `nn.Embedding`, read and written without torch.

PEFT's `lora.Embedding` (huggingface/peft, `src/peft/tuners/lora/layer.py`) holds
`lora_embedding_A` `(r, num_embeddings)` (initialized to zeros) and `lora_embedding_B`
`(embedding_dim, r)` (normal), and its forward adds
`F.embedding(ids, lora_embedding_A.T) @ lora_embedding_B.T * scaling` to the base layer's rows,
`scaling = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`. jaxembed keeps A
`(input_dim, rank)` and B `(rank, output_dim)` and adds `scale * A[ids] @ B`: the same numbers
with `A = lora_embedding_A.T` and `B = lora_embedding_B.T`.

Files, as `PeftModel.save_pretrained` writes them: `adapter_config.json` (the `LoraConfig`,
`"peft_type": "LORA"`) and `adapter_model.safetensors` (metadata `{"format": "pt"}`). Saved keys
drop the adapter name (`get_peft_model_state_dict`, `_remove_adapter_name_from_state_dict_key`
in `src/peft/tuners/tuners_utils.py`): the model's `ParameterDict` entry
`base_model.model.<module>.lora_embedding_A.default` is saved as
`base_model.model.<module>.lora_embedding_A`, with no `.weight` (a Parameter, not a Linear
layer's), and likewise `lora_embedding_B`. When an embedding is targeted, PEFT may also save
the base table as `base_model.model.<module>.base_layer.weight` (`save_embedding_layers`).

Example:
    >>> import os, tempfile, jax, numpy as np, jaxembed
    >>> from jaxembed.interop.peft import from_peft, to_peft
    >>> base = jaxembed.init(jax.random.key(0), 100, 16)
    >>> trained = jaxembed.enable_lora(base, jax.random.key(1), rank=4,
    ...                                b_initializer="normal")
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = to_peft(trained, tmp, lora_alpha=8, use_rslora=True)
    ...     params, config = from_peft(tmp, base=base)
    >>> config
    {'lora_rank': 4, 'lora_alpha': 8, 'use_rslora': True}
    >>> ids = np.array([3, 14, 15])
    >>> ours = jaxembed.apply(trained, ids, lora_alpha=8, use_rslora=True)
    >>> bool((jaxembed.apply(params, ids, lora_alpha=config["lora_alpha"],
    ...                      use_rslora=config["use_rslora"]) == ours).all())
    True
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxembed import _checks, _table, lora
from jaxembed._table import LORA_A, LORA_B, LORA_DTYPE, LORA_KEYS, Params
from jaxembed.interop.torch import (
    SAFETENSORS_METADATA,
    as_numpy,
    check_path,
    describe_keys,
    floating_matrix,
    refuse_torch_only_file,
)

__all__ = ["from_peft", "to_peft"]

WEIGHTS_NAME = "adapter_model.safetensors"
"""PEFT's `SAFETENSORS_WEIGHTS_NAME` (`src/peft/utils/constants.py`)."""
CONFIG_NAME = "adapter_config.json"
"""PEFT's `CONFIG_NAME`."""
KEY_PREFIX = "base_model.model."
"""What a `PeftModel`'s saved keys start with (the LoRA model's `model` attribute)."""
PEFT_A = "lora_embedding_A"
PEFT_B = "lora_embedding_B"
BASE_LAYER_WEIGHT = "base_layer.weight"
"""The base table's key under the module, when PEFT saved it (`save_embedding_layers`)."""

PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
"""`LoraConfig`'s defaults, used where a config leaves `r` or `lora_alpha` out (as PEFT)."""

_REFUSED = {
    "use_dora": "DoRA rescales every row by a learned magnitude vector jaxembed does not hold",
    "layer_replication": "it stacks copies of a model's layers, which jaxembed does not build",
    "lora_bias": "it adds a bias to B, which jaxembed's adapter does not hold",
    "trainable_token_indices": (
        "it trains separate token rows (`trainable_tokens_delta`) that jaxembed does not read"
    ),
    "use_qalora": "QALoRA is a variant of LoRA on quantized linear layers",
    "velora_config": "VeLoRA is a LoRA variant jaxembed does not implement",
    "alora_invocation_tokens": "aLoRA is a LoRA variant jaxembed does not implement",
    "monteclora_config": "MonteCLoRA is a LoRA variant jaxembed does not implement",
    "use_bdlora": "BD-LoRA is a LoRA variant jaxembed does not implement",
    "arrow_config": "Arrow routing is a LoRA variant jaxembed does not implement",
    "kasa_config": "KaSA is a LoRA variant jaxembed does not implement",
    "megatron_config": "it builds Megatron parallel layers",
}
"""`LoraConfig` options that change the weights or the forward beyond plain LoRA, refused when
set (truthy). Every other option is accepted: `lora_dropout` (training only), `bias` (an
`nn.Embedding` has none), `fan_in_fan_out` (unused by embeddings), `init_lora_weights`,
`target_modules`, `layers_to_transform`... decide what was trained, not what it computes."""

_A_OR_B = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>[AB])$")
_WITH_ADAPTER_NAME = re.compile(r"\.lora_embedding_[AB]\.[^.]+$")


def _strip_prefix(name: str) -> str:
    return name[len(KEY_PREFIX) :] if name.startswith(KEY_PREFIX) else name


def _read_state_dict(source: Any) -> tuple[Mapping[str, Any], pathlib.Path | None]:
    """The tensors, and the `adapter_config.json` beside them (if `source` is a path)."""
    if isinstance(source, Mapping):
        return source, None
    path = check_path(source, "adapter_dir_or_state_dict")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            pickled = path / "adapter_model.bin"
            if pickled.is_file():
                refuse_torch_only_file(pickled, "The adapter")
            raise FileNotFoundError(
                f"No {WEIGHTS_NAME} in {str(path)!r} (PEFT's adapter directory holds "
                f"{WEIGHTS_NAME} and {CONFIG_NAME}). Received: files "
                f"{describe_keys(p.name for p in path.iterdir())}."
            )
    else:
        refuse_torch_only_file(path, "The adapter")
        if not path.is_file():
            raise FileNotFoundError(
                f"No adapter at {str(path)!r}: `adapter_dir_or_state_dict` must be a PEFT "
                f"adapter directory, the path of its {WEIGHTS_NAME}, or a state dict."
            )
        weights = path
    from safetensors.numpy import load_file  # the interop extra

    return load_file(weights), weights.parent / CONFIG_NAME


def _read_config(config: Any, beside: pathlib.Path | None) -> Mapping[str, Any]:
    if config is None:
        if beside is None:
            raise ValueError(
                "from_peft needs the adapter's config (its r, lora_alpha and use_rslora): pass "
                f"`adapter_config` (a dict, or the path of {CONFIG_NAME}) with a state dict."
            )
        if not beside.is_file():
            raise FileNotFoundError(
                f"No {CONFIG_NAME} beside the adapter weights (expected {str(beside)!r}); pass "
                "`adapter_config` (a dict or a path)."
            )
        config = beside
    if not isinstance(config, Mapping):
        path = check_path(config, "adapter_config")
        path = path / CONFIG_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"No adapter config at {str(path)!r}.")
        config = json.loads(path.read_text())
        if not isinstance(config, Mapping):
            raise ValueError(
                f"{str(path)!r} must hold a JSON object. Received: {_checks.describe(config)}."
            )
    return config


def _check_options(config: Mapping[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(
            f"from_peft reads LoRA adapters: adapter_config['peft_type'] must be 'LORA'. "
            f"Received: peft_type={peft_type!r}."
        )
    for option, reason in _REFUSED.items():
        value = config.get(option)
        if value:
            raise ValueError(
                f"adapter_config[{option!r}]={_checks.describe(value)} cannot be reproduced by "
                f"jaxembed: {reason}. Only plain LoRA (and rsLoRA) adapters of an embedding "
                f"are read; expected {option}=None/False."
            )


def _pattern_value(patterns: Any, module: str, default: Any, option: str) -> Any:
    """PEFT's `get_pattern_key` (`src/peft/utils/other.py`): the first pattern `p` for which
    `re.match(rf"(.*\\.)?({p})$", module)` holds gives the module's value."""
    if not patterns:
        return default
    if not isinstance(patterns, Mapping):
        raise ValueError(
            f"adapter_config[{option!r}] must be a dict of module patterns. Received: "
            f"{_checks.describe(patterns)}."
        )
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _embedding_modules(state_dict: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """{module path (without "base_model.model."): {"A": key, "B": key}}."""
    found: dict[str, dict[str, str]] = {}
    for key in state_dict:
        match = _A_OR_B.match(str(key))
        if match:
            found.setdefault(_strip_prefix(match["module"]), {})[match["which"]] = key
    for module, pair in found.items():
        if len(pair) == 1:
            (have,) = pair
            missing = "B" if have == "A" else "A"
            raise ValueError(
                f"Module {module!r} has lora_embedding_{have} but no lora_embedding_{missing}: "
                "an embedding LoRA adapter needs both."
            )
    return found


def _choose_module(found: dict[str, dict[str, str]], module: str | None, keys: Any) -> str:
    if not found:
        hint = ""
        if any(_WITH_ADAPTER_NAME.search(str(key)) for key in keys):
            hint = (
                " The keys still hold an adapter name (`...lora_embedding_A.default`): this "
                "is a model's state dict; save the adapter with `save_pretrained` (or "
                "`get_peft_model_state_dict`), which drops it."
            )
        raise ValueError(
            f"No embedding LoRA weights (keys ending in '.{PEFT_A}' and '.{PEFT_B}') in the "
            f"adapter; 'lora_A' / 'lora_B' keys belong to Linear layers.{hint} Received: keys "
            f"{describe_keys(keys)}."
        )
    names = sorted(found)
    if module is None:
        if len(found) == 1:
            return names[0]
        raise ValueError(
            f"The adapter holds embedding LoRA weights for {len(names)} modules; choose one "
            f"with `module=`. Found: {names}."
        )
    if not isinstance(module, str):
        raise TypeError(f"`module` must be a str or None. Received: {_checks.describe(module)}.")
    wanted = _strip_prefix(module)
    if wanted in found:
        return wanted
    suffixed = [name for name in names if name.endswith("." + wanted)]
    if len(suffixed) == 1:
        return suffixed[0]
    reason = f"matches {suffixed} by suffix" if suffixed else "is not among them"
    raise ValueError(
        f"module={module!r} {reason}: give one of the modules with embedding LoRA weights "
        f"in the adapter. Found: {names}."
    )


def _config_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[Any, Any]:
    rank = _pattern_value(
        config.get("rank_pattern"), module, config.get("r", PEFT_DEFAULT_R), "rank_pattern"
    )
    alpha = _pattern_value(
        config.get("alpha_pattern"),
        module,
        config.get("lora_alpha", PEFT_DEFAULT_ALPHA),
        "alpha_pattern",
    )
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(
            f"The config's rank of module {module!r} (r / rank_pattern) must be a positive int. "
            f"Received: {_checks.describe(rank)}."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(
            f"The config's lora_alpha of module {module!r} (lora_alpha / alpha_pattern) must be "
            f"a positive number (jaxembed's scale numerator). Received: {_checks.describe(alpha)}."
        )
    if not np.isfinite(alpha):
        raise ValueError(f"lora_alpha must be finite. Received: {alpha!r}.")
    return int(rank), alpha


def _base_params(
    base: Any, state_dict: Mapping[str, Any], module: str
) -> tuple[Params, str, tuple[int, int] | None]:
    """The base params to return, what they are called in messages, and their shape."""
    if base is None:
        saved = [
            key for key in state_dict if _strip_prefix(str(key)) == f"{module}.{BASE_LAYER_WEIGHT}"
        ]
        if not saved:
            return {}, "", None
        name = f"the saved base table {saved[0]!r}"
        table = floating_matrix(
            as_numpy(state_dict[saved[0]], saved[0]), name, "(num_embeddings, embedding_dim)"
        )
        return {_table.EMBEDDINGS: jnp.asarray(table)}, name, tuple(table.shape)
    if isinstance(base, Mapping):
        adapters = sorted(key for key in base if key in LORA_KEYS)
        if adapters:
            raise ValueError(
                f"`base` must be params without a LoRA adapter. Received: params holding "
                f"{adapters}."
            )
        view = _table.view(base)
        return dict(base), "the base table", (view.input_dim, view.output_dim)
    table = floating_matrix(as_numpy(base, "base"), "`base`", "(input_dim, output_dim)")
    return {_table.EMBEDDINGS: jnp.asarray(table)}, "the base table", tuple(table.shape)


def from_peft(
    adapter_dir_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    adapter_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    module: str | None = None,
    base: ArrayLike | Mapping[str, Any] | None = None,
) -> tuple[Params, dict[str, Any]]:
    """Reads a PEFT LoRA adapter of an `nn.Embedding` into jaxembed's LoRA params.

    `lora_embedding_A` `(r, V)` becomes `"lora_embeddings_a"` `(V, r)` and `lora_embedding_B`
    `(D, r)` becomes `"lora_embeddings_b"` `(r, D)`, both float32 (jaxembed's adapter dtype;
    float16 and bfloat16 files convert exactly). Then

        jaxembed.apply(params, ids, lora_alpha=config["lora_alpha"],
                       use_rslora=config["use_rslora"])

    gives PEFT's forward `E[ids] + scaling * lora_embedding_A.T[ids] @ lora_embedding_B.T`,
    computed in float32 and cast to the table's dtype (as PEFT does with float32 adapter
    weights). A model whose embedding scales its output (Gemma 3's `embed_scale`) scales the
    whole sum: multiply jaxembed's rows by the same factor.

    Accepted config options: `lora_dropout` (dropout on the ids' path in training only; no
    effect on the weights or on inference), `init_lora_weights` (only the starting values),
    `rank_pattern` / `alpha_pattern` (the module's rank and alpha are resolved as PEFT's
    `get_pattern_key` does), `bias`, `fan_in_fan_out`, `target_modules`... Refused by name:
    `use_dora`, `layer_replication`, `lora_bias`, `trainable_token_indices`, the other LoRA
    variants (`use_qalora`, `velora_config`, `alora_invocation_tokens`, ...), and a
    `peft_type` other than "LORA".

    Args:
        adapter_dir_or_state_dict: a PEFT adapter directory (`save_pretrained`'s output,
            holding `adapter_model.safetensors`, read with safetensors' NumPy API, and
            `adapter_config.json`), the path of its `.safetensors` file, or the state dict
            (a mapping of NumPy / JAX arrays or torch tensors) with PEFT's saved key names.
        adapter_config: the `LoraConfig` as a dict, or the path of its JSON file (or of the
            directory holding it); None reads `adapter_config.json` beside the weights.
        module: which embedding's adapter to read, as PEFT names it without
            `"base_model.model."` (e.g. `"model.embed_tokens"`; a unique suffix such as
            `"embed_tokens"` works too). None: the only embedding adapter in the file.
        base: the frozen table, a `(V, D)` array or params such as `{"embeddings": ...}`
            (quantized params too), returned in params beside the adapter after checking its
            shape. None: the table PEFT saved under `<module>.base_layer.weight` if the file
            has it, else no table.

    Returns:
        `(params, config)`: params `{"lora_embeddings_a": (V, r), "lora_embeddings_b":
        (r, D)}` plus the base table's entries, and config `{"lora_rank": r, "lora_alpha":
        alpha, "use_rslora": bool}` for `apply`, `attend`, `merge_lora`, the modules.

    Raises:
        ValueError: no embedding adapter, an unknown or ambiguous `module` (the modules found
            are listed), half a pair, shapes of A, B, the base table and the config's `r` that
            disagree, a refused option, a missing config. TypeError: non-floating weights.
        FileNotFoundError: a path without the adapter's files.

    Example:
        >>> import os, tempfile, numpy as np, jaxembed
        >>> from safetensors.numpy import save_file
        >>> from jaxembed.interop.peft import from_peft
        >>> rng = np.random.default_rng(0)
        >>> A, B = rng.normal(size=(2, 10)), rng.normal(size=(4, 2))  # (r, V), (D, r)
        >>> E = rng.normal(size=(10, 4)).astype(np.float32)
        >>> state = {"base_model.model.embed_tokens.lora_embedding_A": A.astype(np.float32),
        ...          "base_model.model.embed_tokens.lora_embedding_B": B.astype(np.float32)}
        >>> config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": False}
        >>> params, options = from_peft(state, config, base=E)
        >>> params["lora_embeddings_a"].shape, options
        ((10, 2), {'lora_rank': 2, 'lora_alpha': 4, 'use_rslora': False})
        >>> ids = np.array([1, 7])
        >>> peft = E[ids] + 4 / 2 * (A.T[ids] @ B.T)  # PEFT's forward
        >>> rows = jaxembed.apply(params, ids, lora_alpha=options["lora_alpha"])
        >>> bool(np.allclose(rows, peft, atol=1e-5))
        True
    """
    state_dict, beside = _read_state_dict(adapter_dir_or_state_dict)
    config = _read_config(adapter_config, beside)
    _check_options(config)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, (bool, np.bool_)):
        raise ValueError(
            f"adapter_config['use_rslora'] must be true or false. Received: "
            f"{_checks.describe(use_rslora)}."
        )
    found = _embedding_modules(state_dict)
    name = _choose_module(found, module, state_dict)
    key_a, key_b = found[name]["A"], found[name]["B"]
    a = floating_matrix(as_numpy(state_dict[key_a], key_a), repr(key_a), "(r, num_embeddings)")
    b = floating_matrix(as_numpy(state_dict[key_b], key_b), repr(key_b), "(embedding_dim, r)")
    (rank, vocab), (features, rank_b) = a.shape, b.shape
    if rank != rank_b:
        raise ValueError(
            f"{key_a!r} (r, num_embeddings) and {key_b!r} (embedding_dim, r) must share r. "
            f"Received: shapes {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if rank == 0 or vocab == 0 or features == 0:
        raise ValueError(
            f"Empty LoRA weights: {key_a!r} of shape {tuple(a.shape)}, {key_b!r} of shape "
            f"{tuple(b.shape)}."
        )
    config_rank, alpha = _config_rank_alpha(config, name)
    if rank != config_rank:
        raise ValueError(
            f"The config gives module {name!r} rank r={config_rank} (r / rank_pattern), but "
            f"its weights have rank {rank}: {key_a!r} of shape {tuple(a.shape)}."
        )
    base_params, base_name, shape = _base_params(base, state_dict, name)
    if shape is not None and shape != (vocab, features):
        raise ValueError(
            f"{base_name[0].upper()}{base_name[1:]} must have shape (num_embeddings, "
            f"embedding_dim) = ({vocab}, {features}), as the adapter of {name!r} ({key_a!r} "
            f"{tuple(a.shape)}, {key_b!r} {tuple(b.shape)}). Received: shape {shape}."
        )
    params = {
        **base_params,
        LORA_A: jnp.asarray(a.T, LORA_DTYPE),
        LORA_B: jnp.asarray(b.T, LORA_DTYPE),
    }
    return params, {"lora_rank": rank, "lora_alpha": alpha, "use_rslora": bool(use_rslora)}


def _check_module(module: Any) -> str:
    if not isinstance(module, str) or not module or any(not part for part in module.split(".")):
        raise ValueError(
            "`module` must be the embedding's dotted module path, e.g. 'model.embed_tokens'. "
            f"Received: {_checks.describe(module)}."
        )
    return _strip_prefix(module)


def to_peft(
    params: Params,
    path: str | os.PathLike[str],
    *,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    module: str = "embed_tokens",
    base_model_name_or_path: str | None = None,
    save_embedding_layers: bool = False,
) -> pathlib.Path:
    """Writes the params' LoRA adapter as a PEFT adapter directory, for
    `PeftModel.from_pretrained(model, path)` on a model whose `nn.Embedding` is at `module`.

    Writes `adapter_model.safetensors` with `base_model.model.<module>.lora_embedding_A`
    `(r, V)` = A.T and `...lora_embedding_B` `(D, r)` = B.T in float32 (metadata
    `{"format": "pt"}`, as PEFT), and `adapter_config.json` (PEFT's `LoraConfig` keys, sorted,
    indented by 2, as `save_pretrained`): `peft_type` "LORA", `r`, `lora_alpha`,
    `use_rslora`, `target_modules` `[module]`, `inference_mode` true, and the defaults of
    the others (`lora_dropout` 0.0, `bias` "none", `use_dora` false, ...). `from_peft` reads it
    back exactly.

    Args:
        params: params holding an adapter (`"lora_embeddings_a"` `(V, r)`,
            `"lora_embeddings_b"` `(r, D)`), with or without their table.
        path: the directory to write (created if needed; the two files are overwritten).
        lora_alpha: the alpha the adapter was trained with; None means the rank (jaxembed's
            default), written as `lora_alpha = r`.
        use_rslora: whether it was trained with `lora_alpha / sqrt(rank)`.
        module: the embedding's module path in the torch model, without `"base_model.model."`
            (e.g. `"model.embed_tokens"` for Llama); it is also the `target_modules` entry.
        base_model_name_or_path: recorded in the config (the Hub id or path of the model).
        save_embedding_layers: also save the params' float table as
            `base_model.model.<module>.base_layer.weight` (what PEFT's `save_embedding_layers`
            writes; PEFT loads it over the model's table).

    Returns:
        The directory, as a `pathlib.Path`.

    Raises:
        ValueError: params without an adapter (or with half of one), bad `module`,
            `lora_alpha` or `use_rslora`, `save_embedding_layers` without a float table.
        TypeError: non-floating adapter weights.

    Example:
        >>> import json, os, tempfile, jax, jaxembed
        >>> from safetensors.numpy import load_file
        >>> from jaxembed.interop.peft import to_peft
        >>> params = jaxembed.enable_lora(jaxembed.init(jax.random.key(0), 100, 16),
        ...                               jax.random.key(1), rank=4)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = to_peft(params, tmp, lora_alpha=8, module="model.embed_tokens")
        ...     tensors = load_file(os.path.join(tmp, "adapter_model.safetensors"))
        ...     config = json.loads((out / "adapter_config.json").read_text())
        >>> for key, value in sorted(tensors.items()):
        ...     print(key, value.shape, value.dtype)
        base_model.model.model.embed_tokens.lora_embedding_A (4, 100) float32
        base_model.model.model.embed_tokens.lora_embedding_B (16, 4) float32
        >>> config["r"], config["lora_alpha"], config["target_modules"], config["peft_type"]
        (4, 8, ['model.embed_tokens'], 'LORA')
    """
    if not isinstance(params, Mapping) or not any(key in params for key in LORA_KEYS):
        raise ValueError(
            f"to_peft needs params holding a LoRA adapter ({LORA_A!r}, {LORA_B!r}). Received: "
            + (
                f"params with keys {sorted(map(str, params))}."
                if isinstance(params, Mapping)
                else f"params={_checks.describe(params)}."
            )
        )
    missing = [key for key in LORA_KEYS if key not in params]
    if missing:
        raise ValueError(
            f"params hold half a LoRA adapter: {missing[0]!r} is missing. Received: params "
            f"with keys {sorted(params)}."
        )
    if np.ndim(params[LORA_A]) == 3:
        raise ValueError(
            f"to_peft takes one LoRA adapter; params hold {np.shape(params[LORA_A])[0]} stacked "
            "adapters. Pick one with `jaxembed.lora.select_adapter(params, index)`."
        )
    a = floating_matrix(as_numpy(params[LORA_A], LORA_A), repr(LORA_A), "(input_dim, rank)")
    b = floating_matrix(as_numpy(params[LORA_B], LORA_B), repr(LORA_B), "(rank, output_dim)")
    if a.shape[1] != b.shape[0] or a.shape[1] == 0:
        raise ValueError(
            f"{LORA_A!r} (input_dim, rank) and {LORA_B!r} (rank, output_dim) must share a "
            f"rank >= 1. Received: shapes {tuple(a.shape)} and {tuple(b.shape)}."
        )
    rank = int(a.shape[1])
    present = [params[key] for key in _table.TOKEN_KEYS if key in params]
    if present:  # a trained delta is never dropped, table or not
        raise _table.tokens_unsupported("to_peft", len(present[0]))
    if any(key in params for key in _table.table_keys()):
        _table.refuse(_table.view(params), "to_peft")  # and the table agrees with the adapter
    module = _check_module(module)
    if lora_alpha is None:
        lora_alpha = rank
    else:
        lora.check_alpha(lora_alpha)
        integral = isinstance(lora_alpha, numbers.Integral)
        lora_alpha = int(lora_alpha) if integral else float(lora_alpha)  # JSON-able
    use_rslora = _checks.boolean("use_rslora", use_rslora)
    _checks.boolean("save_embedding_layers", save_embedding_layers)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ValueError(
            "`base_model_name_or_path` must be None or a str. Received: "
            f"{_checks.describe(base_model_name_or_path)}."
        )
    key = f"{KEY_PREFIX}{module}."
    tensors = {
        key + PEFT_A: np.ascontiguousarray(a.T, np.float32),
        key + PEFT_B: np.ascontiguousarray(b.T, np.float32),
    }
    if save_embedding_layers:
        table = _table.view(params) if _table.kind_of(params) else None
        if table is None or not isinstance(table.kind, _table.DenseTable):
            raise ValueError(
                "to_peft(save_embedding_layers=True) needs the float table under "
                f"'embeddings' in params. Received: params with keys {sorted(params)}."
            )
        tensors[key + BASE_LAYER_WEIGHT] = np.array(np.asarray(table.dense()), order="C")
    config = {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": [module],
        "task_type": None,
        "use_dora": False,
        "use_rslora": use_rslora,
    }
    directory = check_path(path, "path")
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file  # the interop extra

    save_file(tensors, directory / WEIGHTS_NAME, metadata=SAFETENSORS_METADATA)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory
