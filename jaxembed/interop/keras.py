"""Keras 3's `Embedding`, in memory and on disk: its variables as jaxembed params, and back.

Example:
    >>> import os; os.environ["KERAS_BACKEND"] = "jax"
    >>> import keras, numpy as np, jaxembed
    >>> from jaxembed.interop.keras import from_keras
    >>> layer = keras.layers.Embedding(100, 8)
    >>> layer.build()
    >>> params, config = from_keras(layer)
    >>> ids = np.array([[1, 2, 3]])
    >>> out = jaxembed.Embedding(**config).apply({"params": params}, ids)
    >>> bool((out == layer(ids)).all())
    True

In memory (needs Keras; any backend, tested on JAX):

- `from_keras(layer) -> (params, config)`: a built `keras.layers.Embedding` (float, LoRA,
  int8, int4 per row or grouped) as params and the keyword arguments of `jaxembed.Embedding`
  / `jaxembed.nnx.Embedding`; the module built from them gives the layer's outputs.
- `to_keras(params, **config)`: a built Keras layer holding params (LoRA enabled with the
  adapter, quantized with the stored integers); `assign_to_keras(layer, params)` writes params
  into a layer you already have (one inside a model).

On disk (h5py only, no Keras):

- `read_keras_weights(path, layer_name)`: an Embedding's variables out of a `.keras` archive
  or a `.weights.h5` file of a whole model; `list_keras_embeddings(path)` names the layers.
- `write_keras_weights(params, path, layer_name=...)`: a `.weights.h5` that Keras loads into
  an `Embedding` (alone, or in a model), or an update of one layer in a model's file.

The params layout is jaxembed's (`jaxembed.quantization` has the table of keys). Keras keeps
the same arrays under other names:

+------------------------------+-------------------------------------------------------+
| Keras variable (h5 dataset)  | jaxembed key                                          |
+==============================+=======================================================+
| `_embeddings` (`vars/0`)     | "embeddings"; "embeddings_int8" / "embeddings_int4"   |
+------------------------------+-------------------------------------------------------+
| `embeddings_scale` (`1`)     | "embeddings_scale" `(V,)` or `(V, groups)`            |
+------------------------------+-------------------------------------------------------+
| `embeddings_zero` (`2`)      | "embeddings_zero" int8 `(V, groups)` (grouped int4)   |
+------------------------------+-------------------------------------------------------+
| `g_idx` (`3`)                | none: `column // block_size`, from the shapes         |
+------------------------------+-------------------------------------------------------+
| `lora_embeddings_a` / `_b`   | "lora_embeddings_a" / "lora_embeddings_b" (in memory) |
+------------------------------+-------------------------------------------------------+

Keras's int4 packing (two values per byte, even columns in the low nibble) and its per-row and
grouped formats are jaxembed's, bit for bit; a grouped layer's block size is
`output_dim // groups`.

Keras behaviours worth knowing, each handled here:

- Saving merges LoRA: Keras writes `E + (alpha / rank) * A @ B` (requantized when the table
  is quantized) and no adapter; loading zeroes the layer's A and B. Files therefore never hold
  an adapter, and `write_keras_weights` merges one before writing.
- `Embedding(..., lora_rank=r, lora_alpha=a)` scales by 1, not `a / r`: Keras 3.10+'s `build`
  re-enables LoRA with alpha = rank. `from_keras` reports the alpha the layer computes with
  (`layer.lora_alpha`); `to_keras` enables LoRA after building and sets `layer.lora_alpha`.
- A weights file addresses layers by position (`layers/embedding_1/vars/0`: the class name in
  snake case, numbered), not by their names; each `vars` group carries the layer's name as an
  attribute, which is what `layer_name` matches here (or pass the group's path).
- int8 and per-row int4 have the same shapes on disk (`(V, n)` int8 values, `(V,)` scales):
  `read_keras_weights` tells them apart by the layer's dtype policy in a `.keras` archive,
  by `quantization=` when given, and otherwise by their values (Keras's per-row abs-max puts
  +-127 in every nonzero int8 row, and +-7 but never -8 in every nonzero int4 row), and asks
  for `quantization=` when the values fit both or neither. A `.weights.h5` file does not
  record `output_dim` either: a per-row int4 table of odd `output_dim` (Keras pads a zero
  column; jaxembed refuses such tables) reads from it with that zero column, while the same
  layer read from a `.keras` archive (whose config gives `output_dim`) is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import pathlib
import re
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxembed import _checks, _quantized, _table, constraints, initializers, lora, regularizers
from jaxembed import quantization as _quantization
from jaxembed._table import Params

__all__ = [
    "assign_to_keras",
    "from_keras",
    "list_keras_embeddings",
    "read_keras_weights",
    "to_keras",
    "write_keras_weights",
]

_WEIGHTS_IN_ARCHIVE = "model.weights.h5"
_GROUP = "vars"


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _keras() -> Any:
    """Keras, imported on first use (the file readers never need it)."""
    try:
        import keras
    except ImportError as error:  # pragma: no cover - Keras is installed with the test extra
        raise ImportError(
            "from_keras / to_keras / assign_to_keras need Keras 3 (`pip install keras`); the "
            "file functions (read_keras_weights, write_keras_weights) need only h5py."
        ) from error
    return keras


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as error:  # pragma: no cover - h5py is in the interop extra
        raise ImportError(
            'Reading and writing Keras weights files needs h5py: `pip install "jaxembed[interop]"`.'
        ) from error
    return h5py


def _summary(array: Any) -> str:
    """ "shape (5, 4), dtype int8" for an array or h5 dataset."""
    return f"shape {tuple(array.shape)}, dtype {array.dtype}"


def _keras_alpha(rank: int, lora_alpha: float | None, use_rslora: bool) -> float:
    """The `lora_alpha` Keras must hold so that its scale `lora_alpha / rank` is jaxembed's
    (`lora_alpha / rank`, or `/ sqrt(rank)` with `use_rslora`; alpha defaults to the rank)."""
    lora.check_alpha(lora_alpha)
    alpha = float(rank if lora_alpha is None else lora_alpha)
    _checks.boolean("use_rslora", use_rslora)
    return alpha * math.sqrt(rank) if use_rslora else alpha


# --------------------------------------------------------------------------------------------
# Keras identifiers <-> jaxembed's names
# --------------------------------------------------------------------------------------------

_KINDS = {
    "embeddings_initializer": initializers,
    "embeddings_regularizer": regularizers,
    "embeddings_constraint": constraints,
}
_OMIT = object()


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _from_keras_identifier(argument: str, obj: Any) -> Any:
    """A built-in Keras initializer / regularizer / constraint object as jaxembed takes it: its
    snake-case name when its hyperparameters are jaxembed's defaults for that name, jaxembed's
    factory called with them otherwise (e.g. `regularizers.l2(0.1)`), `_OMIT` when jaxembed has
    no such function (custom classes, options jaxembed lacks such as `input_axes`)."""
    if obj is None:
        return None
    module = _KINDS[argument]
    name = _snake_case(type(obj).__name__)
    factory = getattr(module, name, None)
    if name not in module.NAMES or not callable(factory) or not hasattr(obj, "get_config"):
        return _OMIT
    config = {k: v for k, v in obj.get_config().items() if k != "seed"}
    try:
        keras_defaults = {k: v for k, v in type(obj)().get_config().items() if k != "seed"}
    except Exception:  # a class that needs arguments: every option counts as set
        keras_defaults = {}
    parameters = inspect.signature(factory).parameters
    for key, value in config.items():
        if key not in parameters and not (
            key in keras_defaults and _same(value, keras_defaults[key])
        ):
            return _OMIT  # an option jaxembed's function does not take, set to a non-default
    arguments = {k: v for k, v in config.items() if k in parameters}
    if all(_same(v, parameters[k].default) for k, v in arguments.items()):
        return "uniform" if name == "random_uniform" else name
    try:
        return factory(**arguments)
    except (TypeError, ValueError):  # a value Keras allows and jaxembed's function refuses
        return _OMIT


def _to_keras_identifier(argument: str, value: Any) -> Any:
    """jaxembed's identifier as Keras takes it: names through Keras's `get` (with jaxembed's
    meaning of "l1_l2" and "constant", which Keras 3 refuses by name), Keras objects as they
    are, other regularizer and constraint callables wrapped to take Keras's Variable. A
    callable initializer is JAX's `(key, shape, dtype)`, which Keras cannot call: None is
    returned, for Keras's default."""
    keras = _keras()
    if value is None:
        return None
    module = _KINDS[argument]
    keras_module = {
        "embeddings_initializer": keras.initializers,
        "embeddings_regularizer": keras.regularizers,
        "embeddings_constraint": keras.constraints,
    }[argument]
    if isinstance(value, str):
        module.get(value)  # jaxembed's check: an unknown name fails here, naming the argument
        special = {
            ("embeddings_regularizer", "l1_l2"): lambda: keras.regularizers.L1L2(0.01, 0.01),
            ("embeddings_initializer", "constant"): lambda: keras.initializers.Constant(0.0),
        }
        name = _snake_case(value) if value[:1].isupper() else value
        name = getattr(module, "_ALIASES", {}).get(name, name)  # jaxembed's aliases
        if (argument, name) in special:
            return special[argument, name]()
        return keras_module.get(name)
    keras_class = {
        "embeddings_initializer": keras.initializers.Initializer,
        "embeddings_regularizer": keras.regularizers.Regularizer,
        "embeddings_constraint": keras.constraints.Constraint,
    }[argument]
    if isinstance(value, keras_class):
        return value
    if argument == "embeddings_initializer":
        return None
    function = value  # jaxembed's (a JAX function of an array): Keras passes it a Variable

    def jaxembed_function(variable: Any) -> Any:
        return function(keras.ops.convert_to_tensor(variable))

    jaxembed_function.__name__ = f"jaxembed_{argument.partition('_')[2]}"
    return jaxembed_function


