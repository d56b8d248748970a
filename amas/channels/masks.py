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

**BatchNorms with a built-in activation** (timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``: batch norm, then
the ``drop`` and ``act`` children inside the module's own forward) are masked at the input of their first such
child (``mask_site``), i.e. right after the BN affine, where the cut folds the mask; multiplying the module's
output would mask after the activation, which no fold reproduces. Their conv is not masked (post-BN, as for a
plain BN). A BatchNorm subclass with its own forward is checked on a randomised copy: when masking at its site
does not equal folding the mask into its affine (a hidden non-linear step, a site shared with other modules),
its groups are left out. Groups through norm+act layers of other norms (timm's ``GroupNormAct``,
``LayerNormAct2d``) are left out as their norms are; torchvision's ``Conv2dNormActivation`` is a Sequential of
plain layers and needs nothing special.

**Grouped convolutions** (ResNeXt, RegNet) keep their ``groups``: a group through a conv with G groups (not
depthwise) removes the same position from every conv group at once, as Torch-Pruning does. Its channel ``j``
(``ChannelGroup.size`` = channels per conv group) is every root output channel ``c`` with ``c % size == j``, and
``ChannelGroup.conv_groups`` = G is the number of channels one mask entry stands for (the least common multiple
when the group passes through grouped convs of different G). The planner rounds ``G·kept`` to ``round_to``.

**Groups left out** (never masked, never pruned): groups holding the model's output units (the
classifier's logits); groups whose index mapping Torch-Pruning gets wrong or that touch layers
whose removal is not equal to masking (channel zero-padding, a grouped conv in a group whose channels are
not mapped one to one, transposed convs, LayerNorm/GroupNorm/InstanceNorm, unwrapped parameters, attention,
RNNs); groups through a split, unbind or slice of the channels (the sizes and bounds in the model's forward stay
as they are after a cut: MixNet's mixed convs); groups through a layer with per-channel tensors Torch-Pruning
does not cut (a frozen BN, which it traces as plain arithmetic; a conv or BN with extra per-channel parameters,
as NFNets' gains), or through a conv/linear subclass whose output a fold into its weights does not scale (a
hidden weight standardisation, checked on a copy); groups through a layer ``prune.ignore`` keeps whole
(``amas.channels.tracing``); groups of fewer than two channels.

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
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from amas.channels.cost import CostModel
from amas.channels.shortcut import CUSTOM_PRUNERS
from amas.channels.tracing import build_graph, is_kept_whole
from amas.errors import MaskError

__all__ = ["ChannelGroup", "ChannelMasks", "CostModel", "MaskError", "channel_dim", "find_groups", "mask_site",
           "prox_nonneg_l1"]


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


_BN = nn.modules.batchnorm._BatchNorm
_LAYER = (nn.modules.conv._ConvNd, nn.Linear)
# torch's own forwards: a subclass that keeps one has no hidden step (a BN: none after its affine)
_PLAIN_BN_FORWARDS = frozenset({_BN.forward, nn.SyncBatchNorm.forward})
_PLAIN_FORWARDS = _PLAIN_BN_FORWARDS | {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}
# the tensors Torch-Pruning's conv, linear and BN pruners cut
_CUT_TENSORS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
_SITE_CHILDREN = ("drop", "act")  # timm's norm+act layers: norm, then drop, then act


def mask_site(module: nn.Module) -> nn.Module | None:
    """The child whose input a producer's mask multiplies (timm BatchNormAct2d: drop, else act), or None: its output."""
    if not isinstance(module, _BN) or type(module).forward in _PLAIN_BN_FORWARDS:
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
    if not isinstance(module, _BN) or not module.affine:
        return False
    gen = torch.Generator().manual_seed(0)
    c = int(module.num_features)
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


def _unmaskable(model: nn.Module) -> set[nn.Module]:
    """Conv, linear and BatchNorm layers whose removal is not masking: their groups are left out.

    A layer with per-channel tensors Torch-Pruning would not cut (its own beyond weight, bias and BN statistics, or
    its children's), a BatchNorm subclass whose mask cannot be placed where the cut folds it, a conv or linear
    subclass whose output a fold into its weights does not scale.
    """
    shared = _shared_modules(model)
    out = set()
    for m in model.modules():
        if not isinstance(m, (_BN, *_LAYER)):
            continue
        own = [t for n, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))
               if n not in _CUT_TENSORS]
        if any(t.numel() > 1 for t in own):
            out.add(m)
        elif isinstance(m, _BN) and type(m).forward not in _PLAIN_BN_FORWARDS:
            site = mask_site(m)
            stateful = any(t.numel() > 1 for c in m.children() for t in (*c.parameters(), *c.buffers()))
            if stateful or (site is not None and site in shared) or not _masks_exactly(m):
                out.add(m)
        elif isinstance(m, _LAYER) and type(m).forward not in _PLAIN_FORWARDS and not _folds_exactly(m):
            out.add(m)
    return out


