"""Torch-Pruning's dependency graph of a model, with the layers of ``prune.ignore`` kept whole.

An ignored layer runs as usual, but during tracing its output is handed on through one opaque autograd op
(``_KeptWhole``) that hides the layer's insides from Torch-Pruning. Torch-Pruning sees an element-wise op that
couples the layer's inputs to its outputs, so every channel group that reaches the layer holds that op, and
``amas.channels.groups`` leaves such groups out: the layer, the layers feeding it and the layers reading it keep their
channels. That is how a model with an op Torch-Pruning cannot follow (shufflenet's channel shuffle, a reshape of
channels) still gets its other groups.

When Torch-Pruning fails inside its tracer, the error names the layer (module) whose forward ran the op it failed
on, and suggests the ``prune.ignore`` list of every layer that reshapes channels.

**The group walk.** Torch-Pruning 1.6 finds a group by walking the graph from its root layer in both directions,
mapping channel indices through each concatenation, split, slice and reshape, and walks a layer again whenever it
arrives with an index list it has not seen in that exact order. Two of its mappings make that walk run for hours:
it maps a channel reshape (a channel shuffle's ``view(N, g, C/g, H, W)`` and the reshape back) as a flatten, whose
reverse map returns the indices in set order, so every pass through a shuffle yields new lists (exponentially many
through the split, cat and shuffle of each ShuffleNetV2 block); and it infers a ``torch.cat``'s input sizes from
the layers around it, which for rexnet's partial residual (``cat([x[:, :c] + shortcut, x[:, c:]])``) come out as
running totals, so indices grow without end around the block. amas therefore (a) records the real input sizes of
every channel concatenation during the trace and hands them to Torch-Pruning (a feature-map concat it still
cannot map, such as one with a constant before a traced input, is kept whole), (b) keeps channel reshapes whole, as
``prune.ignore`` would (groups that reach one are left out), and (c) walks groups itself: each (layer, index set)
once, within ``WALK_STEPS`` steps per group and ``WALK_SECONDS`` seconds per graph. A walk that still runs past
them stops with one line naming the layers whose ops it cycles through and the ``prune.ignore`` list (tried before
it is suggested) that keeps them whole.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Sequence
from numbers import Number
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.pruner import function

from amas.channels.cost import device_dtype
from amas.channels.owners import OpOwners, collapse, untraceable
from amas.channels.units import custom_pruners
from amas.errors import MaskError

__all__ = ["WALK_SECONDS", "WALK_STEPS", "build_graph", "ignored_modules", "is_kept_whole", "is_model_output"]

WALK_STEPS = 1_000_000  # channel indices one group's walk may carry from layer to layer
WALK_SECONDS = 30.0  # seconds all group walks on one graph may take together
_ROUNDS = 4  # tries of the prune.ignore list a walk past its bound suggests
_ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)

_KEPT_WHOLE = "keptwhole"  # in the name of the opaque op's backward node
_KEPT_FLAG = "amas_kept_whole"  # set on the graph nodes amas keeps whole
_OUTPUT_FLAG = "amas_model_output"  # set on the graph nodes of layers whose output is (part of) the model's output


class _KeptWhole(torch.autograd.Function):
    """The output of an ignored layer, linked to the layer's inputs by one op Torch-Pruning cannot see into."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """out unchanged (a copy); the inputs only link the graph."""
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        """Never used for training (tracing only)."""
        return (grad, *([None] * 64))


def is_kept_whole(node: Any) -> bool:
    """True for the traced op that stands for an ignored layer, or a channel reshape amas keeps whole."""
    if getattr(node, _KEPT_FLAG, False):
        return True
    fn = getattr(node, "grad_fn", None)
    return fn is not None and hasattr(fn, "name") and _KEPT_WHOLE in fn.name().lower()


def is_model_output(node: Any) -> bool:
    """True for a traced layer whose output tensor is one of the model's outputs (in a tensor, dict, list or tuple)."""
    return bool(getattr(node, _OUTPUT_FLAG, False))


def _output_fns(out: Any, into: set[Any]) -> Any:
    """Collect the grad_fns of every tensor in out (nested dicts, lists, tuples) into into; out unchanged."""
    for t in tp.utils.flatten_as_list(out) if not isinstance(out, torch.Tensor) else [out]:
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            into.add(t.grad_fn)
    return out


