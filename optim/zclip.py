"""
ZClip: adaptive global-norm clipping by an EMA z-score (Kumar et al. 2025,
arXiv 2504.02507), written from shared/docs/spike-methods.md section 1.

Given the global gradient norm n of a step (computed once by the trainer):

- Warm-up: the first `warmup_steps` (W) finite norms are only collected. At
  the W-th, mu = their mean and s2 = their population variance. During the
  warm-up only the fixed cap (max_norm, if > 0) is applied.
- After it: sigma = sqrt(s2), z = (n - mu) / (sigma + 1e-6). A step with
  z > z_thr is a spike and gets the clip value
      c = clip_factor * (mu + z_thr^2 * sigma / z)
  (the further out the spike, the lower c); otherwise c = n (no clipping).
  The bound is min(c, max_norm) when max_norm > 0, and the gradients are
  scaled by min(1, bound / (n + 1e-6)).
- Statistics: x = c on a spike step, n otherwise;
      mu <- alpha * mu + (1 - alpha) * x
      s2 <- alpha * s2 + (1 - alpha) * (x - mu)^2   (with the new mu)
  unless freeze_on_spike, which leaves mu and s2 alone on spike steps.

A non-finite norm never enters the statistics or the warm-up (the trainer
skips such a step anyway; its gradients are left as they are). Everything is
0-dim device tensors selected with torch.where: no host sync, and no Python
loop over elements; the gradients are scaled by one _foreach_mul_ per device.
"""

import torch

# added to sigma in z and to n in the scale factor, as in the definition
_EPS = 1e-6