# --------------------------------------------------------------------------------------------
# Keras layer -> params
# --------------------------------------------------------------------------------------------


def _check_layer(layer: Any, function: str) -> Any:
    keras = _keras()
    if not isinstance(layer, keras.layers.Embedding):
        kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
        name = getattr(layer, "name", None)
        raise TypeError(
            f"{function} expects a keras.layers.Embedding. Received: {kind}"
            + (f" {name!r}" if isinstance(name, str) else "")
            + "."
        )
    if not layer.built:
        raise ValueError(
            f"{function}: Keras layer {layer.name!r} is not built, so it holds no variables. "
            "Build it first: `layer.build()` or call it on ids."
        )
    return keras


def _keras_format(layer: Any) -> str | None:
    """The jaxembed format of a built Keras Embedding: None, "int8", "int4" or "int4/B";
    raises for formats jaxembed cannot hold."""
    mode = layer.quantization_mode
    if mode is None:
        return None
    if mode == "int8":
        return "int8"
    if mode != "int4":
        raise ValueError(
            f"Keras layer {layer.name!r} is quantized with mode {mode!r}; jaxembed holds Keras's "
            "'int8' and 'int4' tables only. Quantize the float layer with one of those."
        )
    output_dim = int(getattr(layer, "_orig_output_dim", layer.output_dim))
    if output_dim % 2:
        raise ValueError(
            f"Keras layer {layer.name!r} is int4 with an odd output_dim={output_dim} (Keras pads "
            "a column); jaxembed's int4 needs an even output_dim. Use int8, or a table with an "
            "even number of columns."
        )
    block = getattr(layer, "_int4_block_size", None)
    if block is None or block == -1:
        return "int4"
    groups = int(layer.embeddings_scale.shape[1])
    where = f"Keras layer {layer.name!r}"
    return f"int4/{_check_block(int(block), groups, output_dim, where)}"


def _check_block(block: int, groups: int, output_dim: int, where: str) -> int:
    """The block size jaxembed reads from Keras's `block` size and number of `groups`: `block`
    when it divides output_dim; output_dim when one group covers the whole row (a block wider
    than the row, which Keras pads with zeros: its scale and zero point dequantize the row as
    jaxembed's one block of output_dim columns does); raises otherwise."""
    if groups == 1:
        return output_dim
    if output_dim % block == 0 and output_dim // block == groups:
        return block
    raise ValueError(
        f"{where} is int4 with blocks of {block} columns, which do not divide "
        f"output_dim={output_dim} (Keras pads the last of its {groups} blocks with zeros); "
        "jaxembed's grouped format needs equal blocks. Quantize the Keras layer with a block "
        f"size dividing {output_dim} (`Int4QuantizationConfig(block_size=...)`), or per row "
        "(block_size=None)."
    )


def _numpy(variable: Any) -> np.ndarray:
    return np.array(_keras().ops.convert_to_numpy(variable))


def _policy_dtypes(layer: Any, fmt: str | None) -> dict[str, str]:
    """`param_dtype`, and `dtype` when the outputs' dtype is not the one jaxembed gives by
    default (the table's for a float table, float32 for a quantized one)."""
    policy = layer.dtype_policy
    variable, compute = str(policy.variable_dtype), str(policy.compute_dtype)
    default_output = variable if fmt is None else "float32"
    dtypes = {"param_dtype": variable}
    if compute != default_output:
        dtypes["dtype"] = compute
    return dtypes


_KERAS_EXTRAS = (
    "embeddings_scale",
    "embeddings_zero",
    "g_idx",
    "lora_embeddings_a",
    "lora_embeddings_b",
)
"""The variables of a Keras Embedding besides its table (each present or not)."""


