"""Soft channel masks applied by forward hooks, where a mask goes in a layer (mask_site), which layers a mask
reproduces exactly, and the proximal operator.

**Masks and producers.** ``ChannelMasks`` holds one vector per group and multiplies it into the
output of each of the group's *producers*: every module that can put a non-zero value into one of
the group's channels. That is every BatchNorm in the group (including BNs that read a
concatenation further down, as in DenseNet), and every conv/linear whose output channels the
group removes, except (a) a conv/linear whose only consumer is a BN of the group (the BN is masked
instead, "post-BN") and (b) the excitation conv of a squeeze-excitation gate (conv → sigmoid →
multiply), whose channel is already zero when the main path is. Because every producer's output is
multiplied by the mask, a mask value of 0 is exactly the removal of the channel, and a non-zero
value folds exactly into the producer's weights (BN weight and bias, or conv/linear weight and
bias). This assumes activations map 0 to 0 between producers and consumers (ReLU, ReLU6, SiLU,
GELU, Hardswish do; a plain sigmoid activation would not).

**BatchNorms with a built-in activation** (timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``: batch norm, then
the ``drop`` and ``act`` children inside the module's own forward) are masked at the input of their first such
child (``mask_site``), i.e. right after the BN affine, where the cut folds the mask; multiplying the module's
output would mask after the activation, which no fold reproduces. Their conv is not masked (post-BN, as for a
plain BN). A BatchNorm subclass with its own forward is checked on a randomised copy: when masking at its site
does not equal folding the mask into its affine (a hidden non-linear step, a site shared with other modules),
its groups are left out. Groups through norm+act layers of other norms (timm's ``GroupNormAct``,
``LayerNormAct2d``) are left out as their norms are; torchvision's ``Conv2dNormActivation`` is a Sequential of
plain layers and needs nothing special.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from amas.channels.bake import bakeable
from amas.channels.frozen_norms import is_frozen_norm
from amas.errors import MaskError

if TYPE_CHECKING:
    from amas.channels.group import ChannelGroup

__all__ = ["PLAIN_BN_FORWARDS", "BatchNormBase", "ChannelMasks", "channel_dim", "mask_site", "prox_nonneg_l1",
           "remove_mask_hooks", "unmaskable_modules"]


# ---------------------------------------------------------------- where masks go

BatchNormBase = nn.modules.batchnorm._BatchNorm  # every BatchNorm class: 1d/2d/3d, SyncBatchNorm, subclasses
_LAYER = (nn.modules.conv._ConvNd, nn.Linear)
# torch's own forwards: a subclass that keeps one has no hidden step (a BN: none after its affine)
PLAIN_BN_FORWARDS = frozenset({BatchNormBase.forward, nn.SyncBatchNorm.forward})
_PLAIN_FORWARDS = PLAIN_BN_FORWARDS | {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}
# the tensors Torch-Pruning's conv, linear and BN pruners cut
_CUT_TENSORS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
_SITE_CHILDREN = ("drop", "act")  # timm's norm+act layers: norm, then drop, then act


def mask_site(module: nn.Module) -> nn.Module | None:
    """The child whose input a producer's mask multiplies (timm BatchNormAct2d: drop, else act), or None: its output."""
    if not (isinstance(module, BatchNormBase) or is_frozen_norm(module)) or type(module).forward in PLAIN_BN_FORWARDS:
        return None
    for attr in _SITE_CHILDREN:
        child = module._modules.get(attr)
        if isinstance(child, nn.Module):
            return child
    return None


def _shared_modules(model: nn.Module) -> set[nn.Module]:
    """Modules registered under more than one name (reachable from more than one parent)."""
    seen = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {m for m in model.modules() if seen[id(m)] > 1}


def _probe_shape(module: nn.Module, channels: int) -> tuple[int, ...]:
    if isinstance(module, nn.BatchNorm1d):
        return (2, channels, 3)
    if isinstance(module, nn.BatchNorm3d):
        return (2, channels, 2, 2, 2)
    return (2, channels, 3, 3)


