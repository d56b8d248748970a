"""Model cost: MACs and parameters (literature convention) and measured latency."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from amas.errors import AmasError
from amas.latency.timing import warm_allocator

# Convention (matches the CIFAR pruning literature, e.g. HRank/GAL tables): MACs of conv and
# linear layers, plus one per output element for their bias adds; BN, activations, pooling
# and element-wise adds are free. torch's FlopCounterMode counts conv/matmul flops (2 per MAC)
# but ignores biases, so its conv and addmm formulas are wrapped to add 2 flops per biased
# output element. Plain FlopCounterMode/2 gives the same numbers for bias-free nets (ResNets)
# but 313.46M instead of the published 313.7M for VGG-16-BN, whose convs have biases.


def _plus_bias(base: Callable[..., int], bias_index: int) -> Callable[..., int]:
    """Wrap torch's flop formula `base` to add 2 flops per output element when the op has a bias."""

    def formula(*args, out_val=None, **kwargs) -> int:
        flops = base(*args, out_val=out_val, **kwargs)
        if args[bias_index] is not None and isinstance(out_val, torch.Tensor):
            flops += 2 * out_val.numel()
        return flops

    formula._get_raw = True  # receive tensors (FlopCounterMode protocol), as `base` expects
    return formula


_aten = torch.ops.aten
# aten.convolution(input, weight, bias, ...); aten.addmm(bias, input, weight_t) is what nn.Linear runs.
_BIAS_AWARE = {
    op: _plus_bias(flop_registry[op], bias_index)
    for op, bias_index in ((_aten.convolution, 2), (_aten._convolution, 2), (_aten.addmm, 0))
    if op in flop_registry
}


def _batched_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Return (N, C, H, W) from (C, H, W) (N = 1) or (N, C, H, W)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return (1, *shape)
    if len(shape) == 4:
        return shape
    raise AmasError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Return the device and floating dtype of the model's first parameter (CPU/float32 if none)."""
    for p in model.parameters():
        dtype = p.dtype if p.is_floating_point() else torch.float32
        return p.device, dtype
    return torch.device("cpu"), torch.float32


def param_count(model: nn.Module) -> int:
    """Return the number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Return (MACs per image, params) for an eval-mode forward pass on an input of `input_shape`."""
    shape = _batched_shape(input_shape)
    device, dtype = _device_and_dtype(model)
    x = torch.zeros(shape, device=device, dtype=dtype)
    was_training = model.training
    counter = FlopCounterMode(display=False, custom_mapping=_BIAS_AWARE)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    macs = counter.get_total_flops() // 2 // shape[0]
    return int(macs), param_count(model)


def _sync(device: torch.device) -> None:
    """Wait for queued work on `device` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    device: str | torch.device | None = None,
    warmup: int = 5,
    iters: int = 20,
    channels_last: bool = True,
) -> dict:
    """Measure inference time per batch: median_ms, mean_ms, images_per_s, batch_size, device."""
    shape = _batched_shape(input_shape)
    if len(input_shape) == 3:
        shape = (batch_size, *shape[1:])
    elif batch_size not in (1, shape[0]):
        raise AmasError(f"batch_size={batch_size} conflicts with the batch of input_shape {tuple(input_shape)}")
    if iters < 1 or warmup < 0:
        raise AmasError(f"latency needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    model_device, dtype = _device_and_dtype(model)
    dev = torch.device(device) if device is not None else model_device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # Work on a copy when the model must change device or layout, so the caller's model is untouched.
    if dev != model_device or channels_last:
        net = copy.deepcopy(model).to(device=dev, memory_format=memory_format)
    else:
        net = model
    x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=memory_format)
    warm_allocator()
    was_training = net.training
    times: list[float] = []
    try:
        net.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                net(x)
            _sync(dev)
            for _ in range(iters):
                start = time.perf_counter()
                net(x)
                _sync(dev)
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        net.train(was_training)
    median = statistics.median(times)
    return {
        "median_ms": median,
        "mean_ms": statistics.fmean(times),
        "images_per_s": shape[0] * 1000.0 / median,
        "batch_size": shape[0],
        "device": str(dev),
    }
