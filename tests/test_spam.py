"""AdamWSpam against its definition (shared/docs/spam-reference.md) and its edge cases."""

import io
import math
import statistics

import pytest
import torch

from optim.spam import AdamWSpam

torch.set_num_threads(1)

# ---------------------------------------------------------------------------
# A per-element reference, written from the reference text with python floats.
# ---------------------------------------------------------------------------


class ReferenceSpam:
    """SPAM, one element at a time. params: list of lists of floats (flat tensors).

    mask_of(i, k) -> set of kept flat indices of param i at step k, or None (dense).
    """

    def __init__(self, params, weight_decays, *, lr, betas=(0.9, 0.999), eps=1e-8, enable_clip=True,
                 theta=50.0, spike_threshold=2.0, interval=None, warmup_steps=0, grace=20,
                 window=100, reset_bias_correction=False, mask_of=None):
        self.p = [list(map(float, x)) for x in params]
        self.wd = weight_decays
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.enable_clip, self.theta, self.thr = enable_clip, theta, spike_threshold
        self.interval, self.n_warm, self.grace, self.window = interval, warmup_steps, grace, window
        self.reset_bc = reset_bias_correction
        self.mask_of = mask_of
        self.m = [[0.0] * len(x) for x in self.p]
        self.v = [[0.0] * len(x) for x in self.p]
        self.count = [0] * len(self.p)
        self.k = 0
        self.last_reset = 0
        self.norms = []

    def step(self, grads):
        """One step; returns (clipped element count, z)."""
        self.k += 1
        k = self.k
        if self.interval and k % self.interval == 0:
            self.last_reset = k
            self.m = [[0.0] * len(x) for x in self.p]
            self.v = [[0.0] * len(x) for x in self.p]
            if self.reset_bc:
                self.count = [0] * len(self.p)
        t = k - self.last_reset
        if self.last_reset > 0 and t < self.n_warm:
            scale = 1 - 0.99 * (1 + math.cos(math.pi * t / (self.n_warm + 1))) / 2
        else:
            scale = 1.0

        norm = math.sqrt(sum(g * g for gs in grads for g in gs))
        previous = self.norms[-self.window:]
        z = 0.0
        if len(previous) >= 2:
            sd = statistics.stdev(previous)
            z = (norm - statistics.mean(previous)) / sd if sd > 0 else 0.0
        self.norms.append(norm)
        spike = z > self.thr if self.thr > 0 else True
        clip = self.enable_clip and k >= self.grace and t >= self.grace and spike

        clipped = 0
        for i, gs in enumerate(grads):
            self.count[i] += 1
            c = self.count[i]
            kept = self.mask_of(i, k) if self.mask_of else None
            for j, g in enumerate(gs):
                self.p[i][j] *= 1 - self.lr * self.wd[i]
                if kept is not None and j not in kept:
                    continue  # no moments, no Adam update
                if clip and g * g > self.theta * self.v[i][j]:
                    g = math.copysign(math.sqrt(self.theta * self.v[i][j]), g)
                    clipped += 1
                self.m[i][j] = self.b1 * self.m[i][j] + (1 - self.b1) * g
                self.v[i][j] = self.b2 * self.v[i][j] + (1 - self.b2) * g * g
                m_hat = self.m[i][j] / (1 - self.b1 ** c)
                v_hat = self.v[i][j] / (1 - self.b2 ** c)
                self.p[i][j] -= self.lr * scale * m_hat / (math.sqrt(v_hat) + self.eps)
        return clipped, z


SPIKES = {5: 1000.0, 150: 1000.0, 205: 1000.0, 333: 1000.0, 400: 1000.0, 470: 500.0, 620: 1000.0,
          777: 1000.0, 950: 1000.0, 1111: 1000.0}


def gradient_stream(shapes, steps, seed=0, spikes=SPIKES):
    """Seeded gradients with a per-element scale, multiplied by 500-1000 on spike steps."""
    gen = torch.Generator().manual_seed(seed)
    scales = [torch.rand(s, generator=gen, dtype=torch.float64) * 2 + 0.1 for s in shapes]
    for k in range(1, steps + 1):
        factor = spikes.get(k, 1.0)
        yield [torch.randn(s, generator=gen, dtype=torch.float64) * sc * factor for s, sc in zip(shapes, scales)]


