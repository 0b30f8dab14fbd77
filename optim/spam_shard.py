"""
AdamWSpam's sparse-momentum masks, and its work on sharded (DTensor) parameters.

Under FSDP2 (torch.distributed.fsdp.fully_shard) every parameter and gradient
is a DTensor of which each rank holds one block (Shard(0): a block of rows).
AdamWSpam works on the local blocks (to_local()): element-wise clipping,
resets, the post-reset warmup and the fused update need no other rank. What
does:

- the global gradient norm of the spike gate: the trainer's grad_norm=, or
  the local sums of squares all-reduced (reduce_sum_), so that every rank
  keeps the same gate history and takes the same decision;
- the clipped-element counts of the telemetry (all-reduced when read);
- the masks: every rank draws the whole tensor's mask from the same seeded
  generator, in the same order, and keeps the part inside its block
  (mask_part), so the union over the ranks is exactly the mask one process
  would draw, while each rank stores moments and mask for its block only
  (state per rank proportional to density / world size);
- whole-model state: full_state gathers a parameter's state into the form
  one process holding the whole model has (a collective), local_state cuts
  that form down to a rank's block (no communication). (Sharded checkpoints
  need neither: each rank writes its block in the form of optim/spam_dcp.py.)

A mask is stored as a uint8 offset of each kept element inside its block of
MASK_BLOCK elements plus one int32 count per block: about 1 byte per kept
element instead of the 8 of an int64 index, so that the state at density
0.25 is about 0.28x the dense state rather than 0.5x.
"""

from typing import NamedTuple

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    # private, but the function DTensor itself uses to place a rank's block
    # (torch 2.13 has no public equivalent)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # a torch built without distributed support: nothing is sharded
    DTensor = None

MASK_BLOCK = 256


def is_sharded(t):
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local block of a DTensor (a view: in-place writes reach the parameter), else t."""
    return t.to_local() if is_sharded(t) else t


class Layout(NamedTuple):
    """Where a rank's block sits in the whole tensor (row-major, any number of dims)."""

    global_shape: tuple
    local_shape: tuple
    offset: tuple

    @property
    def global_numel(self):
        return _numel(self.global_shape)

    @property
    def local_numel(self):
        return _numel(self.local_shape)

    @property
    def whole(self):
        return self.local_shape == self.global_shape


def _numel(shape):
    n = 1
    for size in shape:
        n *= size
    return n


def check_supported(p):
    """Sharded parameters must be Shard(dim) on a 1-D mesh (what fully_shard makes): then
    the blocks of the ranks are disjoint and together cover the tensor once."""
    placements = p.placements
    if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in placements):
        raise ValueError(f"AdamWSpam: a sharded parameter must be Shard(dim) on a 1-D device mesh "
                         f"(FSDP2 fully_shard), got {tuple(placements)} on a {p.device_mesh.ndim}-D mesh")


def layout_of(p):
    if not is_sharded(p):
        shape = tuple(p.shape)
        return Layout(shape, shape, (0,) * len(shape))
    check_supported(p)
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return Layout(tuple(p.shape), tuple(local_shape), tuple(offset))


def group_of(p):
    return p.device_mesh.get_group()


def reduce_sum_(tensor, group):
    """Sum over the ranks of `group`, in place (no host sync)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ------------------------------------------------------------------ masks

def encode_mask(indices, numel, device):
    """Sorted flat indices of the kept elements of a numel-element tensor -> (offsets, counts)."""
    n_blocks = -(-numel // MASK_BLOCK)
    counts = torch.bincount(indices // MASK_BLOCK, minlength=n_blocks).to(torch.int32)
    offsets = (indices % MASK_BLOCK).to(torch.uint8)
    return offsets.to(device), counts.to(device)


def decode_mask(offsets, counts):
    """(offsets, counts) -> the sorted flat indices (int64) of the kept elements."""
    block = torch.repeat_interleave(counts, output_size=offsets.numel())
    return block.long() * MASK_BLOCK + offsets.long()


def global_to_local(indices, layout):
    """Flat indices into the whole tensor -> (which of them lie in the block, their
    flat indices inside the block). Row-major order inside a block follows row-major
    order in the whole tensor, so sorted indices stay sorted."""
    if layout.whole:
        return torch.ones(indices.shape, dtype=torch.bool, device=indices.device), indices
    coords = torch.unravel_index(indices, layout.global_shape)
    inside = torch.ones(indices.shape, dtype=torch.bool, device=indices.device)
    inner = torch.zeros_like(indices)
    for c, start, size in zip(coords, layout.offset, layout.local_shape):
        inside &= (c >= start) & (c < start + size)
        inner = inner * size + (c - start)
    return inside, inner[inside]


def local_to_global(indices, layout):
    """Flat indices inside the block -> flat indices into the whole tensor."""
    if layout.whole:
        return indices
    coords = torch.unravel_index(indices, layout.local_shape)
    outer = torch.zeros_like(indices)
    for c, start, size in zip(coords, layout.offset, layout.global_shape):
        outer = outer * size + (c + start)
    return outer


def mask_part(chosen, layout):
    """The kept elements of the whole tensor (sorted flat indices) that lie in this
    rank's block, as sorted flat indices inside the block."""
    return global_to_local(chosen, layout)[1]


# ------------------------------------------------------------ checkpoints

def local_state(state, layout):
    """One parameter's optimizer state as one process holding the whole tensor has it
    -> this rank's part (no communication)."""
    out = dict(state)
    if "mask_offsets" in state:
        inside, inner = global_to_local(decode_mask(state["mask_offsets"], state["mask_counts"]).to(
            state["exp_avg"].device), layout)
        out["mask_offsets"], out["mask_counts"] = encode_mask(inner, layout.local_numel, state["mask_offsets"].device)
        for name in ("exp_avg", "exp_avg_sq"):
            out[name] = state[name][inside].clone()
    else:
        block = tuple(slice(start, start + size) for start, size in zip(layout.offset, layout.local_shape))
        for name in ("exp_avg", "exp_avg_sq"):
            out[name] = state[name].view(layout.global_shape)[block].clone()
    return out


def full_state(state, p):
    """This rank's optimizer state of the sharded parameter p -> the state one process
    holding the whole tensor has, on the CPU. A collective: every rank of p's mesh
    must call it, for the same parameters in the same order."""
    layout, group = layout_of(p), group_of(p)
    out = dict(state)
    if "mask_offsets" in state:
        kept = local_to_global(decode_mask(state["mask_offsets"], state["mask_counts"]), layout)
        kept = _all_gather_1d(kept, group)
        order = torch.argsort(kept, stable=True)  # the ranks' parts in the whole tensor's order
        kept = kept[order]
        out["mask_offsets"], out["mask_counts"] = encode_mask(kept.cpu(), layout.global_numel, "cpu")
        for name in ("exp_avg", "exp_avg_sq"):
            out[name] = _all_gather_1d(state[name], group)[order].cpu()
    else:
        for name in ("exp_avg", "exp_avg_sq"):
            whole = DTensor.from_local(state[name], p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[name] = whole.full_tensor().cpu()
    return out


def _all_gather_1d(t, group):
    """Concatenation in rank order of the 1-D tensors of the ranks (of any lengths)."""
    world = dist.get_world_size(group)
    length = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    lengths = [int(n) for n in lengths]  # a checkpoint may synchronise
    padded = t.new_zeros(max(lengths))
    padded[:t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)])
