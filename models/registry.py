"""The architecture registry: `register(name)` adds a builder, `build(name, **kw)` calls it."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from bnfold.errors import BnfoldError

Builder = Callable[..., nn.Module]
_B = TypeVar("_B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


class UnknownModelError(BnfoldError):
    """A model name that no builder was registered under."""


def register(name: str) -> Callable[[_B], _B]:
    """Decorator: register a builder under `name`. A name can be registered once only."""
    def decorator(builder: _B) -> _B:
        if name in _REGISTRY:
            raise BnfoldError(f"model name {name!r} is already registered (by {_REGISTRY[name].__module__}."
                              f"{_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = builder
        return builder
    return decorator


def list_models() -> list[str]:
    """The registered architecture names, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_builder(name: str) -> Builder:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build an untrained `name` architecture with the builder's keyword arguments."""
    builder = get_builder(name)
    try:
        return builder(**kwargs)
    except TypeError as exc:  # an unexpected keyword: say which model refused it
        raise BnfoldError(f"model {name!r} does not accept these arguments {kwargs}: {exc}") from None


def _ensure_loaded() -> None:
    # The architecture modules register themselves on import.
    from bnfold.models import lenet, resnet, unet  # noqa: F401
