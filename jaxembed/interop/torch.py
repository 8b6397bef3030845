"""A torch `nn.Embedding`'s state dict as jaxembed params, and back, without torch.

`nn.Embedding(num_embeddings, embedding_dim, padding_idx=None)` stores one tensor, `weight`
`(num_embeddings, embedding_dim)`: jaxembed's "embeddings" `(input_dim, output_dim)` as it is,
no transpose. `padding_idx` is a constructor argument, not part of the state dict: pass it
here and it is carried in `config`, for `jaxembed.init(..., padding_idx=)`,
`jaxembed.apply(..., padding_idx=)` and the modules' `padding_idx=`, which give torch's meaning
(the row is looked up as stored and receives no gradient). Arrays may be NumPy arrays, JAX
arrays, torch tensors (read through `.detach().cpu()`; torch is never imported here), or a
`.safetensors` file read with safetensors' NumPy API.

Example:
    >>> import os, tempfile, numpy as np, jaxembed
    >>> from jaxembed.interop import torch as torch_io
    >>> state = {"weight": np.arange(12, dtype=np.float32).reshape(4, 3)}
    >>> params, config = torch_io.from_torch_state_dict(state, padding_idx=0)
    >>> config
    {'input_dim': 4, 'output_dim': 3, 'padding_idx': 0}
    >>> jaxembed.apply(params, np.array([1]), padding_idx=config["padding_idx"]).tolist()
    [[3.0, 4.0, 5.0]]
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "embedding.safetensors")
    ...     _ = torch_io.to_torch_state_dict(params, path)
    ...     again, _ = torch_io.from_torch_state_dict(path)
    >>> bool((np.asarray(again["embeddings"]) == state["weight"]).all())
    True
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import _checks, _table, functional
from jaxembed._table import Params

__all__ = ["from_torch_state_dict", "to_torch_state_dict"]

WEIGHT = "weight"
"""The one key of an `nn.Embedding`'s state dict."""

SAFETENSORS_METADATA = {"format": "pt"}
"""The header metadata torch-side writers put in `.safetensors` files (transformers and PEFT
write it; transformers checks it when loading a model)."""

_TORCH_ONLY_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def as_numpy(value: Any, name: str) -> np.ndarray:
    """`value` as a NumPy array on the host: NumPy and JAX arrays, array-likes, or a torch
    tensor (detached, moved to the CPU; bfloat16 comes back as `jnp.bfloat16`, which NumPy
    reads through ml_dtypes). Torch is never imported."""
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # torch's .numpy() refuses bfloat16
            return tensor.float().numpy().astype(jnp.bfloat16)
        return tensor.numpy()
    return _checks.host_array(name, jax.device_get(value), "an array", TypeError)


def floating_matrix(array: np.ndarray, name: str, expected: str) -> np.ndarray:
    """`array` if it is a 2-D floating array, else an error naming `name` and `expected`."""
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D {expected} array. Received: shape {tuple(array.shape)}."
        )
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be floating-point (float32, bfloat16, float16...). Received: dtype "
            f"{array.dtype}."
        )
    return array


