"""Conv+BatchNorm folding of a model copy with torch.fx, checked against the model on a random batch."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["folded_copy"]


def folded_copy(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module | None:
    """An eval-mode copy of model with each BatchNorm after a conv folded into it, or None where torch.fx cannot
    trace the model or the copy computes something else; model itself is left as it was (mode included)."""
    from torch.fx.experimental.optimization import fuse

    was_training = model.training
    model.eval()
    try:
        fused = fuse(copy.deepcopy(model))
        p = next(model.parameters())
        x = torch.randn((4, *input_shape), generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
        with torch.no_grad():
            ref, out = model(x), fused(x)
        if (not isinstance(out, torch.Tensor) or out.shape != ref.shape
                or not torch.allclose(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()) + 1e-5)):
            return None
    except Exception:  # any model torch.fx cannot trace or fuse
        return None
    finally:
        model.train(was_training)
    return fused.eval()