SHAPES = [(3, 4), (5,)]
WEIGHT_DECAYS = [0.1, 0.0]
SPAM_KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, theta=50.0, interval=200, warmup_steps=30,
               clip_grace_steps=20, zscore_window=50, gate_statistic="window", gate_min_history=2)


def make_params(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def rel_diff(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run_against_reference(dtype, spike_threshold, steps=1200, density=1.0):
    params = make_params(dtype)
    groups = [dict(params=[params[0]], weight_decay=WEIGHT_DECAYS[0], sparse=True),
              dict(params=[params[1]], weight_decay=WEIGHT_DECAYS[1])]
    opt = AdamWSpam(groups, spike_threshold=spike_threshold, density=density, **SPAM_KW)

    masks = {}

    def mask_of(i, k):
        return masks.get((i, k))

    ref = ReferenceSpam([p.detach().double().flatten().tolist() for p in params], WEIGHT_DECAYS,
                        lr=SPAM_KW["lr"], betas=SPAM_KW["betas"], eps=SPAM_KW["eps"], theta=SPAM_KW["theta"],
                        spike_threshold=spike_threshold, interval=SPAM_KW["interval"],
                        warmup_steps=SPAM_KW["warmup_steps"], grace=SPAM_KW["clip_grace_steps"],
                        window=SPAM_KW["zscore_window"], mask_of=mask_of if density < 1 else None)
    worst, clip_counts, mismatched_counts = 0.0, [], 0
    for k, grads in enumerate(gradient_stream(SHAPES, steps), start=1):
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
        if density < 1:  # the optimizer draws the masks; the reference uses them from the same step
            masks[(0, k)] = set(opt.moment_index(params[0]).tolist())
        clipped, z = ref.step([g.to(dtype).double().flatten().tolist() for g in grads])
        tele = opt.read_telemetry()
        clip_counts.append(clipped)
        mismatched_counts += int(tele["clipped_count"]) != clipped
        if spike_threshold > 0 and dtype == torch.float64:
            assert tele["zscore"] == pytest.approx(z, rel=1e-9, abs=1e-9), k
        for p, r in zip(params, ref.p):
            worst = max(worst, rel_diff(p.detach().flatten(), torch.tensor(r, dtype=torch.float64)))
    return worst, clip_counts, mismatched_counts


@pytest.mark.parametrize("spike_threshold", [2.0, 0.0])
def test_matches_reference_definition_float64(spike_threshold):
    worst, clip_counts, mismatched = run_against_reference(torch.float64, spike_threshold)
    assert worst <= 1e-6
    assert mismatched == 0
    # the injected spikes out of grace are clipped; those in grace are not
    assert all(clip_counts[k - 1] > 0 for k in (150, 333, 470, 620, 777, 950, 1111))
    assert clip_counts[5 - 1] == clip_counts[205 - 1] == clip_counts[400 - 1] == 0
    steps_clipped = sum(c > 0 for c in clip_counts)
    if spike_threshold > 0:  # gated: only outlier steps clip
        assert steps_clipped < 60
    else:  # every step may clip, and right after grace many do
        assert steps_clipped > 200


@pytest.mark.parametrize("spike_threshold", [2.0, 0.0])
def test_matches_reference_definition_float32(spike_threshold):
    worst, _, mismatched = run_against_reference(torch.float32, spike_threshold)
    assert worst <= 1e-4
    assert mismatched <= 3  # elements right at the clip boundary may round either way


def test_sparse_matches_reference_definition():
    worst, clip_counts, mismatched = run_against_reference(torch.float64, 0.0, steps=450, density=0.5)
    assert worst <= 1e-6
    assert mismatched == 0 and sum(clip_counts) > 0


# ---------------------------------------------------------------------------
# With every SPAM feature off it is AdamW.
# ---------------------------------------------------------------------------


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.fc1 = torch.nn.Linear(6, 16)
        self.fc2 = torch.nn.Linear(16, 3)


def tiny_groups(model):
    matrices = [model.fc1.weight, model.fc2.weight]
    return [dict(params=matrices, weight_decay=0.1),
            dict(params=[model.emb.weight, model.fc1.bias, model.fc2.bias], weight_decay=0.0)]


def test_equals_adamw_when_features_off():
    torch.manual_seed(0)
    models = [Tiny() for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [AdamWSpam(tiny_groups(models[0]), lr=3e-3, betas=(0.9, 0.95), enable_clip=False,
                      periodic_reset=False, density=1.0),
            torch.optim.AdamW(tiny_groups(models[1]), lr=3e-3, betas=(0.9, 0.95), foreach=False),
            torch.optim.AdamW(tiny_groups(models[2]), lr=3e-3, betas=(0.9, 0.95), fused=True)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    spam, single, fused = (list(m.parameters()) for m in models)
    assert max(rel_diff(a, b) for a, b in zip(spam, single)) <= 1e-6
    assert all(torch.equal(a, b) for a, b in zip(spam, fused))  # the very same kernel


# ---------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------


def one_param_opt(n=8, seed=0, **kw):
    p = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed)))
    opt = AdamWSpam([p], **{**dict(lr=1e-2, weight_decay=0.0), **kw})
    return p, opt


def step_with(opt, p, grad):
    p.grad = grad.clone()
    opt.step()
    return opt.read_telemetry()


def test_grace_steps_block_clipping():
    p, opt = one_param_opt(spike_threshold=0.0, interval=40, warmup_steps=5, clip_grace_steps=10)
    gen = torch.Generator().manual_seed(1)
    counts = {}
    for k in range(1, 100):
        factor = 1000.0 if k in (3, 9, 10, 41, 49, 50, 81) else 1.0
        counts[k] = step_with(opt, p, torch.randn(8, generator=gen) * factor)["clipped_count"]
    # no clipping before step G, nor in the first G steps after the resets at 40 and 80
    assert all(counts[k] == 0 for k in list(range(1, 10)) + list(range(40, 50)) + list(range(80, 90)))
    assert counts[10] > 0 and counts[50] > 0  # first step out of grace, with a spike: clipped


@pytest.mark.parametrize("reset_bias_correction", [False, True])
def test_reset_step_zeroes_moments_before_update(reset_bias_correction):
    lr, wd, (b1, b2), eps, k_reset = 1e-2, 0.1, (0.9, 0.999), 1e-8, 6
    p, opt = one_param_opt(lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps, interval=k_reset,
                           warmup_steps=3, clip_grace_steps=2, reset_bias_correction=reset_bias_correction)
    gen = torch.Generator().manual_seed(2)
    for _ in range(k_reset - 1):
        step_with(opt, p, torch.randn(8, generator=gen))
    before = p.detach().clone()
    g = torch.randn(8, generator=gen)
    tele = step_with(opt, p, g)
    state = opt.state[p]
    assert tele["reset"] == 1.0 and tele["warmup_scale"] == pytest.approx(0.01)
    # the moments were zero before this step's update: only g is in them
    torch.testing.assert_close(state["exp_avg"], (1 - b1) * g, rtol=1e-6, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"], (1 - b2) * g * g, rtol=1e-6, atol=0)
    count = 1 if reset_bias_correction else k_reset
    assert state["step"] == count
    m_hat = (1 - b1) * g.double() / (1 - b1 ** count)
    v_hat = (1 - b2) * g.double() ** 2 / (1 - b2 ** count)
    expected = before.double() * (1 - lr * wd) - lr * 0.01 * m_hat / (v_hat.sqrt() + eps)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-9)


def test_warmup_scale_values():
    n, interval = 30, 50
    p, opt = one_param_opt(interval=interval, warmup_steps=n)
    scales = {}
    for k in range(1, interval + n + 5):
        scales[k] = step_with(opt, p, torch.ones(8))["warmup_scale"]
    assert all(scales[k] == 1.0 for k in range(1, interval))  # before the first reset
    assert scales[interval] == pytest.approx(0.01, abs=1e-12)  # t = 0
    t = n - 1
    assert scales[interval + t] == pytest.approx(1 - 0.99 * (1 + math.cos(math.pi * t / (n + 1))) / 2, abs=1e-12)
    assert scales[interval + t] == pytest.approx(1.0, abs=0.02)
    assert scales[interval + n] == 1.0  # t = N: exactly 1
    # rises monotonically in between
    window = [scales[interval + t] for t in range(n + 1)]
    assert window == sorted(window)


def test_zscore_gate():
    def run(spike_threshold):
        p, opt = one_param_opt(n=100, theta=100.0, spike_threshold=spike_threshold, periodic_reset=False,
                               clip_grace_steps=25, zscore_window=20, gate_statistic="window",
                               gate_min_history=2)
        norms, zs = [], []
        for k in range(1, 41):  # gradient norms alternate 8 and 12 (mean 10)
            tele = step_with(opt, p, torch.ones(100) * (0.8 if k % 2 else 1.2))
            norms.append(tele["grad_norm"])
            zs.append(tele["zscore"])
        quiet = torch.ones(100)
        quiet[7] = 3.0  # g^2 = 9 > theta * v (about 4), but the global norm is ordinary
        t_quiet = step_with(opt, p, quiet)
        spike = torch.ones(100)
        spike[3] = 1000.0
        t_spike = step_with(opt, p, spike)
        return norms, zs, t_quiet, t_spike

    norms, zs, quiet, spike = run(2.0)
    # z against a plain computation over the previous window
    assert zs[0] == 0.0 and zs[1] == 0.0  # fewer than 2 previous norms
    for i in range(2, 40):
        prev = norms[max(0, i - 20):i]
        assert zs[i] == pytest.approx((norms[i] - statistics.mean(prev)) / statistics.stdev(prev), rel=1e-5)
    assert quiet["zscore"] < 2.0 and quiet["spike_step"] == 0.0 and quiet["clipped_count"] == 0
    assert spike["zscore"] > 2.0 and spike["spike_step"] == 1.0 and spike["clipped_count"] == 1
    assert spike["clipped_fraction"] == pytest.approx(0.01)

    _, _, quiet0, spike0 = run(0.0)  # ungated: the element rule alone decides
    assert quiet0["clipped_count"] == 1 and spike0["clipped_count"] == 1


def test_clipping_changes_the_gradient_adam_sees():
    # the classic defect: grad[mask] = ... writes into a copy and clips nothing
    theta, b1, b2 = 4.0, 0.9, 0.999
    p, opt = one_param_opt(theta=theta, betas=(b1, b2), spike_threshold=0.0, periodic_reset=False,
                           clip_grace_steps=3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        step_with(opt, p, torch.randn(8, generator=gen))
    m_prev, v_prev = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
    g = torch.randn(8, generator=gen)
    g[2], g[5] = 50.0, -70.0
    user_grad = g.clone()
    p.grad = g
    opt.step()
    bound = (theta * v_prev).sqrt()
    clipped = torch.maximum(torch.minimum(g, bound), -bound)
    assert clipped[2] < 50.0 and clipped[5] > -70.0
    torch.testing.assert_close(opt.state[p]["exp_avg"], b1 * m_prev + (1 - b1) * clipped)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], b2 * v_prev + (1 - b2) * clipped ** 2)
    assert torch.equal(p.grad, user_grad)  # the caller's gradient is left alone
    assert opt.read_telemetry()["clipped_count"] >= 2