def from_keras(layer: Any) -> tuple[Params, dict[str, Any]]:
    """A built `keras.layers.Embedding` as jaxembed params and module arguments.

    Params (JAX arrays, copies of the layer's variables):

    - float: `{"embeddings": (input_dim, output_dim)}` in the layer's variable dtype;
    - int8: `"embeddings_int8"` int8 `(V, D)`, `"embeddings_scale"` `(V,)`;
    - int4 per row: `"embeddings_int4"` int8 `(V, D/2)` packed, `"embeddings_scale"` `(V,)`;
    - int4 grouped: the same values, `"embeddings_scale"` and `"embeddings_zero"` int8
      `(V, D/B)` (Keras's `g_idx` is not kept: it is `column // B`);
    - with LoRA enabled, also `"lora_embeddings_a"` `(V, rank)` and `"lora_embeddings_b"`
      `(rank, D)` float32, as the layer holds them (unmerged).

    Config: the keyword arguments of `jaxembed.Embedding` / `jaxembed.nnx.Embedding` (which
    take them as `**config`) that reproduce the layer: `input_dim`, `output_dim`,
    `mask_zero`, `param_dtype` (the policy's variable dtype), `dtype` (only when the outputs'
    dtype differs from the one jaxembed gives by default, e.g. "bfloat16" for
    "mixed_bfloat16"), `lora_rank` and `lora_alpha` (the alpha the layer computes with) when
    LoRA is enabled, `quantization` ("int8", "int4", "int4/128") when quantized, and
    `embeddings_initializer` / `embeddings_regularizer` / `embeddings_constraint`: a Keras
    built-in becomes its jaxembed name ("uniform", "glorot_normal", "l2", "max_norm", ...)
    when its hyperparameters are that name's defaults, jaxembed's function of the same name
    called with them otherwise (`jaxembed.regularizers.l2(0.1)`: a callable, not
    serializable). **Left out** (jaxembed's defaults apply): custom Keras objects, options
    jaxembed lacks (`input_axes`), initializer seeds, the constraint of a quantized layer
    (Keras no longer applies it; jaxembed refuses one), and `activity_regularizer`.

    Outputs of the module built from `config` with these params equal the layer's: exactly for
    float, int8 and int4 tables (quantized ones with LoRA too), within float rounding for a
    float table with LoRA (Keras adds `A @ B` to the whole table first, jaxembed to the rows).

    Raises:
        TypeError: `layer` is not a `keras.layers.Embedding`.
        ValueError: the layer is not built, holds variables beyond an Embedding's (a
            subclass's own), or is quantized in a format jaxembed cannot hold
            (float8/GPTQ/AWQ modes, int4 with an odd `output_dim`, int4 blocks that do not
            divide `output_dim`).

    Example:
        >>> import os; os.environ["KERAS_BACKEND"] = "jax"
        >>> import keras, numpy as np, jaxembed
        >>> from jaxembed.interop.keras import from_keras
        >>> layer = keras.layers.Embedding(100, 8, mask_zero=True)
        >>> layer.build()
        >>> params, config = from_keras(layer)
        >>> config["input_dim"], config["mask_zero"], config["embeddings_initializer"]
        (100, True, 'uniform')
        >>> ids = np.array([[1, 2, 0]])
        >>> out = jaxembed.Embedding(**config).apply({"params": params}, ids)
        >>> bool((out == layer(ids)).all())
        True
    """
    _check_layer(layer, "from_keras")
    fmt = _keras_format(layer)
    if fmt is None:
        params = {_table.EMBEDDINGS: _numpy(layer._embeddings)}
    else:
        mode = fmt.partition("/")[0]
        params = {
            _table.QUANTIZED_VALUES[mode]: _numpy(layer._embeddings),
            _table.SCALE: _numpy(layer.embeddings_scale),
        }
        if "/" in fmt:
            params[_table.ZERO] = _numpy(layer.embeddings_zero)
    config: dict[str, Any] = {
        "input_dim": int(layer.input_dim),
        "output_dim": int(layer.output_dim),
        "mask_zero": bool(layer.mask_zero),
        **_policy_dtypes(layer, fmt),
    }
    for argument in _KINDS:
        if argument == "embeddings_constraint" and fmt is not None:
            continue
        value = _from_keras_identifier(argument, getattr(layer, argument, None))
        if value is not _OMIT:
            config[argument] = value
    read = [layer._embeddings, *(getattr(layer, n, None) for n in _KERAS_EXTRAS)]
    others = [v.path for v in layer.weights if not any(v is known for known in read)]
    if others:  # a subclass with variables of its own (a reversed table, say)
        raise ValueError(
            f"Keras layer {layer.name!r} ({type(layer).__name__}) holds variables an Embedding "
            f"does not, which jaxembed would drop: {others}."
        )
    if layer.lora_enabled:
        params[_table.LORA_A] = _numpy(layer.lora_embeddings_a)
        params[_table.LORA_B] = _numpy(layer.lora_embeddings_b)
        config["lora_rank"] = int(params[_table.LORA_A].shape[1])
        config["lora_alpha"] = float(layer.lora_alpha)
    if fmt is not None:
        config["quantization"] = fmt
    params = {key: jnp.asarray(value) for key, value in params.items()}
    _table.view(params)  # the layout jaxembed expects, or an error naming the key
    return params, config


# --------------------------------------------------------------------------------------------
# params -> Keras layer
# --------------------------------------------------------------------------------------------


def _policy_name(param_dtype: np.dtype, dtype: np.dtype) -> str:
    """The Keras dtype policy with variables in `param_dtype` and outputs in `dtype`."""
    if dtype == param_dtype:
        return param_dtype.name
    if param_dtype == np.float32 and dtype.name in ("bfloat16", "float16"):
        return f"mixed_{dtype.name}"
    raise ValueError(
        f"Keras has no dtype policy with variables in {param_dtype.name} and outputs in "
        f"{dtype.name} (only equal dtypes, or float32 variables with bfloat16/float16 outputs: "
        f"'mixed_bfloat16', 'mixed_float16'). Received: param_dtype={param_dtype.name}, "
        f"dtype={dtype.name}."
    )


def _cast_to(variable: Any, value: Any, what: str) -> np.ndarray:
    """`value` as a NumPy array of the variable's shape and dtype (floats cast, shapes checked)."""
    array = np.asarray(value)
    shape = tuple(int(n) for n in variable.shape)
    if tuple(array.shape) != shape:
        raise ValueError(
            f"{what} must have the Keras variable's shape {shape}. Received: {_summary(array)}."
        )
    return array.astype(_variable_dtype(variable), copy=False)


def _variable_dtype(variable: Any) -> np.dtype:
    """A Keras variable's dtype as a NumPy dtype (bfloat16 as ml_dtypes')."""
    return jnp.dtype(_keras().backend.standardize_dtype(variable.dtype))


