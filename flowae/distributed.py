"""Process-group bookkeeping for runs under torchrun; a plain run is a world of one.

Only the CLI calls `init_from_env` (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, one or many nodes);
the training loop receives the resulting DistInfo, and `sync_batchnorm` makes BatchNorm layers
normalise with the statistics of the global batch. Imports torch only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each process of a CUDA run takes the GPU of its local rank."""
        if device.type == "cuda" and self.world_size > 1:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        backend_device = "cuda" if torch_dist.get_backend() == "nccl" else "cpu"
        reduced = values.to(backend_device)
        torch_dist.all_reduce(reduced)
        return reduced.to(values.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()


def init_from_env(device_name: str) -> DistInfo:
    """Join the process group torchrun set up (nccl for CUDA runs, gloo otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(torch_dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the processes' gradients: each rank's
    statistic feeds every rank's loss."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        torch_dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        torch_dist.all_reduce(total)
        return total


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all processes).

    torch's nn.SyncBatchNorm does this on GPUs only (it refuses CPU tensors); this one reduces
    (sum, count) and then the centred sum of squares with differentiable all-reduces, so it
    also runs under gloo on CPU. Same parameters and buffers as BatchNorm1d/2d, so its state
    dict loads into the plain model. Outside a multi-process training step it is BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected a (B, C, ...) input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch_dist.is_initialized()
                and torch_dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        values = x.float()
        count = torch.tensor([values.numel() / values.shape[1]], device=x.device)
        total = _AllReduceSum.apply(torch.cat([values.sum(dims), count]))  # (C + 1,)
        n = total[-1]
        mean = total[:-1] / n
        centred = values - mean.view(shape)
        # Two passes (mean, then centred squares): E[x^2] - E[x]^2 would cancel digits.
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (self.momentum if self.momentum is not None
                            else 1.0 / self.num_batches_tracked.item())
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm of `module` use global-batch statistics under DDP, in place.

    nn.SyncBatchNorm.convert_sync_batchnorm where it runs (CUDA, nccl), GlobalBatchNorm
    elsewhere; parameters and buffers are kept (the same tensors), so optimizers and state
    dicts are unaffected. A model without BatchNorm comes back unchanged.
    """
    if torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum,
                                          child.affine, child.track_running_stats)
            replacement.weight, replacement.bias = child.weight, child.bias
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(replacement, buffer, getattr(child, buffer))
            replacement.train(child.training)
            module.add_module(name, replacement)
        else:
            sync_batchnorm(child)
    return module
