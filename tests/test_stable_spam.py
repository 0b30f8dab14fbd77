"""Stable-SPAM against a plain per-element reference written from
shared/docs/spike-methods.md section 2, including the two reset defects of the
authors' code (reproduced in the reference, to show the class avoids them)."""

import io
import math
import types

import pytest
import torch

from optim import StableSpam, build_optimizer


def reference(params, grad_steps, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.0, gamma1=0.7,
              gamma2=0.9, gamma3=0.999, interval=1000, stale_reset=False, clip_counter_resets=False):
    """Stable-SPAM in plain floats, one element at a time. Returns (params after each step,
    AdaClip clipped-element count of each step).

    stale_reset: the authors' reset, whose step still uses and updates the old moments with
    Adam's counter already at 1, and whose new zero moments only start at the next step.
    clip_counter_resets: the authors' reset, which also restarts AdaClip's bias-correction counter.
    """
    params = [list(p) for p in params]
    st = [dict(m=[0.0] * len(p), v=[0.0] * len(p), t=0, j_clip=0, j_norm=0, T=0.0, mn=0.0, vn=0.0)
          for p in params]
    history, clipped_counts = [], []
    b1, b2 = betas
    for k, grads in enumerate(grad_steps, start=1):
        reset = k % interval == 0
        clipped = 0
        for p, g, s in zip(params, grads, st):
            if reset:
                s["t"] = 0
                if not stale_reset:
                    s["m"], s["v"] = [0.0] * len(p), [0.0] * len(p)
                if clip_counter_resets:
                    s["j_clip"] = 0
            s["t"] += 1
            s["j_clip"] += 1
            s["j_norm"] += 1
            for i in range(len(p)):  # decoupled weight decay
                p[i] *= 1 - lr * wd
            # AdaClip
            a = max(abs(x) for x in g)
            s["T"] = gamma3 * s["T"] + (1 - gamma3) * a
            t_hat = s["T"] / (1 - gamma3 ** s["j_clip"])
            g = list(g)
            for i in range(len(g)):
                if abs(g[i]) > t_hat:
                    g[i] = g[i] * t_hat / a
                    clipped += 1
            # AdaGN
            n = math.sqrt(sum(x * x for x in g))
            s["mn"] = gamma1 * s["mn"] + (1 - gamma1) * n
            s["vn"] = gamma2 * s["vn"] + (1 - gamma2) * n * n
            m_hat = s["mn"] / (1 - gamma1 ** s["j_norm"])
            v_hat = s["vn"] / (1 - gamma2 ** s["j_norm"])
            if n > 0:
                g = [x / n * m_hat / (math.sqrt(v_hat) + eps) for x in g]
            # Adam
            for i in range(len(p)):
                s["m"][i] = b1 * s["m"][i] + (1 - b1) * g[i]
                s["v"][i] = b2 * s["v"][i] + (1 - b2) * g[i] * g[i]
                m_hat_i = s["m"][i] / (1 - b1 ** s["t"])
                v_hat_i = s["v"][i] / (1 - b2 ** s["t"])
                p[i] -= lr * m_hat_i / (math.sqrt(v_hat_i) + eps)
            if reset and stale_reset:  # the fresh zeros arrive after the step
                s["m"], s["v"] = [0.0] * len(p), [0.0] * len(p)
        history.append([list(p) for p in params])
        clipped_counts.append(clipped)
    return history, clipped_counts


