"""Tests for monitor/metrics.py: every metric against a hand-computed value or a
plain-loop reference written here."""

import math
import os
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from monitor import metrics as M
from references import gsnr_loop


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- norms


def test_grad_norms_by_hand_with_a_missing_gradient():
    grads = [torch.tensor([3.0, 4.0]), None, torch.tensor([[1.0, 2.0], [2.0, 4.0]])]
    assert M.per_tensor_grad_norms(grads).tolist() == [5.0, 0.0, 5.0]
    assert M.global_grad_norm(grads).item() == pytest.approx(math.sqrt(50.0))


def test_global_grad_norm_matches_a_plain_sum_of_squares():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 3, generator=g), torch.randn(11, generator=g), torch.randn(2, 2, 2, generator=g)]
    ref = math.sqrt(sum(float(x) ** 2 for t in grads for x in t.reshape(-1)))
    assert M.global_grad_norm(grads).item() == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------- GSS


def test_gss_by_hand_ema_excludes_the_current_step():
    s = M.GradSpikeScore(beta=0.5)
    gss, glob = s.update(torch.tensor([2.0, 4.0]), torch.tensor(10.0))
    assert gss.tolist() == [1.0, 1.0] and glob.item() == 1.0  # no history: reported as 1
    gss, glob = s.update(torch.tensor([4.0, 4.0]), torch.tensor(20.0))
    assert gss.tolist() == [2.0, 1.0] and glob.item() == 2.0  # 4/2: only the first norm is in the EMA
    # EMA now [0.5*2+0.5*4, 4] = [3, 4], global 15
    gss, glob = s.update(torch.tensor([30.0, 2.0]), torch.tensor(30.0))
    assert gss.tolist() == [10.0, 0.5] and glob.item() == 2.0


def test_gss_matches_a_plain_loop_reference():
    beta = 0.8
    rng = np.random.default_rng(1)
    seq = rng.uniform(0.5, 2.0, size=(20, 3))
    s = M.GradSpikeScore(beta)
    ema = None
    for norms in seq:
        got, _ = s.update(torch.tensor(norms, dtype=torch.float32), torch.tensor(1.0))
        if ema is None:
            expected, ema = [1.0, 1.0, 1.0], list(norms)
        else:
            expected = [n / e for n, e in zip(norms, ema)]
            ema = [beta * e + (1 - beta) * n for e, n in zip(ema, norms)]
        assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_gss_zero_baseline():
    s = M.GradSpikeScore(0.9)
    s.update(torch.tensor([0.0, 1.0]), torch.tensor(1.0))
    gss, _ = s.score(torch.tensor([0.0, 1.0]), torch.tensor(1.0))
    assert gss.tolist() == [1.0, 1.0]
    gss, _ = s.score(torch.tensor([3.0, 1.0]), torch.tensor(1.0))
    assert math.isinf(gss[0].item())


def test_gss_score_does_not_change_state_and_state_dict_resumes_exactly():
    a, b = M.GradSpikeScore(0.7), M.GradSpikeScore(0.7)
    seq = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0])]
    a.update(seq[0], seq[0].norm())
    a.score(torch.tensor([100.0, 100.0]), torch.tensor(100.0))  # must not move the baseline
    b.load_state_dict(a.state_dict())
    for n in seq[1:]:
        assert torch.equal(a.update(n, n.norm())[0], b.update(n, n.norm())[0])
    assert a.steps == b.steps == 3


def test_gss_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        M.GradSpikeScore(1.0)


def test_spike_clip_scales_only_tensors_above_tau_to_exactly_tau():
    grads = [torch.tensor([6.0, 8.0]), torch.tensor([1.0]), None, torch.tensor([2.0])]
    ema = torch.tensor([0.5, 1.0, 1.0, 1.0])
    norms = M.per_tensor_grad_norms(grads)
    gss = norms / ema  # [20, 1, 0, 2]
    gss[3] = float("nan")
    scales = M.spike_clip_(grads, gss, tau=10.0)
    assert scales.tolist()[:3] == [0.5, 1.0, 1.0]
    assert grads[0].tolist() == [3.0, 4.0] and grads[1].tolist() == [1.0] and grads[3].tolist() == [2.0]
    assert (M.per_tensor_grad_norms(grads) / ema)[0].item() == pytest.approx(10.0)


def test_elementwise_gss_by_hand():
    g, v = torch.tensor([1.0, -4.0]), torch.tensor([1.0, 4.0])
    assert M.elementwise_gss_max(g, v, eps=0.0).item() == 2.0
    # bias correction: v_hat = v / (1 - 0.75**1) = 4v
    assert M.elementwise_gss_max(g, v, eps=0.0, step=1, beta2=0.75).item() == 1.0
    with pytest.raises(ValueError, match="does not match"):
        M.elementwise_gss_max(g, torch.ones(3), eps=0.0)


