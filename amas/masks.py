"""Channel groups, soft channel masks applied by forward hooks, the proximal operator, and exact MAC costs.

Channel groups come from Torch-Pruning's ``DependencyGraph``: channels coupled through residual
adds, concatenations or depthwise convs share one group, named after its root module (the first
conv/linear, in ``named_modules`` order, whose output channels the group removes). A group's
channel ``j`` is channel ``j`` of that root's output.

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

**Grouped convolutions** (ResNeXt, RegNet) keep their ``groups``: a group through a conv with G groups (not
depthwise) removes the same position from every conv group at once, as Torch-Pruning does. Its channel ``j``
(``ChannelGroup.size`` = channels per conv group) is every root output channel ``c`` with ``c % size == j``, and
``ChannelGroup.conv_groups`` = G is the number of channels one mask entry stands for (the least common multiple
when the group passes through grouped convs of different G). The planner rounds ``G·kept`` to ``round_to``.

**Groups left out** (never masked, never pruned): groups holding the model's output units (the
classifier's logits); groups whose index mapping Torch-Pruning gets wrong or that touch layers
whose removal is not equal to masking (channel zero-padding, a grouped conv in a group whose channels are
not mapped one to one, transposed convs, LayerNorm/GroupNorm/InstanceNorm, unwrapped parameters, attention,
RNNs); groups through a layer ``prune.ignore`` keeps whole (``amas.tracing``); groups of fewer than two channels.

**Option-A CIFAR ResNets.** Torch-Pruning 1.6 treats a channel zero-pad as an element-wise op and
maps channel indices across it wrongly, so any group that passes through a constant pad of the
channel dimension is left out (a wrong mapping also shows as a non one-to-one index map, the second
guard). The zoo's ``ShortcutA`` does not pad: it routes input channels to output channels by an
index vector with a per-channel scale, and ``ShortcutAPruner`` (registered with Torch-Pruning as a
custom pruner) prunes its inputs and outputs independently. By default amas still keeps the stage
(residual) channels whole and prunes each block's inner channels (``layerX.Y.conv1``), as GAL and
HRank do; ``find_groups(..., residual=True)`` (``prune.residual_channels``) adds one group per stage
(roots ``conv1``, ``layer2.0.conv2``, ``layer3.0.conv2``), whose producers are the stage's BNs and
the shortcut feeding it (its scale takes the folded mask).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from amas.channel_cost import CostModel, MaskError
from amas.shortcut_pruner import CUSTOM_PRUNERS
from amas.tracing import build_graph, is_kept_whole

__all__ = ["ChannelGroup", "ChannelMasks", "CostModel", "MaskError", "channel_dim", "find_groups", "prox_nonneg_l1"]


@dataclass
class ChannelGroup:
    """A set of coupled channels removed together; channel j is channel j of the root module's output."""

    name: str
    size: int
    producers: list[str]
    # producer module -> (channel positions in its output, the group channel of each position)
    index: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict, repr=False)
    # conv/linear layers whose output (input) channels carry the group: name -> channels per group channel
    out_layers: dict[str, int] = field(default_factory=dict, repr=False)
    in_layers: dict[str, int] = field(default_factory=dict, repr=False)
    input_shape: tuple[int, ...] = field(default=(), repr=False)
    # channels per group channel: the conv groups of the grouped convs it passes through (1 without any)
    conv_groups: int = 1
    ignore: tuple[str, ...] = field(default=(), repr=False)  # the modules kept whole when the groups were found


# ---------------------------------------------------------------- finding groups

_ALLOWED_PARAM_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)
_GATES = ("sigmoid", "hardsigmoid")


def _grad_fn_name(node: Any) -> str:
    fn = getattr(node, "grad_fn", None)
    return fn.name().lower() if fn is not None and hasattr(fn, "name") else ""


def _is_channel_pad(node: Any) -> bool:
    """A constant pad that pads the channel dimension (ShortcutA's zero-pad)."""
    if "constantpadnd" not in _grad_fn_name(node):
        return False
    pad = getattr(node.grad_fn, "_saved_pad", None)
    if pad is None:
        return True  # cannot tell: be conservative
    pad = list(pad)
    return len(pad) > 4 and any(int(p) != 0 for p in pad[4:])


