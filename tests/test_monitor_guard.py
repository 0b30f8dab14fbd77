"""Tests for monitor/guard.py: the spike guard driven by hand-made step sequences."""

import math

import pytest

from monitor.guard import Decision, SpikeGuard


def run(guard, seq):
    return [guard.observe(step, gss) for step, gss in seq]


def test_spike_is_strictly_above_tau_and_nan_is_not_a_spike():
    g = SpikeGuard(tau=10.0, action="skip")
    d = run(g, [(1, 9.9), (2, 10.0), (3, 10.1), (4, math.nan)])
    assert [x.spike for x in d] == [False, False, True, False]
    assert d[0] == Decision(spike=False, action="none", rollback=False)
    assert d[2] == Decision(spike=True, action="skip", rollback=False, signals=("gss",))


@pytest.mark.parametrize("action", ["log", "clip", "skip"])
def test_the_configured_action_is_returned_on_spikes(action):
    g = SpikeGuard(action=action)
    assert g.observe(1, 50.0).action == action
    assert g.observe(2, 1.0).action == "none"


def test_rollback_on_more_than_k_spikes_then_the_window_restarts():
    g = SpikeGuard(tau=10.0, action="clip", cluster_k=2, cluster_window=5)
    d = run(g, [(1, 20), (2, 20), (3, 20), (4, 20), (5, 20), (6, 20), (7, 20)])
    # 3 spikes (> 2) in the window at step 3 -> rollback, window emptied; again at step 6
    assert [x.rollback for x in d] == [False, False, True, False, False, True, False]
    assert all(x.spike for x in d)
    assert g.total_spikes == 7 and g.total_rollbacks == 2


def test_spikes_leave_the_window_after_w_steps():
    g = SpikeGuard(tau=10.0, cluster_k=2, cluster_window=5)
    # window at step 6 is steps 2..6: the spike at 1 has left, so {3, 6}: 2 spikes, no rollback
    d = run(g, [(1, 11), (3, 11), (4, 1), (6, 11)])
    assert [x.spike for x in d] == [True, True, False, True]
    assert not any(x.rollback for x in d)
    assert g.observe(7, 11).rollback is True  # window 3..7 holds spikes 3, 6, 7: 3 > 2


def test_k_zero_rolls_back_on_the_first_spike_and_large_k_never():
    assert SpikeGuard(cluster_k=0).observe(1, 99).rollback
    g = SpikeGuard(cluster_k=3, cluster_window=3)
    assert not any(x.rollback for x in run(g, [(s, 99) for s in range(1, 50)]))


def test_state_dict_round_trip_continues_identically():
    a = SpikeGuard(tau=5.0, cluster_k=2, cluster_window=10)
    run(a, [(1, 6), (2, 1), (3, 7)])
    b = SpikeGuard(tau=5.0, cluster_k=2, cluster_window=10)
    b.load_state_dict(a.state_dict())
    assert a.observe(4, 9) == b.observe(4, 9) == Decision(True, "log", True, ("gss",))
    assert b.total_spikes == 3 and b.total_rollbacks == 1


def test_bad_settings_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="one of log, clip, skip"):
        SpikeGuard(action="drop")
    with pytest.raises(ValueError, match="tau"):
        SpikeGuard(tau=0.0)


def test_only_the_watched_signals_make_a_spike_and_the_decision_names_them():
    gss_only, loss_only, both = (SpikeGuard(tau=10.0, signals=s) for s in (("gss",), ("loss",), ("gss", "loss")))
    assert not gss_only.observe(1, 1.0, loss_spike=True).spike
    assert gss_only.observe(2, 50.0, loss_spike=True).signals == ("gss",)
    assert not loss_only.observe(1, 50.0).spike
    assert loss_only.observe(2, 1.0, loss_spike=True).signals == ("loss",)
    assert both.observe(1, 50.0).signals == ("gss",)
    assert both.observe(2, 1.0, loss_spike=True).signals == ("loss",)
    assert both.observe(3, 50.0, loss_spike=True).signals == ("gss", "loss")
    assert not both.observe(4, math.nan, loss_spike=False).spike
    with pytest.raises(ValueError, match="signals"):
        SpikeGuard(signals=("grad",))
