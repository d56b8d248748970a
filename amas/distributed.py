"""Process-group setup under torchrun (NCCL on GPUs, gloo on CPU) and the collectives the stages need."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from amas.errors import AmasError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_from_env(device_kind: str = "auto") -> DistContext:
    """Join the torchrun process group if the environment names one; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_kind != "cpu"
        if use_cuda:
            if torch.cuda.device_count() <= local:
                raise AmasError(
                    f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                    "lower --nproc-per-node or set train.device=cpu"
                )
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def context() -> DistContext:
    """The current process's place in an initialised process group (single process otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU under CUDA."""
    if device.type == "cuda" and ctx.enabled:
        return torch.device("cuda", ctx.local_rank)
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity for one process)."""
    if context().enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average .grad over ranks in place (for parameters outside DDP, e.g. masks and the discriminator)."""
    ctx = context()
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's module."""
    if not context().enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_object(obj: T) -> T:
    """Rank 0's value of a picklable object on every rank (itself for one process)."""
    if not context().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if context().enabled:
        dist.barrier()


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run fn on rank 0 only (the one writer of files), then wait for every rank; fn's result on rank 0, else None."""
    out = fn(*args, **kwargs) if context().is_main else None
    barrier()
    return out


class _SumOverRanks(torch.autograd.Function):
    """Differentiable all-reduce (sum): each rank's output is the sum over ranks, and so is each input's gradient
    (torch.distributed.nn.functional.all_reduce, deprecated)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _sum_over_ranks(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _sum_over_ranks(grad)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks, out of place (torch.compile traces the collective: no graph break)."""
    out = x.clone()
    dist.all_reduce(out)
    return out


class CrossRankBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch on every backend, CPU/gloo included.

    torch's SyncBatchNorm runs only on GPUs; this one sums the per-channel count, sum and sum of
    squares with a differentiable all-reduce, so a run over N ranks normalises exactly as one
    process over the same global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not context().enabled:
            return super().forward(x)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 where the model runs in it
        xd = x.double()  # sum and sum of squares in float64: E[x²]−E[x]² cancels badly in float32
        n_local = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=torch.float64, device=x.device)
        stats = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), n_local])
        stats = _SumOverRanks.apply(stats)
        c = self.num_features
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        mean, var, n = mean.to(xf.dtype), var.to(xf.dtype), n.to(xf.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)).detach(), alpha=m)
        y = (xf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Swap BatchNorm2d layers for global-batch BN: torch's SyncBatchNorm on CUDA, CrossRankBatchNorm on CPU."""
    if not context().enabled:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _swap_bn(model)


def _swap_bn(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = CrossRankBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        new.to(next(iter(module.buffers())).device)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, _swap_bn(child))
    return module


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AmasError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    return torch.device(name)
