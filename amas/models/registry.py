"""Model registry: constructors register by name; `create_model` builds zoo or torchvision nets."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from amas.errors import AmasError

ModelFn = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFn)

TV_PREFIX = "tv:"
_REGISTRY: dict[str, ModelFn] = {}


def register_model(fn: F) -> F:
    """Register a model constructor under its function name (timm style decorator)."""
    name = fn.__name__
    old = _REGISTRY.get(name)
    # Re-registering the same function (module reload) is fine; two families using one name is a bug.
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"model {name!r} is already registered by {old.__module__}")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Return the sorted names of the registered zoo models (torchvision ones use 'tv:<name>')."""
    return sorted(_REGISTRY)


def _torchvision_names() -> list[str]:
    """Return torchvision classification model names, or [] when torchvision is unavailable."""
    try:
        from amas.models.torchvision_models import torchvision_classifiers
    except ImportError:
        return []
    return torchvision_classifiers()


def _unknown(name: str) -> AmasError:
    """Build the one-line error for an unknown model name, with the closest names."""
    zoo = list_models()
    candidates = zoo + [TV_PREFIX + n for n in _torchvision_names()]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return AmasError(
        f"unknown model {name!r}{hint}; available: {', '.join(zoo)}, "
        f"or '{TV_PREFIX}<name>' for any torchvision classifier"
    )


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build model `name` (zoo name or 'tv:<torchvision name>') for the given classes and input channels."""
    if num_classes < 1 or in_channels < 1:
        raise AmasError(
            f"model {name!r} needs num_classes >= 1 and in_channels >= 1, "
            f"got num_classes={num_classes}, in_channels={in_channels}"
        )
    if name.startswith(TV_PREFIX):
        from amas.models.torchvision_models import create_torchvision_model

        tv_name = name[len(TV_PREFIX):]
        if tv_name not in _torchvision_names():
            raise _unknown(name)
        return create_torchvision_model(tv_name, num_classes=num_classes, in_channels=in_channels, **kwargs)
    fn = _REGISTRY.get(name)
    if fn is None:
        raise _unknown(name)
    try:
        inspect.signature(fn).bind(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise AmasError(
            f"model {name!r} does not accept these options ({exc}); remove them from the model config"
        ) from None
    return fn(num_classes=num_classes, in_channels=in_channels, **kwargs)
