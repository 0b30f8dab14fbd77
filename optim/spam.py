"""
AdamWSpam: AdamW with the three mechanisms of SPAM (Huang et al., "SPAM:
Spike-Aware Adam with Momentum Reset for Stable LLM Training", ICLR 2025),
written from the algorithm's definition (shared/docs/spam-reference.md).

One optimizer step k (1-based, counted once per real step() call; a step
that an fp16 GradScaler skips never reaches step(), so nothing advances):

1. Periodic reset. When periodic_reset and k % interval == 0, both Adam
   moments of every parameter are set to zero before this step's update and
   the sparse masks are redrawn. Adam's bias-correction counter keeps running
   across resets, as in the published code; reset_bias_correction=True
   restarts it instead, as if Adam were started afresh.
2. Warmup scale. With t the number of steps since the last reset (0 on the
   reset step) and N = warmup_steps, the Adam update is multiplied by
   1 - 0.99 * (1 + cos(pi * t / (N + 1))) / 2 while t < N, and by 1 after.
   Before the first reset the scale is 1: the LR schedule's own warmup covers
   the start of training. Weight decay is never scaled.
3. Spike-aware clipping. Every gradient element with g^2 > theta * v, where v
   is the raw second moment from before this step's update, is replaced by
   sign(g) * sqrt(theta * v), i.e. g is clamped to +-sqrt(theta * v). Clipping
   is off during the first clip_grace_steps steps of training and of every
   reset window, while v is still near zero and everything would look like
   a spike.
   Spike-step gate (spike_threshold > 0): the element-wise rule above is only
   applied on steps whose global gradient norm is an outlier, i.e. whose
   z-score (norm - mean) / std against the global gradient norms of the
   previous zscore_window steps (sample std; this step's own norm is not
   part of its statistics) exceeds spike_threshold. With fewer than two
   previous norms z = 0. spike_threshold = 0 clips on every step, as in the
   paper.
4. Adam moments from the (clipped) gradient, then torch.optim.AdamW's update:
   p *= 1 - lr * weight_decay, then p -= lr * scale * m_hat / (sqrt(v_hat) + eps).
   With every SPAM feature off this is AdamW; the update itself is done by
   torch's fused AdamW kernel, the one torch.optim.AdamW(fused=True) runs.
5. Sparse momentum (density < 1, only for param groups marked sparse=True):
   each such tensor keeps moments for a random subset of round(density *
   numel) of its elements, redrawn at every reset from a dedicated generator
   seeded with `seed`, so every data-parallel rank draws the same masks. Only
   those elements get Adam updates during the window. Weight decay still
   applies to the whole tensor: it is a property of the weight, not of the
   moments, and freezing 75% of a matrix out of its regulariser for a whole
   window would change the model's effective decay (the authors' code also
   decays the whole tensor).

Defects of other public implementations that this one avoids (see the
reference for details):
- Boolean-index writes such as grad[mask].mul_(...) act on a copy and do
  nothing; here every write is an in-place op on the real tensor (clamp,
  index_copy_, the fused kernel), and the tests check that clipping changes
  the gradient Adam sees.
- The post-reset warmup length is its own knob, independent of the LR
  schedule's warmup, and the step counter advances in exactly one place.
- Resetting zeroes the moments that feed the denominator (no AMSGrad buffer
  left behind).
- No .item() or other host synchronisation in step(): the spike statistics,
  the gate and the telemetry stay on the device.
- Masks come from a seeded generator of their own, never the global RNG, so
  ranks agree and the model's own randomness is untouched.
"""

import math

import torch

# A sparse mask stores each kept element as a uint8 offset inside its block of
# 256 elements plus one int32 count per block: about 1 byte per kept element
# instead of the 8 of an int64 index, so that the state at density 0.25 is
# about 0.28x the dense state rather than 0.5x.
_MASK_BLOCK = 256