def test_elementwise_gss_reads_torch_adamw_state():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        w.grad = torch.randn(4, 3)
        opt.step()
    w.grad = torch.randn(4, 3)
    st = opt.state[w]
    step = float(st["step"])
    got = M.elementwise_gss_max(w.grad, st["exp_avg_sq"], 1e-8, step=step, beta2=0.95).item()
    ref = max(abs(float(gi)) / (math.sqrt(float(vi) / (1 - 0.95 ** step)) + 1e-8)
              for gi, vi in zip(w.grad.reshape(-1), st["exp_avg_sq"].reshape(-1)))
    assert got == pytest.approx(ref, rel=1e-5)
    # compact sparse moments: the caller gathers the matching gradient values
    index = torch.tensor([0, 5, 11])
    got = M.elementwise_gss_max(w.grad.reshape(-1)[index], st["exp_avg_sq"].reshape(-1)[index], 1e-8).item()
    ref = max(abs(float(w.grad.reshape(-1)[i])) / (math.sqrt(float(st["exp_avg_sq"].reshape(-1)[i])) + 1e-8)
              for i in index.tolist())
    assert got == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------ update, GSNR, DDP


def test_update_ratio_of_a_real_sgd_step():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    b = nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    before = [w.detach().clone(), b.detach().clone()]
    w.grad, b.grad = torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 0.5], [0.0, 0.0]])
    torch.optim.SGD([w, b], lr=0.1).step()
    per, total = M.update_ratios(before, [w.detach(), b.detach()])
    assert per.tolist() == pytest.approx([0.1 * math.sqrt(5) / 5, 0.05 / 1.0], rel=1e-6)
    assert total.item() == pytest.approx(math.sqrt(0.05 + 0.0025) / math.sqrt(26), rel=1e-6)


def test_gsnr_by_hand():
    # elements 0 and 1 see 1 then 3: mean 2, unbiased variance 2, ratio 4 / (2 + 1e-8 * 5);
    # element 2 never gets gradient and is left out of the mean.
    micro = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([3.0, 3.0, 0.0])]
    s, s2 = sum(micro), sum(m * m for m in micro)
    assert M.gsnr_from_sums(s, s2, 2).item() == pytest.approx(4 / (2 + 5e-8), rel=1e-12)
    # the same gradient in every micro-batch: no noise, ratio capped at 1 / eps, whatever the scale
    for scale in (1.0, 1e-6):
        same = torch.tensor([2.0], dtype=torch.float64) * scale  # float64 sums, as the monitor keeps
        assert M.gsnr_from_sums(2 * same, 2 * same * same, 2).item() == pytest.approx(1e8, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        M.gsnr_from_sums(s, s2, 1)


def test_gsnr_matches_a_loop_over_micro_batches_and_ignores_scale():
    rng = np.random.default_rng(3)
    micro = rng.normal(0.3, 1.0, size=(5, 40)).astype(np.float32)
    micro[:, :4] = 0.0  # untouched elements
    s, s2 = torch.zeros(40), torch.zeros(40)
    for m in micro:  # what a caller accumulates
        t = torch.from_numpy(m)
        s += t
        s2 += t * t
    assert M.gsnr_from_sums(s, s2, 5).item() == pytest.approx(gsnr_loop(micro), rel=1e-5)
    assert M.gsnr_from_sums(s / 5, s2 / 25, 5).item() == pytest.approx(gsnr_loop(micro), rel=1e-5)


def test_direction_consistency_by_hand_and_by_loop():
    g = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    assert M.direction_consistency(g).item() == pytest.approx(math.sqrt(2) / 3, rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 30, generator=gen)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    ref = np.mean([float(g[i] @ g[j] / (g[i].norm() * g[j].norm())) for i, j in pairs])
    assert M.direction_consistency(g).item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError):
        M.direction_consistency(g[:1])


def test_loss_dispersion_is_population_std():
    assert M.loss_dispersion([1.0, 3.0]).item() == 1.0
    assert M.loss_dispersion(torch.tensor([2.5])).item() == 0.0


