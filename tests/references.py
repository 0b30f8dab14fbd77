"""Plain-loop references shared by several test modules."""

import numpy as np


def gsnr_loop(micro):
    """Plain reference: per element m^2 / (unbiased var + 1e-8 * mean g^2), averaged over touched elements."""
    micro = np.asarray(micro, dtype=np.float64)
    n = len(micro)
    ratios = []
    for col in micro.T:
        if not np.any(col != 0):
            continue
        m = sum(col) / n
        var = sum((v - m) ** 2 for v in col) / (n - 1)
        ratios.append(m * m / (var + 1e-8 * sum(v * v for v in col) / n))
    return np.mean(ratios)
