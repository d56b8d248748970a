"""The training precision (train.amp) resolved once per device, the CPU's native-bf16 detection, the engine's autocast
context and fp16's loss scaling.

train.amp: auto (bf16 on CUDA and on CPUs that compute bf16 natively: AVX512-BF16 or AMX; float32 elsewhere), bf16,
fp16 (CUDA only: float16 without a loss scale underflows) or off (float32). Autocast covers the training forwards
(student, teacher, and the loss); what needs full precision opts out (the discriminator, amas.search.alignment) or
lives outside it (masks and their proximal step, the budget controller, the optimisers' updates). Accuracies are
measured in float32, the way the exported model runs.
A CPU stage whose first batch reaches a convolution as a map narrower than its stride trains in float32
(settle_cpu_bf16): oneDNN's bf16 weight gradient of such a convolution is wrong.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

from amas import distributed
from amas.errors import ConfigError

__all__ = ["AMP_CHOICES", "LossScale", "autocast", "cpu_bf16_conv_hazard", "cpu_has_native_bf16", "no_autocast",
           "resolve_amp", "settle_cpu_bf16"]

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_said: set[str] = set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), read from torch when it says, else from the
    CPU flags in /proc/cpuinfo (Linux); False where neither tells."""
    cpu = getattr(torch._C, "_cpu", None)
    probes = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(callable(p) for p in probes):
        return any(bool(p()) for p in probes if callable(p))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def _say_once(line: str) -> None:
    """line on stderr once per process (rank 0)."""
    if line not in _said and distributed.context().is_main:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)


def resolve_amp(name: str | bool, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype train.amp=name asks for on device (None: float32, no autocast); true/false as auto/off.

    fp16 on a CPU is a ConfigError; a forced bf16 on a CPU without native bf16 runs, with one line on its cost.
    """
    if isinstance(name, bool):
        name = "auto" if name else "off"
    if name not in AMP_CHOICES:
        raise ConfigError(f"train.amp={name!r} is not allowed; choose one of {', '.join(AMP_CHOICES)}")
    kind = torch.device(device).type
    if name == "off" or kind not in ("cuda", "cpu"):
        return None
    if kind == "cuda":
        if name == "fp16":
            return torch.float16
        if name == "auto" and torch.cuda.get_device_capability(torch.device(device))[0] < 8:
            return None  # before Ampere bf16 is emulated
        return torch.bfloat16
    if name == "fp16":
        raise ConfigError("train.amp=fp16 needs a CUDA device; on the CPU use train.amp=bf16, auto or off")
    if cpu_has_native_bf16():
        return torch.bfloat16
    if name == "auto":
        return None
    _say_once("train.amp=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated and training "
              "runs slower than float32; train.amp=auto picks float32 here")
    return torch.bfloat16


def _narrow_input(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> str | None:
    """'HxW input, stride S' where a dimension of x is narrower than the conv's stride under a kernel wider than 1."""
    size = tuple(x.shape[2:])
    for n, k, s in zip(size, module.kernel_size, module.stride, strict=False):
        if k > 1 and n < s:
            return f"{'x'.join(map(str, size))} input, stride {'x'.join(map(str, module.stride))}"
    return None


@torch.no_grad()
def cpu_bf16_conv_hazard(model: nn.Module, x: torch.Tensor) -> str | None:
    """Where bf16 autocast on the CPU would train model wrongly on images like x: "'layer': why" for the first
    convolution whose input is narrower than its stride, else None.

    oneDNN's bf16 weight gradient of such a convolution (a 16-px image at a ResNet's last stage: a 1x1 map into a
    stride-2 3x3) reads memory it never wrote for the taps that fall on padding, so a weight there can become 1e31
    or nan in one step (PyTorch 2.14 on AVX512-BF16; the forward and the input gradient are right)."""
    convs = {m: name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    found: list[str] = []

    def hook(module: nn.Module, args: tuple) -> None:
        why = _narrow_input(module, args[0]) if args and isinstance(args[0], torch.Tensor) else None
        if why and not found:
            found.append(f"'{convs[module]}': {why}")

    handles = [m.register_forward_pre_hook(hook) for m in convs]
    was_training = model.training
    try:
        model.eval()
        model(x)
    except Exception:  # a forward that fails here fails in the step too, with its own message
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found[0] if found else None


def settle_cpu_bf16(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, device: torch.device,
                    say: Callable[[str], None]) -> torch.dtype | None:
    """dtype, or None (float32) after one line where bf16 on the CPU would train a convolution of model wrongly on
    images like x (cpu_bf16_conv_hazard)."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return dtype
    hazard = cpu_bf16_conv_hazard(model, x)
    if hazard is None:
        return dtype
    say(f"training in float32, not bf16: on this CPU the bf16 weight gradient of a convolution whose input is "
        f"narrower than its stride is wrong ({hazard}); larger images avoid it")
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to dtype on device (CUDA or CPU); nothing when dtype is None."""
    if dtype is None or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on device (CUDA or CPU): full precision inside an autocast region."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class LossScale:
    """Dynamic loss scaling for fp16: the loss is multiplied by scale before backward, the gradients divided after;
    a step with a non-finite gradient (on any rank) is skipped and the scale halved, 2000 good steps double it."""

    def __init__(self, enabled: bool, init: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """loss times the scale (loss itself when off)."""
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale(self, params: Iterable[torch.Tensor]) -> bool:
        """Divide the gradients of params by the scale; whether the step may go on (every gradient finite)."""
        if not self.enabled:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        bad = distributed.all_reduce_sum(torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().double())
        if float(bad) > 0:
            self.scale /= 2.0
            self.good_steps = 0
            for g in grads:
                g.zero_()
            return False
        for g in grads:
            g.div_(self.scale)
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2.0
        return True

    def state_dict(self) -> dict:
        """The scale and the count of good steps since it last changed."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (a state without one keeps the current scale)."""
        if state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
