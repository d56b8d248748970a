"""Any timm model by name ('timm:<name>'), with random weights, for the dataset's classes and input channels.

timm is an optional extra (``pip install amas[timm]``): it is imported only when a 'timm:' model is built.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from types import ModuleType

from torch import nn

from amas.errors import AmasError
from amas.models.registry import TIMM_PREFIX


def _timm() -> ModuleType:
    """The timm package, or a one-line AmasError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise AmasError("'timm:' models need timm, which is not installed; pip install amas[timm]") from None
    return timm


@lru_cache(maxsize=1)
def timm_models() -> list[str]:
    """Return the names of timm's models (architectures, without pretrained tags)."""
    return sorted(_timm().list_models())


def create_timm_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build timm model `name` without pretrained weights for `num_classes` and `in_channels`."""
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(TIMM_PREFIX + c) for c in close)}?)" if close else ""
        raise AmasError(f"unknown timm model {TIMM_PREFIX + name!r}{hint}; see timm.list_models() for the names")
    if "pretrained" in kwargs or "num_classes" in kwargs or "in_chans" in kwargs:
        raise AmasError(f"model.kwargs of {TIMM_PREFIX + name!r} may not set pretrained, num_classes or in_chans (amas "
                        "builds random weights for the dataset's classes and channels); remove them, and load trained "
                        "weights as a plain state_dict teacher")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        why = " ".join(str(exc).split())
        raise AmasError(f"timm model {name!r} rejected its options: {why}; fix model.kwargs") from None
