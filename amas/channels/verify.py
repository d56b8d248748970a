"""After a cut: the cut model run once against the masked model it came from, so a model the cut breaks (a forward that
branches on channel counts, a layer Torch-Pruning cannot follow) stops in one line naming where, before anything is
saved.

The reference is the model with the mask values folded in and every dropped channel multiplied by 0 (ChannelMasks on
the same groups): what the cut must reproduce exactly. Both run in eval mode on the same seeded random batch of two.
When their outputs differ, the first module (in the reference's execution order) whose output differs where the two can
be compared (equal shapes) is named, with the ``ignore=`` that keeps it whole.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from amas.errors import PruneError

__all__ = ["check_cut"]

RTOL, ATOL = 1e-3, 1e-4  # relative to the reference's largest output magnitude (the fold reorders float sums)


def _leaf_outputs(model: nn.Module, x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor], BaseException | None]:
    """The model's output (or the exception its forward raised) and every leaf module's first tensor output by name,
    in execution order."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if name and not any(True for _ in m.children()):
            def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
                if isinstance(out, torch.Tensor) and name not in seen:
                    seen[name] = out.detach()
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(x), seen, None
    except Exception as e:  # noqa: BLE001 - a cut that crashes is reported, not raised raw
        return None, seen, e
    finally:
        for h in handles:
            h.remove()


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=RTOL, atol=ATOL * max(scale, 1.0)))


def check_cut(folded: nn.Module, cut: nn.Module, groups: list, keep: dict[str, list[int]],
              input_shape: tuple[int, ...]) -> None:
    """Raise a one-line PruneError when cut's eval output differs from folded's with the dropped channels zeroed."""
    from amas.channels.masks import ChannelMasks

    ref = copy.deepcopy(folded).eval()
    masks = ChannelMasks(groups, init=1.0)
    values = {}
    for g in groups:
        v = torch.ones(g.size)
        if g.name in keep:
            v.zero_()
            v[torch.tensor(keep[g.name], dtype=torch.long)] = 1.0
        values[g.name] = v
    masks.load_values(values)
    p = next(ref.parameters(), None)
    if p is not None:
        masks.to(p.device)
    masks.attach(ref)
    was_training = cut.training
    cut.eval()
    try:
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
        want, ref_leaves, _ = _leaf_outputs(ref, x)
        got, cut_leaves, error = _leaf_outputs(cut, x)
    finally:
        masks.detach()
        cut.train(was_training)
    wants, gots = _tensors(want), _tensors(got)
    scale = max((float(t.abs().max()) for t in wants if t.numel()), default=1.0)
    if error is None and len(wants) == len(gots) and all(_close(a, b, scale) for a, b in zip(wants, gots, strict=True)):
        return
    where = next((n for n, t in ref_leaves.items() if n in cut_leaves and t.shape == cut_leaves[n].shape
                  and not _close(t, cut_leaves[n], max(float(t.abs().max()), 1.0))), None)
    if error is not None:
        where = next(reversed(cut_leaves), None) if cut_leaves else None
        what = f"the cut model's forward fails ({type(error).__name__}: {str(error).strip().splitlines()[0][:120]})"
        at = f" after module {where!r}" if where else ""
    else:
        what = "the cut model's output differs from the masked model's"
        at = f" from module {where!r} on" if where else ""
    culprit = _last_cut_layer(folded, ref_leaves, cut_leaves, where)
    fix = (f"keep '{culprit}' whole with prune.ignore=['{culprit}'] (MaskSearch(ignore=['{culprit}']))" if culprit
           else "keep the layers whose channel counts its forward reads whole with prune.ignore")
    raise PruneError(f"{what}{at}; the forward depends on a channel count "
                     f"the cut changed: {fix}")


def _last_cut_layer(model: nn.Module, ref: dict[str, torch.Tensor], cut: dict[str, torch.Tensor],
                    before: str | None) -> str | None:
    """The last conv/linear (in execution order, before the module named before) whose output the cut narrowed."""
    found = None
    for name, t in ref.items():
        if name == before:
            break
        layer = isinstance(model.get_submodule(name), (nn.modules.conv._ConvNd, nn.Linear))
        if layer and name in cut and cut[name].shape != t.shape:
            found = name
    return found
