"""
Stable-SPAM (Huang et al. 2025, arXiv 2502.17055): Adam with AdaClip, AdaGN
and MoRet, written from shared/docs/spike-methods.md section 2.

One optimizer step k (1-based, counted once per step() call), for every
parameter tensor with a gradient g, j its gradient-statistics counter (steps
this tensor has been through, never reset) and t Adam's counter:

0. MoRet: when k % interval == 0, Adam's m and v of every tensor are zeroed
   and t restarts, BEFORE this step's update, so that this step's gradient is
   the first to enter the fresh moments (t = 1).
1. Decoupled weight decay: p <- p * (1 - lr * wd).
2. AdaClip: a = max|g|; T <- gamma3 * T + (1 - gamma3) * a;
   T_hat = T / (1 - gamma3^j); every element with |g_i| > T_hat becomes
   g_i * T_hat / a (scaled down, sign kept).
3. AdaGN: n = ||g|| after AdaClip; m_n <- gamma1 * m_n + (1 - gamma1) * n;
   v_n <- gamma2 * v_n + (1 - gamma2) * n^2; with both bias-corrected by j,
   g <- g / n * m_n_hat / (sqrt(v_n_hat) + eps) when n > 0.
4. Adam with the processed g: m, v EMAs (betas), bias-corrected by t,
   p <- p - lr * m_hat / (sqrt(v_hat) + eps).

The two reset defects of the authors' code, fixed here:
- Their reset rebinds the state to new zero tensors after the step has
  already taken references to the old ones: the reset step's update still
  uses (and updates) the old moments with the counter already restarted,
  and its gradient never enters the fresh ones. Here the moments are zeroed
  in place before anything reads them.
- Their reset also restarts the counter that bias-corrects AdaClip's T, so
  T_hat jumps by up to 1 / (1 - gamma3) = 1000x after every reset and the clip
  is effectively off for hundreds of steps. Here AdaClip and AdaGN use j, which
  keeps running: their EMAs track the gradients and are not reset, so their
  bias correction must not restart either (the doc names AdaClip's counter;
  AdaGN's EMAs are not reset either, so the same reasoning applies to them).
The authors' optional cosine schedule of beta1 and gamma1 (total_T, eta_min;
off by default there) is not implemented.

No host sync in step(): max|g|, norms and the statistics are device tensors;
the counters and bias corrections are Python numbers that depend only on the
step count. Per-tensor scalars go through torch._foreach ops; the element-wise
clip is one torch.where per tensor.
"""

import math

import torch

_STATE_KEY = "stable_spam"


def _is_dtensor(p):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(p, DTensor)


