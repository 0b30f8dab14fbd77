"""Gradient clipping modes: the fixed global-norm bound and ZClip, against plain references
written from shared/docs/spike-methods.md section 1."""

import io
import math
import statistics
import types

import pytest
import torch

from optim.clipping import FixedNormClipper, ZClip, build_grad_clipper

NAN, INF = float("nan"), float("inf")


def zclip_reference(norms, *, alpha=0.97, z_thr=2.5, warmup=25, factor=1.0, cap=1.0, freeze=False):
    """Per step: (scale applied to the gradients, mu, s2 after the step). Plain floats, one loop."""
    collected, mu, s2, out = [], None, None, []
    for n in norms:
        if not math.isfinite(n):  # never enters anything; the gradients are left alone
            out.append((1.0, mu, s2))
            continue
        if len(collected) < warmup:
            collected.append(n)
            bound = cap if cap > 0 else INF
            if len(collected) == warmup:
                mu, s2 = statistics.fmean(collected), statistics.pvariance(collected)
        else:
            sigma = math.sqrt(s2)
            z = (n - mu) / (sigma + 1e-6)
            spike = z > z_thr
            c = factor * (mu + z_thr * z_thr * sigma / z) if spike else n
            # "otherwise c = n (no clipping)": only the cap can touch a step that is no spike
            limit = c if spike else INF
            bound = min(limit, cap) if cap > 0 else limit
            if not (freeze and spike):
                mu = alpha * mu + (1 - alpha) * c
                s2 = alpha * s2 + (1 - alpha) * (c - mu) ** 2
        out.append((min(1.0, bound / (n + 1e-6)), mu, s2))
    return out


def norm_stream(steps=80, seed=0):
    """Healthy norms around 1.5 with a drift, a few spikes of various sizes, NaN and inf."""
    rng = torch.Generator().manual_seed(seed)
    noise = torch.rand(steps, generator=rng, dtype=torch.float64).tolist()
    norms = [1.5 + 0.004 * k + 0.3 * (u - 0.5) for k, u in enumerate(noise)]
    for k, value in ((3, NAN), (8, 40.0), (30, 12.0), (31, 9.0), (33, INF), (45, 2.6), (50, NAN),
                     (60, 1000.0), (61, 300.0), (70, 5.0)):
        norms[k] = value
    return norms


def run_clipper(clipper, norms):
    """Scales applied to a gradient of ones, and the telemetry, for each step."""
    scales, tele = [], []
    for n in norms:
        grads = [torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]
        clipper.clip_(grads, torch.tensor(n, dtype=torch.float64))
        assert all(torch.equal(g, torch.full_like(g, g.flatten()[0].item())) for g in grads)
        assert grads[0][0].item() == grads[1][0, 0].item()  # one factor for every tensor
        scales.append(grads[0][0].item())
        tele.append({k: (v.item() if torch.is_tensor(v) else v) for k, v in clipper.telemetry().items()})
    return scales, tele


ZCLIP_CASES = {
    "defaults": dict(),
    "short-warmup-no-cap": dict(warmup=5, cap=0.0),
    "cap-2": dict(warmup=5, cap=2.0),
    "freeze-on-spike": dict(warmup=5, cap=0.0, freeze=True),
    "factor-alpha-z": dict(warmup=4, cap=0.0, factor=0.8, alpha=0.9, z_thr=1.5),
}


@pytest.mark.parametrize("case", ZCLIP_CASES)
def test_zclip_matches_the_plain_reference(case):
    kw = ZCLIP_CASES[case]
    ref = zclip_reference(norm_stream(), **kw)
    clipper = ZClip(alpha=kw.get("alpha", 0.97), z_threshold=kw.get("z_thr", 2.5),
                    warmup_steps=kw.get("warmup", 25), clip_factor=kw.get("factor", 1.0),
                    max_norm=kw.get("cap", 1.0), freeze_on_spike=kw.get("freeze", False))
    scales, tele = run_clipper(clipper, norm_stream())
    spikes = 0
    for k, ((scale, mu, s2), got, t) in enumerate(zip(ref, scales, tele)):
        assert got == pytest.approx(scale, rel=1e-12, abs=0), k
        if mu is not None:  # after the warm-up
            assert t["mu"] == pytest.approx(mu, rel=1e-12) and t["sigma"] == pytest.approx(math.sqrt(s2), rel=1e-12)
        assert t["clipped"] == float(scale < 1.0)
        spikes += t["spike"]
    assert tele[-1]["clipped_total"] == sum(scale < 1.0 for scale, _, _ in ref)
    if kw.get("cap", 1.0) == 0.0:
        assert spikes >= 4  # the injected spikes after the warm-up were detected and clipped


