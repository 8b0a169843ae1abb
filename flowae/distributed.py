"""Process-group bookkeeping for runs under torchrun; a plain run is a world of one.

Only the CLI calls `init_from_env` (torchrun's RANK/WORLD_SIZE/LOCAL_RANK); the training loop
receives the resulting DistInfo. Imports torch only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


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