def ignored_modules(model: nn.Module, ignore: Iterable[str]) -> dict[str, nn.Module]:
    """The modules prune.ignore names, by name, or a one-line MaskError naming one the model does not have."""
    modules = dict(model.named_modules())
    out = {}
    for name in ignore:
        name = str(name)
        if not name or name not in modules:
            import difflib

            close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise MaskError(f"prune.ignore names {name!r}, which {type(model).__name__} has no module of{hint}; use "
                            "names from model.named_modules()")
        out[name] = modules[name]
    return out


def _barrier_hook(module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise MaskError(f"prune.ignore: {type(module).__name__} returns a {type(output).__name__}, not one tensor; "
                        "ignore the module around it")
    return _KeptWhole.apply(output.detach(), *[x for x in inputs if isinstance(x, torch.Tensor)])


def build_graph(model: nn.Module, input_shape: Sequence[int], ignore: Iterable[str] = (),
                complete: bool = True) -> tp.DependencyGraph:
    """Trace model with one example input (on its device) into a DependencyGraph; ignored layers stay opaque
    (complete: a model that cannot be traced names every layer to ignore, not only the first)."""
    device, dtype = device_dtype(model)
    x = torch.randn((1, *input_shape), device=device, dtype=dtype)
    kept = ignored_modules(model, ignore)
    inside = [m for top in kept.values() for m in top.modules()]
    handles = [m.register_forward_hook(_barrier_hook) for m in kept.values()]
    was_training = model.training
    rec = OpOwners(model)
    outs: set[Any] = set()
    try:
        with rec, torch.enable_grad():
            dg = _Graph().build_dependency(model, example_inputs=x, verbose=False,
                                           customized_pruners=custom_pruners(), ignored_layers=inside or None,
                                           output_transform=lambda out: _output_fns(out, outs))
    except (ZeroDivisionError, IndexError, KeyError, TypeError) as e:  # inside Torch-Pruning's tracer: say where
        err = untraceable(model, x, e)
        raise (_complete(err, model, input_shape, list(ignore)) if complete else err) from None
    finally:
        rec.close()
        for h in handles:
            h.remove()
        model.train(was_training)
    dg.adopt(rec)
    dg.mark_outputs(rec, outs)
    dg.amas_input = (tuple(int(s) for s in input_shape), tuple(kept))
    return dg


def _complete(err: MaskError, model: nn.Module, input_shape: Sequence[int], ignore: list[str],
              tries: int = 8) -> MaskError:
    """err with every layer to ignore at once: the model traced again with err's suggestion ignored until it traces
    (at most tries times), so one run names the whole list (CSP nets fail at each stage's split-and-concat in turn)."""
    found = list(getattr(err, "suggest", None) or [])
    if not found:
        return err
    for _ in range(tries):
        try:
            build_graph(model, input_shape, [*ignore, *found], complete=False)
        except MaskError as again:
            more = [n for n in getattr(again, "suggest", None) or [] if n not in found]
            if not more:
                return err
            found += more
            continue
        text = str(err).rsplit("prune.ignore: [", 1)[0]
        return MaskError(f"{text}prune.ignore: [{', '.join(found)}]")
    return err


# ---------------------------------------------------------------- the bounded group walk


class _Graph(tp.DependencyGraph):
    """Torch-Pruning's dependency graph with the real concat sizes, channel reshapes kept whole, a bounded walk."""

    def __init__(self) -> None:
        super().__init__()
        self.amas_owner: dict[Any, str] = {}  # grad_fn -> the module whose forward ran the op
        self.amas_multi: set[str] = set()  # modules whose output is not one tensor
        self.amas_seconds = 0.0  # spent in group walks
        self.amas_input: tuple[tuple[int, ...], tuple[str, ...]] = ((), ())  # the traced input shape, prune.ignore

    def mark_outputs(self, rec: OpOwners, outputs: set[Any]) -> None:
        """Flag the nodes whose output is one of the model's (outputs: their grad_fns; a reused layer by any call)."""
        out_layers = {rec.owner[fn] for fn in outputs if fn in rec.owner}  # the layers that ran those ops
        for node in self.module2node.values():
            if node.grad_fn in outputs or self._module2name.get(node.module) in out_layers:
                setattr(node, _OUTPUT_FLAG, True)

    def adopt(self, rec: OpOwners) -> None:
        """Take the trace's records: op owners, the concat sizes, the nodes to keep whole."""
        self.amas_owner, self.amas_multi = rec.owner, rec.multi
        params = [p for p, _ in self.unwrapped_parameters]
        for node in self.module2node.values():
            if node.grad_fn in rec.channel_reshapes or is_kept_whole(node):
                setattr(node, _KEPT_FLAG, True)
            if isinstance(node.module, tp.ops._ConcatOp) and node.grad_fn in rec.cat_sizes:
                rank, sizes = rec.cat_sizes[node.grad_fn]
                traced = _traced_sizes(node.grad_fn, sizes, params)
                if traced is not None and len(traced) == len(node.inputs):
                    _unmap_concat(node)
                    node.module.concat_sizes = traced
                elif rank == 4:  # an input it does not trace (a constant, the model's input) shifts the offsets
                    setattr(node, _KEPT_FLAG, True)
        index_mapping.update_index_mapping(self)
        for node in self.module2node.values():  # a channel concat of feature maps it still cannot map: keep it whole
            if (isinstance(node.module, tp.ops._ConcatOp) and node.module.offsets is None
                    and rec.cat_sizes.get(node.grad_fn, (0,))[0] == 4):
                setattr(node, _KEPT_FLAG, True)

    def get_pruning_group(self, module: nn.Module, pruning_fn: Any, idxs: Sequence[int]) -> Group:
        """Torch-Pruning's group of module's channels idxs, by a walk that visits each (layer, index set) once."""
        if module not in self.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        steps, stopped = self._walk(module, pruning_fn, idxs)
        if stopped is not None:
            raise self._stuck(module, steps, stopped)
        return self._merged(steps)

    def _walk(self, module: nn.Module, pruning_fn: Any,
              idxs: Sequence[int]) -> tuple[list[tuple[Any, list]], tuple[int, float] | None]:
        """The (dependency, indices) steps of the walk from module's channels; (steps, seconds) if it hit a bound."""
        if isinstance(module, tp.ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
            pruning_fn = function.prune_depthwise_conv_out_channels
        if isinstance(idxs, Number):
            idxs = [idxs]
        index_mapping.update_index_mapping(self)
        root = self.module2node[module]
        first = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
        steps = [(Dependency(pruning_fn, pruning_fn, source=root, target=root), first)]
        # Torch-Pruning compares index lists in order; every mapping acts on each index alone, so the set decides
        seen = {(root, pruning_fn, frozenset(first))}
        stack = list(steps)
        carried = 0
        start = time.monotonic()
        left = WALK_SECONDS - self.amas_seconds
        try:
            while stack:
                if carried > WALK_STEPS or time.monotonic() - start >= left:
                    return steps, (carried, time.monotonic() - start)
                dep, cur = stack.pop()
                for new_dep in dep.target.dependencies:
                    if not new_dep.is_triggered_by(dep.handler):
                        continue
                    new = cur
                    for mapping in new_dep.index_mapping:
                        if mapping is not None:
                            new = mapping(new)
                    key = (new_dep.target, new_dep.handler, frozenset(new))
                    if not new or key in seen:
                        continue
                    seen.add(key)
                    carried += len(new)
                    steps.append((new_dep, new))
                    if not getattr(new_dep.target, _KEPT_FLAG, False):  # its group is left out: no need to go on
                        stack.append((new_dep, new))
        finally:
            self.amas_seconds += time.monotonic() - start
        return steps, None

    def _merged(self, items: list[tuple[Any, list]]) -> Group:
        """One group item per (layer, pruning function), indices merged in order as Torch-Pruning merges them."""
        parts: dict[tuple[Any, Any], tuple[Any, list[list]]] = {}
        for dep, idxs in items:
            target = dep.target.module
            if isinstance(target, nn.Parameter) and any(target is p for p in self.ignored_params):
                continue
            parts.setdefault((dep.target, dep.handler), (dep, []))[1].append(idxs)
        group = Group()
        for dep, lists in parts.values():
            idxs = lists[0]
            if len(lists) > 1:
                taken: set[int] = set()
                idxs = [i for part in lists for i in part if not (i.idx in taken or taken.add(i.idx))]
            item = _helpers.GroupItem(dep, _helpers.to_plain_idxs(idxs))
            item.root_idxs = _helpers.to_root_idxs(idxs)
            group.items.append(item)
        group._DG = self
        return group

    def _stuck(self, module: nn.Module, steps: list[tuple[Any, list]], stopped: tuple[int, float]) -> MaskError:
        """The one-line error for a walk that hit its bound: the layers whose ops such walks cycle through."""
        owners = self._hot_owners(steps)
        more, found = self._scan(self._roots_in(steps))
        owners |= found
        shape, ignore = self.amas_input
        # try the list: walks that only hit the bound once their neighbours are kept whole add their layers
        for _ in range(_ROUNDS):
            layers = collapse(sorted(o for o in owners if o), self.model, self.amas_multi)
            if not layers or self.amas_seconds >= WALK_SECONDS:
                break
            try:
                trial = build_graph(self.model, shape, (*ignore, *layers))
            except MaskError:
                break
            trial.amas_seconds = self.amas_seconds
            left, found = trial._scan(set())
            self.amas_seconds = trial.amas_seconds
            if not left or found <= owners:
                break
            owners |= found
        layers = collapse(sorted(o for o in owners if o), self.model, self.amas_multi)
        carried, seconds = stopped
        bound = f"{WALK_STEPS} steps" if carried > WALK_STEPS else f"{WALK_SECONDS:g} s"
        also = f" (and {more} more)" if more else ""
        head = (f"Torch-Pruning's channel-group walk on {type(self.model).__name__} from layer "
                f"'{self._module2name.get(module, '?')}'{also} did not end within {bound} "
                f"(amas.channels.tracing.WALK_STEPS, WALK_SECONDS; {carried} steps in {seconds:.1f} s)")
        if not owners:
            return MaskError(head + " though it comes back to no op; if the model is that large, raise WALK_STEPS or "
                             "WALK_SECONDS")
        head += ": its channel indices keep changing through concatenations, splits or reshapes it maps wrongly, in "
        if not layers:
            return MaskError(head + "the model's own forward; this model cannot be pruned by amas yet")
        return MaskError(head + f"the forward of {len(layers)} layers; keep them whole with prune.ignore: "
                         f"[{', '.join(layers)}]")

    def _scan(self, covered: set[Any]) -> tuple[int, set[str]]:
        """Of the walks get_all_groups and find_groups take (roots not in covered): how many hit the bound, owners."""
        order = {m: i for i, m in enumerate(self._module2name)}
        stuck, owners = 0, set()
        for m in list(self.module2node):
            if m in covered or self.amas_seconds >= WALK_SECONDS:
                continue
            while m is not None:
                pruner = self.get_pruner_of_module(m) if isinstance(m, _ROOT_TYPES) else None
                size = pruner.get_out_channels(m) if pruner is not None else None
                if m in self.IGNORED_LAYERS_IN_TRACING or size is None:
                    break
                steps, hit = self._walk(m, pruner.prune_out_channels, list(range(size)))
                roots = self._roots_in(steps)
                covered |= roots
                if hit is not None:
                    stuck += 1
                    owners |= self._hot_owners(steps)
                    break
                first = min((r for r in roots if isinstance(r, _ROOT_TYPES) and r in order), key=order.get, default=m)
                m = first if first is not m else None
        return stuck, owners

    def _roots_in(self, steps: list[tuple[Any, list]]) -> set[Any]:
        """The layers whose output channels a walk reached: get_all_groups starts no walk of its own from them."""
        return {dep.target.module for dep, _ in steps if self.is_out_channel_pruning_fn(dep.handler)}

    def _hot_owners(self, steps: list[tuple[Any, list]]) -> set[str]:
        """The modules ('' the model's own forward) whose ops a walk reached most often (at least half the top)."""
        visits = collections.Counter(dep.target for dep, _ in steps if dep.target.module not in self._module2name)
        top = max(visits.values(), default=0)
        return {self.amas_owner.get(n.grad_fn, "") for n, c in visits.items() if c * 2 >= top > 1}


def _traced_sizes(fn: Any, sizes: list[int], params: list[Any]) -> list[int] | None:
    """The sizes of a concat's inputs Torch-Pruning traced, or None when an untraced one comes before a traced one."""
    # an untraced input (a constant, a plain leaf) has no graph node, so Torch-Pruning's offsets leave it out
    nexts = fn.next_functions
    if len(nexts) != len(sizes):
        return None
    traced = [f is not None and ("accumulategrad" not in f.name().lower() or any(f.variable is p for p in params))
              for f, _ in nexts]
    count = sum(traced)
    return sizes[:count] if all(traced[:count]) else None


def _unmap_concat(node: Any) -> None:
    """Drop the index maps Torch-Pruning set on a concat from its own size guesses."""
    for dep in node.dependencies:
        dep.index_mapping[1] = None
    for src in node.inputs:
        for dep in src.dependencies:
            if dep.target is node:
                dep.index_mapping[1] = None
    node.module.offsets = None
