"""The health metrics on sharded parameters (FSDP2): reductions over the ranks' blocks.

Under FSDP2 (torch.distributed.fsdp.fully_shard) every parameter, gradient
and Adam moment is a DTensor placed Shard(0): each rank holds a block of rows
and no rank holds a whole tensor. The monitor computes on the local blocks
(to_local(), a view) and reduces across the ranks so that every rank ends up
with the value one process holding the whole model would compute:

- norms (per-tensor and global gradient norms, update ratios, parameter
  std): each rank's float64 sums of squares (and sums) of its blocks, packed
  into ONE vector and all-reduced (sum); square roots afterwards. float64,
  because a float32 sum of a million squares is off by ~1e-5 relative and the
  two layouts round differently;
- the element-wise GSS maximum and p99.9 per class: exact, from one
  all-gather of each rank's largest candidates (upper_quantiles below), at the
  metric's own interval only;
- the weight spectra: each matrix gathered whole (full_tensor), one at a
  time, at their interval only;
- the probe metrics (forward passes on a held-out batch, per-example
  gradients): on an unsharded replica of the model built for the probe and
  dropped afterwards (unsharded_replica).

Everything here stays on the device and never reads a value on the host.
Every function that reduces is a collective: all ranks must call it at the
same point with the same tensors (the same parameters, in the same order).
"""

import math

import torch
import torch.distributed as dist

from optim.norms import sums_of_squares
# a DTensor or not, and its rank's block: the same test AdamWSpam's shards use
from optim.spam_shard import is_sharded, local


def shard_group(params):
    """The process group the sharded parameters are split over, or None when none is sharded.
    fully_shard places every parameter on one 1-D mesh, so the first one's mesh is everyone's."""
    for p in params:
        if is_sharded(p):
            return p.device_mesh.get_group()
    return None


