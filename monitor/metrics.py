"""Training-health metrics as pure functions on tensors.

Each function states its exact definition in its docstring. Tensor-in,
tensor-out functions stay on the tensors' device and never call .item(), so
the caller decides when to pay for a host synchronisation (the monitor does
it once per log interval). Functions that need a host anyway (the power-law
fit, the loss-curve fit, zlib) take and return numpy / Python values.

Sources of the definitions: the Gradient Spike Score manual (GSS, the
Adam-moment approximation of GSS) and the health-indicator table of this
project's seeds; Liu et al. 2020 (GSNR); Martin & Mahoney 2021 and Clauset,
Shalizi & Newman 2009 (heavy-tailed ESD alpha by power-law MLE + KS x_min);
Carlini et al. 2021 (zlib vs perplexity); Roy & Vetterli 2007 (effective rank).
"""

import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from optim.norms import sums_of_squares

# ---------------------------------------------------------------------------
# Gradient norms


def per_tensor_grad_norms(grads) -> torch.Tensor:
    """L2 norm of each gradient tensor, as one float32 vector (n,).

    grads: a sequence of tensors or None; a None gradient (parameter unused
    in this step) counts as norm 0 so that positions stay aligned with the
    parameter list. Accurate to float64 (optim.norms: torch's float32 norm of
    an embedding gradient is off by about 1e-3 on a CPU), and so equal to the
    sum of the same tensor's blocks under FSDP (monitor.sharded).
    """
    return sums_of_squares(grads).sqrt().float()


def global_grad_norm(grads) -> torch.Tensor:
    """L2 norm of all gradients concatenated: sqrt(sum_i ||g_i||^2), 0-dim float32.

    None entries are skipped. Equals torch.nn.utils.clip_grad_norm_'s total norm.
    """
    return torch.linalg.vector_norm(per_tensor_grad_norms(grads))


# ---------------------------------------------------------------------------
# Gradient Spike Score


class GradSpikeScore:
    """GSS_t = ||g_t|| / EMA(||g||)_{t-1}, per parameter tensor and globally.

    The EMA covers the PREVIOUS steps only: EMA_t = beta * EMA_{t-1} +
    (1 - beta) * ||g_t||, and it is seeded with the first norm (EMA_1 =
    ||g_1||), so no bias correction is needed. On the first observation there
    is no history and the GSS is undefined; it is reported as 1.0 ("equal to
    the baseline", which is what a seeded EMA gives), never as a spike. A
    tensor whose EMA is exactly 0 (its gradient has always been zero) gets
    GSS 1.0 while its gradient stays zero, and +inf once it is not.

    Usage per optimizer step: ``gss, gss_global = s.score(norms, global_norm)``
    (no state change), then ``s.accept(norms, global_norm)`` with the norms
    that were actually applied (after a spike clip; not called for a skipped
    step), so that a blocked spike does not inflate the baseline. Everything
    stays on the norms' device; nothing here synchronises with the host.
    """

    def __init__(self, beta: float = 0.9):
        if not 0.0 < beta < 1.0:
            raise ValueError(f"GSS EMA beta must be in (0, 1), got {beta}")
        self.beta = beta
        self.steps = 0  # observations folded into the EMA (host counter, no sync)
        self.ema = None  # (n,) per-tensor EMA of ||g||
        self.ema_global = None  # 0-dim EMA of the global norm
        self.seen = None  # (n,) bool: the tensor has had a finite norm (its EMA is seeded)
        self.seen_global = None

    @staticmethod
    def _ratio(norm, ema):
        ratio = norm / ema
        # 0/0 (never any gradient) -> 1; x/0 stays +inf.
        return torch.where((ema == 0) & (norm == 0), torch.ones_like(ratio), ratio)

    def score(self, norms: torch.Tensor, global_norm: torch.Tensor):
        """(per-tensor GSS (n,), global GSS 0-dim) of this step's norms."""
        if self.ema is None:
            return torch.ones_like(norms), torch.ones_like(global_norm)
        if self.ema.shape != norms.shape:
            raise ValueError(f"GSS got {norms.numel()} gradient norms but tracks {self.ema.numel()} tensors")
        ones = torch.ones_like(norms)
        return (torch.where(self.seen, self._ratio(norms, self.ema), ones),
                torch.where(self.seen_global, self._ratio(global_norm, self.ema_global), torch.ones_like(global_norm)))

    def accept(self, norms: torch.Tensor, global_norm: torch.Tensor):
        """Fold this step's norms into the EMA.

        A non-finite norm (NaN/inf gradient) never enters it: that entry keeps
        its previous EMA (or stays unseeded). Done with torch.where on the
        device, so there is no host synchronisation.
        """
        norms, global_norm = norms.detach().float(), global_norm.detach().float()
        if self.ema is None:
            self.ema, self.ema_global = torch.zeros_like(norms), torch.zeros_like(global_norm)
            self.seen = torch.zeros_like(norms, dtype=torch.bool)
            self.seen_global = torch.zeros_like(global_norm, dtype=torch.bool)
        self.ema = self._fold(self.ema, self.seen, norms)
        self.ema_global = self._fold(self.ema_global, self.seen_global, global_norm)
        self.seen = self.seen | torch.isfinite(norms)
        self.seen_global = self.seen_global | torch.isfinite(global_norm)
        self.steps += 1

    def _fold(self, ema, seen, norm):
        moved = torch.where(seen, ema * self.beta + norm * (1.0 - self.beta), norm)  # seeded by the first
        return torch.where(torch.isfinite(norm), moved, ema)

    def update(self, norms: torch.Tensor, global_norm: torch.Tensor):
        """score() then accept() the same norms; returns score()'s result."""
        out = self.score(norms, global_norm)
        self.accept(norms, global_norm)
        return out

    def state_dict(self) -> dict:
        return {"beta": self.beta, "steps": self.steps, "ema": self.ema, "ema_global": self.ema_global,
                "seen": self.seen, "seen_global": self.seen_global}

    def load_state_dict(self, state: dict, device=None):
        """Restore; device moves the EMA next to the gradients (checkpoints often load on the CPU)."""
        self.beta = state["beta"]
        self.steps = state["steps"]
        for key in ("ema", "ema_global", "seen", "seen_global"):
            value = state[key]
            setattr(self, key, None if value is None else value.clone().to(device))