def describe_keys(keys: Any, limit: int = 20) -> str:
    """ "['a', 'b', ...] (and 3 more)": the sorted keys, cut after `limit`."""
    names = sorted(map(str, keys))
    text = repr(names[:limit])
    return text + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_path(path: Any, argument: str) -> pathlib.Path:
    """`path` as a `pathlib.Path`, refusing what is neither a str nor an `os.PathLike`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`{argument}` must be a path (str or os.PathLike). Received: {_checks.describe(path)}."
        )
    return pathlib.Path(path)


def refuse_torch_only_file(path: pathlib.Path, what: str) -> None:
    """A pickled torch checkpoint cannot be read without torch: say how to convert it."""
    if path.suffix in _TORCH_ONLY_SUFFIXES:
        raise ValueError(
            f"{what} {str(path)!r} is a pickled torch checkpoint, which cannot be read without "
            "torch. Convert it to safetensors first, e.g. `safetensors.torch.save_file("
            "torch.load(path), 'model.safetensors')`, or pass the state dict itself."
        )


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise TypeError(
            f"`prefix` must be a str such as 'embed_tokens.'. Received: {_checks.describe(prefix)}."
        )
    return prefix + "." if prefix and not prefix.endswith(".") else prefix


def _read_weight(source: Any, key: str) -> np.ndarray:
    if isinstance(source, Mapping):
        if key not in source:
            raise ValueError(
                f"The state dict has no {key!r}: an nn.Embedding's state dict holds its table "
                f"under 'weight' (after `prefix`). Received: keys {describe_keys(source)}."
            )
        return as_numpy(source[key], f"state_dict[{key!r}]")
    path = check_path(source, "state_dict_or_path")
    refuse_torch_only_file(path, "state_dict_or_path")
    if not path.is_file():
        raise FileNotFoundError(
            f"No .safetensors file at {str(path)!r} (`state_dict_or_path` must be a mapping of "
            "arrays or the path of a .safetensors file)."
        )
    from safetensors import safe_open  # the interop extra; read only the one tensor

    with safe_open(path, framework="np") as file:
        keys = list(file.keys())
        if key not in keys:
            raise ValueError(
                f"{str(path)!r} has no tensor {key!r}: an nn.Embedding's state dict holds its "
                f"table under 'weight' (after `prefix`). Received: keys {describe_keys(keys)}."
            )
        return file.get_tensor(key)


def from_torch_state_dict(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike[str],
    *,
    prefix: str = "",
    padding_idx: int | None = None,
) -> tuple[Params, dict[str, Any]]:
    """Reads an `nn.Embedding`'s `weight` into jaxembed params.

    Args:
        state_dict_or_path: `module.state_dict()` (torch tensors, NumPy or JAX arrays), or the
            path of a `.safetensors` file (only the one tensor is read, so a whole model's
            file is fine). Pickled `.bin` / `.pt` checkpoints need torch and are refused.
        prefix: the module's path in a larger state dict, e.g. `"model.embed_tokens."` (a
            missing final dot is added): the table is read from `prefix + "weight"`.
        padding_idx: the `nn.Embedding`'s `padding_idx` (not stored in its state dict), an int
            in `[-num_embeddings, num_embeddings)`; a negative one is returned as the row it
            names, as torch stores it.

    Returns:
        `(params, config)`: params `{"embeddings": (num_embeddings, embedding_dim)}` in the
        stored dtype (bfloat16 stays bfloat16), and config `{"input_dim", "output_dim",
        "padding_idx"}`, so that `jaxembed.init(None, **config, weights=...)` and
        `jaxembed.Embedding(**config, weights=...)` rebuild the layer.

    Raises:
        ValueError: no `prefix + "weight"` (the keys found are listed), a table that is not
            2-D, a bad `padding_idx`, a pickled torch file. TypeError: a non-floating table.
        FileNotFoundError: a path with no file.

    Example:
        >>> import numpy as np, jaxembed
        >>> from jaxembed.interop.torch import from_torch_state_dict
        >>> state = {"model.embed_tokens.weight": np.ones((10, 4), np.float32)}
        >>> params, config = from_torch_state_dict(state, prefix="model.embed_tokens",
        ...                                        padding_idx=-1)
        >>> params["embeddings"].shape, config["padding_idx"]
        ((10, 4), 9)
        >>> jaxembed.init(None, **config, weights=params["embeddings"])["embeddings"].shape
        (10, 4)
    """
    key = _check_prefix(prefix) + WEIGHT
    weight = floating_matrix(
        _read_weight(state_dict_or_path, key),
        f"The embedding table {key!r}",
        "(num_embeddings, embedding_dim)",
    )
    input_dim, output_dim = (int(n) for n in weight.shape)
    if input_dim == 0 or output_dim == 0:
        raise ValueError(
            f"The embedding table {key!r} must have at least one row and one column. "
            f"Received: shape {tuple(weight.shape)}."
        )
    config = {
        "input_dim": input_dim,
        "output_dim": output_dim,
        "padding_idx": functional.check_padding_idx(padding_idx, input_dim),
    }
    return {_table.EMBEDDINGS: jnp.asarray(weight)}, config


def to_torch_state_dict(
    params: Params,
    path: str | os.PathLike[str] | None = None,
    *,
    prefix: str = "",
) -> dict[str, np.ndarray]:
    """The state dict of an `nn.Embedding` holding the params' table, optionally saved.

    Args:
        params: `{"embeddings": (input_dim, output_dim)}` float params. An adapter must be
            merged first (`jaxembed.merge_lora`; or export it with
            `jaxembed.interop.peft.to_peft`), a quantized table dequantized
            (`jaxembed.dequantize`).
        path: when given, the state dict is also written there as a `.safetensors` file (with
            the `{"format": "pt"}` metadata torch-side writers use), for
            `safetensors.torch.load_file` / `module.load_state_dict`.
        prefix: prepended to `"weight"` (a missing final dot is added), e.g.
            `"model.embed_tokens."`.

    Returns:
        `{prefix + "weight": (input_dim, output_dim) NumPy array}` in the table's dtype, a
        copy on the host. A bfloat16 table gives an ml_dtypes bfloat16 array, which
        `torch.from_numpy` refuses; the `.safetensors` file holds it as BF16, which torch reads.

    Raises:
        ValueError: params holding an adapter or a quantized table, or no table.

    Example:
        >>> import os, tempfile, jax, jaxembed
        >>> from jaxembed.interop.torch import to_torch_state_dict
        >>> params = jaxembed.init(jax.random.key(0), 10, 4)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     state = to_torch_state_dict(params, os.path.join(tmp, "embed.safetensors"))
        >>> state["weight"].shape, state["weight"].dtype
        ((10, 4), dtype('float32'))
    """
    table = _table.view(params)
    _table.refuse(table, "to_torch_state_dict", stacked=False)
    if table.adapter is not None:
        raise ValueError(
            "to_torch_state_dict needs params without a LoRA adapter: an nn.Embedding has no "
            "place for one. Merge it first (`jaxembed.merge_lora(params, lora_alpha=..., "
            "use_rslora=...)`), or export it as a PEFT adapter "
            "(`jaxembed.interop.peft.to_peft`). Received: params with keys "
            f"{sorted(params)}."
        )
    if not isinstance(table.kind, _table.DenseTable):
        raise ValueError(
            "to_torch_state_dict needs a float table; this one is quantized "
            f"({table.kind!r}). Dequantize it first: `jaxembed.dequantize(params)`."
        )
    weight = np.array(jax.device_get(table.dense()), copy=True, order="C")
    state = {_check_prefix(prefix) + WEIGHT: weight}
    if path is not None:
        from safetensors.numpy import save_file  # the interop extra

        save_file(state, check_path(path, "path"), metadata=SAFETENSORS_METADATA)
    return state
