"""FSDP2 (torch.distributed.fsdp.fully_shard) for models that do not fit one device.

Each transformer block (GPT-2) or residual stage (ResNet) becomes one shard
unit, then the root module; parameters become DTensors sharded across ranks.
Checkpoints gather full (unsharded) state dicts so they load into any layout.
"""
from __future__ import annotations

import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard


def shard_units(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "transformer"):
        return list(model.transformer.h)
    return list(model.blocks)  # ResNet: one unit per residual block


def shard_model(model: nn.Module) -> nn.Module:
    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict:
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    if hasattr(optimizer, "full_state_dict"):  # AdamWSpam gathers its own (sparse masks, the "spam" entry)
        return optimizer.full_state_dict()
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, model_state, options=opts)
    if hasattr(optimizer, "load_full_state_dict"):  # AdamWSpam: each rank keeps its shards' part
        optimizer.load_full_state_dict(optimizer_state)
    else:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)