def sparse_setup(seed=0, density=0.25, wd=0.0, interval=10, shape=(64, 48)):
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    b = torch.nn.Parameter(torch.zeros(shape[0]))
    opt = AdamWSpam([dict(params=[w], sparse=True), dict(params=[b], weight_decay=0.0)], lr=1e-2,
                    weight_decay=wd, density=density, interval=interval, warmup_steps=3, seed=seed)
    return w, b, opt


def sparse_steps(w, b, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        w.grad = torch.randn(w.shape, generator=gen)
        b.grad = torch.randn(b.shape, generator=gen)
        opt.step()


def test_sparse_masks():
    density, numel = 0.25, 64 * 48
    w, b, opt = sparse_setup(density=density)
    sparse_steps(w, b, opt, 1)
    first = opt.moment_index(w)
    assert first.numel() == round(density * numel)
    assert len(set(first.tolist())) == first.numel() and 0 <= first.min() and first.max() < numel
    assert opt.state[b]["exp_avg"].shape == b.shape and opt.moment_index(b) is None  # unflagged: dense

    # elements outside the mask do not move during the window (no weight decay here)
    before = w.detach().clone()
    sparse_steps(w, b, opt, 7, seed=1)  # steps 2..8, still in the first window
    moved = (w.detach() != before).flatten().nonzero().flatten()
    assert set(moved.tolist()) <= set(first.tolist())
    assert len(moved) > 0.9 * first.numel()

    sparse_steps(w, b, opt, 2, seed=2)  # step 10 resets: new masks
    redrawn = opt.moment_index(w)
    assert redrawn.numel() == first.numel() and not torch.equal(redrawn, first)

    # two "ranks" with the same seed draw the same masks, another seed others
    masks = {}
    for name, seed in (("rank0", 7), ("rank1", 7), ("other", 8)):
        wi, bi, oi = sparse_setup(seed=seed)
        torch.manual_seed(len(name))  # the global RNG must not matter
        sparse_steps(wi, bi, oi, 10)
        masks[name] = oi.moment_index(wi)
    assert torch.equal(masks["rank0"], masks["rank1"]) and not torch.equal(masks["rank0"], masks["other"])


def test_sparse_weight_decay_applies_to_whole_tensor():
    lr, wd = 1e-2, 0.1
    w, b, opt = sparse_setup(wd=wd, interval=100)
    before = w.detach().clone()
    sparse_steps(w, b, opt, 3)
    outside = torch.ones(w.numel(), dtype=torch.bool)
    outside[opt.moment_index(w)] = False
    torch.testing.assert_close(w.detach().flatten()[outside], before.flatten()[outside] * (1 - lr * wd) ** 3)


def state_bytes(state):
    return sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))


