"""Model factory: `create_model` builds zoo, torchvision ('tv:'), timm ('timm:'), importable and in-memory models.

It looks zoo constructors up in ``amas.models.registry``; importing this module imports the zoo's family files, which
register themselves there. torchvision and timm are imported only when one of their models is built.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect

from torch import nn

from amas.errors import AmasError
from amas.models import cifar_resnet, googlenet, mobilenetv2, vgg  # noqa: F401  (registers the zoo)
from amas.models.registry import (
    MEMORY_PREFIX,
    TIMM_PREFIX,
    TV_PREFIX,
    ModelFn,
    list_models,
    memory_model,
    model_entrypoint,
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


def _memory_copy(name: str) -> nn.Module:
    model = memory_model(name)
    if model is None:
        raise AmasError(f"model {name!r} was handed to amas in another process; load the .pt2 file instead, or "
                        "pass base=YourModel(...) to amas.load_pruned")
    return copy.deepcopy(model).requires_grad_(True)


def _import_class(name: str) -> ModelFn:
    """The class (or function) 'package.module:ClassName' names, or a one-line AmasError."""
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


def create_imported(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
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


def _torchvision_names() -> list[str]:
    """Return torchvision classification, segmentation and detection model names ([] without torchvision)."""
    try:
        from amas.models.torchvision_models import (
            torchvision_classifiers,
            torchvision_detectors,
            torchvision_segmenters,
        )
    except ImportError:
        return []
    return torchvision_classifiers() + torchvision_segmenters() + torchvision_detectors()


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


def _build(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    if num_classes < 1 or in_channels < 1:
        raise AmasError(
            f"model {name!r} needs num_classes >= 1 and in_channels >= 1, "
            f"got num_classes={num_classes}, in_channels={in_channels}"
        )
    if name.startswith(MEMORY_PREFIX):
        return _memory_copy(name)
    if name.startswith(TIMM_PREFIX):
        from amas.models.timm_models import create_timm_model

        return create_timm_model(name[len(TIMM_PREFIX):], num_classes=num_classes, in_channels=in_channels, **kwargs)
    if ":" in name and not name.startswith(TV_PREFIX):
        return create_imported(name, num_classes, in_channels, kwargs)
    if name.startswith(TV_PREFIX):
        from amas.models.torchvision_models import create_torchvision_model

        tv_name = name[len(TV_PREFIX):]
        if tv_name not in _torchvision_names():
            raise _unknown(name)
        return create_torchvision_model(tv_name, num_classes=num_classes, in_channels=in_channels, **kwargs)
    fn = model_entrypoint(name)
    if fn is None:
        raise _unknown(name)
    try:
        inspect.signature(fn).bind(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise AmasError(
            f"model {name!r} does not accept these options ({exc}); remove them from the model config"
        ) from None
    return fn(num_classes=num_classes, in_channels=in_channels, **kwargs)