def test_gradient_sketch_is_a_fixed_linear_map_that_preserves_geometry():
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(300, 40, generator=gen), torch.randn(5000, generator=gen)]
    b = [torch.randn(300, 40, generator=gen), torch.randn(5000, generator=gen)]
    sa, sb = M.gradient_sketch(a, 4096, seed=7), M.gradient_sketch(b, 4096, seed=7)
    assert torch.equal(sa, M.gradient_sketch(a, 4096, seed=7))  # same seed, same projection
    assert not torch.equal(sa, M.gradient_sketch(a, 4096, seed=8))
    s_sum = M.gradient_sketch([x + y for x, y in zip(a, b)], 4096, seed=7)
    assert torch.allclose(s_sum, sa + sb, atol=1e-4)  # linear
    flat_a = torch.cat([t.reshape(-1) for t in a])
    assert sa.norm().item() == pytest.approx(flat_a.norm().item(), rel=0.1)
    # cosine of correlated vectors survives the sketch (error ~ 1/sqrt(4096))
    c = [0.6 * x + 0.8 * y for x, y in zip(a, b)]
    flat_c = torch.cat([t.reshape(-1) for t in c])
    true_cos = float(flat_a @ flat_c / (flat_a.norm() * flat_c.norm()))
    sc = M.gradient_sketch(c, 4096, seed=7)
    assert float(sa @ sc / (sa.norm() * sc.norm())) == pytest.approx(true_cos, abs=0.05)


# ------------------------------------------------------------- entropies


def test_attention_entropy_by_hand():
    probs = torch.zeros(1, 2, 2, 2)
    probs[0, 0] = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    probs[0, 1] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert M.attention_entropy(probs).tolist() == pytest.approx([math.log(2) / 2, 0.0])


def test_attention_entropy_matches_a_loop_on_causal_softmax():
    gen = torch.Generator().manual_seed(1)
    B, H, T = 2, 3, 5
    scores = torch.randn(B, H, T, T, generator=gen)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    ref = []
    for h in range(H):
        vals = []
        for b in range(B):
            for q in range(T):
                vals.append(-sum(float(p) * math.log(float(p)) for p in probs[b, h, q, : q + 1]))
        ref.append(np.mean(vals))
    assert M.attention_entropy(probs).tolist() == pytest.approx(ref, rel=1e-5)


