"""
Skip-step: drop the whole optimizer step on a loss or gradient-norm outlier
(OLMo-core's SkipStepAdamW rule, shared/docs/spike-methods.md section 3),
usable with any optimizer because the trainer simply does not call
optimizer.step() on a skipped step: no moment update, no weight decay, no
parameter change, no step counter advance.

Rule, per step, against the previous R (= window) recorded values:
once at least R/2 values exist, the step is skipped when
    loss > mean(losses) + sigma * std(losses)   or
    grad_norm > mean(norms) + sigma * std(norms)     (one-sided).
std is the sample standard deviation (n - 1 in the denominator), as
torch.std computes it in OLMo-core; over the >= R/2 = 64 values needed to arm,
it differs from the population std by under 1%, and is the larger of the two,
so it errs on the side of not skipping.

What enters the window (record):
- Non-finite values never do: one NaN would make every later mean and std
  NaN, every comparison false, and the rule blind (or, in a public
  implementation, skip 129 steps in a row). A step enters both windows only
  when its loss and its gradient norm are both finite, so they stay aligned.
- Skipped (outlier) steps do enter, at their value, as in OLMo-core. Keeping
  them out would protect the statistics from an outlier (as SPAM's gate
  needs), but a rule that never admits what it skips locks a run out after
  any lasting jump of the loss or norm: every later step is skipped, the
  weights never change, so the loss never comes back. Admitted, an outlier
  widens the std for R steps; with R = 128 and sigma = 6, after a first
  outlier the next three of the same size within R steps are still skipped
  and a fifth gets through (tests/test_skip_step.py checks this).

verdict() and record() make no host sync: the windows are device ring buffers
and the verdict is a 0-dim bool tensor that the trainer reads in the one sync
per step it already makes.
"""

import torch

from optim.zclip import stat_dtype


class SkipStep:

    def __init__(self, *, window=128, sigma=6.0):
        if window < 4:
            raise ValueError(f"SkipStep: window (SKIP_STEP_WINDOW) must be >= 4, got {window}")
        if not sigma > 0.0:
            raise ValueError(f"SkipStep: sigma (SKIP_STEP_SIGMA) must be > 0, got {sigma}")
        self.window = int(window)
        self.sigma = float(sigma)
        self._state = None  # device tensors, made at the first call
        self._telemetry = {}

    def _state_on(self, device):
        if self._state is None:
            dtype = stat_dtype(device)
            self._state = dict(
                losses=torch.zeros(self.window, dtype=dtype, device=device),
                norms=torch.zeros(self.window, dtype=dtype, device=device),
                count=torch.zeros((), dtype=torch.long, device=device),  # values ever recorded
                skipped_total=torch.zeros((), dtype=torch.long, device=device),
            )
        elif self._state["count"].device != device:
            self._state = {k: v.to(device) for k, v in self._state.items()}
        return self._state

    def _threshold(self, values, filled, used):
        """mean + sigma * sample std over the `filled` values of the ring buffer."""
        n = filled.clamp(min=2).to(values.dtype)  # below 2 the rule is not armed anyway
        mean = (values * used).sum() / n
        var = (((values - mean) * used) ** 2).sum() / (n - 1)
        return mean + self.sigma * var.sqrt()

    @torch.no_grad()
    def verdict(self, loss, grad_norm):
        """A 0-dim bool tensor: True when this step must be skipped. Non-finite steps
        are never skipped here (the trainer's own non-finite check drops them)."""
        s = self._state_on(loss.device)
        loss = loss.detach().to(s["losses"].dtype)
        grad_norm = grad_norm.detach().to(device=loss.device, dtype=s["norms"].dtype)
        filled = s["count"].clamp(max=self.window)
        used = (torch.arange(self.window, device=loss.device) < filled).to(loss.dtype)
        armed = 2 * filled >= self.window
        loss_bound = self._threshold(s["losses"], filled, used)
        norm_bound = self._threshold(s["norms"], filled, used)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        skip = armed & finite & ((loss > loss_bound) | (grad_norm > norm_bound))
        nan = torch.full_like(loss, float("nan"))
        self._telemetry = dict(loss_threshold=torch.where(armed, loss_bound, nan),
                               grad_norm_threshold=torch.where(armed, norm_bound, nan))
        return skip

    @torch.no_grad()
    def record(self, loss, grad_norm, skipped):
        """Enter this step's values (when both are finite) and count it if skipped."""
        s = self._state_on(loss.device)
        loss = loss.detach().to(s["losses"].dtype)
        grad_norm = grad_norm.detach().to(device=loss.device, dtype=s["norms"].dtype)
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
        slot = (s["count"] % self.window).view(1)
        for name, value in (("losses", loss), ("norms", grad_norm)):
            old = s[name].index_select(0, slot)
            s[name].index_copy_(0, slot, torch.where(ok, value.view(1), old))
        s["count"] = s["count"] + ok.long()
        skipped = torch.as_tensor(skipped, device=loss.device)
        s["skipped_total"] = s["skipped_total"] + skipped.long()
        self._telemetry["skipped"] = skipped.float()
        self._telemetry["skipped_total"] = s["skipped_total"]

    def telemetry(self):
        """Whether the last step was skipped, skipped steps so far, and the last
        thresholds (NaN until the rule is armed): 0-dim tensors."""
        return dict(self._telemetry)

    def state_dict(self):
        state = {k: v.clone() for k, v in self._state.items()} if self._state is not None else None
        return dict(window=self.window, state=state)

    def load_state_dict(self, state_dict):
        if state_dict["window"] != self.window:
            raise ValueError(f"skip-step checkpoint has SKIP_STEP_WINDOW={state_dict['window']}, "
                             f"this run {self.window}")
        state = state_dict["state"]
        self._state = {k: v.clone() for k, v in state.items()} if state is not None else None


def build_skip_step(cfg):
    """The skip-step rule the settings select, or None when SKIP_STEP is off."""
    if not cfg.SKIP_STEP:
        return None
    return SkipStep(window=int(cfg.SKIP_STEP_WINDOW), sigma=float(cfg.SKIP_STEP_SIGMA))