def assign_to_keras(
    layer: Any,
    params: Params,
    *,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
) -> None:
    """Writes params into a built `keras.layers.Embedding` (one inside a model, say).

    The layer must have the table's shape and storage: a float layer whose variable dtype is
    the table's, or a layer quantized in the params' format (`layer.quantize("int8")`,
    `layer.quantize("int4", config=Int4QuantizationConfig(block_size=B))`, or built under an
    "int8_from_float32"-style dtype policy); scales are cast to the layer's variable dtype. An
    adapter in params enables LoRA on a layer without it (or must have the rank of the
    layer's), and the layer's `lora_alpha` is set to `lora_alpha` (default: the layer's own
    when LoRA was enabled, else the rank); `use_rslora` folds rank-stabilized scaling into
    Keras's alpha (`alpha * sqrt(rank)`). Params without an adapter zero the A and B of a
    LoRA-enabled layer, as Keras's own weight loading does.

    Args:
        layer: a built `keras.layers.Embedding`.
        params: jaxembed params, `{"embeddings": (input_dim, output_dim)}` or a quantized table,
            with or without "lora_embeddings_a" `(input_dim, rank)` and "lora_embeddings_b"
            `(rank, output_dim)`.

    Raises:
        TypeError: not an Embedding, or a float table of another dtype than the layer's.
        ValueError: an unbuilt layer, another shape, another storage format, another rank, or
            an adapter for a layer with an embeddings constraint (Keras refuses LoRA there).
            Nothing is written when a check fails.

    Example:
        >>> import os; os.environ["KERAS_BACKEND"] = "jax"
        >>> import jax, keras, numpy as np, jaxembed
        >>> from jaxembed.interop.keras import assign_to_keras
        >>> model = keras.Sequential([keras.Input((3,), dtype="int32"),
        ...                           keras.layers.Embedding(50, 4)])
        >>> params = jaxembed.init(jax.random.key(0), 50, 4)
        >>> assign_to_keras(model.layers[0], params)
        >>> ids = np.array([[1, 2, 3]])
        >>> bool((model(ids) == jaxembed.apply(params, ids)).all())
        True
    """
    _check_layer(layer, "assign_to_keras")
    table = _table.view(params)
    _table.refuse(table, "assign_to_keras")
    expected = (int(layer.input_dim), int(layer.output_dim))
    if (table.input_dim, table.output_dim) != expected:
        raise ValueError(
            f"params hold a ({table.input_dim}, {table.output_dim}) table; Keras layer "
            f"{layer.name!r} is (input_dim, output_dim) = {expected}."
        )
    fmt, layer_fmt = _quantization.quantization_format(params), _keras_format(layer)
    if fmt != layer_fmt:
        raise ValueError(
            f"params hold a {fmt or 'float'} table; Keras layer {layer.name!r} holds a "
            f"{layer_fmt or 'float'} table. Quantize the float layer in the params' format "
            "first (`layer.quantize(...)`), or pass params in the layer's format "
            "(jaxembed.quantize / jaxembed.dequantize)."
        )
    if fmt is None:
        table_dtype = np.dtype(params[_table.EMBEDDINGS].dtype)
        layer_dtype = _variable_dtype(layer._embeddings)
        if table_dtype != layer_dtype:
            raise TypeError(
                f"params['embeddings'] has dtype {table_dtype.name}; Keras layer {layer.name!r} "
                f"stores its table in {layer_dtype.name}. Cast the table "
                f"(`params['embeddings'].astype('{layer_dtype.name}')`) or build the layer with "
                f"dtype='{table_dtype.name}'."
            )
    adapter = table.adapter
    if adapter is not None and layer.lora_enabled:
        layer_rank = int(layer.lora_embeddings_a.shape[1])
        if layer_rank != adapter.rank:
            raise ValueError(
                f"params hold a rank-{adapter.rank} LoRA adapter; Keras layer {layer.name!r} "
                f"has LoRA of rank {layer_rank}."
            )
    if adapter is not None and not layer.lora_enabled and layer.embeddings_constraint:
        raise lora.refuse_constraint(f"assign_to_keras (Keras layer {layer.name!r})")
    keras_alpha = None
    if adapter is not None:
        keep = layer.lora_enabled and lora_alpha is None and not use_rslora
        keras_alpha = (
            float(layer.lora_alpha) if keep else _keras_alpha(adapter.rank, lora_alpha, use_rslora)
        )

    # Every check passed: write.
    stored = [(layer._embeddings, table.kind.keys[0])]
    if fmt is not None:
        stored.append((layer.embeddings_scale, _table.SCALE))
        if _table.ZERO in table.kind.keys:
            stored.append((layer.embeddings_zero, _table.ZERO))
    for variable, key in stored:
        variable.assign(_cast_to(variable, params[key], f"params[{key!r}]"))
    if adapter is None:
        if layer.lora_enabled:  # as Keras's load_own_variables: the delta is gone
            for variable in (layer.lora_embeddings_a, layer.lora_embeddings_b):
                variable.assign(np.zeros(variable.shape, variable.dtype))
        return
    if not layer.lora_enabled:
        layer.enable_lora(adapter.rank, lora_alpha=keras_alpha)
    layer.lora_alpha = keras_alpha  # explicitly: see the module doc on Keras's build
    layer.lora_embeddings_a.assign(_cast_to(layer.lora_embeddings_a, adapter.a, _table.LORA_A))
    layer.lora_embeddings_b.assign(_cast_to(layer.lora_embeddings_b, adapter.b, _table.LORA_B))


