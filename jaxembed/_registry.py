"""Keras identifiers -> functions: the one resolver behind `initializers.get`,
`regularizers.get` and `constraints.get`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from jaxembed import _checks


def _snake_case(name: str) -> str:
    """Keras class names ("RandomUniform", "L1L2", "MaxNorm") -> their snake names."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def resolve(
    argument: str,
    identifier: Any,
    factories: Mapping[str, Callable[[], Any]],
    aliases: Mapping[str, str],
) -> Any:
    """A Keras-style identifier -> a function: a name (snake or CamelCase, or an alias) is
    built by its factory with Keras's defaults; a callable passes through; else ValueError.
    """
    if isinstance(identifier, str):
        for name in (identifier, _snake_case(identifier)):
            name = aliases.get(name, name)
            if name in factories:
                return factories[name]()
    elif callable(identifier):
        return identifier
    valid = sorted({*factories, *aliases})
    if isinstance(identifier, str):
        raise ValueError(
            f"Unknown `{argument}`: {identifier!r}. Expected one of {valid} (or their Keras "
            "class names), or a callable."
        )
    raise ValueError(
        f"`{argument}` must be one of {valid} or a callable. "
        f"Received: {argument}={_checks.describe(identifier)}."
    )


@dataclasses.dataclass(frozen=True)
class Bound:
    """`function(*arguments, x)`: a built-in regularizer or constraint with its
    hyperparameters, compared and hashed by value. Two layers given `l2(0.1)` (or "l2")
    then have equal configs: one NNX graphdef and one jit trace, where closures would
    differ by identity."""

    name: str
    function: Callable[..., Any]
    arguments: tuple[Any, ...] = ()

    def __call__(self, x: Any) -> Any:
        return self.function(*self.arguments, x)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(map(repr, self.arguments))})"
