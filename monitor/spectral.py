"""Activation-covariance and per-sample-gradient spectra ("spectral lens" diagnostics).

Two views of what a model is learning, measured on a small probe batch:

- Activation covariance spectrum of each block's residual stream: the
  eigenvalues of the (C x C) covariance of token activations. Its head (the
  share of variance in the leading modes) moves when the model's
  representation changes direction; its tail (how fast the remaining
  eigenvalues decay, a power-law exponent) measured early in training has
  been reported to forecast later token efficiency, and runs at equal loss
  but different batch size settle into different tails.
- Per-sample gradient spectrum of one weight matrix: the singular values of
  the (B x P) matrix whose rows are the flattened gradients of individual
  samples. A spectrum dominated by one mode means the samples agree on one
  update direction; a flat one means they pull in many directions.
"""

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def activation_covariance_spectrum(acts: torch.Tensor) -> torch.Tensor:
    """Eigenvalues, descending, of the covariance of token activations.

    acts: (B, T, C) or (N, C); every token is one observation of a C-vector.
    Covariance = X_c^T X_c / (N - 1) with X_c the activations minus their
    mean over tokens; eigenvalues by a symmetric eigensolver in float64 (they
    span many decades), clamped at 0 against rounding, returned as float64.
    """
    x = acts.detach().reshape(-1, acts.size(-1)).double()
    if x.size(0) < 2:
        raise ValueError("an activation covariance needs at least 2 tokens")
    xc = x - x.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / (x.size(0) - 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0)


def head_mass(spectrum: torch.Tensor, k: int) -> float:
    """Fraction of the total of a descending spectrum held by its k leading values."""
    total = spectrum.sum()
    return float(spectrum[:k].sum() / total) if total > 0 else math.nan


def tail_exponent(spectrum, first=None, last=None) -> float:
    """Power-law decay exponent alpha of a descending spectrum, lambda_i ~ i^(-alpha).

    Least-squares slope of log(lambda_i) against log(i) over the 1-based ranks
    first..last (inclusive), alpha = -slope. Defaults: first =
    max(2, round(0.05 n)) and last = max(first + 1, round(0.5 n)) of the n
    positive values, which skips the leading modes (the "head", fitted
    separately) and the bottom half, where a finite probe batch bends the
    spectrum down towards its noise floor. Non-positive values are never used.
    NaN with fewer than 2 points in the range.
    """
    lam = np.asarray(spectrum.cpu() if torch.is_tensor(spectrum) else spectrum, dtype=np.float64)
    n = int(np.count_nonzero(lam > 0))
    first = max(2, round(0.05 * n)) if first is None else first
    last = max(first + 1, round(0.5 * n)) if last is None else last
    ranks = np.arange(1, len(lam) + 1)
    use = (ranks >= first) & (ranks <= last) & (lam > 0)
    if np.count_nonzero(use) < 2:
        return math.nan
    slope = np.polyfit(np.log(ranks[use]), np.log(lam[use]), 1)[0]
    return float(-slope)


def per_sample_grads(model, param_name: str, inputs: torch.Tensor, targets: torch.Tensor,
                     loss_fn=None) -> torch.Tensor:
    """Gradient of each sample's loss w.r.t. one parameter, flattened: (B, P).

    Row b is d loss(inputs[b:b+1], targets[b:b+1]) / d param, computed for the
    whole batch at once with torch.func (vmap over grad of a functional_call
    that swaps in the parameter); no .grad is touched. loss_fn(output,
    targets) -> scalar; None means the model's own loss, i.e. the model is
    called as model(inputs, targets) and returns (logits, loss), the GPT API.
    The model should be in eval mode (vmap of dropout draws would differ from
    a per-sample loop).
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    if param_name not in params:
        raise ValueError(f"model has no parameter named '{param_name}'")
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(weight, x, y):
        x, y = x.unsqueeze(0), y.unsqueeze(0)
        state = {**params, **buffers, param_name: weight}
        if loss_fn is None:
            return functional_call(model, state, (x, y))[1]
        return loss_fn(functional_call(model, state, (x,)), y)

    with warnings.catch_warnings():
        # Some kernels (CPU flash attention) have no vmap batching rule and fall back
        # to a loop: slower, still exact; not worth a warning in every probe.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params[param_name], inputs, targets)
    return grads.reshape(inputs.size(0), -1)


def cross_entropy_loss(output, targets):
    """Classifier loss for per_sample_grads: mean cross-entropy of logits (B, K)."""
    return F.cross_entropy(output, targets)


def gradient_spectrum(per_sample: torch.Tensor) -> torch.Tensor:
    """Singular values, descending, of a (B, P) per-sample gradient matrix (float32)."""
    return torch.linalg.svdvals(per_sample.float())


def spectrum_summary(sv: torch.Tensor, k: int) -> dict:
    """Summary of a descending singular-value spectrum, as floats.

    top_k_mass: share of the energy sum sigma_i^2 in the k leading modes.
    effective_rank: exp(H(p)) with p_i = sigma_i / sum sigma_j (Roy & Vetterli
    2007): 1 for a rank-one matrix, the rank when all singular values are equal.
    sigma_max: the largest singular value.
    """
    sv = sv.double()
    energy = sv ** 2
    p = sv / sv.sum()
    erank = torch.exp(-torch.special.xlogy(p, p).sum())
    return {"top_k_mass": float(energy[:k].sum() / energy.sum()), "effective_rank": float(erank),
            "sigma_max": float(sv[0])}
