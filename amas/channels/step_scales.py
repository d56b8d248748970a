"""Fine-tuning a searched cut at the step sizes the search trained it with.

During the search a channel's BN output is multiplied by its mask m, so an SGD step on that BN's weight or bias
moves the channel's output by lr·m²·g. The cut folds m into the BN parameters (w' = m·w), after which the same
step moves it by lr·g: a channel whose mask ended at 0.3 suddenly learns eleven times faster. Scaling the folded
parameters' gradients by m² (capped at 1, so no channel learns slower than plain fine-tuning would let it) keeps
the search's step sizes across the cut; weight decay needs no change (it shrinks w' at the rate it shrank m·w).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["folded_mask_scales", "scale_folded_grads"]


def folded_mask_scales(folded: nn.Module, plain: nn.Module) -> dict[str, torch.Tensor]:
    """Per BN module of a cut: the mask folded into each channel (folded BN weight over the unfolded cut's)."""
    plain_bn = dict(plain.named_modules())
    scales: dict[str, torch.Tensor] = {}
    for name, module in folded.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.weight is None:
            continue
        ref = plain_bn.get(name)
        if ref is None or ref.weight is None or ref.weight.shape != module.weight.shape:
            continue
        w, w0 = module.weight.detach(), ref.weight.detach()
        m = torch.ones_like(w)
        live = w0.abs() > 1e-12  # a channel whose BN weight is zero carries no mask to recover
        m[live] = w[live] / w0[live]
        if not torch.allclose(m, torch.ones_like(m)):
            scales[name] = m.abs().clone()
    return scales


def scale_folded_grads(model: nn.Module, scales: dict[str, torch.Tensor], cap: float = 1.0) -> list:
    """Multiply the gradients of each scaled BN's weight and bias by min(m², cap); returns the hook handles."""
    handles = []
    modules = dict(model.named_modules())
    for name, m in scales.items():
        module = modules.get(name)
        if module is None:
            continue
        factor = (m.float() ** 2).clamp(max=cap)
        for p in (module.weight, module.bias):
            if p is not None and p.shape == factor.shape:
                f = factor.to(p.device, p.dtype)
                handles.append(p.register_hook(lambda g, f=f: g * f.to(g.device, g.dtype)))
    return handles
