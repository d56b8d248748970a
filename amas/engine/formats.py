"""Memory formats: whether a model's forward runs in the channels_last format amas trains and times in by default."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import torch
from torch import nn

from amas import distributed

__all__ = ["keep_channels_last", "runs_channels_last"]

# what torch says when a forward reshapes a channels_last feature map with .view (a user's x.view(n, -1))
_VIEW_ERROR = "view size is not compatible with input tensor's size and stride"
_SAID_CONTIGUOUS: set[str] = set()


def runs_channels_last(model: nn.Module, x: torch.Tensor, name: str | None = None) -> bool:
    """Whether model (already in the channels_last format) runs x in that format, tried once in eval mode without
    grad; False, after one printed line naming the model's class (or name), where its forward reshapes a feature map
    with .view, which channels_last strides do not allow. Any other failure is left to the real forward."""
    was_training = model.training
    model.eval()
    try:  # an FX GraphModule (the teacher's folded copy) prints its failing line to stderr: not the user's concern
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            model(x.contiguous(memory_format=torch.channels_last))
    except RuntimeError as e:
        if _VIEW_ERROR not in str(e):
            return True
        name = name or type(model).__name__
        if name not in _SAID_CONTIGUOUS and distributed.context().is_main:
            print(f"amas: {name} reshapes a feature map with .view(), which the channels_last format cannot run; "
                  "running it in the contiguous format (channels_last=false in the train sections says so up front; "
                  ".reshape or .flatten in the model's forward lets it run channels_last)", flush=True)
        _SAID_CONTIGUOUS.add(name)
        return False
    except Exception:
        return True
    finally:
        model.train(was_training)
    return True


def keep_channels_last(model: nn.Module, x: torch.Tensor, fallback: Callable[[], None]) -> bool:
    """Whether model (in the channels_last format) runs x so; if not, model goes back to the contiguous format and
    fallback() does the same for whatever runs beside it (a teacher's copy). Its parameters stay the same objects
    (an optimiser or DDP built on them keeps working)."""
    if runs_channels_last(model, x):
        return True
    model.to(memory_format=torch.contiguous_format)
    fallback()
    return False