def _is_gate_conv(node: Any) -> bool:
    """A conv/linear whose output runs through element-wise ops into sigmoid and then a multiply (SE gate)."""
    cur = node
    seen_gate = False
    for _ in range(8):
        if len(cur.outputs) != 1:
            return False
        cur = cur.outputs[0]
        if isinstance(cur.module, _ALLOWED_PARAM_TYPES):
            return False
        name = _grad_fn_name(cur)
        if seen_gate:
            return name.startswith("mul")
        if any(name.startswith(g) for g in _GATES):
            seen_gate = True
    return False


def _group_record(dg: tp.DependencyGraph, group: Any, names: dict[nn.Module, str], size: int,
                  residual: bool) -> dict | None:
    """Check a Torch-Pruning group and extract producers, index maps and cost bookkeeping, or None to skip it."""
    out_nodes: dict[str, Any] = {}
    index: dict[str, tuple[list[int], list[int]]] = {}
    out_layers: dict[str, int] = {}
    in_layers: dict[str, int] = {}
    members: set[Any] = set()
    conv_groups: set[int] = set()  # of the grouped (not depthwise) convs in the group
    straight = True  # every layer's channels are the root's channels, in order
    for item in group.items:
        dep, idxs = item.dep, item.idxs
        node, module = dep.target, dep.target.module
        if node.type == tp.ops.OPTYPE.OUTPUT or (not node.outputs and dg.is_out_channel_pruning_fn(dep.handler)):
            return None  # the model's output units (the traced graph's sinks)
        if node.type == tp.ops.OPTYPE.PARAMETER or isinstance(module, nn.Parameter):
            return None
        if _is_channel_pad(node) or is_kept_whole(node):
            return None  # a channel zero-pad, or a layer prune.ignore keeps whole (amas.tracing)
        roots = list(item.root_idxs)
        counts = collections.Counter(roots)
        if set(counts) != set(range(size)) or len(set(counts.values())) != 1 or len(idxs) != len(roots):
            return None  # not a uniform one-to-k index map: Torch-Pruning mapped it wrongly
        mult = next(iter(counts.values()))
        straight = straight and mult == 1 and [int(i) for i in idxs] == [int(r) for r in roots]
        if isinstance(module, tuple(CUSTOM_PRUNERS)):
            if not residual or names.get(module) is None:
                return None  # a residual stage routed through a custom shortcut: kept whole unless asked for
            if dg.is_out_channel_pruning_fn(dep.handler):  # it puts values into the group's channels: a producer
                out_nodes[names[module]] = node
                index[names[module]] = ([int(i) for i in idxs], [int(r) for r in roots])
            members.add(node)
            continue
        if not isinstance(module, _ALLOWED_PARAM_TYPES):
            if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
                return None  # a layer whose channel removal amas cannot vouch for (LayerNorm, GroupNorm, ...)
            continue
        name = names.get(module)
        if name is None:
            return None
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.transposed:
                return None
            if 1 < module.groups == module.out_channels != module.in_channels:
                return None  # Torch-Pruning prunes it as depthwise, in and out channels one to one: they are not
            if module.groups != 1 and not (module.groups == module.in_channels == module.out_channels):
                conv_groups.add(int(module.groups))
        members.add(node)
        out_fn = dg.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            layers = out_layers if out_fn else in_layers
            if name in layers and layers[name] != mult:
                return None
            layers[name] = mult
        if out_fn and not isinstance(module, nn.PReLU):
            out_nodes[name] = node
            index[name] = ([int(i) for i in idxs], [int(r) for r in roots])
    producers = []
    for name, node in out_nodes.items():
        module = node.module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not module.affine:
                return None  # a mask could not be folded into it
            producers.append(name)
            continue
        outs = node.outputs
        if (len(outs) == 1 and outs[0] in members and isinstance(outs[0].module, nn.modules.batchnorm._BatchNorm)
                and names.get(outs[0].module) in out_nodes):
            continue  # masked after its BN
        if _is_gate_conv(node):
            continue
        producers.append(name)
    if not producers:
        return None
    rec = {"index": {p: index[p] for p in producers}, "out_layers": out_layers, "in_layers": in_layers,
           "conv_groups": 1}
    return _by_conv_group(rec, conv_groups, size, straight) if conv_groups else rec