def spike_clip_(grads, gss: torch.Tensor, tau: float) -> torch.Tensor:
    """Scale, in place, each gradient whose GSS exceeds tau by tau / GSS.

    Afterwards every tensor's GSS (against the same EMA) is at most tau and
    the largest equals tau when any was above. Tensors at or below tau, None
    gradients and NaN scores are left alone. Returns the scale factors (n,)
    (1 where untouched), on the scores' device; no host synchronisation.
    """
    scales = torch.where(gss > tau, tau / gss, torch.ones_like(gss))
    present = [i for i, g in enumerate(grads) if g is not None]
    if present:
        tensors = [grads[i] for i in present]
        factors = scales[present].unbind()
        torch._foreach_mul_(tensors, [f.to(t.dtype) for f, t in zip(factors, tensors)])
    return scales


def elementwise_gss_ratios(grad: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float,
                           step=None, beta2=None) -> torch.Tensor:
    """|g| / (sqrt(v) + eps) element by element (float32, grad's shape): the Adam-moment GSS.

    v is the optimizer's second moment (torch AdamW / AdamWSpam 'exp_avg_sq')
    as it stands BEFORE this step's update, i.e. an EMA of g^2 over the previous
    steps. With step and beta2 given, v is bias-corrected first,
    v_hat = v / (1 - beta2**step), which removes the early-training inflation
    of the raw ratio; without them the raw v is used (the manual's formula).
    grad and exp_avg_sq are matched element by element, so a caller with
    compact sparse moments passes the gathered values (grad.view(-1)[index],
    v) instead of the dense tensors. An element whose v is about 0 (an
    embedding row of a token not seen for many steps) gets |g| / eps: that is
    the rare-token effect, not a spike.
    """
    if grad.shape != exp_avg_sq.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} does not match second moment {tuple(exp_avg_sq.shape)}")
    v = exp_avg_sq.float()
    if step is not None and beta2 is not None and step > 0:
        v = v / (1.0 - beta2 ** step)
    return grad.float().abs() / (v.sqrt() + eps)


def elementwise_gss_max(grad: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float,
                        step=None, beta2=None) -> torch.Tensor:
    """max over elements of elementwise_gss_ratios(...), 0-dim."""
    return elementwise_gss_ratios(grad, exp_avg_sq, eps, step, beta2).max()