def test_sparse_state_memory():
    sizes = {}
    for density in (0.25, 1.0):
        w, b, opt = sparse_setup(density=density, shape=(256, 192))
        sparse_steps(w, b, opt, 1)
        sizes[density] = state_bytes(opt.state[w])
    assert sizes[0.25] <= 0.30 * sizes[1.0]


def test_state_dict_roundtrip_mid_warmup():
    def build(params):
        return AdamWSpam([dict(params=[params[0]], sparse=True), dict(params=params[1:], weight_decay=0.0)],
                         lr=1e-2, weight_decay=0.1, density=0.5, interval=12, warmup_steps=6,
                         clip_grace_steps=2, spike_threshold=1.0, zscore_window=5, seed=3)

    params_a = [torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(0))),
                torch.nn.Parameter(torch.zeros(8))]
    opt_a = build(params_a)
    stream = list(gradient_stream([(16, 8), (8,)], 40, spikes={15: 50.0, 20: 100.0, 30: 80.0}))

    def feed(params, opt, grads):
        for p, g in zip(params, grads):
            p.grad = g.float()
        opt.step()

    for grads in stream[:15]:  # step 15: three steps into the warmup after the reset at 12
        feed(params_a, opt_a, grads)
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = build(params_b)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    for grads in stream[15:]:  # crosses the resets at 24 and 36 (masks redrawn from the saved generator)
        feed(params_a, opt_a, grads)
        feed(params_b, opt_b, grads)
        assert opt_a.read_telemetry() == opt_b.read_telemetry()
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert torch.equal(opt_a.moment_index(params_a[0]), opt_b.moment_index(params_b[0]))


