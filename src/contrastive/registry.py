"""One dictionary per kind of part, filled by the ``@register`` decorator where each part is defined.

Kinds: ``methods``, ``backbones``, ``datasets``, ``modalities``. Looking up an unknown name raises a ConfigError that
lists the known ones.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from contrastive.errors import ConfigError

T = TypeVar("T")

_REGISTRIES: dict[str, dict[str, Any]] = {"methods": {}, "backbones": {}, "datasets": {}, "modalities": {}}


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator: ``@register("backbones", "resnet18")`` stores the object under that name."""
    table = _REGISTRIES[kind]

    def wrap(obj: T) -> T:
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = obj
        return obj

    return wrap


def lookup(kind: str, name: str) -> Any:
    table = _REGISTRIES[kind]
    if name not in table:
        known = ", ".join(sorted(table)) or "(none)"
        raise ConfigError(f"unknown {kind[:-1]} {name!r}; known {kind}: {known}")
    return table[name]


def names(kind: str) -> list[str]:
    return sorted(_REGISTRIES[kind])
