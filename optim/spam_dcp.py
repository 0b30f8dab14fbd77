"""
AdamWSpam's state in a layout-independent form for sharded checkpoints
(torch.distributed.checkpoint, "DCP").

A rank of an FSDP2 run holds, for a sparse parameter, the moments of the kept
elements of its block only, as flat vectors whose length depends on where its
block starts and ends (optim/spam_shard.py). DCP can cut a tensor into any
other ranks' blocks only if every rank's piece is a block of one tensor of a
known shape. So each parameter's moments are written as tensors shaped like
the parameter, and placed like it (a DTensor with the parameter's placement
under FSDP, a plain tensor otherwise):

- `<name>.exp_avg`, `<name>.exp_avg_sq`: the moments, dense; for a sparse
  parameter the moment of each kept element at its place and 0 elsewhere;
- `<name>.mask` (sparse parameters only): uint8, 1 at the kept elements. A
  kept moment may itself be 0, so the mask cannot be read off the moments.

Everything else (each parameter's step count, the param groups, the "spam"
entry: step, last reset, gate history, mask generator) is the same on every
rank and goes into the plain, replicated part. Reading back, each rank takes
its block of the dense tensors and keeps the elements its block of the mask
names, in row-major order: exactly the state AdamWSpam keeps for that block
(the kept elements of a block are stored sorted), so a round trip is exact
and a checkpoint of N ranks loads into M ranks, or into one process.

Cost: while a checkpoint is written or read, a sparse parameter's moments take
the dense size (8 bytes per element of the rank's block, plus 1 for the mask),
as plain AdamW's would all the time.
"""

import torch

from optim.spam_shard import encode_mask, is_sharded, local

MOMENTS = ("exp_avg", "exp_avg_sq")


def _params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _placed_like(p, block):
    """`block` (this rank's block of a tensor shaped like p) as a tensor placed like p."""
    if not is_sharded(p):
        return block
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(block, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def sharded_state(optimizer, names):
    """(tensors, plain): names[i] is the name of the optimizer's i-th parameter (its
    model FQN). tensors: {"<name>.exp_avg" | ".exp_avg_sq" | ".mask": tensor shaped and
    placed like the parameter}; plain: what every rank holds alike. No communication."""
    sd = optimizer.state_dict()
    tensors, steps = {}, {}
    for index, p in enumerate(_params(optimizer)):
        state = optimizer.state.get(p)
        if not state:
            continue  # a parameter that never had a gradient has no state
        name, shape = names[index], local(p).shape
        steps[name] = state["step"]
        if "mask_offsets" in state:
            kept = optimizer.moment_index(p)
            mask = torch.zeros(shape.numel(), dtype=torch.uint8, device=kept.device)
            mask[kept] = 1
            tensors[f"{name}.mask"] = _placed_like(p, mask.view(shape))
            for moment in MOMENTS:
                dense = state[moment].new_zeros(shape.numel())
                dense[kept] = state[moment]
                tensors[f"{name}.{moment}"] = _placed_like(p, dense.view(shape))
        else:
            for moment in MOMENTS:
                tensors[f"{name}.{moment}"] = _placed_like(p, state[moment].view(shape))
    plain = {"param_groups": sd["param_groups"], "spam": sd["spam"], "steps": steps}
    return tensors, plain


def empty_sharded_state(optimizer, names, saved):
    """The tensors sharded_state() would give, zero, for what a checkpoint holds: saved
    maps each of its tensor names to its dtype. Filled by a DCP load, they go to
    load_sharded_state()."""
    tensors = {}
    for index, p in enumerate(_params(optimizer)):
        for suffix in (*MOMENTS, "mask"):
            key = f"{names[index]}.{suffix}"
            if key in saved:
                block = torch.zeros(local(p).shape, dtype=saved[key], device=p.device)
                tensors[key] = _placed_like(p, block)
    return tensors


def load_sharded_state(optimizer, names, tensors, plain):
    """Loads sharded_state()'s form (tensors placed like this optimizer's parameters,
    e.g. filled by empty_sharded_state() and a DCP load): each rank keeps its blocks'
    part. No communication."""
    states = {}
    for index, p in enumerate(_params(optimizer)):
        name = names[index]
        if name not in plain["steps"]:
            continue
        blocks = {key: local(tensors[f"{name}.{key}"]) for key in MOMENTS + ("mask",) if f"{name}.{key}" in tensors}
        states[index] = _state_of_block(plain["steps"][name], blocks, p.device)
    optimizer.load_state_dict({"state": states, "param_groups": plain["param_groups"], "spam": plain["spam"]})


def full_state_dict(tensors, plain, names):
    """The optimizer state dict of one process holding the whole model (what
    AdamWSpam.state_dict() of such a process, or full_state_dict() of a sharded one,
    returns), from sharded_state()'s form read whole (plain tensors of the parameters'
    full shapes)."""
    states = {}
    for index, name in enumerate(names):
        if name in plain["steps"]:
            blocks = {key: tensors[f"{name}.{key}"] for key in MOMENTS + ("mask",) if f"{name}.{key}" in tensors}
            states[index] = _state_of_block(plain["steps"][name], blocks, "cpu")
    return {"state": states, "param_groups": plain["param_groups"], "spam": plain["spam"]}


def _state_of_block(step, blocks, device):
    """One parameter's AdamWSpam state (of a block, or of a whole tensor) from its dense
    moments and, for a sparse parameter, its mask, all of the block's shape."""
    state = {"step": step}
    if "mask" not in blocks:
        for moment in MOMENTS:
            state[moment] = blocks[moment].to(device).contiguous()
        return state
    mask = blocks["mask"].reshape(-1)
    kept = torch.nonzero(mask).squeeze(1)  # sorted, as AdamWSpam stores the kept elements
    state["mask_offsets"], state["mask_counts"] = encode_mask(kept, mask.numel(), device)
    for moment in MOMENTS:
        state[moment] = blocks[moment].reshape(-1)[kept].to(device)
    return state