def test_zclip_hand_computed_step():
    # warm-up of 2 norms: 1 and 3 -> mu 2, s2 1 (population); then n = 10: z = 8/(1+1e-6),
    # c = 2 + 2.5^2 * 1 / z, scale c / (10 + 1e-6); x = c enters the EMA with the new mu
    clipper = ZClip(alpha=0.5, z_threshold=2.5, warmup_steps=2, max_norm=0.0)
    scales, tele = run_clipper(clipper, [1.0, 3.0, 10.0])
    z = 8.0 / (1.0 + 1e-6)
    c = 2.0 + 6.25 / z
    assert scales[:2] == [1.0, 1.0] and tele[1]["mu"] == 2.0 and tele[1]["sigma"] == 1.0
    assert scales[2] == pytest.approx(c / (10.0 + 1e-6), rel=1e-14)
    assert tele[2]["z"] == pytest.approx(z, rel=1e-14) and tele[2]["clip_bound"] == pytest.approx(c, rel=1e-14)
    new_mu = 0.5 * 2.0 + 0.5 * c
    assert tele[2]["mu"] == pytest.approx(new_mu, rel=1e-14)
    assert tele[2]["sigma"] == pytest.approx(math.sqrt(0.5 * 1.0 + 0.5 * (c - new_mu) ** 2), rel=1e-14)


def test_zclip_warmup_applies_only_the_cap_and_skips_non_finite_norms():
    clipper = ZClip(warmup_steps=3, max_norm=2.0)
    scales, tele = run_clipper(clipper, [4.0, NAN, 1.0, INF, 2.5])
    assert scales[0] == pytest.approx(2.0 / (4.0 + 1e-6)) and scales[1] == 1.0 and scales[2] == 1.0
    assert scales[3] == 1.0  # left for the trainer's non-finite check
    # the warm-up ended at the third finite norm: mu = mean(4, 1, 2.5), population variance
    assert tele[-1]["mu"] == pytest.approx(2.5, rel=1e-14)
    assert tele[-1]["sigma"] == pytest.approx(math.sqrt(statistics.pvariance([4.0, 1.0, 2.5])), rel=1e-14)
    assert all(t["z"] == 0.0 for t in tele)


def test_zclip_state_round_trip_mid_sequence_continues_identically():
    norms = norm_stream()
    whole = ZClip(warmup_steps=5, max_norm=0.0)
    expected = run_clipper(whole, norms)
    first = ZClip(warmup_steps=5, max_norm=0.0)
    head = run_clipper(first, norms[:32])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = ZClip(warmup_steps=5, max_norm=0.0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    tail = run_clipper(second, norms[32:])
    assert head[0] + tail[0] == expected[0] and head[1] + tail[1] == expected[1]
    # also when saved inside the warm-up
    early = ZClip(warmup_steps=5, max_norm=0.0)
    run_clipper(early, norms[:3])
    resumed = ZClip(warmup_steps=5, max_norm=0.0)
    resumed.load_state_dict(early.state_dict())
    assert run_clipper(resumed, norms[3:])[0] == expected[0][3:]
    with pytest.raises(ValueError, match="ZCLIP_WARMUP_STEPS"):
        ZClip(warmup_steps=6).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="another gradient-clipping choice"):
        ZClip().load_state_dict(FixedNormClipper(1.0).state_dict())