def to_keras(
    params: Params,
    *,
    input_dim: int | None = None,
    output_dim: int | None = None,
    embeddings_initializer: Any = "uniform",
    embeddings_regularizer: Any = None,
    embeddings_constraint: Any = None,
    mask_zero: bool = False,
    weights: Any = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    out_of_range: str = "error",
    dtype: Any = None,
    param_dtype: Any = None,
    quantization: str | None = None,
    use_rslora: bool = False,
    padding_idx: int | None = None,
    num_lora_adapters: int | None = None,
    trainable_token_ids: Any = None,
    name: str | None = None,
) -> Any:
    """A built `keras.layers.Embedding` holding params; the keywords are jaxembed's module
    arguments (pass `from_keras`'s config, or a module's, as `**config`).

    The layer is built with the params' shape, then: a float table is assigned; a quantized
    table is assigned dequantized, quantized with `layer.quantize(mode, config=...)` in the
    params' format, and its variables overwritten with the stored arrays (so the integers are
    exactly the params'); an adapter enables LoRA with its values (without one, `lora_rank`
    enables a fresh Keras adapter: A he_uniform, B zeros) and `layer.lora_alpha` is set to
    `lora_alpha` (Keras's build would reset it to the rank). The layer's outputs equal
    `jaxembed.apply(params, ids, lora_alpha=lora_alpha, dtype=dtype)`.

    Args:
        params: jaxembed params (float or quantized table, optional LoRA adapter).
        input_dim, output_dim, quantization, lora_rank: optional; when given they must agree
            with params (the table's shape, its format, the adapter's rank).
        embeddings_initializer, embeddings_regularizer, embeddings_constraint: names become
            Keras objects (jaxembed's meaning: "l1_l2" is `L1L2(0.01, 0.01)`, "constant" is
            `Constant(0.0)`); Keras objects pass through; other callable regularizers and
            constraints (jaxembed's `l2(0.1)`, say) are called on the variable's value (Keras
            serializes them by function name only, and cannot rebuild them from a config); a
            JAX callable initializer is not carried (Keras's "uniform" instead: the table
            comes from params).
        mask_zero: as Keras's.
        weights: must be None: the table is params'.
        lora_alpha, use_rslora: the adapter's scale; `use_rslora` becomes Keras's
            `lora_alpha = alpha * sqrt(rank)` (same scale, `alpha / sqrt(rank)`).
        dtype, param_dtype: the Keras dtype policy: variables in `param_dtype` (default: a float
            table's dtype, float32 for a quantized one), outputs in `dtype` (default: the
            same); float32 variables with bfloat16/float16 outputs are "mixed_bfloat16" /
            "mixed_float16".
        out_of_range, padding_idx: jaxembed-only options with no Keras counterpart; ignored.
            The padding row is exported as stored, but Keras will train it.
        num_lora_adapters, trainable_token_ids: must be None (a Keras layer holds one
            adapter and no trainable tokens): select an adapter, merge the tokens first.
        name: the Keras layer's name.

    Returns:
        A built `keras.layers.Embedding`.

    Raises:
        TypeError: `param_dtype` that is not the float table's dtype.
        ValueError: bad params, `weights` given, an argument that disagrees with params, a
            dtype pair Keras has no policy for, or a constraint with LoRA or a quantized table
            (both refused by jaxembed and Keras).

    Example:
        >>> import os; os.environ["KERAS_BACKEND"] = "jax"
        >>> import jax, numpy as np, jaxembed
        >>> from jaxembed.interop.keras import to_keras
        >>> params = jaxembed.quantize(jaxembed.init(jax.random.key(0), 100, 256), "int4",
        ...                            block_size=128)
        >>> layer = to_keras(params, mask_zero=True)
        >>> layer.dtype_policy.name, tuple(layer.embeddings_zero.shape)
        ('int4/128_from_float32', (100, 2))
        >>> ids = np.array([[1, 2, 0]])
        >>> bool((layer(ids) == jaxembed.apply(params, ids)).all())
        True
    """
    del out_of_range, padding_idx  # no Keras counterpart (documented above)
    keras = _keras()
    table = _table.view(params)
    _table.refuse(table, "to_keras")
    if num_lora_adapters is not None:  # a module's arguments: its params may be split
        raise ValueError(
            f"to_keras takes one LoRA adapter; the module stacks {num_lora_adapters}. Pick one "
            "with `jaxembed.lora.select_adapter(params, index)` and drop num_lora_adapters."
        )
    if trainable_token_ids is not None:
        raise _table.tokens_unsupported("to_keras", len(trainable_token_ids))
    for argument, value, actual in [
        ("input_dim", input_dim, table.input_dim),
        ("output_dim", output_dim, table.output_dim),
    ]:
        if value is not None and value != actual:
            raise ValueError(
                f"`{argument}`={value!r} does not match params, whose table is "
                f"({table.input_dim}, {table.output_dim})."
            )
    if weights is not None:
        raise ValueError(
            "to_keras takes the table from params; `weights` must be None. Received: weights="
            f"an array of shape {tuple(np.shape(weights))}."
        )
    fmt = _quantization.quantization_format(params)
    if quantization is not None:
        wanted = _format_of(quantization, table.output_dim)
        if wanted != fmt:
            raise ValueError(
                f"`quantization`={quantization!r} does not match params, which hold a "
                f"{fmt or 'float'} table."
            )
    if table.adapter is not None and lora_rank is not None and lora_rank != table.adapter.rank:
        raise ValueError(
            f"`lora_rank`={lora_rank!r} does not match params, whose adapter has rank "
            f"{table.adapter.rank}."
        )
    if fmt is None:
        stored = np.dtype(params[_table.EMBEDDINGS].dtype)
        if param_dtype is not None and jnp.dtype(param_dtype) != stored:
            raise TypeError(
                f"`param_dtype`={jnp.dtype(param_dtype).name} does not match params, whose "
                f"table has dtype {stored.name}. Cast the table or drop param_dtype."
            )
        variables_dtype = stored
    else:
        variables_dtype = jnp.dtype("float32" if param_dtype is None else param_dtype)
    policy = _policy_name(variables_dtype, jnp.dtype(variables_dtype if dtype is None else dtype))
    if fmt is not None and embeddings_constraint is not None:
        raise constraints.refuse_quantized("to_keras")
    if lora_rank is not None:
        lora.check_rank("lora_rank", lora_rank)
    if (table.adapter is not None or lora_rank is not None) and embeddings_constraint is not None:
        raise lora.refuse_constraint("to_keras")
    layer = keras.layers.Embedding(
        table.input_dim,
        table.output_dim,
        embeddings_initializer=_to_keras_identifier(
            "embeddings_initializer", embeddings_initializer
        )
        or "uniform",
        embeddings_regularizer=_to_keras_identifier(
            "embeddings_regularizer", embeddings_regularizer
        ),
        embeddings_constraint=_to_keras_identifier("embeddings_constraint", embeddings_constraint),
        mask_zero=mask_zero,
        dtype=policy,
        name=name,
    )
    layer.build()
    if fmt is not None:
        dense = np.asarray(table.dense()).astype(variables_dtype)
        layer._embeddings.assign(dense)
        mode, _, block = fmt.partition("/")
        config = None
        if mode == "int4":
            config = keras.quantizers.Int4QuantizationConfig(
                block_size=int(block) if block else None
            )
        layer.quantize(mode, config=config)
    assign_to_keras(layer, params, lora_alpha=lora_alpha, use_rslora=use_rslora)
    if table.adapter is None and lora_rank is not None:
        keras_alpha = _keras_alpha(lora_rank, lora_alpha, use_rslora)
        layer.enable_lora(lora_rank, lora_alpha=keras_alpha)
        layer.lora_alpha = keras_alpha
    return layer


def _format_of(quantization: str, output_dim: int) -> str | None:
    """The format string of a modules' `quantization` argument, checked ("int4/128" etc.)."""
    fmt = _quantization.parse_format(quantization, output_dim)
    return None if fmt is None else fmt.name


# --------------------------------------------------------------------------------------------
# Files: .keras archives and .weights.h5
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Layer:
    """One layer's `vars` group in a weights file."""

    path: str  # the group holding "vars" ("" for a standalone layer's file)
    name: str  # the layer's name (the group's "name" attribute, else the path's last part)
    group: Any  # the h5py "vars" group


