"""AdamWSpam's work lists (optim/spam_plan.py): buckets cover every element once,
and reusing the lists between steps changes nothing."""

import pytest
import torch

import optim.spam_plan as spam_plan
from optim.spam import AdamWSpam

torch.set_num_threads(1)


def test_buckets_cover_every_element_once_and_stay_within_the_limit(monkeypatch):
    monkeypatch.setitem(spam_plan.BUCKET_NUMEL, "cpu", 100)
    sizes = [250, 7, 100, 31, 1, 99, 3]
    tensors = [torch.arange(n, dtype=torch.float64) + 1000 * i for i, n in enumerate(sizes)]
    items = [(i % 2, t, t.clone(), t.clone(), {}, i) for i, t in enumerate(tensors)]
    buckets = spam_plan.make_buckets(items)
    seen = {}
    for b in buckets:
        assert 0 < b.numel <= 100 and b.numel == sum(p.numel() for p in b.params)
        for p, (owner, start, end, whole) in zip(b.params, b.slices):
            assert items[owner][0] == b.cls  # one class per bucket
            assert torch.equal(p, tensors[owner][start:end]) and whole == (end - start == sizes[owner])
            seen.setdefault(owner, []).append((start, end))
    for owner, n in enumerate(sizes):  # contiguous, non-overlapping, complete
        spans = sorted(seen[owner])
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def run(reuse, steps=14):
    """Steps with gradients that come and go, a parameter whose storage is
    swapped, a group added mid-run, telemetry of each step."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    b = torch.nn.Parameter(torch.randn(5, generator=gen))
    e = torch.nn.Parameter(torch.randn(9, 5, generator=gen))
    late = torch.nn.Parameter(torch.randn(4, generator=gen))
    opt = AdamWSpam([dict(params=[w], sparse=True), dict(params=[b, e], weight_decay=0.0)], lr=1e-2,
                    density=0.5, interval=5, warmup_steps=2, clip_grace_steps=1, spike_threshold=0.0, theta=2.0,
                    param_names={"attn.w": w, "bias": b, "wte": e})
    history = []
    for k in range(1, steps + 1):
        if not reuse:
            opt._plans_key = None  # rebuild the work lists every step
        for p in (w, b, e, late):
            p.grad = torch.randn(p.shape, generator=gen) * (30.0 if k % 4 == 0 else 1.0)
        if k in (3, 4):
            e.grad = None  # no gradient this step
        if k == 6:
            e.data = e.data.clone()  # new storage behind the same parameter
        if k == 8:
            opt.add_param_group(dict(params=[late], weight_decay=0.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(opt.read_telemetry())
    return [p.detach().clone() for p in (w, b, e, late)], history


def test_reused_work_lists_change_nothing():
    cached, tele_cached = run(reuse=True)
    rebuilt, tele_rebuilt = run(reuse=False)
    assert all(torch.equal(a, b) for a, b in zip(cached, rebuilt))
    assert [{k: repr(v) for k, v in t.items()} for t in tele_cached] == \
        [{k: repr(v) for k, v in t.items()} for t in tele_rebuilt]  # repr: nan == nan
    assert any(t["clipped_count"] > 0 for t in tele_cached)


def test_class_of_params_prefers_the_first_class_of_a_tied_weight():
    shared = torch.nn.Parameter(torch.zeros(4, 3))
    classes = spam_plan.class_of_params([("lm_head.weight", shared), ("transformer.wte.weight", shared)])
    assert spam_plan.PARAM_CLASSES[classes[shared]] == "embedding"


@pytest.mark.parametrize("statistic", ["window", "exclude", "mad"])
def test_non_finite_gradient_step_keeps_the_window_clean(statistic):
    p = torch.nn.Parameter(torch.zeros(8))
    opt = AdamWSpam([p], lr=1e-3, zscore_window=10, gate_statistic=statistic, gate_min_history=3,
                    clip_grace_steps=0)
    for k in range(6):
        p.grad = torch.full((8,), 1.0 + 0.01 * k)
        opt.step()
    p.grad = torch.full((8,), float("nan"))
    opt.step()
    tele = opt.read_telemetry()
    assert tele["spike_step"] == 0.0
    history = opt._gate.history[:opt._gate.count]
    assert history[-1].isnan() and history[:-1].isfinite().all()
