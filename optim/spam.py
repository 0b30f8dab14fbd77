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
   z-score against the global gradient norms of the previous zscore_window
   steps (this step's own norm is not part of its statistics) exceeds
   spike_threshold; optim/spam_gate.py has the three statistics
   (gate_statistic "window" as published, "exclude", "mad"), the minimum
   history before the gate arms and the handling of non-finite norms. The
   norm is the caller's grad_norm when step() gets one (the trainer computes
   it once per step), else computed here. spike_threshold = 0 clips on every
   step, as in the paper.
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
6. Sharded parameters (FSDP2 DTensors): everything above acts on each
   rank's local block; the gate's norm, the clipped counts and the masks are
   made whole-model quantities across the ranks, and full_state_dict() /
   load_full_state_dict() convert to and from one process's state, so that
   a sharded run trains as one process would (optim/spam_shard.py); sharded
   checkpoints hold the layout-independent form of optim/spam_dcp.py.

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

Telemetry (telemetry(): 0-dim tensors, read_telemetry(): floats) includes
the clipped fraction per parameter class (embedding, attention, mlp, head,
other), from the names given as param_names (optim/spam_plan.py).

Speed: the tensors are cut into cache-sized buckets of flat chunks whose
work lists are built once and reused (optim/spam_plan.py); the clip works in
kept scratch buffers (see _clip for how its bound may differ from
sqrt(theta * v): in the last bit, and where theta * v is 0).
"""

import math

import torch

from optim.spam_gate import GATE_STATISTICS, SpikeGate
from optim.spam_plan import PARAM_CLASSES, GroupPlan, Scratch, bucket_scratch, class_of_params, grad_chunks
from optim.spam_shard import (decode_mask, encode_mask, full_state, group_of, is_sharded, layout_of, local,
                              local_state, mask_part, reduce_sum_)

# Buckets of up to this many chunks are clipped chunk by chunk, larger ones
# through a gathered copy (measured on CPU at GPT-2 1M shapes).
_MAX_CHUNKS_WITHOUT_GATHER = 8


def warmup_scale(steps_since_reset, warmup_steps):
    """The post-reset cosine warmup factor: 0.01 at t = 0, rising to 1 at t = N."""
    t, n = steps_since_reset, warmup_steps
    if t >= n:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * t / (n + 1))) / 2.0



class AdamWSpam(torch.optim.Optimizer):

    # step() takes the trainer's global gradient norm (grad_norm=), computed
    # once per step, instead of computing its own for the spike gate
    accepts_grad_norm = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *,
                 enable_clip=True, theta=50.0, spike_threshold=2.0, periodic_reset=True,
                 interval=1000, warmup=True, warmup_steps=100, density=1.0, clip_grace_steps=20,
                 zscore_window=100, gate_statistic="exclude", gate_min_history=None,
                 reset_bias_correction=False, seed=0, param_names=None):
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
        if gate_statistic not in GATE_STATISTICS:
            raise ValueError(f"AdamWSpam: gate_statistic must be one of {GATE_STATISTICS}, got {gate_statistic!r}")
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
        self.gate_statistic = gate_statistic
        self.gate_min_history = min(10, self.zscore_window) if gate_min_history is None else int(gate_min_history)
        self._gate = None
        if self.enable_clip and self.theta > 0 and self.spike_threshold > 0:
            self._gate = SpikeGate(self.spike_threshold, self.zscore_window, gate_statistic, self.gate_min_history)
        # telemetry class of each named parameter (unnamed ones are "other")
        self._classes = class_of_params(param_names) if param_names is not None else {}

        self._step = 0            # k of the last step taken
        self._last_reset = 0      # k of the last reset, 0 before the first one
        self._mask_generator = torch.Generator(device="cpu")
        self._mask_generator.manual_seed(self.seed)
        self._plans, self._plans_key = None, None  # the work lists of the last step, see _group_plans
        self._scratch = Scratch()
        self._count_tensor = {}   # device -> the step count all parameters share, see step()
        self._last = None         # raw telemetry of the last step; telemetry() turns it into figures
        self._figures = None
        # FSDP2: the process group over which sharded parameters are split (None when
        # nothing is sharded); layout_of refuses layouts this optimizer cannot handle
        sharded = [p for group in self.param_groups for p in group["params"] if is_sharded(p)]
        for p in sharded:
            layout_of(p)
        self._shard_group = group_of(sharded[0]) if sharded else None

    # ----------------------------------------------------------------- masks

    def _is_sparse(self, group):
        return bool(group.get("sparse", False)) and self.density < 1.0

    def _kept(self, numel):
        return max(1, round(self.density * numel))

    def _draw_mask(self, p):
        # the whole tensor's mask on every rank (same generator, same order of
        # calls), of which a sharded parameter keeps its block's part
        layout = layout_of(p)
        numel = layout.global_numel
        chosen = torch.randperm(numel, generator=self._mask_generator)[: self._kept(numel)]
        chosen = chosen.sort().values  # sorted: gathers and scatters walk memory forwards
        return encode_mask(mask_part(chosen, layout), layout.local_numel, p.device)

    def moment_index(self, p):
        """Flat indices of the elements of p (of its local block when p is a DTensor)
        that its moments cover (a LongTensor as long as exp_avg), or None when p's
        moments are dense."""
        state = self.state.get(p)
        return self._mask_index(state) if state and "mask_offsets" in state else None

    @staticmethod
    def _mask_index(state):
        return decode_mask(state["mask_offsets"], state["mask_counts"])

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
            shape = local(p).shape
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
        # in place: the cached work lists keep viewing the same moment tensors
        moments = []
        for group in self.param_groups:
            sparse = self._is_sparse(group)
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if sparse:
                    state["mask_offsets"], state["mask_counts"] = self._draw_mask(p)
                kept = state["mask_offsets"].numel() if sparse else state["exp_avg"].numel()
                if state["exp_avg"].numel() == kept:
                    moments += [state["exp_avg"], state["exp_avg_sq"]]
                else:  # a shard's part of a redrawn mask has another size (sparse plans are rebuilt anyway)
                    state["exp_avg"] = state["exp_avg"].new_zeros(kept)
                    state["exp_avg_sq"] = state["exp_avg_sq"].new_zeros(kept)
                if self.reset_bias_correction:
                    state["step"] = 0
        if moments:
            torch._foreach_zero_(moments)

    # ------------------------------------------------------------ work lists

    def _group_plans(self):
        """The work lists of every param group with gradients, for this step.

        Dense groups' lists are reused while the same parameters, at the same
        storage, have gradients; sparse groups (kept elements gathered into new
        tensors) and non-contiguous parameters (flat copies) are rebuilt.
        """
        key = tuple(tuple((id(p), local(p).data_ptr()) for p in group["params"] if p.grad is not None)
                    for group in self.param_groups)
        if key != self._plans_key:
            self._plans = [GroupPlan(self, group) for group in self.param_groups]
            self._plans_key = key
        else:
            self._plans = [GroupPlan(self, plan.group) if plan.volatile else plan for plan in self._plans]
        return [plan for plan in self._plans if plan.owners]

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None, *, grad_norm=None):
        """One SPAM step. grad_norm: the global L2 norm of the (unscaled)
        gradients as a 0-dim tensor, when the caller has it; the spike gate
        then uses it instead of computing it again."""
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

        plans = self._group_plans()
        if grad_norm is not None and not torch.is_tensor(grad_norm):
            grad_norm = torch.tensor(float(grad_norm), dtype=torch.float64)
        elif is_sharded(grad_norm):  # partial sums of the ranks: every rank needs the whole norm
            grad_norm = grad_norm.full_tensor()
        norm, z, spike = grad_norm, None, None
        if self._gate is not None and plans:
            if norm is None:
                norm = self._global_norm(plans)
            z, spike = self._gate.observe(norm)
        # added to every clip bound: 0 lets the bound act, +inf switches it off
        # on steps that are not spikes, without asking the host which it is
        floors = self._clip_floors(spike) if clip_now else None

        counts = set()
        for plan in plans:
            for state in plan.states:
                state["step"] += 1
                counts.add(state["step"])
        # The fused kernel reads the bias-correction count from a tensor. When
        # every parameter has the same count (the usual case) one kept tensor
        # per device holds it and the buckets reuse their lists of it.
        count_tensors = None
        if len(counts) == 1:
            count = float(counts.pop())
            for device in {plan.owners[0].device for plan in plans}:
                self._shared_count(device).fill_(count)
        else:
            count_tensors = {}
        clipped = [[] for _ in PARAM_CLASSES]
        eligible = [0] * len(PARAM_CLASSES)
        for plan in plans:
            self._step_group(plan, scale, floors, clipped, count_tensors)
            for cls, numel in plan.eligible.items():
                eligible[cls] += numel

        self._last = dict(clipped=clipped, eligible=eligible, spike=spike, z=z, norm=norm, reset=reset,
                          scale=scale, device=plans[0].owners[0].device if plans else torch.device("cpu"))
        self._figures = None
        return loss

    def _clip_floors(self, spike):
        """(dtype, device) -> the 0-dim floor under theta * v in this step's clip
        bound: the smallest normal float, or on a gated step that is not a
        spike a huge one, decided on the device (spike is a 0-dim bool tensor,
        or None when ungated).

        The huge floor is the dtype's largest float / 256 (float32: 1.3e36),
        so the bound exceeds 1e18: only a gradient element beyond that would
        be clipped on a non-spike step, and in float32 its square (Adam's v)
        would overflow from 2e19 on anyway. (+inf would switch the clip off
        exactly but makes the square root slow, see _clip.)
        """
        cache = {}

        def floor(dtype, device):
            key = (dtype, device)
            if key not in cache:
                info = torch.finfo(dtype)
                tiny = torch.full((), info.tiny, dtype=dtype, device=device)
                cache[key] = tiny if spike is None else torch.where(spike.to(device), tiny, info.max / 256)
            return cache[key]

        return floor

    def _shared_count(self, device):
        tensor = self._count_tensor.get(device)
        if tensor is None:
            tensor = self._count_tensor[device] = torch.zeros((), dtype=torch.float32, device=device)
        return tensor

    def _global_norm(self, plans):
        grads = [p.grad for plan in plans for p in plan.owners]
        acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        if self._shard_group is None:
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=acc)))
        # sharded gradients: each rank's sum of squares over its blocks, summed over
        # the ranks; unsharded (replicated) ones are counted once, after the sum
        sharded = [local(g) for g in grads if is_sharded(g)]
        whole = [g for g in grads if not is_sharded(g)]
        squares = torch.zeros((), dtype=acc, device=plans[0].owners[0].device)
        if sharded:
            squares += torch.stack(torch._foreach_norm(sharded, 2, dtype=acc)).square().sum()
        reduce_sum_(squares, self._shard_group)
        if whole:
            squares += torch.stack(torch._foreach_norm(whole, 2, dtype=acc)).square().sum()
        return squares.sqrt()

    def _step_group(self, plan, scale, floors, clipped, count_tensors):
        group = plan.group
        lr, eps = group["lr"], group["eps"]
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        # The fused kernel applies p *= 1 - lr*wd before its update; during the
        # warmup the update alone is scaled, so hand it lr*scale and wd/scale.
        # Sparse groups decayed the whole tensors when their plan was built.
        adam_lr = lr * scale
        adam_wd = 0.0 if plan.sparse else (wd if scale == 1.0 else wd / scale)
        flat_grads = plan.flat_grads()
        for bucket in plan.buckets:
            grads = grad_chunks(bucket, flat_grads)
            if bucket.low_precision or grads[0].dtype != bucket.dtype:
                grads = [g if g.dtype == bucket.dtype else g.to(bucket.dtype) for g in grads]
            if count_tensors is None:
                if bucket.shared_steps is None:
                    bucket.shared_steps = [self._shared_count(bucket.device)] * len(bucket.params)
                steps = bucket.shared_steps
            else:
                steps = []
                for state in bucket.states:
                    key = (state["step"], bucket.device)
                    if key not in count_tensors:
                        count_tensors[key] = torch.full((), float(key[0]), dtype=torch.float32,
                                                        device=bucket.device)
                    steps.append(count_tensors[key])
            if floors is not None:
                grads = self._clip(bucket, grads, floors, clipped[bucket.cls])
            params = bucket.params
            if bucket.low_precision:  # low-precision weights are updated through fp32 copies
                params = [p if p.dtype == bucket.dtype else p.to(bucket.dtype) for p in params]
            torch._fused_adamw_(params, grads, bucket.exp_avgs, bucket.exp_avg_sqs, [], steps, lr=adam_lr,
                                beta1=beta1, beta2=beta2, weight_decay=adam_wd, eps=eps,
                                amsgrad=False, maximize=False)
            if bucket.low_precision:
                pairs = [(p, w) for p, w in zip(bucket.params, params) if p is not w]
                torch._foreach_copy_([p for p, _ in pairs], [w for _, w in pairs])
        plan.write_back()

    def _clip(self, bucket, grads, floors, clipped_counts):
        """The bucket's gradient clamped to +-sqrt(theta * v_prev): the same as
        replacing g by sign(g) * sqrt(theta * v_prev) wherever g^2 > theta *
        v_prev (floors: see _clip_floors). Works in flat scratch buffers,
        appends the number of clipped elements, and returns the clipped
        chunks (views)."""
        (bound, lower, clipped, gathered), (bounds, lowers, clippeds) = bucket_scratch(self._scratch, bucket)
        # A bucket of a few chunks is worked chunk by chunk where the chunks
        # are read (no copy into a flat buffer first); one of many small chunks
        # is gathered, which costs less than many small calls.
        by_chunk = 1 < len(grads) <= _MAX_CHUNKS_WITHOUT_GATHER
        # bound = sqrt(floor + theta * v), lower = -bound: one fused multiply-
        # add, a square root and a negation. The floor (see _clip_floors) is
        # the smallest normal float on clipping steps: theta * v + floor then
        # rounds to theta * v, or to its neighbour when theta * v is exactly
        # half-way between two floats (one bit, about 2% of elements), and the
        # square root stays off 0:
        # on CPU torch's sqrt of 0 or inf is about 20x slower than of other
        # numbers (measured: 1.5 ms against 0.07 ms per 256Ki floats, half of
        # them 0), and v = 0 is common (embedding rows of tokens not seen
        # yet); such an element is clipped to +-1e-19 (float32) instead of 0.
        # On gated steps that are not spikes the floor is huge instead, so
        # that nothing is clipped.
        v = bucket.exp_avg_sqs
        floor = floors(bucket.dtype, bucket.device)
        if len(grads) == 1:
            torch.add(floor, v[0], alpha=self.theta, out=bound)
        elif by_chunk:
            for v_i, bound_i in zip(v, bounds):
                torch.add(floor, v_i, alpha=self.theta, out=bound_i)
        else:
            torch.add(floor, torch.cat(v, out=bound), alpha=self.theta, out=bound)
        bound.sqrt_()
        torch.neg(bound, out=lower)
        # an element was clipped iff it changed. The mask is written as 0/1
        # floats into the spent `lower` buffer: on CPU a float compare and sum
        # cost half of a bool compare and count (the count is exact: a float32
        # sum of ones is exact up to 2**24, float64 is used above that)
        if by_chunk:
            for g_i, lower_i, bound_i, clipped_i in zip(grads, lowers, bounds, clippeds):
                torch.clamp(g_i, lower_i, bound_i, out=clipped_i)
                torch.ne(g_i, clipped_i, out=lower_i)
        else:
            g = grads[0] if len(grads) == 1 else torch.cat(grads, out=gathered)
            torch.clamp(g, lower, bound, out=clipped)
            torch.ne(g, clipped, out=lower)
        clipped_counts.append(lower.sum() if bucket.numel <= 1 << 24 else lower.sum(dtype=torch.float64))
        return clippeds

    # ------------------------------------------------------------- telemetry

    def telemetry(self):
        """Last step's telemetry as 0-dim tensors (no host sync): clipped_count,
        clipped_fraction and clipped_fraction/<class> for each parameter class
        the optimizer holds (embedding, attention, mlp, head, other: see
        optim/spam_plan.py; GPT-2's tied head is in "embedding"), spike_step,
        zscore, grad_norm, reset, warmup_scale. With sharded parameters the
        counts are summed over the ranks: a collective, every rank must call it."""
        if self._last is None:
            return {}
        if self._figures is None:
            self._figures = _figures(self._last, self._shard_group)
        return dict(self._figures)

    def read_telemetry(self):
        """Last step's telemetry as python floats (synchronises with the device)."""
        return {name: float(value.item()) for name, value in self.telemetry().items()}

    # ------------------------------------------------------------ checkpoint

    def state_dict(self):
        sd = super().state_dict()
        gate = self._gate.state_dict() if self._gate is not None else dict(norm_history=torch.empty(0),
                                                                           norm_count=0)
        sd["spam"] = dict(
            step=self._step,
            last_reset=self._last_reset,
            steps_since_reset=self._step - self._last_reset,
            **gate,
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
        self._check_moment_sizes(saved_state, whole=False)
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
        self._step = int(spam["step"])
        self._last_reset = int(spam["last_reset"])
        if self._gate is not None:
            self._gate.load_state_dict(spam, params[0].device if params else "cpu")
        self._mask_generator.set_state(spam["mask_generator_state"])
        self._plans, self._plans_key = None, None  # the moments are new tensors
        self._last, self._figures = None, None

    def _check_moment_sizes(self, states, whole):
        """states: {parameter index: state}. whole: they are states of whole tensors
        (one process's, or a checkpoint's), else of this rank's blocks of sharded
        parameters (whose density cannot be checked without the other ranks)."""
        params = [(p, self._is_sparse(group)) for group in self.param_groups for p in group["params"]]
        for index, state in states.items():
            if index >= len(params) or not state:
                continue  # torch's load_state_dict reports a different number of parameters
            p, sparse = params[index]
            if whole or not is_sharded(p):
                expected = self._kept(p.numel()) if sparse else p.numel()
            else:
                expected = state["mask_offsets"].numel() if "mask_offsets" in state else local(p).numel()
            if state["exp_avg"].numel() != expected or sparse != ("mask_offsets" in state):
                raise ValueError("optimizer checkpoint was saved with a different SPAM_DENSITY "
                                 "or sparse grouping than this optimizer")

    def full_state_dict(self):
        """state_dict() as one process holding the whole model has it: under FSDP the
        states of the ranks' blocks gathered into whole tensors, on the CPU (the masks
        too, so a checkpoint does not depend on the number of ranks). With sharded
        parameters a collective that every rank must call."""
        sd = self.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        sd["state"] = {index: (full_state(sd["state"][index], params[index]) if is_sharded(params[index])
                               else sd["state"][index]) for index in sorted(sd["state"])}
        return sd

    def load_full_state_dict(self, state_dict):
        """Loads a state dict of whole tensors (full_state_dict()'s, or state_dict()'s of
        an unsharded run); each rank keeps the part of its blocks. No communication."""
        params = [p for group in self.param_groups for p in group["params"]]
        states = state_dict["state"]
        self._check_moment_sizes(states, whole=True)
        local_states = {index: (local_state(state, layout_of(params[index]))
                                if index < len(params) and is_sharded(params[index]) else state)
                        for index, state in states.items()}
        self.load_state_dict({**state_dict, "state": local_states})


def _figures(last, shard_group=None):
    """The telemetry figures (0-dim tensors) of one step's raw record; with a
    shard_group, the clipped counts of its ranks summed."""
    device = last["device"]
    zero = torch.zeros((), dtype=torch.long, device=device)
    per_class = [torch.stack([c.double() for c in counts]).sum().long() if counts else zero
                 for counts in last["clipped"]]
    if shard_group is not None:
        per_class = list(reduce_sum_(torch.stack(per_class), shard_group).unbind())
    total = torch.stack(per_class).sum()
    figures = dict(clipped_count=total, clipped_fraction=total.double() / max(sum(last["eligible"]), 1))
    for cls, name in enumerate(PARAM_CLASSES):
        if last["eligible"][cls]:
            figures[f"clipped_fraction/{name}"] = per_class[cls].double() / last["eligible"][cls]
    nan = torch.full((), math.nan, device=device)
    spike = last["spike"]
    figures.update(
        spike_step=spike.float() if spike is not None else torch.zeros((), device=device),
        zscore=last["z"] if last["z"] is not None else nan,
        grad_norm=last["norm"] if last["norm"] is not None else nan,
        reset=torch.tensor(float(last["reset"]), dtype=torch.float64),
        warmup_scale=torch.tensor(last["scale"], dtype=torch.float64),
    )
    return figures