def test_fixed_clip_equals_clip_grad_norm():
    rng = torch.Generator().manual_seed(1)
    for max_norm in (0.5, 1.0, 1e3):
        shapes = [(5, 4), (7,), (3, 3, 2)]
        ref = [torch.nn.Parameter(torch.randn(s, generator=rng)) for s in shapes]
        for p in ref:
            p.grad = torch.randn(p.shape, generator=rng) * 3
        grads = [p.grad.clone() for p in ref]
        expected_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=True)
        clipper = FixedNormClipper(max_norm)
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        assert torch.equal(norm, expected_norm)
        clipper.clip_(grads, norm)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, ref))
        assert clipper.telemetry()["clipped"].item() == float(norm.item() > max_norm)
    grads = [torch.tensor([3.0, 4.0])]  # norm 5 -> scaled to norm 1 (up to the 1e-6 guard)
    FixedNormClipper(1.0).clip_(grads, torch.tensor(5.0))
    assert torch.allclose(grads[0], torch.tensor([0.6, 0.8]), rtol=1e-6)


def test_fixed_clip_state_round_trip():
    clipper = FixedNormClipper(1.0)
    run_clipper(clipper, [0.5, 2.0, 3.0])
    again = FixedNormClipper(1.0)
    again.load_state_dict(clipper.state_dict())
    assert run_clipper(again, [4.0])[1][0]["clipped_total"] == 3


def test_clip_has_no_host_sync(monkeypatch):
    clippers = [ZClip(warmup_steps=3), FixedNormClipper(1.0)]
    grads = [torch.randn(4, 4), torch.randn(3)]

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside clip_()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for n in (1.0, 2.0, NAN, 1.5, 50.0, 1.2):
        for clipper in clippers:
            clipper.clip_(grads, torch.tensor(n))
            clipper.telemetry()
    monkeypatch.undo()
    assert clippers[0].telemetry()["clipped_total"].item() >= 1


def settings(**overrides):
    base = dict(CLIP_NORM=True, CLIP_ZCLIP=False, GRAD_CLIP=0.0, ZCLIP_ALPHA=None, ZCLIP_Z_THRESHOLD=None,
                ZCLIP_WARMUP_STEPS=None, ZCLIP_CLIP_FACTOR=None, ZCLIP_MAX_NORM=None, ZCLIP_FREEZE_ON_SPIKE=None)
    base.update(overrides)
    return types.SimpleNamespace(**base)


ZCLIP_DEFAULTS = dict(CLIP_NORM=False, CLIP_ZCLIP=True, GRAD_CLIP=None, ZCLIP_ALPHA=0.97, ZCLIP_Z_THRESHOLD=2.5,
                      ZCLIP_WARMUP_STEPS=25, ZCLIP_CLIP_FACTOR=1.0, ZCLIP_MAX_NORM=1.0,
                      ZCLIP_FREEZE_ON_SPIKE=False)


def test_builder_picks_the_mode():
    assert build_grad_clipper(settings()) is None
    fixed = build_grad_clipper(settings(GRAD_CLIP=1.0))
    assert isinstance(fixed, FixedNormClipper) and fixed.max_norm == 1.0
    z = build_grad_clipper(settings(**ZCLIP_DEFAULTS))
    assert isinstance(z, ZClip)
    assert (z.alpha, z.z_threshold, z.warmup_steps, z.clip_factor, z.max_norm, z.freeze_on_spike) == \
        (0.97, 2.5, 25, 1.0, 1.0, False)
    with pytest.raises(ValueError, match="no gradient-clipping mode"):
        build_grad_clipper(settings(CLIP_NORM=False))


@pytest.mark.parametrize("symbol,value", [("ZCLIP_ALPHA", 0.5), ("ZCLIP_Z_THRESHOLD", 1.5),
                                          ("ZCLIP_WARMUP_STEPS", 20), ("ZCLIP_CLIP_FACTOR", 0.5),
                                          ("ZCLIP_MAX_NORM", 0.0), ("ZCLIP_FREEZE_ON_SPIKE", True)])
def test_every_zclip_symbol_changes_the_clipping(symbol, value):
    base = dict(ZCLIP_DEFAULTS, ZCLIP_MAX_NORM=5.0)  # a cap the healthy norms stay under
    default_scales, _ = run_clipper(build_grad_clipper(settings(**base)), norm_stream())
    changed_scales, _ = run_clipper(build_grad_clipper(settings(**dict(base, **{symbol: value}))), norm_stream())
    assert changed_scales != default_scales
