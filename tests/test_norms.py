"""optim.norms: sums of squares accurate to float64, from float32 chunks."""
import math

import torch

from optim.norms import CHUNK, sum_of_squares, sums_of_squares


def test_sum_of_squares_matches_an_exact_loop():
    torch.manual_seed(0)
    # lengths around the chunk size, and values of very different magnitudes
    for n in (1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5):
        t = torch.randn(n) * torch.logspace(-4, 4, n)
        exact = math.fsum(float(x) ** 2 for x in t.tolist())  # correctly rounded sum of the float32 values
        assert abs(sum_of_squares(t).item() - exact) <= 1e-6 * exact, n
    assert sum_of_squares(torch.tensor([3.0, 4.0])).item() == 25.0
    assert sum_of_squares(torch.zeros(0)).item() == 0.0


def test_accurate_where_torch_float32_norm_is_not_and_equal_over_blocks():
    # an embedding-sized gradient with some larger rows
    torch.manual_seed(1)
    g = torch.randn(50304, 128)
    g[:100] *= 100
    exact = g.double().square().sum().item()
    assert abs(torch.linalg.vector_norm(g).item() ** 2 - exact) > 1e-4 * exact  # what torch's float32 gives
    assert abs(sum_of_squares(g).item() - exact) <= 1e-7 * exact
    # rows cut into two uneven blocks (FSDP's Shard(0)) add up to the whole
    blocks = sums_of_squares([g[:25153], g[25153:]])
    assert blocks.dtype == torch.float64 and abs(blocks.sum().item() - exact) <= 1e-7 * exact
