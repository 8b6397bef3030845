"""Bringing weights in and out: Keras layers and files, PEFT adapters, torch tables.

Each source has its module, imported on first use so that `import jaxembed` needs none of
their dependencies (install them with `pip install "jaxembed[interop]"`):

- `jaxembed.interop.keras`: `from_keras` / `to_keras` for a built `keras.layers.Embedding`
  (float, LoRA, int8/int4), and the tables of saved `.keras` / `.weights.h5` files (h5py).
- `jaxembed.interop.peft`: `from_peft` / `to_peft` for Hugging Face PEFT LoRA adapters of an
  `nn.Embedding` (safetensors' NumPy API; no torch).
- `jaxembed.interop.torch`: an `nn.Embedding` state dict's `weight` (and `padding_idx`).

Example:
    >>> import numpy as np, jaxembed
    >>> state = {"weight": np.ones((4, 3), np.float32)}  # a torch nn.Embedding's state dict
    >>> params, config = jaxembed.interop.torch.from_torch_state_dict(state)
    >>> params["embeddings"].shape, config
    ((4, 3), {'input_dim': 4, 'output_dim': 3, 'padding_idx': None})
"""

import importlib as _importlib
import types as _types

_SUBMODULES = ("keras", "peft", "torch")

__all__ = list(_SUBMODULES)


def __getattr__(name: str) -> _types.ModuleType:
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
