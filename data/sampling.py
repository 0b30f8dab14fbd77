"""Seeding shared by the batch samplers.

A batch must be a pure function of (seed, micro-batch index): each draw gets its own
torch.Generator seeded by hashing the key with numpy's SeedSequence, so there is no
RNG state to save, resuming needs only the micro-batch counter, and neighbouring
seeds or indices do not give correlated streams.
"""

import numpy as np
import torch


def seeded_generator(*key):
    """A fresh torch.Generator determined only by the non-negative integers in `key`."""
    seed = np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def rank_rows(global_batch, rank, local_batch):
    """Rank r's share of the global batch: rows [r*local_batch, (r+1)*local_batch)."""
    return global_batch[rank * local_batch:(rank + 1) * local_batch]


def check_ranks(local_batch, rank, world_size):
    if local_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch layout: local_batch={local_batch}, rank={rank}, "
                         f"world_size={world_size}")