@dataclasses.dataclass
class _Source:
    """An open weights file, with what a `.keras` archive's config says of its Embeddings."""

    h5: Any
    where: str  # for messages: "m.keras (model.weights.h5)" or "m.weights.h5"
    embedding_configs: dict[str, dict[str, Any]]  # layer name -> Keras Embedding config

    def layers(self) -> list[_Layer]:
        found: list[_Layer] = []
        h5py = _h5py()

        def visit(path: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and path.rsplit("/", 1)[-1] == _GROUP:
                found.append(_layer_of(path.rpartition("/")[0], obj))

        self.h5.visititems(visit)  # the root "vars" too (a standalone layer's), at path ""
        return [layer for layer in found if layer.path or layer.name]

    def is_embedding(self, layer: _Layer) -> bool:
        """An Embedding's layout, and an Embedding's name in the archive's config or the path
        Keras gives Embeddings in a list of layers ("embedding", "embedding_3")."""
        if _layout(layer.group) is None:
            return False
        if layer.name in self.embedding_configs:
            return True
        segment = layer.path.rsplit("/", 1)[-1]
        return re.fullmatch(r"embedding(_\d+)?", segment) is not None or layer.path == ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _layer_of(path: str, group: Any) -> _Layer:
    name = group.attrs.get("name")
    return _Layer(path, _text(name) if name is not None else path.rsplit("/", 1)[-1], group)


def _embedding_configs(config: Any) -> dict[str, dict[str, Any]]:
    """Every `{"class_name": "Embedding", "config": {...}}` in a `.keras` archive's config,
    by layer name."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            inner = node.get("config")
            if (
                node.get("class_name") == "Embedding"
                and isinstance(inner, dict)
                and isinstance(inner.get("name"), str)
            ):
                found[inner["name"]] = inner
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


@contextlib.contextmanager
def _open(path: str | pathlib.Path) -> Iterator[_Source]:
    """The weights of a `.keras` archive or a `.weights.h5` file, opened read-only."""
    h5py = _h5py()
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such Keras weights file: {str(path)!r}.")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if _WEIGHTS_IN_ARCHIVE not in names:
                raise ValueError(
                    f"{path.name} is a zip archive without {_WEIGHTS_IN_ARCHIVE} (a .keras "
                    f"archive of Keras 3 holds one). Found: {sorted(names)}."
                )
            config = json.loads(archive.read("config.json")) if "config.json" in names else {}
            with archive.open(_WEIGHTS_IN_ARCHIVE) as stream, h5py.File(stream, "r") as h5:
                yield _Source(
                    h5, f"{path.name} ({_WEIGHTS_IN_ARCHIVE})", _embedding_configs(config)
                )
        return
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(
            f"{path.name} is neither a .keras archive nor an HDF5 weights file ({error})."
        ) from None
    with h5:
        yield _Source(h5, path.name, {})


def _is_float(dataset: Any) -> bool:
    return _text(dataset.attrs.get("dtype", "")) == "bfloat16" or dataset.dtype.kind == "f"


def _layout(group: Any) -> str | None:
    """ "float", "per_row" (int8 or int4) or "grouped" for an Embedding's datasets, else None."""
    count = len(group.keys())
    if not 1 <= count <= 4 or sorted(group.keys()) != [str(i) for i in range(count)]:
        return None
    arrays = [group[str(i)] for i in range(count)]
    if not all(hasattr(array, "shape") for array in arrays):
        return None
    values = arrays[0]
    if count == 1:
        return "float" if values.ndim == 2 and _is_float(values) else None
    scale = arrays[1]
    if values.ndim != 2 or values.dtype != np.int8 or not _is_float(scale):
        return None
    if count == 2:
        return "per_row" if tuple(scale.shape) == (values.shape[0],) else None
    zero = arrays[2]
    if (
        scale.ndim != 2
        or scale.shape[0] != values.shape[0]
        or tuple(zero.shape) != tuple(scale.shape)
        or zero.dtype != np.int8
    ):
        return None
    if count == 4 and (arrays[3].ndim != 1 or not _is_float(arrays[3])):
        return None
    return "grouped"


def _read(dataset: Any) -> np.ndarray:
    """A dataset's values, bfloat16 ones (stored by Keras as 2-byte opaque) as bfloat16."""
    array = np.asarray(dataset[()])
    if _text(dataset.attrs.get("dtype", "")) == "bfloat16":
        array = array.view(jnp.bfloat16)
    return array


def _describe_group(group: Any) -> str:
    items = [
        f"{key}: {_summary(group[key])}" if hasattr(group[key], "shape") else f"{key}: a group"
        for key in sorted(group.keys())
    ]
    return "; ".join(items) or "no variables"


def _find(source: _Source, layer_name: str) -> _Layer:
    """The layer named `layer_name` (or whose group path it is), with an Embedding's layout."""
    if not isinstance(layer_name, str):
        raise TypeError(f"`layer_name` must be a str. Received: {layer_name!r}.")
    layers = source.layers()
    matches = [layer for layer in layers if layer.name == layer_name]
    if not matches:
        matches = [layer for layer in layers if layer.path == layer_name.strip("/")]
    if not matches:
        found = [layer.name for layer in layers if source.is_embedding(layer)]
        raise ValueError(f"no layer {layer_name!r} in {source.where}; found: {found}")
    if len(matches) > 1:
        paths = [layer.path for layer in matches]
        raise ValueError(
            f"{len(matches)} layers are named {layer_name!r} in {source.where}, at {paths}; "
            "pass one of these paths as layer_name."
        )
    layer = matches[0]
    if _layout(layer.group) is None:
        found = [other.name for other in layers if source.is_embedding(other)]
        raise ValueError(
            f"layer {layer_name!r} in {source.where} does not hold an Embedding's variables "
            "(a float (input_dim, output_dim) table, or Keras's int8/int4 values with scales). "
            f"Found: {_describe_group(layer.group)}. Embedding layers found: {found}"
        )
    return layer


def _fits(values: np.ndarray, qmax: int) -> bool:
    """Whether every nonzero row reaches +-qmax and no value is below -qmax: what Keras's
    symmetric abs-max per-row quantization stores."""
    if values.size == 0 or values.min() < -qmax:
        return False
    magnitudes = np.abs(values.astype(np.int16))
    row_max = magnitudes.max(axis=1)
    return bool(((row_max == qmax) | (row_max == 0)).all())


def _per_row_mode(
    values: np.ndarray, hint: str | None, config: Mapping[str, Any] | None, where: str
) -> str:
    """ "int8" or "int4" for per-row values (both are `(V, n)` int8 with `(V,)` scales on
    disk): the layer's dtype policy in an archive's config, else the caller's hint, else the
    values (raises when they fit both modes or neither)."""
    if config is not None:
        policy = config.get("dtype")
        mode = None
        if isinstance(policy, dict):
            mode = (policy.get("config") or {}).get("mode")
        elif isinstance(policy, str) and "_from_" in policy:
            mode = policy.partition("_from_")[0]
        if isinstance(mode, str) and mode.partition("/")[0] in ("int8", "int4"):
            output_dim = config.get("output_dim")
            if mode.startswith("int4") and isinstance(output_dim, int) and output_dim % 2:
                raise ValueError(
                    f"{where} is int4 with an odd output_dim={output_dim} (Keras pads a "
                    "column); jaxembed's int4 needs an even output_dim."
                )
            return mode.partition("/")[0]
    if hint is not None:
        return hint.partition("/")[0]
    candidates = [
        mode
        for mode, fits in (
            ("int8", _fits(values, 127)),
            ("int4", _fits(np.asarray(_quantized.unpack_int4(values)), 7)),
        )
        if fits
    ]
    if len(candidates) != 1:
        raise ValueError(
            f"{where} holds per-row quantized values {_summary(values)} that could be int8 "
            f"(output_dim={values.shape[1]}) or packed int4 (output_dim={2 * values.shape[1]}), "
            f"and their values fit {'both' if candidates else 'neither'}. Pass "
            'quantization="int8" or quantization="int4".'
        )
    return candidates[0]


def _params_of(source: _Source, layer: _Layer, hint: str | None) -> Params:
    where = f"layer {layer.name!r} in {source.where}"
    kind = _layout(layer.group)
    arrays = [_read(layer.group[str(i)]) for i in range(len(layer.group.keys()))]
    if kind == "float":
        return {_table.EMBEDDINGS: arrays[0]}
    values, scale = arrays[0], arrays[1]
    if kind == "per_row":
        mode = _per_row_mode(values, hint, source.embedding_configs.get(layer.name), where)
        return {_table.QUANTIZED_VALUES[mode]: values, _table.SCALE: scale}
    zero = arrays[2]
    groups = int(scale.shape[1])
    if len(arrays) == 4:  # g_idx: column // block, which gives output_dim and the block
        g_idx = arrays[3]
        output_dim = int(g_idx.shape[0])
        block = int(np.count_nonzero(g_idx == 0))
        if block == 0 or not np.array_equal(g_idx, np.arange(output_dim) // block):
            raise ValueError(
                f"{where}: its g_idx (dataset 3) is not column // block_size for any block size."
            )
    else:
        output_dim, block = 2 * int(values.shape[1]), None
    if output_dim % 2:
        raise ValueError(
            f"{where} is int4 with an odd output_dim={output_dim} (Keras pads a column); "
            "jaxembed's int4 needs an even output_dim. Use int8, or an even number of columns."
        )
    if values.shape[1] != output_dim // 2:
        raise ValueError(
            f"{where}: packed int4 values {_summary(values)} do not hold output_dim={output_dim} "
            "columns."
        )
    if block is None:
        if output_dim % groups:
            raise ValueError(
                f"{where}: {groups} groups do not divide output_dim={output_dim} into equal blocks."
            )
        block = output_dim // groups
    _check_block(block, groups, output_dim, where)
    return {_table.QUANTIZED_VALUES["int4"]: values, _table.SCALE: scale, _table.ZERO: zero}


def list_keras_embeddings(path: str | pathlib.Path) -> list[str]:
    """The names of the Embedding layers in a `.keras` archive or `.weights.h5` file.

    A layer counts when its variables have an Embedding's layout (a float 2-D table, or Keras's
    int8/int4 values with scales) and either the archive's config says it is an Embedding or
    Keras saved it at an Embedding's path in a list of layers (`.../embedding`,
    `.../embedding_3`), or it is the file's only layer (a standalone layer's file).
    `read_keras_weights` also reads layers not listed (a subclassed model's attribute, by its
    name or path) when their variables have an Embedding's layout.

    Returns:
        Layer names (the names the layers had in Keras), in the file's order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a Keras file (neither a `.keras` archive nor an HDF5 weights file).

    Example:
        >>> import os, tempfile; os.environ["KERAS_BACKEND"] = "jax"
        >>> import keras
        >>> from jaxembed.interop.keras import list_keras_embeddings
        >>> model = keras.Sequential([keras.Input((3,), dtype="int32"),
        ...     keras.layers.Embedding(50, 4, name="tokens"), keras.layers.Dense(2)])
        >>> path = os.path.join(tempfile.mkdtemp(), "model.weights.h5")
        >>> model.save_weights(path)
        >>> list_keras_embeddings(path)
        ['tokens']
    """
    with _open(path) as source:
        return [layer.name for layer in source.layers() if source.is_embedding(layer)]


def read_keras_weights(
    path: str | pathlib.Path, layer_name: str, *, quantization: str | None = None
) -> Params:
    """An Embedding layer's variables out of a saved Keras file, as jaxembed params (JAX
    arrays; h5py only, no Keras).

    Reads what the file holds: `{"embeddings": (V, D)}` for a float layer (in its dtype,
    bfloat16 included), or a quantized table (int8 `(V, D)` or packed int4 `(V, D/2)` values,
    `(V,)` or `(V, D/B)` scales, `(V, D/B)` zero points when grouped). Keras merges a LoRA
    adapter into the table when it saves, so no adapter is ever read.

    Args:
        path: a `.keras` archive (a zip holding model.weights.h5) or a `.weights.h5` file
            written by Keras (`model.save`, `model.save_weights`) or by `write_keras_weights`.
        layer_name: the layer's Keras name (`layer.name`), or its group's path in the file
            ("layers/embedding_1").
        quantization: "int8", "int4" or "int4/B" to check the format against (and to decide
            between int8 and per-row int4 when the file cannot tell: see the module doc).

    Returns:
        Params that `jaxembed.apply` and the modules take.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a Keras file, no layer of that name (the message lists the Embeddings
            found), a layer that is not an Embedding, a format jaxembed cannot hold, or one
            that is not `quantization`.

    Example:
        >>> import os, tempfile; os.environ["KERAS_BACKEND"] = "jax"
        >>> import keras, numpy as np, jaxembed
        >>> from jaxembed.interop.keras import read_keras_weights
        >>> model = keras.Sequential([keras.Input((3,), dtype="int32"),
        ...     keras.layers.Embedding(50, 4, name="tokens"), keras.layers.Dense(2)])
        >>> path = os.path.join(tempfile.mkdtemp(), "model.keras")
        >>> model.save(path)
        >>> params = read_keras_weights(path, "tokens")
        >>> params["embeddings"].shape
        (50, 4)
        >>> ids = np.array([[1, 2, 3]])
        >>> bool((jaxembed.apply(params, ids) == model.layers[0](ids)).all())
        True
    """
    hint = None if quantization is None else _checked_hint(quantization)
    with _open(path) as source:
        layer = _find(source, layer_name)
        params = _params_of(source, layer, hint)
        where = f"layer {layer.name!r} in {source.where}"
    params = {key: jnp.asarray(value) for key, value in params.items()}
    _table.view(params)
    fmt = _quantization.quantization_format(params)
    if hint is not None and hint != fmt and not (fmt and hint == fmt.partition("/")[0]):
        raise ValueError(
            f"{where} holds a {fmt or 'float'} table; quantization={quantization!r} was asked."
        )
    return params


def _checked_hint(hint: Any) -> str:
    """The `quantization=` hint, checked as the modules' argument is (a block size must be
    positive; it is matched against the file's shapes when read)."""
    _, block = _quantization.split_format(hint)
    if block is not None:
        _checks.positive_int("block_size", block)
    return hint


def _arrays_to_write(params: Params, lora_alpha: float | None, use_rslora: bool) -> list[Any]:
    """The datasets "0", "1", ... Keras's `Embedding.load_own_variables` reads, in order."""
    table = _table.view(params)
    _table.refuse(table, "write_keras_weights")
    if table.adapter is not None:  # Keras's save merges, its load zeroes A and B: merge here
        alpha = _keras_alpha(table.adapter.rank, lora_alpha, use_rslora)
        params = lora.merge_lora(params, lora_alpha=alpha)
        table = _table.view(params)
    fmt = _quantization.quantization_format(params)
    arrays = [np.asarray(params[key]) for key in table.kind.keys]
    if fmt is not None and "/" in fmt:
        block = int(fmt.partition("/")[2])
        arrays.append((np.arange(table.output_dim) // block).astype(np.float32))  # g_idx
    return arrays


def _write_dataset(group: Any, key: str, array: np.ndarray) -> None:
    if array.dtype == jnp.bfloat16:  # as Keras: 2-byte opaque, marked with a dtype attribute
        group.create_dataset(key, data=array.view(np.dtype("V2")))
        group[key].attrs["dtype"] = "bfloat16"
    else:
        group[key] = array


def write_keras_weights(
    params: Params,
    path: str | pathlib.Path,
    *,
    layer_name: str = "embedding",
    layer_path: str = "",
    mode: str = "w",
    lora_alpha: float | None = None,
    use_rslora: bool = False,
) -> None:
    """Writes params as Keras's weights of an Embedding layer, in a `.weights.h5` file that
    Keras loads (h5py only, no Keras).

    Keras stores an Embedding's variables in its `vars` group as datasets "0" (the table, or
    int8 / packed int4 values), "1" (scales), "2" (zero points) and "3" (`g_idx`, float32
    `column // block_size`) for grouped int4. An adapter in params is merged first, as
    Keras's own save does (`E + (lora_alpha / rank) * A @ B`, requantized in the table's
    format), since Keras loads no adapter. The Keras layer must have the table's format: a
    float layer of that shape, or one quantized alike (`layer.quantize("int8")`, or built with
    `dtype="int8_from_float32"`, "int4/128_from_float32", ...).

    Args:
        params: jaxembed params.
        path: a file name ending in ".weights.h5" (Keras's loader requires it).
        layer_name: the layer's name, stored as the group's "name" attribute (mode "w"); the
            layer to replace (mode "a"), as `read_keras_weights` finds it.
        layer_path: mode "w": where the layer sits in the model's weights tree. "" (default)
            for a standalone layer, loaded with `keras.saving.load_weights(layer, path)`;
            "layers/embedding" for a Sequential or functional model whose only layer with
            weights is this Embedding (`model.load_weights(path)`).
        mode: "w" writes a new file (replacing one at `path`); "a" replaces one Embedding's
            variables in an existing Keras weights file of a whole model (e.g. from
            `model.save_weights`), leaving the other layers as they are: the stored variables
            must have the shapes and dtypes of the ones written.
        lora_alpha, use_rslora: the adapter's scale when params hold one.

    Raises:
        ValueError: bad params, a path not ending in ".weights.h5", an unknown mode, or (mode
            "a") no such layer or variables of other shapes or dtypes than the file's.

    Example:
        >>> import os, tempfile; os.environ["KERAS_BACKEND"] = "jax"
        >>> import jax, keras, numpy as np, jaxembed
        >>> from jaxembed.interop.keras import write_keras_weights
        >>> params = jaxembed.quantize(jaxembed.init(jax.random.key(0), 50, 8), "int8")
        >>> path = os.path.join(tempfile.mkdtemp(), "embedding.weights.h5")
        >>> write_keras_weights(params, path)
        >>> layer = keras.layers.Embedding(50, 8, dtype="int8_from_float32")
        >>> layer.build()
        >>> keras.saving.load_weights(layer, path)
        >>> ids = np.array([[1, 2, 3]])
        >>> bool((layer(ids) == jaxembed.apply(params, ids)).all())
        True
    """
    h5py = _h5py()
    path = pathlib.Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(
            "Keras loads weights files whose names end in '.weights.h5'. Received: "
            f"path={str(path)!r}."
        )
    if mode not in ("w", "a"):
        raise ValueError(f'`mode` must be "w" or "a". Received: mode={mode!r}.')
    if not isinstance(layer_name, str) or not layer_name:
        raise ValueError(f"`layer_name` must be a non-empty str. Received: {layer_name!r}.")
    arrays = _arrays_to_write(params, lora_alpha, use_rslora)
    if mode == "w":
        with h5py.File(path, "w") as h5:
            parent = layer_path.strip("/")
            group = h5.create_group(f"{parent}/{_GROUP}" if parent else _GROUP)
            group.attrs["name"] = layer_name
            for index, array in enumerate(arrays):
                _write_dataset(group, str(index), array)
        return
    if layer_path:
        raise ValueError(
            'mode="a" finds the layer by `layer_name` in the existing file; `layer_path` is '
            f"for mode='w'. Received: layer_path={layer_path!r}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"No such Keras weights file to update: {str(path)!r}.")
    with h5py.File(path, "r+") as h5:
        source = _Source(h5, path.name, {})
        layer = _find(source, layer_name)
        group = layer.group
        stored = [group[str(i)] for i in range(len(group.keys()))]
        described = [(tuple(a.shape), _stored_dtype(a)) for a in stored]
        written = [(tuple(a.shape), str(a.dtype)) for a in arrays]
        if described != written:
            raise ValueError(
                f"layer {layer.name!r} in {path.name} holds variables "
                f"{_pairs(described)}; params give {_pairs(written)}. The datasets are "
                "overwritten in place: pass params of the layer's shape, format (int8, int4, "
                "block size) and dtype."
            )
        for index, array in enumerate(arrays):
            key = str(index)
            if array.dtype == jnp.bfloat16:
                group[key][...] = array.view(np.dtype("V2"))
            else:
                group[key][...] = array


def _stored_dtype(dataset: Any) -> str:
    return "bfloat16" if _text(dataset.attrs.get("dtype", "")) == "bfloat16" else str(dataset.dtype)


def _pairs(items: list[tuple[tuple[int, ...], str]]) -> str:
    return "[" + ", ".join(f"{i}: {shape} {dtype}" for i, (shape, dtype) in enumerate(items)) + "]"
