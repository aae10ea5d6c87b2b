"""Method name -> adapted-layer class. Each method module registers itself; nothing branches on names."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moka_train.adapters.layer import AdaptedLinear

_METHODS: dict[str, type[AdaptedLinear]] = {}
# The package whose modules register the built-in methods: every module in it is imported on first lookup
# (not at import time, to avoid import cycles), so a new method is one new module there.
_BUILTIN_METHOD_PACKAGE = "moka_train.adapters.methods"


def register_method(name: str):
    """Class decorator: ``@register_method("moka")`` makes ``AdapterConfig(method="moka")`` build that class."""

    def decorate(cls: type[AdaptedLinear]) -> type[AdaptedLinear]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"adapter method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.method = name
        _METHODS[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    package = importlib.import_module(_BUILTIN_METHOD_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{_BUILTIN_METHOD_PACKAGE}.{module.name}")


def get_method(name: str) -> type[AdaptedLinear]:
    """The layer class of a method, or a ValueError listing the known methods."""
    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; known methods: {', '.join(sorted(_METHODS))}") from None


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)