def test_state_dict_loads_weights_only_and_keeps_dtypes():
    w = torch.nn.Parameter(torch.randn(32, 8).to(torch.bfloat16))
    opt = AdamWSpam([dict(params=[w], sparse=True)], density=0.5)
    w.grad = torch.randn(32, 8).to(torch.bfloat16)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)
    fresh = AdamWSpam([dict(params=[w], sparse=True)], density=0.5)
    fresh.load_state_dict(sd)
    assert fresh.state[w]["exp_avg"].dtype == torch.float32
    assert fresh.state[w]["mask_offsets"].dtype == torch.uint8
    assert torch.equal(fresh.state[w]["exp_avg_sq"], opt.state[w]["exp_avg_sq"])
    assert fresh._step == 1
    with pytest.raises(ValueError, match="DENSITY"):
        AdamWSpam([w], density=1.0).load_state_dict(sd)
    with pytest.raises(ValueError, match="not from AdamWSpam"):
        fresh.load_state_dict(torch.optim.AdamW([w]).state_dict())


def test_bf16_params_fp32_state():
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        w = torch.nn.Parameter((torch.randn(32, 16) * 0.02).to(dtype))
        b = torch.nn.Parameter((torch.randn(16) * 0.02).to(dtype))
        opt = AdamWSpam([dict(params=[w], sparse=True), dict(params=[b])], lr=1e-3, density=0.5,
                        interval=20, warmup_steps=5, clip_grace_steps=3)
        for grads in gradient_stream([(32, 16), (16,)], 30, spikes={12: 100.0}):
            w.grad, b.grad = grads[0].to(dtype), grads[1].to(dtype)
            opt.step()
        assert w.dtype == dtype
        assert all(opt.state[p][name].dtype == torch.float32 for p in (w, b) for name in ("exp_avg", "exp_avg_sq"))
        results[dtype] = (w.detach().float(), b.detach().float())
    for a, b in zip(results[torch.float32], results[torch.bfloat16]):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-3)  # two lr-sized steps


