"""Process group and device setup for single-process and torchrun runs.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them the run is one
process. The backend follows the device: NCCL for CUDA, gloo for CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(cfg, local_rank: int) -> torch.device:
    """The device named by DEVICE_AUTO / DEVICE_CPU / DEVICE_CUDA."""
    if cfg.DEVICE_CPU:
        return torch.device("cpu")
    if cfg.DEVICE_CUDA and not torch.cuda.is_available():
        raise SystemExit("error: CONFIG_DEVICE_CUDA=y but PyTorch sees no CUDA GPU "
                         "(choose DEVICE_AUTO or DEVICE_CPU in make menuconfig)")
    if cfg.DEVICE_CUDA or (cfg.DEVICE_AUTO and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg) -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
