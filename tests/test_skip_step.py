"""Skip-step (OLMo-core's rule) against a plain reference written from
shared/docs/spike-methods.md section 3: lists and the statistics module."""

import io
import math
import statistics
import types

import pytest
import torch

from optim.skip_step import SkipStep, build_skip_step

NAN, INF = float("nan"), float("inf")


def skip_reference(losses, norms, window=128, sigma=6.0):
    """Skip verdicts: previous `window` finite steps (skipped ones included), sample std,
    armed from window/2 values on, one-sided, non-finite steps never skipped nor recorded."""
    past_losses, past_norms, verdicts = [], [], []
    for loss, norm in zip(losses, norms):
        finite = math.isfinite(loss) and math.isfinite(norm)
        skip = False
        if finite and 2 * len(past_losses) >= window:
            loss_bound = statistics.fmean(past_losses) + sigma * statistics.stdev(past_losses)
            norm_bound = statistics.fmean(past_norms) + sigma * statistics.stdev(past_norms)
            skip = loss > loss_bound or norm > norm_bound
        verdicts.append(skip)
        if finite:
            past_losses = (past_losses + [loss])[-window:]
            past_norms = (past_norms + [norm])[-window:]
    return verdicts


def stream(steps, seed=0, spikes=()):
    rng = torch.Generator().manual_seed(seed)
    u = torch.rand(2, steps, generator=rng, dtype=torch.float64).tolist()
    losses = [4.0 - 0.002 * k + 0.1 * (a - 0.5) for k, a in enumerate(u[0])]
    norms = [1.0 + 0.2 * (b - 0.5) for b in u[1]]
    for k, loss, norm in spikes:
        losses[k] = loss if loss is not None else losses[k]
        norms[k] = norm if norm is not None else norms[k]
    return losses, norms


def run(skipper, losses, norms):
    verdicts = []
    for loss, norm in zip(losses, norms):
        loss_t, norm_t = torch.tensor(loss, dtype=torch.float32), torch.tensor(norm, dtype=torch.float32)
        skip = skipper.verdict(loss_t, norm_t)
        assert skip.dtype == torch.bool and skip.dim() == 0
        skipper.record(loss_t, norm_t, skipped=skip)
        verdicts.append(bool(skip))
    return verdicts


SPIKES = [(20, 9.0, None), (40, None, 30.0), (41, None, 25.0), (55, NAN, None), (60, None, INF),
          (70, 4.3, None), (90, None, 1.6), (120, 50.0, 50.0), (150, None, NAN),
          (200, None, 40.0), (230, 30.0, None)]


@pytest.mark.parametrize("window,sigma", [(16, 6.0), (31, 3.0), (128, 6.0)])
def test_matches_the_plain_reference(window, sigma):
    # the data are float32 as the trainer's losses are: the reference sees the same values
    losses, norms = (
        [float(torch.tensor(v, dtype=torch.float32)) for v in series] for series in stream(260, spikes=SPIKES))
    expected = skip_reference(losses, norms, window, sigma)
    got = run(SkipStep(window=window, sigma=sigma), losses, norms)
    assert got == expected
    assert sum(expected) >= 3  # the rule did skip outliers
    skipper = SkipStep(window=window, sigma=sigma)
    run(skipper, losses, norms)
    assert skipper.telemetry()["skipped_total"].item() == sum(expected)


def test_one_nan_does_not_cause_a_run_of_skips():
    losses, norms = stream(400, seed=3, spikes=[(150, NAN, None), (151, None, NAN), (152, NAN, INF)])
    skipper = SkipStep()
    verdicts = run(skipper, losses, norms)
    assert not any(verdicts)
    assert skipper.telemetry()["skipped_total"].item() == 0
    assert not math.isnan(skipper.telemetry()["loss_threshold"].item())


def test_no_skip_before_half_the_window():
    losses, norms = stream(20, seed=1, spikes=[(k, 1e6, 1e6) for k in range(3, 8, 2)])
    # window 16: values 0-7 are too few (the spikes among them even enter the window)
    verdicts = run(SkipStep(window=16), losses, norms)
    assert verdicts[:8] == [False] * 8
    losses, norms = stream(20, seed=1, spikes=[(8, 1e6, None)])
    verdicts = run(SkipStep(window=16), losses, norms)
    assert verdicts == [k == 8 for k in range(20)]  # armed with exactly 8 = 16/2 previous values


def test_skipped_outliers_enter_the_window():
    # the documented choice: with window 128 and 6 sigma, after a first outlier of 100x the
    # next three of the same size are still skipped and the fifth gets through (the std has
    # grown), so a lasting jump of the norm cannot lock the run out forever
    losses, norms = stream(300, seed=2, spikes=[(k, None, 100.0) for k in (150, 160, 170, 180, 190)])
    verdicts = run(SkipStep(), losses, norms)
    assert [k for k, v in enumerate(verdicts) if v] == [150, 160, 170, 180]
    assert skip_reference(losses, norms) == verdicts
    # a lasting level shift: skipped for a while, then followed
    losses, norms = stream(400, seed=2)
    norms[200:] = [n + 20.0 for n in norms[200:]]
    verdicts = run(SkipStep(), losses, norms)
    assert verdicts[200] and not any(verdicts[330:])


def test_state_round_trip_mid_sequence():
    losses, norms = stream(260, spikes=SPIKES)
    expected = run(SkipStep(window=16), losses, norms)
    first = SkipStep(window=16)
    head = run(first, losses[:100], norms[:100])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = SkipStep(window=16)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert head + run(second, losses[100:], norms[100:]) == expected
    assert second.telemetry()["skipped_total"].item() == sum(expected)
    with pytest.raises(ValueError, match="SKIP_STEP_WINDOW"):
        SkipStep(window=32).load_state_dict(first.state_dict())


def test_verdict_and_record_make_no_host_sync(monkeypatch):
    skipper = SkipStep(window=8)
    losses, norms = stream(30, spikes=[(20, 50.0, None), (22, NAN, None)])
    tensors = [(torch.tensor(a), torch.tensor(b)) for a, b in zip(losses, norms)]

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside verdict()/record()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for loss, norm in tensors:
        skipper.record(loss, norm, skipped=skipper.verdict(loss, norm))
        skipper.telemetry()
    monkeypatch.undo()
    assert skipper.telemetry()["skipped_total"].item() == 1


def settings(**overrides):
    base = dict(SKIP_STEP=False, SKIP_STEP_WINDOW=None, SKIP_STEP_SIGMA=None)
    base.update(overrides)
    return types.SimpleNamespace(**base)


def test_builder_and_symbols_change_the_verdicts():
    assert build_skip_step(settings()) is None
    on = dict(SKIP_STEP=True, SKIP_STEP_WINDOW=128, SKIP_STEP_SIGMA=6.0)
    default = build_skip_step(settings(**on))
    assert (default.window, default.sigma) == (128, 6.0)
    spiky, clean = stream(260, spikes=SPIKES), stream(260)
    for change, (losses, norms) in ((dict(SKIP_STEP_WINDOW=16), spiky), (dict(SKIP_STEP_SIGMA=1.5), clean)):
        base = run(build_skip_step(settings(**on)), losses, norms)
        assert run(build_skip_step(settings(**{**on, **change})), losses, norms) != base