def test_gradient_accumulation_counts_one_step_per_call():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = AdamWSpam(model.parameters(), interval=3, warmup_steps=2)
    for k in range(1, 8):
        for _ in range(4):  # micro-batches
            model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        assert opt._step == k and opt.state[model.weight]["step"] == k
        assert opt.read_telemetry()["reset"] == float(k % 3 == 0)


def test_gradscaler_skipped_step_advances_nothing():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = AdamWSpam(model.parameters(), interval=3, warmup_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    def train_step(poison):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(5, 4)).float().pow(2).mean()
        scaler.scale(loss).backward()
        if poison:
            model.weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    train_step(False)
    train_step(False)
    weight = model.weight.detach().clone()
    train_step(True)  # overflow: skipped
    assert opt._step == 2 and opt.state[model.weight]["step"] == 2
    assert torch.equal(model.weight.detach(), weight)
    train_step(False)  # the real third step resets
    assert opt._step == 3 and opt.read_telemetry()["reset"] == 1.0
    assert torch.isfinite(model.weight).all()


def test_step_has_no_host_sync(monkeypatch):
    w, b, opt = sparse_setup(density=0.5, interval=4)
    sparse_steps(w, b, opt, 3)  # state exists; the next step resets and redraws

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside step()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    sparse_steps(w, b, opt, 30, seed=4)  # reset, warmup, z-gated clipping
    monkeypatch.undo()
    assert opt._step == 33 and opt.read_telemetry()["clipped_count"] >= 0


def test_non_contiguous_params_update_like_contiguous():
    conv = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        w = torch.nn.Parameter(conv.clone().to(memory_format=memory_format))
        opt = AdamWSpam([dict(params=[w], sparse=True)], density=0.5, interval=5, clip_grace_steps=1,
                        spike_threshold=0.0)
        for (g,) in gradient_stream([(4, 3, 3, 3)], 12):
            w.grad = g.float().contiguous(memory_format=memory_format)
            opt.step()
        results.append(w.detach().contiguous())
    assert torch.equal(results[0], results[1])


def test_telemetry_is_tensors_then_floats():
    p, opt = one_param_opt()
    step_with(opt, p, torch.ones(8))
    tele = opt.telemetry()
    names = {"clipped_count", "clipped_fraction", "spike_step", "zscore", "grad_norm", "reset", "warmup_scale",
             "clipped_fraction/other"}  # no param_names: every parameter is "other"
    assert set(tele) == names and all(torch.is_tensor(v) and v.dim() == 0 for v in tele.values())
    floats = opt.read_telemetry()
    assert set(floats) == names and all(isinstance(v, float) for v in floats.values())
    assert floats["grad_norm"] == pytest.approx(math.sqrt(8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.9)), "betas"),
    (dict(density=0.0), "SPAM_DENSITY"),
    (dict(interval=0), "SPAM_INTERVAL"),
    (dict(zscore_window=1), "SPAM_ZSCORE_WINDOW"),
    (dict(theta=-1.0), "SPAM_THETA"),
])
def test_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamWSpam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_reset_momentum_zeroes_moments_and_restarts_the_warmup_window():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = AdamWSpam([p], lr=1e-2, weight_decay=0.0, enable_clip=False, periodic_reset=True,
                    interval=1000, warmup=True, warmup_steps=10)
    for _ in range(5):
        p.grad = torch.randn(4, 3)
        opt.step()
    assert opt.read_telemetry()["warmup_scale"] == 1.0  # no reset yet
    opt.reset_momentum()
    state = opt.state[p]
    assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
    p.grad = torch.randn(4, 3)
    opt.step()
    # first step after the reset: t = 1 of a 10-step cosine warmup (hand-computed)
    assert opt.read_telemetry()["warmup_scale"] == pytest.approx(1 - 0.99 * (1 + math.cos(math.pi / 11)) / 2)
