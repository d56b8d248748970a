"""Channel groups: the sets of coupled channels a cut removes together, found on Torch-Pruning's dependency graph.

Channel groups come from Torch-Pruning's ``DependencyGraph``: channels coupled through residual
adds, concatenations or depthwise convs share one group, named after its root module (the first
conv/linear, in ``named_modules`` order, whose output channels the group removes). A group's
channel ``j`` is channel ``j`` of that root's output.

**Grouped convolutions** (ResNeXt, RegNet) keep their ``groups``: a group through a conv with G groups (not
depthwise) removes the same position from every conv group at once, as Torch-Pruning does. Its channel ``j``
(``ChannelGroup.size`` = channels per conv group) is every root output channel ``c`` with ``c % size == j``, and
``ChannelGroup.conv_groups`` = G is the number of channels one mask entry stands for (the least common multiple
when the group passes through grouped convs of different G). The planner rounds ``G·kept`` to ``round_to``.

**Groups left out** (never masked, never pruned): groups holding the model's output units (the
classifier's logits; any layer whose output is one of the model's outputs, in a dict, list or tuple too: a
segmenter's class convs, a detector's class/box/objectness convs, a returned feature map); groups whose index
mapping Torch-Pruning gets wrong or that touch layers
whose removal is not equal to masking (channel zero-padding, a grouped conv in a group whose channels are
not mapped one to one, transposed convs, LayerNorm/GroupNorm/InstanceNorm, unwrapped parameters, attention,
RNNs); groups through a split, unbind or slice of the channels (the sizes and bounds in the model's forward stay
as they are after a cut: MixNet's mixed convs); groups through a layer with per-channel tensors Torch-Pruning
does not cut (a norm subclass it traces as plain arithmetic; a conv or BN with extra per-channel parameters,
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
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from amas.channels.bake import baked_copy
from amas.channels.frozen_norms import is_frozen_norm
from amas.channels.group import ChannelGroup
from amas.channels.masks import PLAIN_BN_FORWARDS, BatchNormBase, unmaskable_modules
from amas.channels.shortcut import CUSTOM_PRUNERS
from amas.channels.tracing import build_graph, is_kept_whole, is_model_output
from amas.channels.units import unit_layers, unit_producers, unit_prunes, unit_reads, unit_types
from amas.errors import MaskError

__all__ = ["ChannelGroup", "find_groups"]


# ---------------------------------------------------------------- finding groups

_ALLOWED_PARAM_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)
_GATES = ("sigmoid", "hardsigmoid")
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


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
    if isinstance(nxt.module, BatchNormBase) or "batchnorm" not in _grad_fn_name(nxt) or len(nxt.outputs) != 1:
        return None
    after = nxt.outputs[0]
    own = isinstance(after.module, BatchNormBase) and type(after.module).forward not in PLAIN_BN_FORWARDS
    return after if own and len(after.inputs) == 1 else None


def _through_frozen_norm(node: Any) -> Any:
    """The frozen BatchNorm a layer's output runs into through its multiply and add (traced as ops before the unit,
    whose node is its last op: the activation's in timm's norm+act)."""
    for _ in range(3):
        if len(node.outputs) != 1:
            return None
        node = node.outputs[0]
        if is_frozen_norm(node.module):
            return node if len(node.inputs) == 1 else None
        if not isinstance(node.module, tp.ops._ElementWiseOp) or not _grad_fn_name(node).startswith(("mul", "add")) \
                or len(node.inputs) != 1:  # by its buffers only
            return None
    return None


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


def _keeps_group_whole(dg: tp.DependencyGraph, dep: Any, unmaskable: set[nn.Module], hidden: set[Any]) -> bool:
    """Whether a member of a Torch-Pruning group leaves the whole group out (the rules, one per line)."""
    node, module = dep.target, dep.target.module
    out_fn = dg.is_out_channel_pruning_fn(dep.handler)
    return bool(
        node.type == tp.ops.OPTYPE.OUTPUT or (not node.outputs and out_fn)  # the traced graph's sinks
        # a layer whose output is one of the model's outputs (a dict, list or tuple of them too)
        or (is_model_output(node) and (out_fn or not isinstance(module, _LAYERS)))
        or node.type == tp.ops.OPTYPE.PARAMETER or isinstance(module, nn.Parameter)
        # a channel zero-pad, a layer prune.ignore keeps whole (amas.channels.tracing), per-channel state not cut
        or _is_channel_pad(node) or is_kept_whole(node) or getattr(node, "grad_fn", None) in hidden
        or _is_channel_split(node)  # split sizes or slice bounds the forward would keep after the cut (MixNet)
        or module in unmaskable  # removal is not masking there (amas.channels.masks.unmaskable_modules)
    )


def _producers(out_nodes: dict[str, Any], members: set[Any], names: dict[nn.Module, str]) -> list[str] | None:
    """The group's producers: the layers a mask multiplies (a BN, or a conv/linear not followed by its own BN and
    not a squeeze-excitation gate's conv); None when a BN cannot take a mask (no affine)."""
    producers = []
    for name, node in out_nodes.items():
        module = node.module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or is_frozen_norm(module):
            if not getattr(module, "affine", True):
                return None  # a mask could not be folded into it
            producers.append(name)
            continue
        outs = node.outputs
        bn = (outs[0] if len(outs) == 1 and isinstance(outs[0].module, BatchNormBase)
              else _through_own_norm(node) or _through_frozen_norm(node))
        if bn is not None and bn in members and names.get(bn.module) in out_nodes:
            continue  # masked after its BN
        if _is_gate_conv(node):
            continue
        producers.append(name)
    return producers