def _masks_exactly(module: nn.Module) -> bool:
    """Whether masking a BatchNorm subclass at its mask_site equals folding the mask into its affine (eval mode),
    and a zero mask silences the channel (an activation inside that maps 0 elsewhere, as sigmoid, does not).

    Probed in float64 on a randomised copy (wide weights, biases, statistics and inputs, so a hidden clamp or
    activation shows), with mask values in [0, 1.5) and exact zeros.
    """
    if not (isinstance(module, BatchNormBase) and module.affine or is_frozen_norm(module)):
        return False
    gen = torch.Generator().manual_seed(0)
    c = int(module.weight.shape[0])
    try:
        probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
        for m in probe.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        with torch.no_grad():
            probe.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 4 - 2)
            probe.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 2)
            if probe.running_mean is not None and probe.running_var is not None:
                probe.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
                probe.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            mask = torch.rand(c, generator=gen, dtype=torch.float64) * 1.5
            mask[::3] = 0.0
            x = torch.randn(_probe_shape(module, c), generator=gen, dtype=torch.float64) * 3
            folded = copy.deepcopy(probe)
            folded.weight.mul_(mask)
            folded.bias.mul_(mask)
            want = folded(x.clone())
            handle = _mask_hook(probe, lambda channels, like: mask.to(like))
            try:
                got = probe(x.clone())
            finally:
                handle.remove()
    except Exception:  # a layer that cannot be probed cannot be vouched for either
        return False
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(got, want, 1e-9, 1e-9):
        return False
    return bool((got.index_select(1, torch.nonzero(mask == 0).flatten()) == 0).all())  # zero mask: removed channel


def _folds_exactly(module: nn.Module) -> bool:
    """Whether folding a mask into a conv/linear subclass's weight and bias equals multiplying its output by it.

    Probed in float64 on a copy with mask values in [0, 1.5) and exact zeros; a hidden weight standardisation
    (timm's StdConv2d) undoes the fold and fails.
    """
    gen = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
        for m in probe.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        if isinstance(probe, nn.Linear):
            shape: tuple[int, ...] = (2, probe.in_features)
        else:
            shape = (2, probe.in_channels, *([5] * len(probe.kernel_size)))
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            out = probe(x)
            dim = channel_dim(probe, out)
            mask = torch.rand(out.shape[dim], generator=gen, dtype=torch.float64) * 1.5
            mask[::3] = 0.0
            probe.weight.mul_(mask.view(-1, *([1] * (probe.weight.dim() - 1))))
            if probe.bias is not None:
                probe.bias.mul_(mask)
            got = probe(x)
    except Exception:  # a layer that cannot be probed cannot be vouched for either
        return False
    return bool(torch.allclose(got, _times(out, mask, dim), rtol=1e-9, atol=1e-9))


def unmaskable_modules(model: nn.Module) -> set[nn.Module]:
    """Conv, linear and BatchNorm layers whose removal is not masking: their groups are left out.

    A layer with per-channel tensors Torch-Pruning would not cut (its own beyond weight, bias and BN statistics, or
    its children's), a BatchNorm subclass whose mask cannot be placed where the cut folds it, a conv or linear
    subclass whose output a fold into its weights does not scale; not a conv that computes its weight in forward
    where a plain conv reproduces it (amas.channels.bake: the cut bakes it first).
    """
    shared = _shared_modules(model)
    out = set()
    for m in model.modules():
        if is_frozen_norm(m):  # a unit of its own (amas.channels.frozen_norms); a norm+act must mask exactly
            if any(True for _ in m.children()) and (mask_site(m) in shared or not _masks_exactly(m)):
                out.add(m)
            continue
        if not isinstance(m, (BatchNormBase, *_LAYER)):
            continue
        own = [t for n, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))
               if n not in _CUT_TENSORS]
        if isinstance(m, _LAYER) and (any(t.numel() > 1 for t in own) or type(m).forward not in _PLAIN_FORWARDS) \
                and bakeable(m):
            continue  # it computes its weight (weight standardisation): the cut bakes it into a plain conv first
        if any(t.numel() > 1 for t in own):
            out.add(m)
        elif isinstance(m, BatchNormBase) and type(m).forward not in PLAIN_BN_FORWARDS:
            site = mask_site(m)
            stateful = any(t.numel() > 1 for c in m.children() for t in (*c.parameters(), *c.buffers()))
            if stateful or (site is not None and site in shared) or not _masks_exactly(m):
                out.add(m)
        elif isinstance(m, _LAYER) and type(m).forward not in _PLAIN_FORWARDS and not _folds_exactly(m):
            out.add(m)
    return out



def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "process_group") else model


