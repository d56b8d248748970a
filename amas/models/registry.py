"""Model registry: constructors register by name, and are looked up by name; nothing here builds a model.

``amas.models.factory.create_model`` builds zoo, torchvision, timm, importable and in-memory models; the family files
(cifar_resnet, vgg, ...) register their constructors here with ``@register_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

ModelFn = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFn)

TV_PREFIX = "tv:"
TIMM_PREFIX = "timm:"  # amas.models.timm_models (timm is an optional extra, imported when used)
MEMORY_PREFIX = "memory:"
_REGISTRY: dict[str, ModelFn] = {}
# models handed to amas in memory (amas.prune), by name: their architecture is rebuilt as a copy of the model
_MEMORY: dict[str, nn.Module] = {}


def register_model(fn: F) -> F:
    """Register a model constructor under its function name (timm style decorator)."""
    name = fn.__name__
    old = _REGISTRY.get(name)
    # Re-registering the same function (module reload) is fine; two families using one name is a bug.
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"model {name!r} is already registered by {old.__module__}")
    _REGISTRY[name] = fn
    return fn


def model_entrypoint(name: str) -> ModelFn | None:
    """The constructor registered under name, or None."""
    return _REGISTRY.get(name)


def list_models() -> list[str]:
    """Return the sorted names of the registered zoo models (torchvision ones use 'tv:<name>', timm 'timm:<name>')."""
    return sorted(_REGISTRY)


def register_memory_model(model: nn.Module) -> str:
    """A name under which create_model rebuilds (an untrained-weights copy of) this in-memory model's architecture."""
    for name, m in _MEMORY.items():
        if m is model:
            return name
    name = f"{MEMORY_PREFIX}{len(_MEMORY) + 1}"
    _MEMORY[name] = model
    return name


def memory_model(name: str) -> nn.Module | None:
    """The in-memory model registered under name in this process, or None."""
    return _MEMORY.get(name)