# Elements per bucket of flat chunks that go through the clip and update ops
# together. On CPU a bucket of 1 MiB per operand keeps the ten or so passes
# of a step in the cache (measured: 256Ki elements beat 64Ki-4Mi on GPT-2
# 124M shapes); on accelerators launch cost dominates, so buckets are large.
_BUCKET_NUMEL = {"cpu": 1 << 18}
_BUCKET_NUMEL_DEFAULT = 1 << 25


def warmup_scale(steps_since_reset, warmup_steps):
    """The post-reset cosine warmup factor: 0.01 at t = 0, rising to 1 at t = N."""
    t, n = steps_since_reset, warmup_steps
    if t >= n:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * t / (n + 1))) / 2.0


class AdamWSpam(torch.optim.Optimizer):

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *,
                 enable_clip=True, theta=50.0, spike_threshold=2.0, periodic_reset=True,
                 interval=1000, warmup=True, warmup_steps=100, density=1.0, clip_grace_steps=20,
                 zscore_window=100, reset_bias_correction=False, seed=0):
        if not lr >= 0.0:
            raise ValueError(f"AdamWSpam: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamWSpam: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"AdamWSpam: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamWSpam: weight_decay must be >= 0, got {weight_decay}")
        if enable_clip and not theta >= 0.0:
            raise ValueError(f"AdamWSpam: theta (SPAM_THETA) must be >= 0, got {theta}")
        if enable_clip and not spike_threshold >= 0.0:
            raise ValueError(f"AdamWSpam: spike_threshold (SPAM_SPIKE_THRESHOLD) must be >= 0, got {spike_threshold}")
        if periodic_reset and (interval is None or interval < 1):
            raise ValueError(f"AdamWSpam: interval (SPAM_INTERVAL) must be >= 1 with periodic_reset, got {interval}")
        if periodic_reset and warmup and (warmup_steps is None or warmup_steps < 0):
            raise ValueError(f"AdamWSpam: warmup_steps (SPAM_WARMUP_STEPS) must be >= 0, got {warmup_steps}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"AdamWSpam: density (SPAM_DENSITY) must be in (0, 1], got {density}")
        if clip_grace_steps < 0:
            raise ValueError(f"AdamWSpam: clip_grace_steps (SPAM_CLIP_GRACE_STEPS) must be >= 0, "
                             f"got {clip_grace_steps}")
        if enable_clip and spike_threshold > 0 and zscore_window < 2:
            raise ValueError(f"AdamWSpam: zscore_window (SPAM_ZSCORE_WINDOW) must be >= 2, got {zscore_window}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, sparse=False)
        super().__init__(params, defaults)

        self.enable_clip = bool(enable_clip)
        self.theta = float(theta)
        self.spike_threshold = float(spike_threshold)
        self.periodic_reset = bool(periodic_reset)
        self.interval = int(interval) if periodic_reset else None
        self.warmup = bool(periodic_reset and warmup)
        self.warmup_steps = int(warmup_steps) if self.warmup else 0
        self.density = float(density)
        self.clip_grace_steps = int(clip_grace_steps)
        self.zscore_window = int(zscore_window)
        self.reset_bias_correction = bool(reset_bias_correction)
        self.seed = int(seed)
        # the spike gate needs the gradient-norm history; pure element-wise
        # clipping (threshold 0) and clipping off do not
        self._gated = self.enable_clip and self.theta > 0 and self.spike_threshold > 0

        self._step = 0            # k of the last step taken
        self._last_reset = 0      # k of the last reset, 0 before the first one
        self._norm_history = None  # ring buffer of global grad norms, on the grads' device
        self._norm_count = 0      # norms ever appended to it
        self._mask_generator = torch.Generator(device="cpu")
        self._mask_generator.manual_seed(self.seed)
        self._telemetry = {}

    # ----------------------------------------------------------------- masks

    def _is_sparse(self, group):
        return bool(group.get("sparse", False)) and self.density < 1.0

    def _kept(self, numel):
        return max(1, round(self.density * numel))

    def _draw_mask(self, p):
        numel = p.numel()
        chosen = torch.randperm(numel, generator=self._mask_generator)[: self._kept(numel)]
        chosen = chosen.sort().values  # sorted: gathers and scatters walk memory forwards
        n_blocks = -(-numel // _MASK_BLOCK)
        counts = torch.bincount(chosen // _MASK_BLOCK, minlength=n_blocks).to(torch.int32)
        offsets = (chosen % _MASK_BLOCK).to(torch.uint8)
        return offsets.to(p.device), counts.to(p.device)

    def moment_index(self, p):
        """Flat indices of the elements of p that its moments cover (a LongTensor
        as long as exp_avg), or None when p's moments are dense."""
        state = self.state.get(p)
        return self._mask_index(state) if state and "mask_offsets" in state else None

    @staticmethod
    def _mask_index(state):
        offsets = state["mask_offsets"]
        block = torch.repeat_interleave(state["mask_counts"], output_size=offsets.numel())
        return block.long() * _MASK_BLOCK + offsets.long()

    # ----------------------------------------------------------------- state

    def _init_state(self, p, sparse):
        state = self.state[p]
        state["step"] = 0
        # bf16/fp16 weights keep fp32 moments; fp32/fp64 weights keep their own dtype
        dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        if sparse:
            state["mask_offsets"], state["mask_counts"] = self._draw_mask(p)
            shape = (state["mask_offsets"].numel(),)
        else:
            shape = p.shape
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)
        return state

    def reset_momentum(self):
        """An unscheduled reset (the health monitor's spike-cluster rollback): zero the
        moments, redraw the sparse masks, and restart the post-reset warmup and clipping
        grace period from the current step, exactly as a periodic reset would."""
        self._last_reset = self._step
        self._reset_moments()

    def _reset_moments(self):
        moments = []
        for group in self.param_groups:
            sparse = self._is_sparse(group)
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                moments += [state["exp_avg"], state["exp_avg_sq"]]
                if sparse:
                    state["mask_offsets"], state["mask_counts"] = self._draw_mask(p)
                if self.reset_bias_correction:
                    state["step"] = 0
        if moments:
            torch._foreach_zero_(moments)

    # ------------------------------------------------------------ spike gate

    def _grad_norm_zscore(self, grads):
        """Global grad norm of this step and its z-score against the previous window."""
        acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=acc)))
        if self._norm_history is None:
            self._norm_history = torch.zeros(self.zscore_window, dtype=acc, device=norm.device)
        history = self._norm_history
        n = min(self._norm_count, self.zscore_window)
        if n >= 2:
            previous = history[:n]
            # 0/0 (flat history, same norm) is no spike; x/0 is a huge z
            z = ((norm.to(history.dtype) - previous.mean()) / previous.std()).nan_to_num(nan=0.0)
        else:
            z = torch.zeros((), dtype=history.dtype, device=history.device)
        history[self._norm_count % self.zscore_window] = norm
        self._norm_count += 1
        return norm, z

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        k = self._step = self._step + 1
        reset = self.interval is not None and k % self.interval == 0
        if reset:
            self._last_reset = k
            self._reset_moments()
        since_reset = k - self._last_reset
        scale = warmup_scale(since_reset, self.warmup_steps) if self.warmup and self._last_reset > 0 else 1.0
        clip_now = (self.enable_clip and self.theta > 0
                    and k >= self.clip_grace_steps and since_reset >= self.clip_grace_steps)

        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("AdamWSpam does not support sparse gradients")
        device = grads[0].device if grads else torch.device("cpu")

        nan = torch.full((), math.nan, device=device)
        norm = z = nan
        spike = None
        if self._gated and grads:
            norm, z = self._grad_norm_zscore(grads)
            spike = z > self.spike_threshold
        # added to every clip bound: 0 lets the bound act, +inf switches it off
        # on steps that are not spikes, without asking the host which it is
        bound_pad = None if spike is None else torch.where(spike, 0.0, math.inf)

        clipped_counts, eligible = [], 0
        step_tensors = {}
        for group in self.param_groups:
            eligible += self._step_group(group, scale, clip_now, bound_pad, clipped_counts, step_tensors)

        if clip_now and clipped_counts:
            clipped = torch.stack(clipped_counts).long().sum()
        else:
            clipped = torch.zeros((), dtype=torch.long, device=device)
        self._telemetry = dict(
            clipped_count=clipped,
            clipped_fraction=clipped / max(eligible, 1),
            spike_step=spike.float() if spike is not None else torch.zeros((), device=device),
            zscore=z,
            grad_norm=norm,
            reset=torch.tensor(float(reset), dtype=torch.float64),
            warmup_scale=torch.tensor(scale, dtype=torch.float64),
        )
        return loss

    def _step_group(self, group, scale, clip_now, bound_pad, clipped_counts, step_tensors):
        """Updates one param group; returns how many elements were eligible for clipping."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        sparse = self._is_sparse(group)
        work, write_back = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p] if self.state.get(p) else self._init_state(p, sparse)
            state["step"] += 1
            count = state["step"]
            key = (count, p.device)
            if key not in step_tensors:  # the fused kernel reads the bias-correction count from a tensor
                step_tensors[key] = torch.full((), float(count), dtype=torch.float32, device=p.device)
            if sparse and wd != 0:
                p.mul_(1.0 - lr * wd)  # the whole tensor decays, kept elements or not
            # flat views share memory with p; a non-contiguous p (channels_last)
            # is updated through a flat copy that is written back at the end
            copy_back = not p.is_contiguous()
            p_flat = p.reshape(-1) if copy_back else p.view(-1)
            g_flat = p.grad.reshape(-1)
            if sparse:
                index = self._mask_index(state)
                p_work, g_work = p_flat.index_select(0, index), g_flat.index_select(0, index)
                write_back.append((p, p_flat, index, p_work, copy_back))
            else:
                p_work, g_work = p_flat, g_flat
                if copy_back:
                    write_back.append((p, p_flat, None, None, True))
            work.append((p_work, g_work, state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                         step_tensors[key]))
        if not work:
            return 0

        # The fused kernel applies p *= 1 - lr*wd before its update; during the
        # warmup the update alone is scaled, so hand it lr*scale and wd/scale.
        adam_lr = lr * scale
        adam_wd = 0.0 if sparse else (wd if scale == 1.0 else wd / scale)
        for bucket in _buckets(work):
            self._update_bucket(*bucket, lr=adam_lr, weight_decay=adam_wd, eps=eps, beta1=beta1,
                                beta2=beta2, clip_now=clip_now, bound_pad=bound_pad,
                                clipped_counts=clipped_counts)

        for p, p_flat, index, p_work, copy_back in write_back:
            if index is not None:
                p_flat.index_copy_(0, index, p_work)
            if copy_back:
                p.copy_(p_flat.view(p.shape))
        return sum(item[0].numel() for item in work)

    def _update_bucket(self, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, weight_decay, eps,
                       beta1, beta2, clip_now, bound_pad, clipped_counts):
        # low-precision weights are updated through fp32 copies of the chunk
        work_params = [p if p.dtype == m.dtype else p.to(m.dtype) for p, m in zip(params, exp_avgs)]
        grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
        if clip_now:
            # |g| is clamped to sqrt(theta * v_prev): the same as replacing
            # g by sign(g) * sqrt(theta * v_prev) wherever g^2 > theta * v_prev
            bound = torch._foreach_mul(exp_avg_sqs, self.theta)
            torch._foreach_sqrt_(bound)
            if bound_pad is not None:
                torch._foreach_add_(bound, bound_pad)
            lower = torch._foreach_neg(bound)
            clipped = [torch.clamp(g, lo, hi) for g, lo, hi in zip(grads, lower, bound)]
            # an element was clipped iff it changed
            clipped_counts.extend(torch._foreach_norm(torch._foreach_sub(grads, clipped), 0))
            grads = clipped
        torch._fused_adamw_(work_params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                            amsgrad=False, maximize=False)
        low_precision = [(p, w) for p, w in zip(params, work_params) if p is not w]
        if low_precision:
            torch._foreach_copy_([p for p, _ in low_precision], [w for _, w in low_precision])

    # ------------------------------------------------------------- telemetry

    def telemetry(self):
        """Last step's telemetry as 0-dim tensors (no host sync)."""
        return dict(self._telemetry)

    def read_telemetry(self):
        """Last step's telemetry as python floats (synchronises with the device)."""
        return {name: float(value.item()) for name, value in self._telemetry.items()}

    # ------------------------------------------------------------ checkpoint

    def state_dict(self):
        sd = super().state_dict()
        history = self._norm_history
        sd["spam"] = dict(
            step=self._step,
            last_reset=self._last_reset,
            steps_since_reset=self._step - self._last_reset,
            norm_history=history.clone() if history is not None else torch.empty(0),
            norm_count=self._norm_count,
            mask_generator_state=self._mask_generator.get_state(),
        )
        return sd

    def load_state_dict(self, state_dict):
        if "spam" not in state_dict:
            raise ValueError("optimizer checkpoint is not from AdamWSpam (no 'spam' entry); "
                             "was it saved with a different optimizer choice?")
        state_dict = dict(state_dict)
        spam = state_dict.pop("spam")
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype,
        # which would round fp32 moments of bf16 weights and turn mask
        # offsets into floats: put back the saved tensors as they were
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            if index not in saved_state:
                continue
            self.state[p] = {name: (value.to(p.device, copy=True) if torch.is_tensor(value) else value)
                             for name, value in saved_state[index].items()}
        for group in self.param_groups:
            sparse = self._is_sparse(group)
            for p in group["params"]:
                state = self.state.get(p)
                if state and state["exp_avg"].numel() != (self._kept(p.numel()) if sparse else p.numel()):
                    raise ValueError("optimizer checkpoint was saved with a different SPAM_DENSITY "
                                     "or sparse grouping than this optimizer")

        self._step = int(spam["step"])
        self._last_reset = int(spam["last_reset"])
        self._norm_count = int(spam["norm_count"])
        history = spam["norm_history"]
        if history.numel() == 0:
            self._norm_history = None
        else:
            if history.numel() != self.zscore_window:
                raise ValueError(f"optimizer checkpoint has a z-score window of {history.numel()} steps, "
                                 f"this optimizer {self.zscore_window} (SPAM_ZSCORE_WINDOW)")
            self._norm_history = history.to(params[0].device if params else "cpu", copy=True)
        self._mask_generator.set_state(spam["mask_generator_state"])


def _buckets(work):
    """Splits (param, grad, exp_avg, exp_avg_sq, step) items into buckets of flat chunks.

    Yields (params, grads, exp_avgs, exp_avg_sqs, steps) lists, one bucket per
    device and state dtype at a time, each about _BUCKET_NUMEL elements.
    """
    pending = {}
    for p, g, m, v, step in work:
        key = (p.device, m.dtype)
        limit = _BUCKET_NUMEL.get(p.device.type, _BUCKET_NUMEL_DEFAULT)
        bucket, filled = pending.get(key, (([], [], [], [], []), 0))
        numel = p.numel()
        for start in range(0, numel, limit):
            end = min(start + limit, numel)
            for dst, src in zip(bucket, (p, g, m, v)):
                dst.append(src if end - start == numel else src[start:end])
            bucket[4].append(step)
            filled += end - start
            if filled >= limit:
                yield bucket
                bucket, filled = ([], [], [], [], []), 0
        pending[key] = (bucket, filled)
    for bucket, filled in pending.values():
        if filled:
            yield bucket