TOP_FRACTION = 1000  # the high quantile logged beside a maximum: 1 element in 1000 (p99.9)


def upper_quantile(values: torch.Tensor, per: int = TOP_FRACTION) -> torch.Tensor:
    """The ceil(n / per)-th largest of the n values, 0-dim: the 1 - 1/per quantile (p99.9 for 1000).

    At least ceil(n / per) values are >= it, so it ignores the single largest
    outliers that decide a maximum. One top-k of ceil(n / per) values (no
    sort of the whole tensor, no size limit as in torch.quantile), on the
    values' device, no host synchronisation.
    """
    return upper_quantile_of_parts([values], per)


def upper_quantile_of_parts(parts, per: int = TOP_FRACTION) -> torch.Tensor:
    """upper_quantile of the concatenation of several tensors, without concatenating them.

    The m = ceil(n / per) largest values overall are among each part's own m
    largest, so a top-k per part and one over those candidates give the exact
    answer while copying only m values per part.
    """
    n = sum(p.numel() for p in parts)
    m = max(1, (n + per - 1) // per)
    candidates = [p.reshape(-1).topk(min(m, p.numel())).values for p in parts]
    pool = torch.cat(candidates) if len(candidates) > 1 else candidates[0]
    return pool.topk(m).values[-1]


# ---------------------------------------------------------------------------
# Update size, gradient signal-to-noise, cross-worker consistency


def update_ratios(before, after):
    """||w_after - w_before|| / ||w_before|| per tensor (n,) and over all tensors (0-dim).

    The actual step taken by the optimizer (Adam's normalisation, weight
    decay, clipping, warmup all included), not lr * g. A tensor with
    ||w_before|| = 0 gives inf (or NaN when it also did not move).
    """
    deltas = torch._foreach_sub([a.float() for a in after], [b.float() for b in before])
    # float64-accurate sums (optim.norms): a float32 norm of a million elements is off by ~1e-3
    delta_norms = sums_of_squares(deltas).sqrt()
    weight_norms = sums_of_squares(before).sqrt()
    per_tensor = (delta_norms / weight_norms).float()
    total = (torch.linalg.vector_norm(delta_norms) / torch.linalg.vector_norm(weight_norms)).float()
    return per_tensor, total


GSNR_EPS = 1e-8


def gsnr_from_sums(sum_g: torch.Tensor, sum_g2: torch.Tensor, n: int, eps: float = GSNR_EPS) -> torch.Tensor:
    """Gradient signal-to-noise ratio of one parameter tensor from running sums.

    Over n >= 2 micro-batch gradients g_1..g_n, with element-wise sums
    sum_g = sum_k g_k and sum_g2 = sum_k g_k^2: mean m = sum_g / n, unbiased
    variance var = (sum_g2 - n m^2) / (n - 1) (clamped at 0 against rounding),
    and per element r = m^2 / (var + eps * sum_g2 / n) with eps = 1e-8. The
    eps term is relative to the element's own mean square, so r stays
    invariant to the gradients' scale (gradients pre-divided by the
    accumulation count are fine) and is capped at 1/eps for an element whose
    gradient was identical in every micro-batch (all signal, no noise).
    Returns the mean of r over the elements that received any gradient
    (sum_g2 > 0); elements whose gradient was zero in every micro-batch (e.g.
    embedding rows of tokens absent from the batch) have neither signal nor
    noise and are left out; NaN when none received any. Computed in float64,
    as var is a difference of nearly equal numbers; pass float64 sums (exact
    squares of float32 gradients), or ratios above ~1e6 are rounding noise.
    Caveat: with few
    micro-batches r is heavy-tailed (its expectation is finite only for
    n >= 4), so the mean over elements is then dominated by a few elements.
    """
    if n < 2:
        raise ValueError(f"GSNR needs at least 2 micro-batch gradients, got {n}")
    s, s2 = sum_g.double(), sum_g2.double()
    mean = s / n
    var = ((s2 - n * mean * mean) / (n - 1)).clamp_min(0.0)
    ratio = mean * mean / (var + eps * s2 / n)
    touched = s2 > 0
    ratio = torch.where(touched, ratio, torch.zeros_like(ratio))  # 0/0 of untouched elements
    return ratio.sum() / touched.sum()  # masked mean without a host sync


def direction_consistency(flat_grads) -> torch.Tensor:
    """Mean pairwise cosine similarity of W flattened gradients (W >= 2), 0-dim.

    flat_grads: a (W, P) tensor or a list of W 1-D tensors (one per worker).
    Mean over the W(W-1)/2 unordered pairs i < j of cos(g_i, g_j). 1 means all
    workers push the same direction. A zero gradient has cosine 0 with anything.
    """
    g = torch.stack(list(flat_grads)) if not torch.is_tensor(flat_grads) else flat_grads
    if g.dim() != 2 or g.size(0) < 2:
        raise ValueError("direction consistency needs a (workers >= 2, P) stack of gradients")
    unit = F.normalize(g.float(), dim=1)
    cos = unit @ unit.T
    w = g.size(0)
    return (cos.sum() - cos.diagonal().sum()) / (w * (w - 1))


def loss_dispersion(losses) -> torch.Tensor:
    """Population standard deviation (divide by W) of the per-worker losses, 0-dim.

    0 for a single worker.
    """
    losses = torch.as_tensor(losses) if not torch.is_tensor(losses) else losses
    return losses.float().std(correction=0)


SKETCH_CHUNK = 1 << 22  # elements per random draw; bounds the sketch's scratch memory


def gradient_sketch(grads, dim: int, seed: int) -> torch.Tensor:
    """CountSketch of the concatenated gradients: a fixed random projection to `dim` numbers.

    Every gradient element i is added, with a random sign s_i, into a random
    bucket h(i) in [0, dim): sketch[b] = sum_{i: h(i)=b} s_i g_i. h and s come
    from a generator seeded with `seed` and drawn in a fixed order (parameter
    order, chunks of 2^22 elements), so every DDP rank that calls this with the
    same seed and parameter shapes uses the same projection. Inner products are
    preserved in expectation, E<S x, S y> = <x, y>, and cosines to within about
    1/sqrt(dim); that is what lets workers compare gradient directions while
    exchanging `dim` floats instead of the whole gradient. None entries are
    skipped (they must be None on every rank).
    """
    tensors = [g for g in grads if g is not None]
    device = tensors[0].device if tensors else torch.device("cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    sketch = torch.zeros(dim, device=device)
    for g in tensors:
        flat = g.detach().reshape(-1)
        for start in range(0, flat.numel(), SKETCH_CHUNK):
            chunk = flat[start:start + SKETCH_CHUNK].float()
            buckets = torch.randint(0, dim, (chunk.numel(),), generator=gen, device=device)
            signs = torch.randint(0, 2, (chunk.numel(),), generator=gen, device=device).float() * 2 - 1
            sketch.index_add_(0, buckets, chunk * signs)
    return sketch


def gather_gradient_sketches(grads, dim: int = 4096, seed: int = 0, group=None) -> torch.Tensor:
    """All-gather every rank's gradient_sketch(grads, dim, seed): (world_size, dim).

    A collective: every rank of the process group must call it at the same
    point with the same dim, seed and parameter shapes. The result feeds
    direction_consistency(); communication is dim floats per rank.
    """
    import torch.distributed as dist
    local = gradient_sketch(grads, dim, seed)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.stack(out)


def gather_losses(loss, group=None) -> torch.Tensor:
    """All-gather a scalar loss from every rank: (world_size,) float32. A collective."""
    import torch.distributed as dist
    local = torch.as_tensor(loss, dtype=torch.float32).detach().reshape(1)
    if dist.get_backend(group) == "nccl":
        local = local.cuda()
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.cat(out)


# ---------------------------------------------------------------------------
# Entropies of attention and output distributions


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-head attention entropy (n_head,) in nats from probabilities (B, n_head, T, T).

    For each head: the mean over batch and query positions of
    H(q) = -sum_k alpha_qk log alpha_qk; masked (zero-probability) keys
    contribute 0 (0 log 0 = 0). Uniform attention over k keys gives log k;
    a query at position q of a causal model attends to q+1 keys.
    """
    p = probs.float()
    h = -torch.special.xlogy(p, p).sum(dim=-1)  # (B, H, T)
    return h.mean(dim=(0, 2))


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the output distributions, 0-dim.

    logits (..., V): the entropy -sum_v p_v log p_v of softmax(logits) at each
    position, computed through log_softmax for stability, averaged over all
    positions.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


# ---------------------------------------------------------------------------
# Weight structure


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a 2-D float32 matrix: (out, in) as is; conv (out, in, kh, kw) -> (out, in*kh*kw)."""
    if weight.dim() < 2:
        raise ValueError(f"a weight matrix needs >= 2 dimensions, got shape {tuple(weight.shape)}")
    return weight.detach().float().reshape(weight.size(0), -1)


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of as_matrix(weight), descending, float32."""
    return torch.linalg.svdvals(as_matrix(weight))


def singular_entropy(sv: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the normalised squared singular values, 0-dim.

    p_i = sigma_i^2 / sum_j sigma_j^2 (the share of the matrix's energy,
    ||W||_F^2, in mode i; the convention of the rank-collapse literature),
    H = -sum p_i log p_i. Ranges from 0 (rank one) to log(rank) (all
    singular values equal). A sharp drop signals rank collapse.
    """
    e = sv.float() ** 2
    p = e / e.sum()
    return -torch.special.xlogy(p, p).sum()


def spectral_radius(sv: torch.Tensor) -> torch.Tensor:
    """Largest singular value sigma_max (the spectral norm), 0-dim."""
    return sv.max()


def param_std(weight: torch.Tensor) -> torch.Tensor:
    """Population standard deviation (divide by n) of all entries of a parameter tensor, 0-dim."""
    return weight.detach().float().std(correction=0)


def powerlaw_alpha(eigs, xmin=None, min_tail: int = 10):
    """Power-law exponent of the tail of an empirical spectral density.

    eigs: eigenvalues of W^T W (= sigma^2), any order; non-positive values are
    dropped. For a lower cut-off x_min the continuous power-law MLE over the
    tail lambda_i >= x_min (n values) is alpha = 1 + n / sum_i ln(lambda_i / x_min),
    and the fit quality is the Kolmogorov-Smirnov distance
    D = max |S(x) - P(x)| between the tail's empirical CDF S and the fitted
    CDF P(x) = 1 - (x / x_min)^(1 - alpha), evaluated on both sides of each
    step of S. With xmin=None, every eigenvalue that leaves at least
    min_tail values in the tail is tried as x_min and the one with the
    smallest D is kept (Clauset et al. 2009; the HT-SR "alpha" of Martin &
    Mahoney). Returns (alpha, x_min, D) as Python floats; NaNs when fewer than
    2 tail values exist.
    """
    x = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    x = x[x > 0]
    nan = (math.nan, math.nan, math.nan)
    if xmin is not None:
        return _powerlaw_fit_at(x[x >= xmin], xmin) if np.count_nonzero(x >= xmin) >= 2 else nan
    best = nan
    candidates = np.unique(x[: max(len(x) - min_tail + 1, 0)])
    for xm in candidates:
        tail = x[x >= xm]
        if len(tail) < 2:
            continue
        fit = _powerlaw_fit_at(tail, xm)
        if not math.isnan(fit[2]) and (math.isnan(best[2]) or fit[2] < best[2]):
            best = fit
    return best


def _powerlaw_fit_at(tail: np.ndarray, xmin: float):
    """(alpha, xmin, KS distance) of the MLE power law on a sorted tail >= xmin."""
    n = len(tail)
    log_sum = np.log(tail / xmin).sum()
    if log_sum <= 0:  # all values equal x_min: no decay to fit
        return math.nan, float(xmin), math.nan
    alpha = 1.0 + n / log_sum
    cdf = 1.0 - (tail / xmin) ** (1.0 - alpha)
    i = np.arange(n)
    ks = max(np.max((i + 1) / n - cdf), np.max(cdf - i / n))
    return float(alpha), float(xmin), float(ks)


# ---------------------------------------------------------------------------
# Loss curve


def collapse_residual(steps, losses, tail: int = 1, b_range=(1e-3, 4.0), min_points: int = 10):
    """Distance of recent losses above a power-law-plus-constant fit of the loss curve.

    Fits L(t) = a * t^(-b) + c to all (t, loss) points (t > 0) by least
    squares: for each exponent b the best (a, c) is a linear least-squares
    solve, so the fit is a search over b alone (a log-spaced grid over
    b_range, then scipy's bounded scalar minimiser around the best grid
    point), which has no starting-point dependence. a and c are unconstrained.
    residual = mean of the last `tail` losses - mean of the fit at those
    steps; relative = residual / mean fit there. Positive: the run is doing
    worse than its own trend predicts. Returns a dict with residual,
    relative, a, b, c (floats), or None with fewer than min_points points
    (a three-parameter curve through a handful of noisy losses means nothing).
    """
    from scipy.optimize import minimize_scalar

    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    keep = (t > 0) & np.isfinite(y)
    t, y = t[keep], y[keep]
    if len(t) < max(min_points, 4):
        return None

    def solve(b):
        design = np.stack([t ** -b, np.ones_like(t)], axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(np.sum((design @ coef - y) ** 2))
        return sse, coef

    grid = np.geomspace(b_range[0], b_range[1], 64)
    sses = [solve(b)[0] for b in grid]
    k = int(np.argmin(sses))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    b = minimize_scalar(lambda b: solve(b)[0], bounds=(lo, hi), method="bounded",
                        options={"xatol": 1e-10}).x
    if solve(b)[0] > sses[k]:
        b = grid[k]
    a, c = solve(b)[1]
    fitted = a * t[-tail:] ** -b + c
    residual = float(np.mean(y[-tail:]) - np.mean(fitted))
    return {"residual": residual, "relative": residual / float(np.mean(fitted)),
            "a": float(a), "b": float(b), "c": float(c)}


# ---------------------------------------------------------------------------
# Memorisation / contamination probes on a language model


def _lm_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """All-position logits (B, T, V) of a GPT-API model (see probe_grads.lm_logits)."""
    from monitor.probe_grads import lm_logits
    return lm_logits(model, idx.contiguous())


def token_nll(model, idx: torch.Tensor) -> torch.Tensor:
    """Per-token next-token negative log-likelihood (B, T-1), nats: -log p(idx[t+1] | idx[:t+1])."""
    logits = _lm_logits(model, idx)[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")


@torch.no_grad()
def codec_score(model, targets: torch.Tensor, contexts: torch.Tensor) -> dict:
    """CoDeC: how much in-context examples lower the loss on held-out target text.

    targets (N, Tt), contexts (N, Tc): token ids; context row k precedes target
    row k, and Tc + Tt must fit the model's context. Both losses are the mean
    next-token NLL over the SAME target tokens 2..Tt (the first target token
    has no in-target prefix in the context-free case, so it is left out of
    both): loss_without from the target alone, loss_with from
    concat(context, target). score = loss_without - loss_with. Positive: the
    examples help, the usual behaviour on unseen text. Near zero or negative
    while the model is otherwise healthy: in-context learning no longer helps,
    a sign the model has memorised this text (contamination). Returns floats.
    """
    tc = contexts.size(1)
    loss_without = token_nll(model, targets).mean()
    loss_with = token_nll(model, torch.cat([contexts, targets], dim=1))[:, tc:].mean()
    return {"score": float(loss_without - loss_with), "loss_without": float(loss_without),
            "loss_with": float(loss_with)}


def zlib_entropy(data: bytes) -> float:
    """Bits per byte of data after zlib compression (level 9): 8 * len(compressed) / len(data)."""
    if not data:
        raise ValueError("zlib entropy of an empty sample is undefined")
    return 8.0 * len(zlib.compress(data, 9)) / len(data)


@torch.no_grad()
def zlib_perplexity_ratio(model, idx: torch.Tensor, samples) -> dict:
    """Model log-perplexity relative to zlib entropy, per sample (Carlini et al. 2021).

    idx (N, T): token ids of the samples; samples: N byte strings, the same
    samples as raw bytes (the decoded text). For sample k, log_ppl_k is the
    mean next-token NLL in nats and zlib_k its zlib entropy in bits per byte;
    ratio_k = log_ppl_k / zlib_k. A sample the model finds far easier than a
    generic compressor does (low ratio) is a memorisation candidate. Carlini
    et al. divide by the absolute compressed length; normalising per byte
    keeps ratios of samples of different lengths comparable, and as only
    orderings and trends of the ratio matter the units (nats per token over
    bits per byte) are kept as they are. Returns numpy arrays
    log_ppl, zlib, ratio (N,).
    """
    log_ppl = token_nll(model, idx).mean(dim=1).double().cpu().numpy()
    z = np.array([zlib_entropy(s) for s in samples])
    return {"log_ppl": log_ppl, "zlib": z, "ratio": log_ppl / z}