class StableSpam(torch.optim.Optimizer):
    # uses per-tensor statistics only: it does not want the trainer's global norm
    accepts_grad_norm = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 gamma1=0.7, gamma2=0.9, gamma3=0.999, interval=1000):
        if not lr >= 0.0:
            raise ValueError(f"StableSpam: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"StableSpam: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"StableSpam: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"StableSpam: weight_decay must be >= 0, got {weight_decay}")
        for name, gamma in (("gamma1", gamma1), ("gamma2", gamma2), ("gamma3", gamma3)):
            if not 0.0 <= gamma < 1.0:
                raise ValueError(f"StableSpam: {name} (STABLE_SPAM_{name.upper()}) must be in [0, 1), "
                                 f"got {gamma}")
        if interval < 1:
            raise ValueError(f"StableSpam: interval (STABLE_SPAM_INTERVAL) must be >= 1, got {interval}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if any(_is_dtensor(p) for group in self.param_groups for p in group["params"]):
            raise ValueError("StableSpam needs whole tensors (its clip and norm are per tensor); "
                             "it does not handle FSDP-sharded (DTensor) parameters: use DDP")
        self.gamma1, self.gamma2, self.gamma3 = float(gamma1), float(gamma2), float(gamma3)
        self.interval = int(interval)
        self._step = 0  # k of the last step taken
        self._telemetry = {}

    def _init_state(self, p):
        state = self.state[p]
        state["step"] = 0       # t: Adam's bias-correction counter, restarted by MoRet
        state["stat_step"] = 0  # j: AdaClip/AdaGN bias-correction counter, never restarted
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        scalar = torch.zeros((), dtype=p.dtype, device=p.device)
        state["clip_ema"] = scalar.clone()     # T: EMA of max|g|
        state["norm_ema"] = scalar.clone()     # m_n: EMA of ||g||
        state["norm_sq_ema"] = scalar.clone()  # v_n: EMA of ||g||^2
        return state

    def reset_momentum(self):
        """An unscheduled MoRet (the health monitor's rollback): zero Adam's moments and
        restart its bias correction, as a periodic reset does; AdaClip/AdaGN keep theirs."""
        self._reset_moments()

    def _reset_moments(self):
        moments = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    moments += [state["exp_avg"], state["exp_avg_sq"]]
                    state["step"] = 0
        if moments:
            torch._foreach_zero_(moments)  # in place: nothing keeps the old values

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self._step = self._step + 1
        reset = k % self.interval == 0
        if reset:
            self._reset_moments()
        clipped_counts, elements = [], 0
        for group in self.param_groups:
            elements += self._step_group(group, clipped_counts)
        if clipped_counts:
            clipped = torch.stack([c.to(clipped_counts[0].device) for c in clipped_counts]).sum()
        else:
            clipped = torch.zeros((), dtype=torch.long)
        self._telemetry = dict(clipped_count=clipped, clipped_fraction=clipped / max(elements, 1),
                               reset=torch.tensor(float(reset)))
        return loss

    def _step_group(self, group, clipped_counts):
        """Updates one param group; returns its number of gradient elements."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return 0
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("StableSpam does not support sparse gradients")
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        states = [self.state[p] if self.state.get(p) else self._init_state(p) for p in params]
        for state in states:
            state["step"] += 1
            state["stat_step"] += 1
        grads = [p.grad for p in params]

        # AdaClip: threshold T_hat from the EMA of max|g|; elements above it are scaled by T_hat / a
        max_abs = torch._foreach_norm(grads, math.inf)
        clip_emas = [s["clip_ema"] for s in states]
        torch._foreach_lerp_(clip_emas, max_abs, 1.0 - self.gamma3)
        thresholds = torch._foreach_div(clip_emas, [1.0 - self.gamma3 ** s["stat_step"] for s in states])
        clipped = []
        for g, a, bound in zip(grads, max_abs, thresholds):
            over = g.abs() > bound
            clipped_counts.append(over.sum())
            clipped.append(torch.where(over, g * (bound / a), g))

        # AdaGN: rescale each tensor to the norm its EMAs predict
        norms = torch._foreach_norm(clipped)
        norm_emas = [s["norm_ema"] for s in states]
        norm_sq_emas = [s["norm_sq_ema"] for s in states]
        torch._foreach_lerp_(norm_emas, norms, 1.0 - self.gamma1)
        torch._foreach_mul_(norm_sq_emas, self.gamma2)
        torch._foreach_addcmul_(norm_sq_emas, norms, norms, 1.0 - self.gamma2)
        target = torch._foreach_div(norm_emas, [1.0 - self.gamma1 ** s["stat_step"] for s in states])
        spread = torch._foreach_div(norm_sq_emas, [1.0 - self.gamma2 ** s["stat_step"] for s in states])
        torch._foreach_sqrt_(spread)
        torch._foreach_add_(spread, eps)
        for g, n, m_hat, denom in zip(clipped, norms, target, spread):
            g.mul_(torch.where(n > 0, m_hat / denom / n, torch.ones_like(n)))

        # AdamW with the processed gradients
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, clipped, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, clipped, clipped, 1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [math.sqrt(1.0 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1.0 - beta1 ** s["step"]) for s in states])
        return sum(g.numel() for g in grads)

    # ------------------------------------------------------------- telemetry

    def telemetry(self):
        """Last step's AdaClip clipped count and fraction, and whether it reset: 0-dim tensors."""
        return dict(self._telemetry)

    def read_telemetry(self):
        """Last step's telemetry as Python floats (synchronises with the device)."""
        return {name: float(value.item()) for name, value in self._telemetry.items()}

    # ------------------------------------------------------------ checkpoint

    def state_dict(self):
        sd = super().state_dict()
        sd[_STATE_KEY] = dict(step=self._step)
        return sd

    def load_state_dict(self, state_dict):
        if _STATE_KEY not in state_dict:
            raise ValueError("optimizer checkpoint is not from StableSpam (no 'stable_spam' entry); "
                             "was it saved with a different optimizer choice?")
        state_dict = dict(state_dict)
        self._step = int(state_dict.pop(_STATE_KEY)["step"])
        super().load_state_dict(state_dict)
