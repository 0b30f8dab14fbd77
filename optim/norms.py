"""Sums of squares of tensors, accurate to float64 without float64 copies.

torch's float32 norm on a CPU accumulates the squares of a whole tensor in
float32: for an embedding gradient (a few large rows, a million tiny elements)
it is off by about 1e-3 relative, and by a different amount for each way of
cutting the tensor into blocks (FSDP). Converting to float64 first is exact
but costs a float64 copy of every tensor (18x the time of the float32 norm on
a CPU). Two levels give both: float32 norms of short chunks (CHUNK elements,
where float32 accumulation is accurate), then their squares summed in float64.
"""
from __future__ import annotations

import torch

CHUNK = 256


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """sum(t**2) of one tensor as a 0-dim float64 tensor (no host sync)."""
    flat = t.detach().reshape(-1)
    whole = flat.numel() // CHUNK * CHUNK
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    if whole:
        chunk_norms = torch.linalg.vector_norm(flat[:whole].view(-1, CHUNK).float(), dim=1)
        total = total + chunk_norms.double().square().sum()
    if whole < flat.numel():
        total = total + flat[whole:].double().square().sum()
    return total


def sums_of_squares(tensors, device=None) -> torch.Tensor:
    """(n,) float64: sum(t**2) of each tensor; 0 for a None entry (a parameter without a
    gradient), so that positions stay aligned with the parameter list. On `device`, else
    on the first tensor's (the CPU when there is none)."""
    present = [t for t in tensors if t is not None]
    if device is None:
        device = present[0].device if present else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float64, device=device)
    if not tensors:
        return zero.reshape(0)
    return torch.stack([sum_of_squares(t).to(device) if t is not None else zero for t in tensors])