def _by_conv_group(rec: dict, conv_groups: set[int], size: int, straight: bool) -> dict | None:
    """A group through grouped convs, as one channel per position in a conv group (removed from every conv group)."""
    import math

    g = math.lcm(*conv_groups)
    if not straight or size % g or size // g < 2:
        return None  # channels not mapped one to one, or conv groups that do not split the channels evenly
    width = size // g
    return {"index": {p: (pos, [r % width for r in roots]) for p, (pos, roots) in rec["index"].items()},
            "out_layers": {n: k * g for n, k in rec["out_layers"].items()},
            "in_layers": {n: k * g for n, k in rec["in_layers"].items()}, "conv_groups": g}


def find_groups(model: nn.Module, input_shape: tuple[int, int, int], residual: bool = False,
                ignore: Sequence[str] = ()) -> list[ChannelGroup]:
    """Prunable channel groups of model (Torch-Pruning DependencyGraph), in named_modules order of their roots.

    residual: also the residual-stage groups that run through the zoo's option-A shortcut (ShortcutA).
    ignore: module names kept whole (prune.ignore), with the channels of the layers around them (amas.tracing).
    """
    input_shape = tuple(int(s) for s in input_shape)
    ignore = tuple(str(n) for n in ignore)
    dg = build_graph(model, input_shape, ignore)
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    found: dict[str, ChannelGroup] = {}
    for group in dg.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        outs = [it.dep.target.module for it in group.items
                if dg.is_out_channel_pruning_fn(it.dep.handler)
                and isinstance(it.dep.target.module, (nn.modules.conv._ConvNd, nn.Linear))
                and it.dep.target.module in names]
        if not outs:
            continue
        root = min(outs, key=lambda m: order[names[m]])
        pruner = dg.get_pruner_of_module(root)
        size = int(pruner.get_out_channels(root))
        if size < 2 or names[root] in found:
            continue
        if group.items[0].dep.target.module is not root:
            group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(size)))
        rec = _group_record(dg, group, names, size, residual)
        if rec is None:
            continue
        found[names[root]] = ChannelGroup(
            name=names[root], size=size // rec["conv_groups"], producers=sorted(rec["index"], key=order.__getitem__),
            index=rec["index"], out_layers=rec["out_layers"], in_layers=rec["in_layers"], input_shape=input_shape,
            conv_groups=rec["conv_groups"], ignore=ignore,
        )
    return sorted(found.values(), key=lambda g: order[g.name])


# ---------------------------------------------------------------- masks


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "process_group") else model


class ChannelMasks(nn.Module):
    """One mask vector per channel group, multiplied into the group's producers' outputs by forward hooks."""

    def __init__(self, groups: list[ChannelGroup], init: float = 1.0) -> None:
        super().__init__()
        self.groups = list(groups)
        self.names = [g.name for g in self.groups]
        if len(set(self.names)) != len(self.names):
            raise MaskError("channel group names are not unique; build the groups with amas.masks.find_groups")
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

    def _hook(self, producer: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            """Multiply the producer's output channels by their masks."""
            dim = channel_dim(module, output)
            s = self.scale(producer, output.shape[dim], output)
            return output * s.view(-1, *([1] * (output.dim() - 1 - dim % output.dim())))

        hook._amas_mask_hook = True  # type: ignore[attr-defined]
        return hook

    def attach(self, model: nn.Module) -> None:
        """Register the forward hooks on the producers of every group (detaches earlier hooks first)."""
        self.detach()
        net = _unwrap(model)
        for prod in self._plan:
            try:
                module = net.get_submodule(prod)
            except AttributeError:
                raise MaskError(
                    f"the model has no module '{prod}' that the masks expect; build the masks from this model's groups"
                ) from None
            self._handles.append(module.register_forward_hook(self._hook(prod)))

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


def remove_mask_hooks(model: nn.Module) -> None:
    """Remove every amas mask hook from model's modules (e.g. on a deep copy of a masked model)."""
    for m in model.modules():
        for key, fn in list(m._forward_hooks.items()):
            if getattr(fn, "_amas_mask_hook", False):
                del m._forward_hooks[key]


def prox_nonneg_l1(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Proximal operator of t·|x| + [x >= 0]: clamp(x - t, min=0)."""
    return torch.clamp(x - threshold, min=0)