def _group_record(dg: tp.DependencyGraph, group: Any, names: dict[nn.Module, str], size: int,
                  residual: bool, unmaskable: set[nn.Module], hidden: set[Any]) -> dict | None:
    """Check a Torch-Pruning group and extract producers, index maps and cost bookkeeping, or None to skip it."""
    out_nodes: dict[str, Any] = {}
    index: dict[str, tuple[list[int], list[int]]] = {}
    out_layers: dict[str, int] = {}
    in_layers: dict[str, int] = {}
    members: set[Any] = set()
    unit_index: dict[str, tuple[list[int], list[int]]] = {}  # mask sites inside units (amas.channels.units)
    conv_groups: set[int] = set()  # of the grouped (not depthwise) convs in the group
    straight = True  # every layer's channels are the root's channels, in order
    for item in group.items:
        dep, idxs = item.dep, item.idxs
        node, module = dep.target, dep.target.module
        if _keeps_group_whole(dg, dep, unmaskable, hidden):
            return None
        roots = list(item.root_idxs)
        counts = collections.Counter(roots)
        if set(counts) != set(range(size)) or len(set(counts.values())) != 1 or len(idxs) != len(roots):
            return None  # not a uniform one-to-k index map: Torch-Pruning mapped it wrongly
        mult = next(iter(counts.values()))
        straight = straight and mult == 1 and [int(i) for i in idxs] == [int(r) for r in roots]
        if isinstance(module, unit_types()):  # a SelectiveKernel: its paths' norms carry the mask (channels/units)
            out_fn = dg.is_out_channel_pruning_fn(dep.handler)
            uname = names.get(module)
            if uname is None or mult != 1 or not unit_prunes(module, out_fn):
                return None
            if out_fn:
                unit_index.update({p: ([int(i) for i in idxs], [int(r) for r in roots])
                                   for p in unit_producers(uname, module)})
                in_layers.update(unit_reads(uname, module))
            (out_layers if out_fn else in_layers).update(unit_layers(uname, module, out_fn))
            members.add(node)
            continue
        if isinstance(module, tuple(CUSTOM_PRUNERS)):
            if not residual or names.get(module) is None:
                return None  # a residual stage routed through a custom shortcut: kept whole unless asked for
            if dg.is_out_channel_pruning_fn(dep.handler):  # it puts values into the group's channels: a producer
                out_nodes[names[module]] = node
                index[names[module]] = ([int(i) for i in idxs], [int(r) for r in roots])
            members.add(node)
            continue
        if is_frozen_norm(module):  # a unit to Torch-Pruning (amas.channels.frozen_norms): a producer, as a BN
            if names.get(module) is None:
                return None
            members.add(node)
            if dg.is_out_channel_pruning_fn(dep.handler):
                out_nodes[names[module]] = node
                index[names[module]] = ([int(i) for i in idxs], [int(r) for r in roots])
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
    producers = _producers(out_nodes, members, names)
    if producers is None:
        return None
    index.update(unit_index)
    producers += list(unit_index)
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


def _no_script_modules(model: nn.Module) -> None:
    """A TorchScript block (torch.jit.script'ed) takes no forward hooks, which tracing and masks need: name it."""
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            what = f"'{name}'" if name else "the model"
            raise MaskError(f"{what} of {type(model).__name__} is a TorchScript module (torch.jit.script), which takes "
                            "no forward hooks, so amas cannot trace or mask it; build it as a plain nn.Module "
                            "(script the pruned model afterwards)")


def find_groups(model: nn.Module, input_shape: tuple[int, int, int], residual: bool = False,
                ignore: Sequence[str] = ()) -> list[ChannelGroup]:
    """Prunable channel groups of model (Torch-Pruning DependencyGraph), in named_modules order of their roots.

    residual: also the residual-stage groups that run through the zoo's option-A shortcut (ShortcutA).
    ignore: module names kept whole (prune.ignore), with the channels of the layers around them (amas.channels.tracing).
    """
    input_shape = tuple(int(s) for s in input_shape)
    ignore = tuple(str(n) for n in ignore)
    _no_script_modules(model)
    model = baked_copy(model)  # the groups of what the cut cuts (names unchanged)
    with _StateOutputs(model) as notes:
        dg = build_graph(model, input_shape, ignore)
    # layers with per-channel state that Torch-Pruning traced through as plain ops: it would not cut them (frozen BNs
    # are units of their own: amas.channels.frozen_norms)
    hidden = {fn for m, fns in notes.outputs.items() if m not in dg.module2node for fn in fns}
    unmaskable = unmaskable_modules(model)
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    found: dict[str, ChannelGroup] = {}
    roots = (nn.modules.conv._ConvNd, nn.Linear, *unit_types())
    for group in dg.get_all_groups(root_module_types=roots):
        outs = [it.dep.target.module for it in group.items
                if dg.is_out_channel_pruning_fn(it.dep.handler)
                and isinstance(it.dep.target.module, roots) and it.dep.target.module in names]
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
