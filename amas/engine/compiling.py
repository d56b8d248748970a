"""train.compile (off | on | auto): torch.compile of the training forwards (the student's, and the frozen teacher's
copy), with an eager fallback and a count of the compilations.

The model is never replaced: a compiled callable runs its forward (mask and feature hooks included, hook changes
guarded), so state_dict keys, evaluation and checkpoints stay the eager model's. A forward that cannot compile (a
graph dynamo refuses, a backend failure such as no C compiler) runs eager from then on, said in one line.

auto: a stage of fewer than AUTO_MIN_STEPS optimiser steps stays eager; a longer one times its first AUTO_PROBE_STEPS
eager steps and compiles when the steps left × the step time × AUTO_GAIN (the share of a step a compiled one saves)
exceed the compile cost: DEFAULT_COST_S until a compilation in this process has been timed, then the last timed one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from amas.errors import ConfigError

__all__ = ["AUTO_MIN_STEPS", "COMPILE_CHOICES", "CompiledForward", "StepCompiler", "auto_compiles", "compile_counts"]

COMPILE_CHOICES = ("off", "on", "auto")
AUTO_MIN_STEPS = 500  # auto never compiles a shorter stage (tests and quick runs stay eager, whatever the timing)
AUTO_PROBE_STEPS = 20  # eager steps timed before auto decides
AUTO_GAIN = 0.12  # a compiled step's saving: 1.13x (fp32) and 1.15x (bf16) on a 2-core CPU, ResNet-20 (issue 34)
DEFAULT_COST_S = 30.0  # compile warm-up before one is timed here (22-36 s measured on a 2-core CPU, ResNet-20)
_timed_cost: list[float] = []  # the compile costs timed in this process (first compiled step minus an eager one)


def compile_counts() -> int:
    """Graphs dynamo has compiled in this process so far (every recompilation counts; frames it only stepped
    through, as DistributedDataParallel's forward under torchrun, do not)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def auto_compiles(steps_left: int, step_s: float, cost_s: float | None = None) -> bool:
    """Whether compiling repays its cost: steps_left·step_s·AUTO_GAIN > cost_s (the last timed cost, else
    DEFAULT_COST_S); never below AUTO_MIN_STEPS steps left."""
    cost = cost_s if cost_s is not None else (_timed_cost[-1] if _timed_cost else DEFAULT_COST_S)
    return steps_left >= AUTO_MIN_STEPS and steps_left * step_s * AUTO_GAIN > cost


class CompiledForward:
    """module's forward, compiled (dynamic=False; nn-module hooks guarded, so adding or removing one recompiles);
    eager with one line through say when it cannot compile. compilations: graphs compiled by its calls."""

    def __init__(self, module: nn.Module, say: Callable[[str], None], what: str = "the training forward") -> None:
        self.module, self.say, self.what = module, say, what
        self.compilations = 0
        self.first_graphs: int | None = None  # graphs its first call compiled (several where the forward breaks)
        self.failed = False
        self._fn: Any = None
        try:
            self._fn = torch.compile(module, dynamic=False)
        except Exception as e:  # noqa: BLE001 - any refusal: eager, said once
            self.fall_back(e)

    def fall_back(self, e: BaseException, what: str | None = None) -> None:
        """Run eager from now on, said in one line (what failed: this forward, or e.g. the step's backward)."""
        self.failed, self._fn = True, None
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        self.say(f"train.compile: {what or self.what} cannot compile ({type(e).__name__}: {why}); it runs eager")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fn is None:
            return self.module(*args, **kwargs)
        import torch._dynamo

        before = compile_counts()
        try:
            with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False, recompile_limit=64):
                return self._fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compile failure: the eager forward decides (a real error re-raises)
            out = self.module(*args, **kwargs)
            self.fall_back(e)
            return out
        finally:
            graphs = compile_counts() - before
            if self.first_graphs is None:
                self.first_graphs = graphs
            self.compilations += graphs

    def __getattr__(self, name: str) -> Any:  # the module's attributes (an objective may read them)
        return getattr(self.__dict__["module"], name)