def stat_dtype(device):
    """float64 for the running statistics (a handful of scalars), where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def scale_grads_(grads, factor):
    """grads[i] *= factor (a 0-dim tensor), one multi-tensor op per device and dtype, no sync."""
    groups = {}
    for g in grads:
        if g is not None:
            groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), group in groups.items():
        # fp64 gradients get the fp64 factor; the others an fp32 one, as clip_grad_norm_ does
        factor_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        torch._foreach_mul_(group, factor.to(device=device, dtype=factor_dtype))


class ZClip:
    """Adaptive global-norm clipping; see the module docstring for the rule."""

    def __init__(self, *, alpha=0.97, z_threshold=2.5, warmup_steps=25, clip_factor=1.0,
                 max_norm=1.0, freeze_on_spike=False):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"ZClip: alpha (ZCLIP_ALPHA) must be in (0, 1), got {alpha}")
        if not z_threshold > 0.0:
            raise ValueError(f"ZClip: z_threshold (ZCLIP_Z_THRESHOLD) must be > 0, got {z_threshold}")
        if warmup_steps < 1:
            raise ValueError(f"ZClip: warmup_steps (ZCLIP_WARMUP_STEPS) must be >= 1, got {warmup_steps}")
        if not clip_factor > 0.0:
            raise ValueError(f"ZClip: clip_factor (ZCLIP_CLIP_FACTOR) must be > 0, got {clip_factor}")
        if not max_norm >= 0.0:
            raise ValueError(f"ZClip: max_norm (ZCLIP_MAX_NORM) must be >= 0, got {max_norm}")
        self.alpha = float(alpha)
        self.z_threshold = float(z_threshold)
        self.warmup_steps = int(warmup_steps)
        self.clip_factor = float(clip_factor)
        self.max_norm = float(max_norm)
        self.freeze_on_spike = bool(freeze_on_spike)
        self._state = None  # tensors on the norm's device, made at the first step
        self._telemetry = {}

    def _fresh_state(self, device):
        dtype = stat_dtype(device)
        zero = torch.zeros((), dtype=dtype, device=device)
        return dict(
            warmup_norms=torch.zeros(self.warmup_steps, dtype=dtype, device=device),
            collected=torch.zeros((), dtype=torch.long, device=device),  # warm-up norms so far (<= W)
            mu=zero.clone(), s2=zero.clone(),
            clipped_total=torch.zeros((), dtype=torch.long, device=device),
        )

    def _state_on(self, device):
        if self._state is None:
            self._state = self._fresh_state(device)
        elif self._state["mu"].device != device:
            self._state = {k: v.to(device) for k, v in self._state.items()}
        return self._state

    @torch.no_grad()
    def clip_(self, grads, total_norm):
        """Scale `grads` in place; `total_norm` is their global L2 norm (0-dim tensor)."""
        s = self._state_on(total_norm.device)
        n = total_norm.detach().to(s["mu"].dtype)
        finite = torch.isfinite(n)
        warming = s["collected"] < self.warmup_steps  # this step is a warm-up step
        W = self.warmup_steps

        # warm-up: put n at position `collected` (only when finite and still warming)
        collect = finite & warming
        slot = s["collected"].clamp(max=W - 1).view(1)
        old = s["warmup_norms"].index_select(0, slot)
        s["warmup_norms"].index_copy_(0, slot, torch.where(collect, n.view(1), old))
        collected = s["collected"] + collect.long()
        warmup_done_now = collect & (collected == W)
        norms = s["warmup_norms"]
        mu0 = torch.where(warmup_done_now, norms.mean(), s["mu"])
        s2_0 = torch.where(warmup_done_now, norms.var(correction=0), s["s2"])

        # adaptive bound from the statistics as they were before this step
        mu, s2 = s["mu"], s["s2"]
        sigma = s2.sqrt()
        z = (n - mu) / (sigma + _EPS)
        adaptive = ~warming & finite
        spike = adaptive & (z > self.z_threshold)
        c_spike = self.clip_factor * (mu + self.z_threshold ** 2 * sigma / z)
        c = torch.where(spike, c_spike, n)
        inf = torch.full_like(n, float("inf"))
        # a step that is no spike is not scaled at all (c = n would scale it by n / (n + eps),
        # a no-op in value that would still count as clipped)
        bound = torch.where(spike, c, inf)
        if self.max_norm > 0:
            bound = torch.minimum(bound, torch.full_like(n, self.max_norm))
        factor = torch.where(finite, (bound / (n + _EPS)).clamp(max=1.0), torch.ones_like(n))
        scale_grads_(grads, factor)

        # EMA update with x = c (spike) or n; the new mu enters the variance
        x = c
        new_mu = self.alpha * mu + (1 - self.alpha) * x
        new_s2 = self.alpha * s2 + (1 - self.alpha) * (x - new_mu) ** 2
        update = adaptive & ~spike if self.freeze_on_spike else adaptive
        s["mu"] = torch.where(update, new_mu, mu0)
        s["s2"] = torch.where(update, new_s2, s2_0)
        s["collected"] = collected
        clipped = factor < 1.0
        s["clipped_total"] = s["clipped_total"] + clipped.long()
        self._telemetry = dict(
            clip_bound=bound, z=torch.where(adaptive, z, torch.zeros_like(z)),
            clipped=clipped.float(), spike=spike.float(), mu=s["mu"], sigma=s["s2"].sqrt(),
            clipped_total=s["clipped_total"],
        )

    def telemetry(self):
        """The last step's clip bound, z, clipped/spike flags, mu and sigma, and the number
        of clipped steps so far: 0-dim tensors (read them at logging time)."""
        return dict(self._telemetry)

    def state_dict(self):
        state = {k: v.clone() for k, v in self._state.items()} if self._state is not None else None
        return dict(kind="zclip", warmup_steps=self.warmup_steps, state=state)

    def load_state_dict(self, state_dict):
        if state_dict.get("kind") != "zclip":
            raise ValueError("clipper checkpoint is not from ZClip; was it saved with another "
                             "gradient-clipping choice?")
        if state_dict["warmup_steps"] != self.warmup_steps:
            raise ValueError(f"clipper checkpoint has ZCLIP_WARMUP_STEPS={state_dict['warmup_steps']}, "
                             f"this run {self.warmup_steps}")
        state = state_dict["state"]
        self._state = {k: v.clone() for k, v in state.items()} if state is not None else None
