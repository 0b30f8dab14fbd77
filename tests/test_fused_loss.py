"""Tests for models/fused_loss.py: the chunked output-head cross-entropy.

References: a hand-computed 2 x 3 case, a per-row Python loop for the loss,
and the plain path (h @ weight.T, then F.cross_entropy, differentiated by
autograd) for the gradients, in fp64 and fp32.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import GPT, GPTConfig
from models import fused_loss
from models.fused_loss import chunk_rows, linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(N=10, C=6, V=13, dtype=torch.float64, seed=0, ignore=(1, 7)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, C, generator=g, dtype=dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignore)] = -1
    return h, w, t


def _plain(h, w, t, scale=1.0):
    loss = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    gh, gw = torch.autograd.grad(loss * scale, (h, w))
    return loss, gh, gw


def _fused(h, w, t, scale=1.0, rows=None):
    loss = linear_cross_entropy(h, w, t, ignore_index=-1, rows=rows)
    gh, gw = torch.autograd.grad(loss * scale, (h, w))
    return loss, gh, gw


def test_hand_computed_two_by_three():
    # h = [1, 2] (C = 1), weight = [0, 1, 2]: logits [0, 1, 2] and [0, 2, 4]
    h = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([2, 0])
    e = math.e
    row0 = math.log(1 + e + e**2) - 2
    row1 = math.log(1 + e**2 + e**4) - 0
    loss, gh, gw = _fused(h, w, t)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-14)
    # d row_i / d h_i = sum_v p_iv w_v - w_target; halved by the mean
    p0 = [1 / (1 + e + e**2), e / (1 + e + e**2), e**2 / (1 + e + e**2)]
    p1 = [1 / (1 + e**2 + e**4), e**2 / (1 + e**2 + e**4), e**4 / (1 + e**2 + e**4)]
    assert gh[0, 0].item() == pytest.approx((p0[1] + 2 * p0[2] - 2) / 2, abs=1e-14)
    assert gh[1, 0].item() == pytest.approx((p1[1] + 2 * p1[2] - 0) / 2, abs=1e-14)
    # d loss / d w_v = sum_i (p_iv - [v == t_i]) h_i / 2
    for v in range(3):
        want = ((p0[v] - (v == 2)) * 1 + (p1[v] - (v == 0)) * 2) / 2
        assert gw[v, 0].item() == pytest.approx(want, abs=1e-14)
    # ignoring the second row leaves the first row's loss alone, not halved
    loss, gh, gw = _fused(h, w, torch.tensor([2, -1]))
    assert loss.item() == pytest.approx(row0, abs=1e-14)
    assert gh[1, 0].item() == 0.0


def test_loss_equals_a_per_row_loop():
    h, w, t = _problem()
    h, w = h.detach(), w.detach()
    loss = linear_cross_entropy(h, w, t, rows=3)
    terms = []
    for i in range(h.size(0)):
        if t[i] == -1:
            continue
        logits = [float(h[i] @ w[v]) for v in range(w.size(0))]
        m = max(logits)
        terms.append(m + math.log(sum(math.exp(x - m) for x in logits)) - logits[t[i]])
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)


@pytest.mark.parametrize("rows", [1, 3, 4, 10, None])
def test_fp64_gradients_equal_the_plain_path(rows):
    h, w, t = _problem()
    ref = _plain(h, w, t, scale=0.37)  # a non-unit incoming gradient, as with accumulation
    got = _fused(h, w, t, scale=0.37, rows=rows)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_fp32_gradients_within_1e5_relative():
    h, w, t = _problem(N=64, C=32, V=200, dtype=torch.float32, seed=3, ignore=(0, 5, 63))
    ref = _plain(h, w, t)
    got = _fused(h, w, t, rows=24)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_every_target_ignored_is_nan_with_zero_grads_like_cross_entropy():
    h, w, t = _problem(ignore=range(10))
    ref, got = _plain(h, w, t), _fused(h, w, t)
    assert torch.isnan(ref[0]) and torch.isnan(got[0])
    assert (ref[1] == 0).all() and (got[1] == 0).all() and (ref[2] == 0).all() and (got[2] == 0).all()


def test_no_grad_gives_the_loss_without_autograd():
    h, w, t = _problem()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, rows=4)
    assert not loss.requires_grad
    assert torch.allclose(loss, F.cross_entropy(h @ w.t(), t, ignore_index=-1), atol=1e-12)


def test_bad_shapes_are_refused():
    h, w, t = _problem()
    with pytest.raises(ValueError, match="needs h"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="needs h"):
        linear_cross_entropy(h, w[:, :-1], t)


def test_chunk_rows():
    assert fused_loss.LOGIT_CHUNK_BYTES == 16 * 2**20 and fused_loss.MIN_CHUNK_ROWS == 256
    assert chunk_rows(10_000, 50304) == 256  # the byte budget allows 83 rows; the floor wins
    assert chunk_rows(100_000, 320) == 16 * 2**20 // (4 * 320)  # byte vocabulary: the byte budget
    assert chunk_rows(100, 320) == 100  # never more than the rows there are


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_no_rows_by_vocab_tensor_exists_forward_or_backward():
    N, C, V, rows = 96, 8, 500, 16
    h, w, t = _problem(N=N, C=C, V=V, dtype=torch.float32, ignore=())
    with LargestTensor() as fused:
        linear_cross_entropy(h, w, t, rows=rows).backward()
    with LargestTensor() as plain:
        F.cross_entropy(h @ w.t(), t).backward()
    assert plain.numel == N * V
    assert fused.numel == rows * V  # one chunk's logits at most


def _tiny_gpt(dtype):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=40, vocab_pad_multiple=16)
    return GPT(cfg).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_whole_gpt_gradients_equal_the_plain_path(monkeypatch, dtype, tol):
    # small chunks, so a (3 x 12)-token batch runs through several chunks and a tail
    monkeypatch.setattr(fused_loss, "LOGIT_CHUNK_BYTES", 4 * 48 * 10)
    monkeypatch.setattr(fused_loss, "MIN_CHUNK_ROWS", 0)
    model = _tiny_gpt(dtype)
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 40, (3, 12), generator=g), torch.randint(0, 40, (3, 12), generator=g)
    targets[1, :4] = -1
    grads = {}
    for name, kw in (("plain", dict(return_logits=True)), ("fused", {})):
        model.zero_grad()
        logits, loss = model(idx, targets, **kw)
        assert (logits is None) == (name == "fused")
        (loss * 0.5).backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert abs(grads["fused"][0] - grads["plain"][0]) <= tol * abs(grads["plain"][0])
    for n, ref in grads["plain"][1].items():
        got = grads["fused"][1][n]
        assert (got - ref).abs().max() <= tol * ref.abs().max(), n


def test_per_sample_gradients_through_vmap():
    # torch.func.grad inside vmap (the monitor's per-sample gradients) against a loop
    h, w, t = _problem(N=6, ignore=(2,))
    h, w = h.detach(), w.detach()

    def sample_loss(weight, h_row, t_row):
        return linear_cross_entropy(h_row.unsqueeze(0), weight, t_row.unsqueeze(0))

    got = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(w, h, t)
    for i in range(6):
        wi = w.clone().requires_grad_()
        ref = torch.autograd.grad(F.cross_entropy(h[i:i + 1] @ wi.t(), t[i:i + 1], ignore_index=-1), wi)[0]
        assert torch.allclose(got[i], ref, atol=1e-12)  # zero where the target is ignored
    assert (got[2] == 0).all()


def test_bf16_autocast_matmul_in_bf16_loss_and_grads_in_fp32():
    h, w, t = _problem(N=40, C=16, V=70, dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_loss._compute_dtypes(h) == (torch.bfloat16, torch.float32)
        got = _fused(h, w, t, rows=16)
        ref = _plain(h, w, t)
    assert got[0].dtype == torch.float32 and ref[0].dtype == torch.float32
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    # both paths multiply bf16-rounded operands; they differ only in rounding order
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    # and the matmul really ran in bf16: far from the fp32 result at this tolerance
    full = _plain(h, w, t)
    assert not torch.allclose(got[0], full[0], rtol=0, atol=1e-7)