def _own_state(module: nn.Module) -> bool:
    """Whether module holds parameters or buffers of its own with more than one value (per-channel state)."""
    return any(t.numel() > 1 for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))


class _StateOutputs:
    """While a model runs: the autograd nodes of the outputs of its layers with per-channel state of their own."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.outputs: dict[nn.Module, list[Any]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> _StateOutputs:
        self.handles = [m.register_forward_hook(self._keep) for m in self.model.modules() if _own_state(m)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Keep the autograd nodes of module's outputs."""
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.outputs.setdefault(module, []).append(t.grad_fn)


def _through_own_norm(node: Any) -> Any:
    """The node after a BatchNorm subclass's own batch-norm op, which Torch-Pruning traces as a separate op."""
    if len(node.outputs) != 1:
        return None
    nxt = node.outputs[0]
    if isinstance(nxt.module, _BN) or "batchnorm" not in _grad_fn_name(nxt) or len(nxt.outputs) != 1:
        return None
    after = nxt.outputs[0]
    own = isinstance(after.module, _BN) and type(after.module).forward not in _PLAIN_BN_FORWARDS
    return after if own and len(after.inputs) == 1 else None


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


def _is_channel_split(node: Any) -> bool:
    """A split, unbind or slice of the channel dimension: its sizes or bounds are fixed in the model's forward."""
    name = _grad_fn_name(node)
    if not any(k in name for k in ("split", "unbind", "slice")) or "copyslices" in name:
        return False
    fn = node.grad_fn
    sizes = getattr(fn, "_saved_self_sym_sizes", None)
    dim = getattr(fn, "_saved_dim", None)
    if sizes is None or dim is None:
        return True  # cannot tell: be conservative
    ndim, dim = len(sizes), int(dim) % max(len(sizes), 1)
    if not (dim == 1 or (ndim == 3 and dim == 2)):  # NC..., or the features of a channels-last (N, L, C) tensor
        return False
    if "slice" in name:  # a slice that keeps every channel keeps them after the cut too
        start, end, step = (int(getattr(fn, f"_saved_{k}", 0) or 0) for k in ("start", "end", "step"))
        return not (start == 0 and step == 1 and end >= int(sizes[dim]))
    return True


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
                  residual: bool, unmaskable: set[nn.Module], hidden: set[Any]) -> dict | None:
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
        if _is_channel_pad(node) or is_kept_whole(node) or getattr(node, "grad_fn", None) in hidden:
            return None  # a channel zero-pad, a layer prune.ignore keeps whole (amas.channels.tracing), a frozen BN
        if _is_channel_split(node):
            return None  # split sizes or slice bounds the model's forward would keep after the cut (MixNet)
        if module in unmaskable:
            return None  # removal is not masking there (amas.channels.masks._unmaskable)
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
        bn = outs[0] if len(outs) == 1 and isinstance(outs[0].module, _BN) else _through_own_norm(node)
        if bn is not None and bn in members and names.get(bn.module) in out_nodes:
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
    ignore: module names kept whole (prune.ignore), with the channels of the layers around them (amas.channels.tracing).
    """
    input_shape = tuple(int(s) for s in input_shape)
    ignore = tuple(str(n) for n in ignore)
    with _StateOutputs(model) as notes:
        dg = build_graph(model, input_shape, ignore)
    # layers with per-channel state that Torch-Pruning traced through as plain ops (a frozen BN): it would not cut them
    hidden = {fn for m, fns in notes.outputs.items() if m not in dg.module2node for fn in fns}
    unmaskable = _unmaskable(model)
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
        rec = _group_record(dg, group, names, size, residual, unmaskable, hidden)
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
    """One mask vector per channel group, multiplied into the group's producers' outputs by forward hooks (into the
    input of a norm+act layer's activation by a forward pre-hook: mask_site)."""

    def __init__(self, groups: list[ChannelGroup], init: float = 1.0) -> None:
        super().__init__()
        self.groups = list(groups)
        self.names = [g.name for g in self.groups]
        if len(set(self.names)) != len(self.names):
            raise MaskError("channel group names are not unique; build the groups with amas.channels.masks.find_groups")
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