class StepCompiler:
    """The training forward of one stage under train.compile: what each step calls, decided once (auto: after timing
    AUTO_PROBE_STEPS eager steps); on_compile(self) is told when compiling starts (e.g. to compile the teacher too,
    with wrap, or to count a forward compiled by an earlier stage, with adopt)."""

    def __init__(self, mode: str, total_steps: int, say: Callable[[str], None],
                 on_compile: Callable[[StepCompiler], None] | None = None) -> None:
        if mode not in COMPILE_CHOICES:
            raise ConfigError(f"train.compile={mode!r} is not allowed; choose one of {', '.join(COMPILE_CHOICES)}")
        self.mode, self.total, self.say, self.on_compile = mode, int(total_steps), say, on_compile
        self.decided: bool | None = {"off": False, "on": True}.get(mode)
        if mode == "auto" and self.total < AUTO_MIN_STEPS:
            self.decided = False
        self.forwards: list[tuple[CompiledForward, int, bool]] = []  # (forward, its count before, new here)
        self._compiled: CompiledForward | None = None
        self._times: list[float] = []
        self._last: float | None = None
        self._first_compiled_step: int | None = None

    def wrap(self, module: nn.Module, what: str) -> CompiledForward:
        """A CompiledForward of module counted with this stage's."""
        f = CompiledForward(module, self.say, what)
        self.forwards.append((f, 0, True))
        return f

    def adopt(self, f: CompiledForward) -> None:
        """Count f (compiled by an earlier stage) with this stage's: whatever it compiles here is a recompilation."""
        self.forwards.append((f, f.compilations, False))

    def model_for(self, model: nn.Module, step: int) -> Any:
        """What the objective calls at this step: model, or its compiled forward."""
        if self.decided is None and len(self._times) >= AUTO_PROBE_STEPS:
            step_s = statistics.median(self._times[1:])
            self.decided = auto_compiles(self.total - step, step_s)
            self._eager_s = step_s
        if not self.decided:
            return model
        if self._compiled is None or self._compiled.module is not model:
            self._compiled = self.wrap(model, "the training forward")
            self._first_compiled_step = step
            if self.on_compile is not None:
                self.on_compile(self)
        return self._compiled

    def run(self, model: nn.Module, step: int, forward_backward: Callable[[Any], Any]) -> Any:
        """forward_backward(what model_for gives at this step); where a compiled step fails in its backward (the
        backward graph compiles at the first backward), that forward is dropped with one line and the step runs
        again eager (the failed attempt's forward may have moved BN statistics once)."""
        fn = self.model_for(model, step)
        if fn is model:
            return forward_backward(model)
        try:
            return forward_backward(fn)
        except Exception as e:  # noqa: BLE001 - the eager step decides: a real error raises again there
            if not isinstance(fn, CompiledForward) or fn.failed:
                raise
            fn.fall_back(e, f"{fn.what}'s backward")
            return forward_backward(model)

    def step_done(self, step: int) -> None:
        """After each step: the eager step times (auto) and the first compiled step's time (the compile cost)."""
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            if self.decided is None:
                self._times.append(dt)
            elif self._first_compiled_step == step and self.mode == "auto" and not self._compiled.failed:
                _timed_cost.append(max(0.0, dt - getattr(self, "_eager_s", 0.0)))
        self._last = now

    def counts(self) -> dict[str, int] | None:
        """{'compilations', 'recompilations'} of this stage's compiled forwards (None when nothing compiled): graphs
        compiled, and those beyond each new forward's first call (a graph break's graphs are not recompilations)."""
        live = [(f, base, new) for f, base, new in self.forwards if not f.failed]
        if not live:
            return None
        n = sum(f.compilations - base for f, base, _ in live)
        first = sum(f.first_graphs or 0 for f, _, new in live if new)
        return {"compilations": n, "recompilations": n - first}