def gradient_stream(sizes, steps, seed=0, spikes=()):
    """Gradients per step (lists of floats), with chosen elements multiplied at chosen steps."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for k in range(1, steps + 1):
        grads = [torch.randn(n, generator=rng, dtype=torch.float64).tolist() for n in sizes]
        for step, tensor, element, factor in spikes:
            if step == k:
                grads[tensor][element] *= factor
        out.append(grads)
    return out


def run_class(params0, grad_steps, *, wd=0.0, shapes=None, lr=1e-2, **kw):
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in params0]
    opt = StableSpam([dict(params=params, weight_decay=wd)], lr=lr, **kw)
    history, clipped = [], []
    for grads in grad_steps:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        history.append([p.detach().tolist() for p in params])
        clipped.append(int(opt.telemetry()["clipped_count"].item()))
    return history, clipped, opt


def assert_close(got, expected, rel=1e-10):
    for step, (got_step, exp_step) in enumerate(zip(got, expected)):
        for g, e in zip(got_step, exp_step):
            assert g == pytest.approx(e, rel=rel, abs=1e-14), f"step {step + 1}"


def max_difference(a, b):
    return max(abs(x - y) for sa, sb in zip(a, b) for pa, pb in zip(sa, sb) for x, y in zip(pa, pb))


SIZES = (6, 4, 1)
PARAMS0 = [[0.5, -0.3, 0.2, 0.1, -0.7, 0.05], [1.0, -1.0, 0.25, 0.0], [0.3]]


@pytest.mark.parametrize("kw", [
    dict(),  # the authors' defaults
    dict(wd=0.1, betas=(0.8, 0.95), gamma1=0.85, gamma2=0.99999, gamma3=0.9, interval=4, eps=1e-6),
    dict(gamma1=0.0, gamma3=0.0, interval=3),
], ids=["defaults", "bf16-gammas-wd-reset", "zero-gammas"])
def test_matches_the_plain_reference_over_steps_and_resets(kw):
    grads = gradient_stream(SIZES, 9, spikes=[(3, 0, 2, 30.0), (6, 1, 0, -50.0), (8, 2, 0, 10.0)])
    grads[4][1] = [0.0] * 4  # a zero gradient: AdaGN leaves it alone
    expected, expected_clipped = reference(PARAMS0, grads, **kw)
    kw_class = {("weight_decay" if k == "wd" else k): v for k, v in kw.items()}
    wd = kw_class.pop("weight_decay", 0.0)
    got, clipped, _ = run_class(PARAMS0, grads, wd=wd, **kw_class)
    assert_close(got, expected)
    assert clipped == expected_clipped
    assert (sum(clipped) > 0) == (kw.get("gamma3", 0.999) > 0)  # gamma3 = 0: the threshold is max|g| itself


def test_reset_zeroes_the_moments_before_the_step_uses_them():
    # Defect 1 of the authors' code: their reset step still runs on the old moments
    # (with Adam's counter at 1) and its gradient never enters the fresh ones.
    grads = gradient_stream(SIZES, 8, seed=5)
    correct, _ = reference(PARAMS0, grads, interval=4)
    stale, _ = reference(PARAMS0, grads, interval=4, stale_reset=True)
    got, _, opt = run_class(PARAMS0, grads, interval=4)
    assert_close(got, correct)
    assert max_difference(got, stale) > 1e-3  # the defect would show
    assert_close(got[:3], stale[:3])  # and only from the reset on
    # step 8 reset again: Adam's counter restarted and counted that step; j kept running
    state = opt.state[opt.param_groups[0]["params"][2]]
    assert (state["step"], state["stat_step"]) == (1, 8)
    assert opt.read_telemetry()["reset"] == 1.0


def test_unscheduled_reset_equals_a_periodic_one():
    grads = gradient_stream(SIZES, 6, seed=2)
    expected, _ = reference(PARAMS0, grads, interval=4)
    head, _, opt = run_class(PARAMS0, grads[:3], interval=1000)
    opt.reset_momentum()  # before step 4, as the reset at k = 4 would
    params = opt.param_groups[0]["params"]
    for grads_k, exp in zip(grads[3:], expected[3:]):
        for p, g in zip(params, grads_k):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        assert_close([[p.detach().tolist() for p in params]], [exp])


def test_adaclip_counter_keeps_running_across_resets():
    # Defect 2 of the authors' code: their reset restarts AdaClip's bias correction, so
    # T_hat jumps to about 1/(1 - gamma3^j) times the typical max|g| and a spike right
    # after the reset passes unclipped.
    grads = gradient_stream(SIZES, 24, seed=7)
    grads[21][0][1], grads[22][1][3] = 8.0, -8.0  # steps 22 and 23: |g| about 4x the usual max
    correct, correct_clipped = reference(PARAMS0, grads, interval=20)
    buggy, buggy_clipped = reference(PARAMS0, grads, interval=20, clip_counter_resets=True)
    got, clipped, _ = run_class(PARAMS0, grads, interval=20)
    assert_close(got, correct)
    assert clipped == correct_clipped
    assert correct_clipped[21] >= 1 and correct_clipped[22] >= 1  # the spikes are clipped
    assert buggy_clipped[21] == 0 and buggy_clipped[22] == 0  # the defect lets them through
    assert max_difference(got, buggy) > 1e-3


def test_state_dict_round_trip_resumes_exactly():
    grads = gradient_stream(SIZES, 10, seed=3, spikes=[(7, 0, 0, 40.0)])
    whole, _, _ = run_class(PARAMS0, grads, interval=5, wd=0.1)
    head, _, opt = run_class(PARAMS0, grads[:4], interval=5, wd=0.1)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in head[-1]]
    fresh = StableSpam([dict(params=params, weight_decay=0.1)], lr=1e-2, interval=5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for grads_k, expected in zip(grads[4:], whole[4:]):
        for p, g in zip(params, grads_k):
            p.grad = torch.tensor(g, dtype=torch.float64)
        fresh.step()
        assert [p.detach().tolist() for p in params] == expected  # bit for bit
    with pytest.raises(ValueError, match="not from StableSpam"):
        fresh.load_state_dict(torch.optim.AdamW(params).state_dict())


def test_step_has_no_host_sync(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = StableSpam(params, interval=3)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside step()")

    grads = [[torch.randn(p.shape) for p in params] for _ in range(5)]
    grads[2][1].zero_()
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
        opt.telemetry()
    monkeypatch.undo()
    assert opt.read_telemetry()["reset"] == 0.0 and opt._step == 5


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.lin = torch.nn.Linear(4, 7)


def settings(**overrides):
    base = dict(OPTIM_ADAMW=False, OPTIM_ADAMW_SPAM=False, OPTIM_STABLE_SPAM=True, OPTIM_SGD=False,
                LR=1e-2, WEIGHT_DECAY=0.1, BETA1=0.9, BETA2=0.95, ADAM_EPS=1e-8,
                STABLE_SPAM_GAMMA1=0.7, STABLE_SPAM_GAMMA2=0.9, STABLE_SPAM_GAMMA3=0.999, STABLE_SPAM_INTERVAL=1000)
    base.update(overrides)
    return types.SimpleNamespace(**base)


def train_tiny(cfg, steps=6):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(cfg, model)
    data = torch.randint(0, 7, (steps, 8), generator=torch.Generator().manual_seed(1))
    for k in range(steps):
        loss = torch.nn.functional.cross_entropy(model.lin(model.emb(data[k])), data[k].roll(1))
        if k == 4:
            loss = loss * 100  # a spike, so that the clip threshold matters
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_built_from_settings_with_adamw_groups():
    opt, _ = train_tiny(settings())
    assert isinstance(opt, StableSpam)
    assert (opt.gamma1, opt.gamma2, opt.gamma3, opt.interval) == (0.7, 0.9, 0.999, 1000)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]  # nanoGPT groups: the Linear weight decays, bias and embedding do not
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in opt.param_groups)


@pytest.mark.parametrize("symbol,value", [("STABLE_SPAM_GAMMA1", 0.85), ("STABLE_SPAM_GAMMA2", 0.99999),
                                          ("STABLE_SPAM_GAMMA3", 0.5), ("STABLE_SPAM_INTERVAL", 3)])
def test_every_symbol_changes_the_updates(symbol, value):
    _, base = train_tiny(settings())
    _, changed = train_tiny(settings(**{symbol: value}))
    assert not torch.allclose(base, changed, rtol=1e-6, atol=0)