class ChannelMasks(nn.Module):
    """One mask vector per channel group, multiplied into the group's producers' outputs by forward hooks (into the
    input of a norm+act layer's activation by a forward pre-hook: mask_site)."""

    def __init__(self, groups: list[ChannelGroup], init: float = 1.0) -> None:
        super().__init__()
        self.groups = list(groups)
        self.names = [g.name for g in self.groups]
        if len(set(self.names)) != len(self.names):
            raise MaskError(
                "channel group names are not unique; build the groups with amas.channels.groups.find_groups")
        self.masks = nn.ParameterList([nn.Parameter(torch.full((g.size,), float(init))) for g in self.groups])
        # producer -> [(group position, channel positions or None for 'all, in order', group channels)]
        plan: dict[str, list[tuple[int, list[int] | None, list[int]]]] = collections.defaultdict(list)
        for gi, g in enumerate(self.groups):
            for prod in g.producers:
                pos, roots = g.index.get(prod, (list(range(g.size)), list(range(g.size))))
                plan[prod].append((gi, pos, roots))
        self._plan = dict(plan)
        # producers whose output channels are exactly one group's channels, in order: multiply by the mask as is
        self._direct = {
            prod: entries[0][0]
            for prod, entries in self._plan.items()
            if len(entries) == 1 and entries[0][1] == entries[0][2] == list(range(self.groups[entries[0][0]].size))
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._index_cache: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _indices(self, prod: str, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (prod, k, str(device))
        hit = self._index_cache.get(key)
        if hit is None:
            _, pos, roots = self._plan[prod][k]
            hit = (
                torch.tensor(pos, dtype=torch.long, device=device),
                torch.tensor(roots, dtype=torch.long, device=device),
            )
            self._index_cache[key] = hit
        return hit

    def scale(self, producer: str, channels: int, like: torch.Tensor) -> torch.Tensor:
        """The per-channel multiplier of producer's output (1 where no group's channel sits)."""
        gi = self._direct.get(producer)
        if gi is not None and self.groups[gi].size == channels:
            return self.masks[gi].to(like.dtype)
        entries = self._plan[producer]
        s = torch.ones(channels, device=like.device, dtype=like.dtype)
        for k, (gi, _, _) in enumerate(entries):
            pos_t, roots_t = self._indices(producer, k, like.device)
            s = s.index_copy(0, pos_t, self.masks[gi].to(like.dtype).index_select(0, roots_t))
        return s

    def attach(self, model: nn.Module) -> None:
        """Register the mask hooks on the producers of every group (detaches earlier hooks first)."""
        self.detach()
        net = _unwrap(model)
        for prod in self._plan:
            try:
                module = net.get_submodule(prod)
            except AttributeError:
                raise MaskError(
                    f"the model has no module '{prod}' that the masks expect; build the masks from this model's groups"
                ) from None
            self._handles.append(_mask_hook(module, lambda channels, like, prod=prod: self.scale(prod, channels, like)))

    def detach(self) -> None:
        """Remove the hooks (the model runs unmasked again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def values(self) -> dict[str, torch.Tensor]:
        """Group name -> detached copy of its mask."""
        return {n: m.detach().clone() for n, m in zip(self.names, self.masks, strict=True)}

    def load_values(self, values: dict[str, torch.Tensor]) -> None:
        """Copy mask values by group name (every group must be present with the right size)."""
        missing = [n for n in self.names if n not in values]
        extra = [n for n in values if n not in self.names]
        if missing or extra:
            what = f"missing {missing[0]!r}" if missing else f"unknown {extra[0]!r}"
            raise MaskError(f"mask values do not match the channel groups ({what}); load masks saved for this model")
        with torch.no_grad():
            for n, m in zip(self.names, self.masks, strict=True):
                v = torch.as_tensor(values[n])
                if v.shape != m.shape:
                    raise MaskError(
                        f"mask {n!r} has shape {tuple(v.shape)}, the group needs {tuple(m.shape)}; load masks "
                        f"saved for this model"
                    )
                m.copy_(v.to(m.device, m.dtype))


def channel_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dimension of module's output that holds its channels: the last for a linear layer, else dimension 1.

    A linear layer on an (N, H, W, C) tensor (ConvNeXt's channels-last blocks) has its features last.
    """
    return -1 if isinstance(module, nn.Linear) or output.dim() < 2 else 1


def _times(x: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
    """x with its channels (dimension dim) multiplied by s."""
    return x * s.view(-1, *([1] * (x.dim() - 1 - dim % x.dim())))


def _mask_hook(producer: nn.Module, scale: Callable[[int, torch.Tensor], torch.Tensor]) -> Any:
    """Multiply scale(channels, like) into producer's output channels, or into the input of its mask_site."""
    site = mask_site(producer)
    if site is None:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            """Multiply the producer's output channels by their masks."""
            dim = channel_dim(module, output)
            return _times(output, scale(output.shape[dim], output), dim)

        hook._amas_mask_hook = True  # type: ignore[attr-defined]
        return producer.register_forward_hook(hook)

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        """Multiply the channels of the BN's affine output by their masks, before its drop and activation."""
        x = args[0]
        return (_times(x, scale(x.shape[1], x), 1), *args[1:])

    pre_hook._amas_mask_hook = True  # type: ignore[attr-defined]
    return site.register_forward_pre_hook(pre_hook)


def remove_mask_hooks(model: nn.Module) -> None:
    """Remove every amas mask hook from model's modules (e.g. on a deep copy of a masked model)."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key, fn in list(hooks.items()):
                if getattr(fn, "_amas_mask_hook", False):
                    del hooks[key]


def prox_nonneg_l1(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Proximal operator of t·|x| + [x >= 0]: clamp(x - t, min=0)."""
    return torch.clamp(x - threshold, min=0)