def sum_over_ranks_(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over the ranks of group (a collective; no host sync)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def local_squares(tensors, device) -> torch.Tensor:
    """(n,) float64: the sum of squares of each tensor's local block (0 for a None entry).
    Accumulated in float64: the ranks' partial sums then add up to what one process's exact
    sum is, whatever the layout."""
    return sums_of_squares([local(t) for t in tensors], device)


def grad_norms_and_loss(grads, loss, group, device):
    """Per-tensor L2 norms of sharded gradients (n,) float32 and the mean of `loss` over the
    ranks (0-dim float32, or None when loss is None), from one all-reduce of one packed vector."""
    packed = local_squares(grads, device)
    if loss is not None:
        packed = torch.cat([packed, loss.detach().to(device=device, dtype=torch.float64).reshape(1)])
    sum_over_ranks_(packed, group)
    n = len(grads)
    norms = packed[:n].sqrt().float()
    mean_loss = (packed[n] / dist.get_world_size(group)).float() if loss is not None else None
    return norms, mean_loss


def update_ratios(before, after, group):
    """metrics.update_ratios on sharded parameters: before/after are the ranks' local blocks.
    ||delta|| / ||w|| per tensor (n,) and over all tensors (0-dim), float32, one all-reduce."""
    deltas = torch._foreach_sub([a.float() for a in after], [b.float() for b in before])
    device = before[0].device
    packed = torch.cat([local_squares(deltas, device), local_squares(before, device)])
    sum_over_ranks_(packed, group)
    delta2, weight2 = packed.view(2, -1).unbind()
    per_tensor = (delta2 / weight2).sqrt().float()
    total = (delta2.sum() / weight2.sum()).sqrt().float()
    return per_tensor, total


def param_stds(params, group):
    """Population std (divide by n) of every sharded parameter, (n,) float32, one all-reduce:
    the ranks' float64 sums and sums of squares, then var = E[x^2] - E[x]^2 (float64 keeps the
    cancellation harmless: a std 1e-4 of the mean leaves ~1e-8 relative error)."""
    blocks = [local(p).detach() for p in params]
    device = blocks[0].device
    sums = torch.stack([b.sum(dtype=torch.float64) for b in blocks])
    packed = torch.cat([sums, local_squares(blocks, device)])
    sum_over_ranks_(packed, group)
    sums, squares = packed.view(2, -1).unbind()
    counts = torch.tensor([p.numel() for p in params], dtype=torch.float64, device=device)
    mean = sums / counts
    return (squares / counts - mean * mean).clamp_min(0.0).sqrt().float()


def upper_quantiles(parts_by_class: dict, bound_by_class: dict, group, per: int) -> dict:
    """{class: (max, upper quantile)} of the element-wise ratios of all ranks together, exact.

    parts_by_class: {class: [this rank's ratio tensors]}, the same classes on every rank;
    bound_by_class: {class: an upper bound on the number of elements of all ranks} (the
    parameters' global sizes; more than the count when sparse moments cover a subset). The
    quantile is metrics.upper_quantile's: the m-th largest of the n values of all ranks,
    m = ceil(n / per). Each rank sends its M = ceil(bound / per) >= m largest values and its
    count in ONE all-gather; the m largest overall are among those candidates, so the answer
    is exact, and n and m are found on the device (no host read).
    """
    mine, widths = quantile_candidates(parts_by_class, bound_by_class, per)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return quantiles_from_candidates(torch.stack(gathered), widths, per)


def quantile_candidates(parts_by_class: dict, bound_by_class: dict, per: int):
    """This rank's share of upper_quantiles: (one float64 row, {class: width}). Per class, in
    the dict's order: [its element count, its width = ceil(bound / per) largest values, padded
    with -inf]. Counts come from the tensors' sizes (host metadata), not from a device read."""
    widths = {cls: max(1, math.ceil(bound_by_class[cls] / per)) for cls in parts_by_class}
    device = next(p.device for parts in parts_by_class.values() for p in parts)
    rows = []
    for cls, parts in parts_by_class.items():
        width = widths[cls]
        flat = [p.reshape(-1) for p in parts if p.numel()]
        row = torch.full((1 + width,), -math.inf, dtype=torch.float64, device=device)
        row[0] = float(sum(p.numel() for p in flat))
        if flat:
            pool = torch.cat([p.topk(min(width, p.numel())).values for p in flat])
            top = pool.topk(min(width, pool.numel())).values
            row[1:1 + top.numel()] = top.double()
        rows.append(row)
    return torch.cat(rows), widths


def quantiles_from_candidates(everyone: torch.Tensor, widths: dict, per: int) -> dict:
    """(world, row length) stack of every rank's quantile_candidates row -> {class: (max,
    m-th largest)} as 0-dim float32 tensors, m = max(1, ceil(n / per)) with n the ranks'
    total count."""
    out, start = {}, 0
    for cls, width in widths.items():
        block = everyone[:, start:start + 1 + width]
        start += 1 + width
        m = torch.clamp(torch.ceil(block[:, 0].sum() / per), min=1).long()
        ranked = block[:, 1:].reshape(-1).sort(descending=True).values
        out[cls] = (ranked[0].float(), ranked.gather(0, (m - 1).reshape(1))[0].float())
    return out


def unsharded_replica(model, build):
    """A plain (unsharded) copy of a sharded model for the probe metrics, with its weights and
    buffers: build() makes a model of the same architecture (constructed on the meta device,
    so nothing is initialised twice), every parameter is gathered whole (full_tensor, one at
    a time, a collective) into it. Costs the whole model's memory on every rank while it
    lives: drop it after the probe."""
    with torch.device("meta"):  # (the meta device also leaves the random generators alone)
        replica = build()
    device = next(local(p).device for p in model.parameters())
    # to_empty gives every module its own new tensor, which unties shared parameters
    # (GPT-2's embedding and output head): note them, and tie them again afterwards
    tied = {}
    for name, p in replica.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    replica.to_empty(device=device)
    for first, *others in tied.values():
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(replica.get_submodule(owner), attr, replica.get_parameter(first))
    mine = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in replica.named_parameters():
            source = mine[name]
            p.copy_(source.full_tensor() if is_sharded(source) else source)
        buffers = dict(model.named_buffers())
        for name, b in replica.named_buffers():
            b.copy_(local(buffers[name]))
    return replica.train(model.training)
