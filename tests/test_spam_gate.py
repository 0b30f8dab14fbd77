"""AdamWSpam's spike gate (optim/spam_gate.py) against a plain-Python reference,
the trainer's grad_norm hand-over, and resuming mid-sequence."""

import io
import math
import random
import statistics

import pytest
import torch

from optim.spam import AdamWSpam
from optim.spam_gate import SpikeGate

torch.set_num_threads(1)

STATISTICS = ("window", "exclude", "mad")


def reference_gate(norms, statistic, threshold, window, min_history):
    """[(z, spike)] per norm, from lists and the statistics module.

    The window is the previous `window` steps; a non-finite norm occupies its
    step but is not a value; "exclude" stores a spike as mean + threshold * std.
    z is None where it is not a finite number (non-finite norm, zero spread).
    """
    slots, out = [], []
    for x in norms:
        values = [h for h in slots[-window:] if h is not None]
        finite = math.isfinite(x)
        z, spike, center, spread = 0.0, False, None, None
        if len(values) >= min_history:
            if statistic == "mad":
                center = statistics.median(values)
                spread = 1.4826 * statistics.median([abs(h - center) for h in values])
            else:
                center, spread = statistics.mean(values), statistics.stdev(values)
            if not finite:
                z = None
            elif spread > 0:
                z = (x - center) / spread
            else:  # flat window: the same norm is no spike, any larger one is
                z = 0.0 if x == center else None
                spike = x > center
            spike = finite and (spike or (z is not None and z > threshold))
        stored = x if finite else None
        if statistic == "exclude" and spike:
            stored = center + threshold * spread
        slots.append(stored)
        out.append((z, spike))
    return out


def run_gate(norms, statistic, threshold, window, min_history, dtype=torch.float64):
    gate = SpikeGate(threshold, window, statistic, min_history)
    out = []
    for x in norms:
        z, spike = gate.observe(torch.tensor(x, dtype=dtype))
        out.append((z.item(), spike.item()))
    return out


def assert_matches_reference(norms, statistic, threshold=2.0, window=20, min_history=5):
    expected = reference_gate(norms, statistic, threshold, window, min_history)
    got = run_gate(norms, statistic, threshold, window, min_history)
    for k, ((z_ref, spike_ref), (z, spike)) in enumerate(zip(expected, got)):
        assert spike == spike_ref, (statistic, k, norms[k])
        if z_ref is not None:
            assert z == pytest.approx(z_ref, rel=1e-9, abs=1e-9), (statistic, k)
    return [spike for _, spike in got]


def noisy_norms(steps, seed=0, spikes=None, level=1.0):
    rng = random.Random(seed)
    norms = [level * (1.0 + 0.05 * rng.gauss(0.0, 1.0)) for _ in range(steps)]
    for k, value in (spikes or {}).items():
        norms[k] = value
    return norms


@pytest.mark.parametrize("statistic", STATISTICS)
def test_gate_matches_reference(statistic):
    norms = noisy_norms(120, spikes={30: 1000.0, 31: 40.0, 45: math.nan, 50: 20.0, 51: math.inf,
                                     70: 500.0, 71: 480.0, 90: 3.0, 100: -math.inf})
    norms[60:66] = [1.0] * 6  # a short flat stretch
    spikes = assert_matches_reference(norms, statistic)
    assert spikes[30]  # the first spike is caught by every statistic


def test_flat_window_conventions():
    for statistic in STATISTICS:  # 0/0 is no spike, x/0 with x above is
        spikes = assert_matches_reference([1.0] * 12 + [1.0, 2.0, 1.0], statistic)
        assert spikes[12:] == [False, True, False]


def test_first_spike_masks_the_next_only_in_the_published_window():
    # a 1000x spike inflates the window's std; the 20x and 50x spikes after it
    # then score z < 2 against the published window, but not against the other two
    later = (40, 55, 70)
    norms = noisy_norms(80, seed=1, spikes={30: 1000.0, 40: 20.0, 55: 50.0, 70: 20.0})
    detected = {s: assert_matches_reference(norms, s, window=100, min_history=10) for s in STATISTICS}
    assert all(detected[s][30] for s in STATISTICS)
    assert not any(detected["window"][k] for k in later)
    assert all(detected["exclude"][k] for k in later)
    assert all(detected["mad"][k] for k in later)


@pytest.mark.parametrize("statistic", STATISTICS)
def test_min_history(statistic):
    # a spike with 3 norms before it passes, one with 6 is caught (min history 5)
    assert_matches_reference([1.0, 1.1, 0.9, 500.0, 1.0, 1.05, 0.95, 500.0], statistic)
    spikes = run_gate([1.0, 1.1, 0.9, 500.0], statistic, 2.0, 20, 5)
    assert [s for _, s in spikes] == [False] * 4 and all(z == 0.0 for z, _ in spikes)
    spikes = run_gate([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 500.0], statistic, 2.0, 20, 5)
    assert spikes[-1][1]
    # five slots but one of them non-finite: four norms are not enough
    spikes = run_gate([1.0, 1.1, math.nan, 0.9, 1.0, 500.0], statistic, 2.0, 20, 5)
    assert not spikes[-1][1] and spikes[-1][0] == 0.0


