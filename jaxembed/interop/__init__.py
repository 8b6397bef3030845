"""Bringing weights in and out: Keras layers and files, PEFT adapters, torch tables.

Each source has its module, imported on first use so that `import jaxembed` needs none of
their dependencies (install them with `pip install "jaxembed[interop]"`):

- `jaxembed.interop.keras`: `from_keras` / `to_keras` for a built `keras.layers.Embedding`
  (float, LoRA, int8/int4), and the tables of saved `.keras` / `.weights.h5` files (h5py).
- `jaxembed.interop.peft`: `from_peft` / `to_peft` for Hugging Face PEFT LoRA adapters of an
  `nn.Embedding` (safetensors' NumPy API; no torch).
- `jaxembed.interop.torch`: an `nn.Embedding` state dict's `weight` (and `padding_idx`).
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
