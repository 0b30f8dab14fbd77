"""FSDP2 (torch.distributed.fsdp.fully_shard) for models that do not fit one device,
and the model and optimizer state of a sharded run.

Each transformer block (GPT-2) or residual stage (ResNet) becomes one shard
unit, then the root module; parameters become DTensors sharded across ranks.

Checkpoints of an FSDP run are sharded (train/sharded_checkpoint.py writes
them): sharded_state() gives each rank's part as tensors named in a
layout-independent way, placed like the parameters (DTensors), plus the plain
part that every rank holds alike. The names are

- `model.<FQN>`: the model's state dict;
- `optim.<FQN>.<state>`: the optimizer state of parameter FQN. For
  torch.optim.AdamW and SGD, torch's own sharded optimizer state dict
  (exp_avg, exp_avg_sq, step, momentum_buffer); for AdamWSpam, its moments
  made dense plus its mask (optim/spam_dcp.py).

Such a checkpoint loads into any number of ranks (load_sharded_state: each
rank reads its blocks) or into one process without a process group
(full_optimizer_state turns the optimizer part into what optimizer.state_dict()
of one process holds). A checkpoint file of a one-process or DDP run (whole
tensors) loads into a sharded model with load_full_state / load_full_weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

from optim import spam_dcp


def shard_units(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "transformer"):
        return list(model.transformer.h)
    return list(model.blocks)  # ResNet: one unit per residual block


def shard_model(model: nn.Module) -> nn.Module:
    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


def _is_spam(optimizer) -> bool:
    return hasattr(optimizer, "load_full_state_dict")  # AdamWSpam keeps its own (sparse) form


def _sharded_registered(model: nn.Module) -> None:
    """Put the sharded parameters back on the modules: FSDP2 leaves the root's gathered
    (unsharded) ones there after a forward pass without backward (an evaluation)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def param_names(model: nn.Module, optimizer) -> list[str]:
    """The model FQN of each of the optimizer's parameters, in the optimizer's order
    (the same for every number of ranks: the order is the model's)."""
    _sharded_registered(model)
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


# ------------------------------------------------------------ sharded (DCP) form

def sharded_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(tensors, plain) of a sharded run: this rank's shards, named as in the module
    docstring, and the plain optimizer data every rank holds alike."""
    names = param_names(model, optimizer)
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    if _is_spam(optimizer):
        optim_tensors, plain = spam_dcp.sharded_state(optimizer, names)
        plain = {"kind": "adamw_spam", **plain}
    else:
        osd = get_optimizer_state_dict(model, optimizer)
        optim_tensors = {f"{fqn}.{k}": v for fqn, s in osd["state"].items() for k, v in s.items()
                         if torch.is_tensor(v)}
        others = {fqn: {k: v for k, v in s.items() if not torch.is_tensor(v)} for fqn, s in osd["state"].items()}
        plain = {"kind": "torch", "param_groups": osd["param_groups"], "state": others}
    tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
    return tensors, {"param_names": names, **plain}


def empty_sharded_state(model: nn.Module, optimizer, plain: dict, saved: dict, weights_only: bool) -> dict:
    """Tensors of sharded_state()'s names and placements for a DCP load to fill: the
    model's own (loaded in place) and, unless weights_only, the optimizer's for every
    name the checkpoint holds (saved: name -> dtype)."""
    _sharded_registered(model)
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    if weights_only:
        return tensors
    _check_same_parameters(model, optimizer, plain)
    if plain["kind"] == "adamw_spam":
        names = plain["param_names"]
        inner = {k[len("optim."):]: dtype for k, dtype in saved.items() if k.startswith("optim.")}
        targets = spam_dcp.empty_sharded_state(optimizer, names, inner)
    else:  # torch's sharded state dict of the optimizer as it is now (it creates the state)
        osd = get_optimizer_state_dict(model, optimizer)
        targets = {f"{fqn}.{k}": v for fqn, s in osd["state"].items() for k, v in s.items()
                   if torch.is_tensor(v) and f"optim.{fqn}.{k}" in saved}
    tensors.update({f"optim.{k}": v for k, v in targets.items()})
    return tensors


def load_sharded_state(model: nn.Module, optimizer, tensors: dict, plain: dict, weights_only: bool) -> None:
    """Put empty_sharded_state()'s tensors, filled by a DCP load, into the model and
    (unless weights_only) the optimizer. No communication."""
    set_model_state_dict(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if weights_only:
        return
    inner = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
    if plain["kind"] == "adamw_spam":
        spam_dcp.load_sharded_state(optimizer, plain["param_names"], inner, plain)
    else:
        set_optimizer_state_dict(model, optimizer, _torch_state(inner, plain))


def full_optimizer_state(tensors: dict, plain: dict) -> dict:
    """What optimizer.state_dict() of one process holds (parameters by index), from the
    optimizer tensors of a sharded checkpoint read whole (names without "optim.")."""
    names = plain["param_names"]
    if plain["kind"] == "adamw_spam":
        return spam_dcp.full_state_dict(tensors, plain, names)
    by_name = _torch_state(tensors, plain)
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[fqn]: s for fqn, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in by_name["param_groups"]]}


def _torch_state(tensors: dict, plain: dict) -> dict:
    """torch's optimizer state dict (parameters by FQN) from the tensors named
    "<FQN>.<state>" and the plain part."""
    state = {fqn: dict(values) for fqn, values in plain["state"].items()}
    for key, value in tensors.items():
        fqn, name = key.rsplit(".", 1)
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _check_same_parameters(model: nn.Module, optimizer, plain: dict) -> None:
    names = param_names(model, optimizer)
    if names != plain["param_names"]:
        raise ValueError(f"the checkpoint's optimizer holds other parameters ({len(plain['param_names'])}, "
                         f"e.g. {plain['param_names'][:1]}) than this model's ({len(names)}, e.g. {names[:1]})")


# ------------------------------------------------ whole tensors into sharded ones

_FULL = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)


def load_full_weights(model: nn.Module, model_state: dict) -> None:
    """A whole-tensor model state dict (a checkpoint file) into the sharded model: each
    rank keeps its blocks."""
    set_model_state_dict(model, model_state, options=_FULL)


def load_full_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """A checkpoint file's model and optimizer state (whole tensors) into the sharded run."""
    load_full_weights(model, model_state)
    if _is_spam(optimizer):  # AdamWSpam: each rank keeps the part of its blocks
        optimizer.load_full_state_dict(optimizer_state)
        return
    if all(isinstance(k, int) for k in optimizer_state["state"]):  # optimizer.state_dict(): by index
        names = param_names(model, optimizer)
        optimizer_state = {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
                           "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                            for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_FULL)
