"""The docstrings are the API reference (help(), Sphinx): every public object has an example
that asserts something, and help() shows real signatures with the example near the top."""

import ast
import doctest
import importlib
import inspect
import pydoc
import textwrap

import pytest

import jaxembed
import jaxembed.nnx
from jaxembed import _config

MODULES = [
    "jaxembed",
    *(f"jaxembed.{name}" for name in jaxembed.__all__ if inspect.ismodule(getattr(jaxembed, name))),
    "jaxembed.interop.keras",
    "jaxembed.interop.peft",
    "jaxembed.interop.torch",
]

CLASSES = [jaxembed.Embedding, jaxembed.nnx.Embedding]
NOT_FOR_USERS = {"setup"}  # flax's hook: it declares the variables, nobody calls it


def _public_objects():
    """(name, object) of every function and class in the `__all__` of every public module
    (type aliases and constants are neither), each once."""
    seen = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isfunction(value) or inspect.isclass(value):
                seen.setdefault(id(value), (f"{module_name}.{name}", value))
    return sorted(seen.values(), key=lambda pair: pair[0])


def _public_methods():
    """(name, object) of the public methods and properties of the Embedding classes."""
    found = []
    for cls in CLASSES:
        for name, value in vars(cls).items():
            if (name.startswith("_") and name != "__call__") or name in NOT_FOR_USERS:
                continue
            if isinstance(value, property | classmethod) or inspect.isfunction(value):
                found.append((f"{cls.__module__}.{cls.__qualname__}.{name}", getattr(cls, name)))
    return found


PUBLIC = _public_objects() + _public_methods()


def _examples(obj):
    doc = inspect.getdoc(obj) or ""
    return doctest.DocTestParser().get_examples(doc)


def test_the_sweep_finds_the_api():
    names = {name for name, _ in PUBLIC}
    assert "jaxembed.apply" in names  # the package's re-export, listed once
    assert "jaxembed.nnx.Embedding" in names
    assert "jaxembed.linen.Embedding.attend" in names
    assert "jaxembed.nnx.Embedding.lora_rank" in names
    assert "jaxembed.interop.keras.from_keras" in names
    assert len(PUBLIC) > 100


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_every_public_object_has_an_example_that_checks_something(name, obj):
    examples = _examples(obj)
    assert examples, f"{name}: no '>>>' example in its docstring"
    assert any(example.want.strip() for example in examples), (
        f"{name}: its example shows no output (print a value or a `True`)"
    )


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_module_docstring_has_an_example(module_name):
    module = importlib.import_module(module_name)
    assert ">>>" in (module.__doc__ or ""), module_name


FUNCTIONS = [(name, obj) for name, obj in PUBLIC if inspect.isroutine(obj)]


@pytest.mark.parametrize("name, obj", FUNCTIONS, ids=[name for name, _ in FUNCTIONS])
def test_functions_that_raise_document_it(name, obj):
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    if any(isinstance(node, ast.Raise) for node in ast.walk(tree)):
        assert "Raises:" in inspect.getdoc(obj), f"{name} raises but has no Raises: section"


def test_nnx_signature_is_the_constructors():
    signature = inspect.signature(jaxembed.nnx.Embedding)
    names = list(signature.parameters)
    assert names[:2] == ["input_dim", "output_dim"]
    assert set(names) == {*_config.NAMES, "rngs"}
    assert signature.parameters["rngs"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "args" not in names and "kwargs" not in names


def test_nnx_instance_signature_stays_the_calls():
    from flax import nnx

    layer = jaxembed.nnx.Embedding(10, 4, rngs=nnx.Rngs(0))
    assert list(inspect.signature(layer).parameters) == ["ids", "adapter_ids"]


def test_nnx_subclass_shows_its_own_constructor():
    from flax import nnx

    class Scaled(jaxembed.nnx.Embedding):
        def __init__(self, input_dim, *, scale=2.0, rngs):
            super().__init__(input_dim, 4, rngs=rngs)
            self.scale = scale

    assert list(inspect.signature(Scaled).parameters) == ["input_dim", "scale", "rngs"]
    assert Scaled(10, rngs=nnx.Rngs(0)).scale == 2.0


@pytest.mark.parametrize("cls", CLASSES, ids=["linen", "nnx"])
def test_help_shows_the_signature_and_an_example_first(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "Embedding(input_dim" in text
    assert "(*args" not in text.split("|  Methods defined here:")[0]
    doc = inspect.getdoc(cls)
    assert ">>>" in doc
    assert doc.index(">>>") < doc.index("Args:" if "Args:" in doc else "Attributes:")
    assert text.index(">>>") < text.index("input_dim: vocabulary size")
