"""Model registry: constructors register by name; `create_model` builds zoo, torchvision or timm nets."""

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


def register_memory_model(model: nn.Module) -> str:
    """A name under which create_model rebuilds (an untrained-weights copy of) this in-memory model's architecture."""
    for name, m in _MEMORY.items():
        if m is model:
            return name
    name = f"{MEMORY_PREFIX}{len(_MEMORY) + 1}"
    _MEMORY[name] = model
    return name


def _memory_model(name: str) -> nn.Module:
    import copy

    model = _MEMORY.get(name)
    if model is None:
        raise AmasError(f"model {name!r} was handed to amas in another process; load the .pt2 file instead, or "
                        "pass base=YourModel(...) to amas.load_pruned")
    return copy.deepcopy(model).requires_grad_(True)


def _import_class(name: str) -> ModelFn:
    """The class (or function) 'package.module:ClassName' names, or a one-line AmasError."""
    import importlib

    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise AmasError(f"model {name!r}: module {module_name!r} does not import ({type(exc).__name__}: {exc}); "
                        "check model.name and that the package is on PYTHONPATH") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise AmasError(f"model {name!r}: module {module_name!r} has no {attr!r}; check model.name") from None
    if not callable(obj):
        raise AmasError(f"model {name!r} is not a class or function; name an nn.Module class in model.name")
    return obj


def _create_imported(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    """An importable 'package.module:ClassName' built with kwargs (num_classes/in_channels when it takes them)."""
    fn = _import_class(name)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
             if k in params and k not in kwargs}
    try:
        model = fn(**extra, **kwargs)
    except TypeError as exc:
        raise AmasError(f"model {name!r} does not accept model.kwargs {kwargs} ({exc}); fix model.kwargs") from None
    if not isinstance(model, nn.Module):
        raise AmasError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module; fix model.name")
    return model


def list_models() -> list[str]:
    """Return the sorted names of the registered zoo models (torchvision ones use 'tv:<name>', timm 'timm:<name>')."""
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
        f"'{TV_PREFIX}<name>' for any torchvision classifier, or '{TIMM_PREFIX}<name>' for any timm model"
    )


ARCH_ATTR = "amas_arch"  # the record create_model leaves on a model: what rebuilds its architecture


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build model `name` (zoo, 'tv:<name>', 'timm:<name>' or 'package.module:ClassName') for these classes/channels.

    The model carries its recipe (name, classes, channels, kwargs) in ``model.amas_arch``, so that a pruned copy of
    it can be saved with ``amas.save_pruned`` and rebuilt by ``amas.load_pruned``.
    """
    model = _build(name, num_classes, in_channels, **kwargs)
    tag_arch(model, {"name": name, "num_classes": int(num_classes), "in_channels": int(in_channels),
                     **({"kwargs": dict(kwargs)} if kwargs else {})})
    return model


def tag_arch(model: nn.Module, record: dict) -> None:
    """Record on model (a plain attribute, kept by deep copies and cuts) the recipe that rebuilds its architecture."""
    object.__setattr__(model, ARCH_ATTR, dict(record))


def arch_of(model: nn.Module) -> dict | None:
    """The architecture recipe create_model or tag_arch left on model, or None."""
    record = getattr(model, ARCH_ATTR, None)
    return dict(record) if isinstance(record, dict) else None


def _build(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    if num_classes < 1 or in_channels < 1:
        raise AmasError(
            f"model {name!r} needs num_classes >= 1 and in_channels >= 1, "
            f"got num_classes={num_classes}, in_channels={in_channels}"
        )
    if name.startswith(MEMORY_PREFIX):
        return _memory_model(name)
    if name.startswith(TIMM_PREFIX):
        from amas.models.timm_models import create_timm_model

        return create_timm_model(name[len(TIMM_PREFIX):], num_classes=num_classes, in_channels=in_channels, **kwargs)
    if ":" in name and not name.startswith(TV_PREFIX):
        return _create_imported(name, num_classes, in_channels, kwargs)
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