@pytest.mark.parametrize("statistic", STATISTICS)
def test_non_finite_norms_never_enter_the_window(statistic):
    clean = noisy_norms(40, seed=2)
    dirty = clean[:20] + [math.nan, math.inf] + clean[20:]
    z_clean = run_gate(clean, statistic, 2.0, 100, 10)
    z_dirty = run_gate(dirty, statistic, 2.0, 100, 10)
    assert not z_dirty[20][1] and not z_dirty[21][1]  # never a spike
    # the statistics after them are those of the clean sequence
    assert [z for z, _ in z_dirty[22:]] == pytest.approx([z for z, _ in z_clean[20:]], rel=1e-12, abs=1e-12)


def test_bad_gate_settings():
    with pytest.raises(ValueError, match="SPAM_GATE_MIN_HISTORY"):
        SpikeGate(2.0, 20, "exclude", 21)
    with pytest.raises(ValueError, match="SPAM_GATE_MIN_HISTORY"):
        SpikeGate(2.0, 20, "exclude", 1)
    with pytest.raises(ValueError, match="gate_statistic"):
        AdamWSpam([torch.nn.Parameter(torch.zeros(2))], gate_statistic="median")


# ---------------------------------------------------------------------------
# Inside the optimizer
# ---------------------------------------------------------------------------

SHAPES = [(6, 5), (5,)]


def grad_stream(steps, seed=0, spikes=None, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    for k in range(1, steps + 1):
        factor = (spikes or {}).get(k, 1.0)
        yield [torch.randn(s, generator=gen, dtype=dtype) * factor for s in SHAPES]


def make(statistic, dtype=torch.float64, **kw):
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(9), dtype=dtype))
              for s in SHAPES]
    opt = AdamWSpam(params, lr=1e-2, theta=4.0, spike_threshold=2.0, interval=30, warmup_steps=5,
                    clip_grace_steps=3, zscore_window=16, gate_statistic=statistic, gate_min_history=6, **kw)
    return params, opt


def feed(params, opt, grads, **step_kw):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step(**step_kw)
    return opt.telemetry()


def same_telemetry(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]) or (a[name].isnan() and b[name].isnan()), name


@pytest.mark.parametrize("statistic", STATISTICS)
def test_optimizer_gate_follows_the_reference(statistic):
    spikes = {12: 300.0, 20: 30.0, 27: 50.0, 40: 100.0}
    stream = list(grad_stream(50, spikes=spikes))
    norms = [math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)) for grads in stream]
    expected = reference_gate(norms, statistic, 2.0, 16, 6)
    params, opt = make(statistic)
    for k, grads in enumerate(stream):
        tele = feed(params, opt, grads)
        assert bool(tele["spike_step"]) == expected[k][1], k
        if expected[k][0] is not None:
            assert float(tele["zscore"]) == pytest.approx(expected[k][0], rel=1e-9, abs=1e-9)
    assert expected[12 - 1][1] and expected[40 - 1][1]


@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_given_grad_norm_is_bit_identical(statistic, dtype):
    assert AdamWSpam.accepts_grad_norm is True
    own, given = make(statistic, dtype), make(statistic, dtype)
    for grads in grad_stream(45, spikes={10: 200.0, 25: 40.0}, dtype=dtype):
        tele_own = feed(*own, grads)
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # as the trainer computes it
        tele_given = feed(*given, grads, grad_norm=norm)
        same_telemetry(tele_own, tele_given)
    assert all(torch.equal(a, b) for a, b in zip(own[0], given[0]))


@pytest.mark.parametrize("statistic", STATISTICS)
def test_state_dict_round_trip_mid_sequence(statistic):
    stream = list(grad_stream(60, seed=3, spikes={8: 100.0, 22: 300.0, 26: 40.0, 41: 80.0, 50: 60.0}))
    params_a, opt_a = make(statistic)
    for grads in stream[:24]:  # after the first spikes, before the reset at 30
        feed(params_a, opt_a, grads)
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = AdamWSpam(params_b, lr=1e-2, theta=4.0, spike_threshold=2.0, interval=30, warmup_steps=5,
                      clip_grace_steps=3, zscore_window=16, gate_statistic=statistic, gate_min_history=6)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    for grads in stream[24:]:
        same_telemetry(feed(params_a, opt_a, grads), feed(params_b, opt_b, grads))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    torch.testing.assert_close(opt_a._gate.history, opt_b._gate.history, rtol=0, atol=0, equal_nan=True)
