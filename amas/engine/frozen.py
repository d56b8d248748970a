"""The frozen teacher's one inference copy: BatchNorm folded where the fold keeps its outputs (amas.engine.fold), eval
mode, no gradients, channels_last where the stage runs it, compiled where train.compile compiles. A run builds it once
(amas.pipeline.context.RunContext.frozen_teacher) and every stage that reads the teacher runs it; the caller's module
is never touched."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from amas.engine.fold import folded_copy

__all__ = ["FrozenTeacher", "fast_inference_copy"]


def _inplace_relus(gm: torch.fx.GraphModule) -> None:
    """Make ReLU modules in-place where, at every call site, their input feeds nothing else."""
    ok: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.ReLU, nn.ReLU6)):
            src = node.args[0] if node.args else None
            single = isinstance(src, torch.fx.Node) and len(src.users) == 1 and src.op != "placeholder"
            ok[node.target] = ok.get(node.target, True) and single
    for target, safe in ok.items():
        if safe:
            gm.get_submodule(target).inplace = True


def fast_inference_copy(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """A frozen eval-mode copy of model for no-grad forwards: conv+BN folded (torch.fx) and in-place ReLUs.

    The copy is checked against model on a random batch; when tracing fails or the outputs differ, it is a plain
    frozen copy. model itself (weights, buffers, flags, mode) is never touched.
    """
    fast = folded_copy(model, input_shape)
    if fast is None:
        return copy.deepcopy(model).eval().requires_grad_(False)
    _inplace_relus(fast)
    return fast.eval().requires_grad_(False)


class FrozenTeacher:
    """One frozen inference copy of teacher (fold: conv+BN folded, checked on a batch; else a plain frozen copy),
    called on images under no_grad. prepare(device, channels_last) puts it where a stage runs it; compile(wrap)
    compiles its forward once (wrap: amas.engine.compiling.StepCompiler.wrap). teacher itself is never modified."""

    def __init__(self, teacher: nn.Module, input_shape: tuple[int, ...], fold: bool = True) -> None:
        self.source_name = type(teacher).__name__
        self.input_shape = tuple(int(s) for s in input_shape)
        self.fold = bool(fold)
        self.module = (fast_inference_copy(teacher, self.input_shape) if fold
                       else copy.deepcopy(teacher).eval().requires_grad_(False))
        self.contiguous = False  # its forward cannot run channels_last (a .view of a feature map)
        self.channels_last: bool | None = None  # the memory format it was last prepared for
        self.compiled: Any = None

    def prepare(self, device: torch.device, channels_last: bool) -> None:
        """Move the copy to device, in channels_last when asked and its forward runs that way (checked once)."""
        self.module.to(device)
        if channels_last == self.channels_last:
            return
        self.channels_last = channels_last
        if channels_last and not self.contiguous:
            from amas.engine.formats import runs_channels_last

            self.module.to(memory_format=torch.channels_last)
            x = torch.randn(2, *self.input_shape, device=device)
            if not runs_channels_last(self.module, x, self.source_name):
                self.use_contiguous()
        elif not channels_last:
            self.module.to(memory_format=torch.contiguous_format)

    def use_contiguous(self) -> None:
        """Run the copy in the contiguous format, on contiguous images."""
        self.module.to(memory_format=torch.contiguous_format)
        self.contiguous = True

    def compile(self, compiler: Any) -> None:
        """Compile the copy's forward once per run (compiler: the stage's amas.engine.compiling.StepCompiler, which
        counts its compilations; a failure leaves it eager, said in one line)."""
        if self.compiled is None:
            self.compiled = compiler.wrap(self.module, "the teacher's forward")
        else:
            compiler.adopt(self.compiled)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for images (no gradients)."""
        fwd = self.compiled if self.compiled is not None and not self.compiled.failed else self.module
        return fwd(images.contiguous() if self.contiguous else images)