def test_token_entropy():
    assert M.token_entropy(torch.zeros(2, 3, 4)).item() == pytest.approx(math.log(4))
    assert M.token_entropy(torch.tensor([[0.0, 1000.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, generator=gen)
    ref = []
    for row in logits:
        z = sum(math.exp(float(v)) for v in row)
        ref.append(-sum(math.exp(float(v)) / z * math.log(math.exp(float(v)) / z) for v in row))
    assert M.token_entropy(logits).item() == pytest.approx(np.mean(ref), rel=1e-5)


# -------------------------------------------------------- weight structure


def test_singular_entropy_radius_and_std_by_hand():
    sv = M.singular_values(torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    assert sv.tolist() == pytest.approx([4.0, 3.0])
    p = [16 / 25, 9 / 25]  # squared singular values, normalised
    assert M.singular_entropy(sv).item() == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-6)
    assert M.spectral_radius(sv).item() == pytest.approx(4.0)
    assert M.singular_entropy(torch.tensor([2.0, 0.0])).item() == 0.0  # rank one
    assert M.param_std(torch.tensor([1.0, 2.0, 3.0, 4.0])).item() == pytest.approx(math.sqrt(1.25))


def test_conv_weights_are_flattened_to_out_by_rest():
    w = torch.randn(4, 3, 2, 2)
    assert torch.allclose(M.singular_values(w), torch.linalg.svdvals(w.reshape(4, 12)))
    with pytest.raises(ValueError, match="2 dimensions"):
        M.singular_values(torch.ones(3))


def test_powerlaw_alpha_by_hand_at_fixed_xmin():
    alpha, xmin, _ = M.powerlaw_alpha([1.0, 2.0, 4.0, 0.0], xmin=1.0)  # the 0 is dropped
    assert alpha == pytest.approx(1 + 3 / (math.log(2) + math.log(4)))
    assert xmin == 1.0
    # tail {1, e}: alpha = 1 + 2 / (0 + 1) = 3, fitted CDF 0 and 1 - e^-2 at the two points;
    # empirical CDF steps 0 -> 1/2 -> 1, so the KS distance is 1/2 (just above x = 1)
    assert M.powerlaw_alpha([1.0, math.e], xmin=1.0) == pytest.approx((3.0, 1.0, 0.5))


def test_powerlaw_alpha_picks_the_xmin_of_smallest_ks_distance():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(0.1, 1.0, 15), (1 - rng.uniform(size=25)) ** (-1 / 1.5)])
    best = None
    xs = sorted(x)
    for xm in xs[: len(xs) - 5 + 1]:  # plain-loop reference of the KS search
        tail = [v for v in xs if v >= xm]
        n = len(tail)
        a = 1 + n / sum(math.log(v / xm) for v in tail)
        d = 0.0
        for i, v in enumerate(tail):
            cdf = 1 - (v / xm) ** (1 - a)
            d = max(d, (i + 1) / n - cdf, cdf - i / n)
        if best is None or d < best[2]:
            best = (a, xm, d)
    got = M.powerlaw_alpha(x, min_tail=5)
    assert got == pytest.approx(best, rel=1e-9)


def test_powerlaw_alpha_recovers_a_pareto_exponent():
    rng = np.random.default_rng(0)
    alpha = 2.5
    samples = 2.0 * (1 - rng.uniform(size=3000)) ** (-1 / (alpha - 1))  # Pareto, x_min = 2
    got, xmin, _ = M.powerlaw_alpha(samples)
    assert got == pytest.approx(alpha, abs=0.15)
    assert xmin >= 2.0


# -------------------------------------------------------------- loss curve


def test_collapse_residual_is_zero_on_an_exact_power_law():
    t = np.arange(1, 301)
    loss = 3.0 * t ** -0.5 + 1.5
    fit = M.collapse_residual(t, loss)
    assert fit["residual"] == pytest.approx(0.0, abs=1e-6)
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((3.0, 0.5, 1.5), rel=1e-3)


def test_collapse_residual_sees_a_bump_above_the_trend():
    t = np.arange(1, 301)
    loss = 3.0 * t ** -0.5 + 1.5
    loss[-20:] += 0.3
    fit = M.collapse_residual(t, loss, tail=20)
    assert fit["residual"] > 0.2
    assert fit["relative"] == pytest.approx(fit["residual"] / (np.mean(3.0 * t[-20:] ** -0.5 + 1.5)), rel=0.1)
    assert M.collapse_residual(t[:5], loss[:5]) is None


# --------------------------------------------------------- LM memorisation


class CountingLM(nn.Module):
    """Predicts the next token as a smoothed count of the tokens seen so far.

    Context that contains the target's tokens makes it more confident, so the
    CoDeC score of a context drawn from the same text must be positive.
    """

    vocab_size = 6

    def forward(self, idx, targets=None, return_logits=False):
        onehot = nn.functional.one_hot(idx, self.vocab_size).float()
        counts = onehot.cumsum(dim=1) + 0.1
        return counts.log(), None


def _nll_loop(model, seq, positions):
    logits, _ = model(seq[None], seq[None])
    out = []
    for t in positions:  # predict seq[t + 1] from logits at t
        logp = logits[0, t] - torch.logsumexp(logits[0, t], dim=0)
        out.append(-float(logp[seq[t + 1]]))
    return out


def test_codec_score_matches_a_loop_and_is_positive_when_context_helps():
    model = CountingLM()
    targets = torch.tensor([[1, 2, 1, 2, 1, 2], [3, 3, 4, 3, 4, 4]])
    contexts = torch.tensor([[1, 2, 2, 1], [4, 3, 3, 4]])
    without, with_ = [], []
    for k in range(2):
        without += _nll_loop(model, targets[k], range(0, 5))
        with_ += _nll_loop(model, torch.cat([contexts[k], targets[k]]), range(4, 9))
    got = M.codec_score(model, targets, contexts)
    assert got["loss_without"] == pytest.approx(np.mean(without), rel=1e-5)
    assert got["loss_with"] == pytest.approx(np.mean(with_), rel=1e-5)
    assert got["score"] == pytest.approx(np.mean(without) - np.mean(with_), rel=1e-5)
    assert got["score"] > 0


def test_zlib_entropy_and_ratio():
    data = b"abcabcabcabc" * 50
    assert M.zlib_entropy(data) == 8 * len(zlib.compress(data, 9)) / len(data)
    assert M.zlib_entropy(data) < M.zlib_entropy(os.urandom(600))
    with pytest.raises(ValueError):
        M.zlib_entropy(b"")
    model = CountingLM()
    idx = torch.tensor([[1, 2, 1, 2, 1], [0, 5, 4, 3, 2]])
    samples = [b"hello hello hello", b"qzxv wkjp"]
    got = M.zlib_perplexity_ratio(model, idx, samples)
    for k in range(2):
        log_ppl = np.mean(_nll_loop(model, idx[k], range(4)))
        assert got["log_ppl"][k] == pytest.approx(log_ppl, rel=1e-5)
        assert got["ratio"][k] == pytest.approx(log_ppl / M.zlib_entropy(samples[k]), rel=1e-5)
