"""Tests for monitor/spectral.py against numpy, hand-computed cases and a loop of
per-sample backward passes."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import GPT, GPTConfig
from monitor import spectral as S


pytestmark = pytest.mark.usefixtures("one_thread")


def test_covariance_spectrum_by_hand():
    # tokens (1,0), (-1,0), (0,2), (0,-2): mean 0, covariance diag(2/3, 8/3) with N - 1 = 3
    acts = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]], [[0.0, 2.0], [0.0, -2.0]]])
    assert S.activation_covariance_spectrum(acts).tolist() == pytest.approx([8 / 3, 2 / 3])


def test_covariance_spectrum_equals_numpy():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(6, 6))
    x = rng.normal(size=(3, 40, 6)) @ mix + 5.0  # correlated features, non-zero mean
    ref = np.sort(np.linalg.eigvalsh(np.cov(x.reshape(-1, 6), rowvar=False)))[::-1]
    got = S.activation_covariance_spectrum(torch.tensor(x, dtype=torch.float32))
    assert got.tolist() == pytest.approx(ref.tolist(), rel=1e-4)


def test_head_mass():
    assert S.head_mass(torch.tensor([4.0, 3.0, 2.0, 1.0]), 2) == pytest.approx(0.7)


def test_tail_exponent_recovers_a_planted_decay():
    lam = torch.arange(1, 201, dtype=torch.float64) ** -1.5
    assert S.tail_exponent(lam) == pytest.approx(1.5)
    assert S.tail_exponent(lam, first=1, last=10) == pytest.approx(1.5)
    # a head that does not follow the law is outside the default range and does not matter
    bent = lam.clone()
    bent[:5] *= 50
    assert S.tail_exponent(bent) == pytest.approx(1.5)
    assert math.isnan(S.tail_exponent(torch.tensor([1.0, 0.0, 0.0])))


def test_tail_exponent_slope_by_hand():
    # lambda = 1, 1/4 at ranks 1, 2: slope log(1/4)/log(2) = -2
    assert S.tail_exponent([1.0, 0.25], first=1, last=2) == pytest.approx(2.0)


def _loop_per_sample_grads(model, name, x, y, loss_fn=None):
    param = dict(model.named_parameters())[name]
    rows = []
    for b in range(x.size(0)):
        model.zero_grad()
        if loss_fn is None:
            loss = model(x[b:b + 1], y[b:b + 1])[1]
        else:
            loss = loss_fn(model(x[b:b + 1]), y[b:b + 1])
        loss.backward()
        rows.append(param.grad.reshape(-1).clone())
    return torch.stack(rows)


def test_per_sample_grads_equal_a_loop_of_backward_passes_on_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=30)).eval()
    x = torch.randint(0, 30, (3, 8))
    y = torch.randint(0, 30, (3, 8))
    name = "transformer.h.1.mlp.c_fc.weight"
    got = S.per_sample_grads(model, name, x, y)
    assert all(p.grad is None for p in model.parameters())  # torch.func leaves .grad alone
    assert got.shape == (3, 16 * 64)
    assert torch.allclose(got, _loop_per_sample_grads(model, name, x, y), atol=1e-6)


def test_per_sample_grads_with_a_classifier_loss():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(4, 5), torch.tensor([0, 2, 1, 2])
    got = S.per_sample_grads(model, "0.weight", x, y, S.cross_entropy_loss)
    assert torch.allclose(got, _loop_per_sample_grads(model, "0.weight", x, y, S.cross_entropy_loss), atol=1e-6)
    with pytest.raises(ValueError, match="no parameter"):
        S.per_sample_grads(model, "nope", x, y, S.cross_entropy_loss)


def test_gradient_spectrum_summary_by_hand():
    sv = S.gradient_spectrum(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))
    assert sv.tolist() == pytest.approx([4.0, 3.0])
    s = S.spectrum_summary(sv, 1)
    assert s["top_k_mass"] == pytest.approx(16 / 25)
    p = [4 / 7, 3 / 7]
    assert s["effective_rank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert s["sigma_max"] == pytest.approx(4.0)
    assert S.spectrum_summary(torch.tensor([2.0, 2.0, 2.0]), 1)["effective_rank"] == pytest.approx(3.0)
