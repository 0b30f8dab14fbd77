"""Process group and device setup for single-process and torchrun runs.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them the run is one
process. The backend follows the device: NCCL for CUDA, gloo for CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

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
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(seconds=cfg.DIST_TIMEOUT_S))
    return DistInfo(rank, world_size, local_rank, device)


# Settings that may legitimately differ between the nodes of one run: each node
# keeps its own data cache, and only rank 0 writes the run folder.
PER_NODE_SETTINGS = {"DATA_DIR", "OUT_DIR"}


def check_ranks_agree(info: DistInfo, settings: dict, data: dict) -> None:
    """Refuse to train unless every rank has rank 0's settings and sees the same data.

    Nodes of a multi-node run read their own .config and their own prepared
    corpus; a difference would silently train a different model on each node
    (or desynchronise the data order), so it stops every rank with the names
    of what differs.
    """
    if not info.enabled:
        return
    mine = {"settings": {k: v for k, v in settings.items() if k not in PER_NODE_SETTINGS}, "data": data}
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    reference = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        names = sorted(k for k in set(reference["settings"]) | set(theirs["settings"])
                       if reference["settings"].get(k) != theirs["settings"].get(k))
        if names:
            raise SystemExit(f"error: rank {rank} has settings that differ from rank 0's: "
                             f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}; give every "
                             "node the same .config (make settings) before starting")
        if theirs["data"] != reference["data"]:
            raise SystemExit(f"error: rank {rank} reads different training data from rank 0 "
                             f"({theirs['data']} vs {reference['data']}); prepare the same corpus on "
                             "every node")


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


def share_checkpoint(info: DistInfo, restored):
    """Every rank resumes from rank 0's checkpoint.

    Only rank 0 writes checkpoints, so on nodes that do not share its
    filesystem the other ranks find none (or an older one). When the ranks
    disagree, rank 0 sends its (state, path) to all of them.
    """
    if not info.enabled:
        return restored
    step = restored[0]["step"] if restored is not None else -1
    steps = [None] * info.world_size
    dist.all_gather_object(steps, step)
    if all(s == steps[0] for s in steps):
        return restored
    box = [restored if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
