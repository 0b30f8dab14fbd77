"""HealthMonitor: runs the health metrics and the spike guard inside a training loop.

Where the trainer calls it, per optimizer step:

    for micro_index in range(GRAD_ACCUM_STEPS):
        loss = model(x, y)[1] / GRAD_ACCUM_STEPS; loss.backward()
        monitor.on_micro_batch(step, micro_index)      # GSNR sums, DDP consistency
    (DDP gradient sync, GradScaler.unscale_)
    decision = monitor.before_step(step)               # norms, GSS, spike guard
    if decision.rollback: reload checkpoint, reset moments, warm up the LR,
                          monitor.on_rollback(checkpoint["monitor"])
    elif decision.action != "skip": optimizer.step()   # "clip" was already applied
    monitor.after_step(step, loss)                     # update ratios, loss history
    if monitor.wants_probe(step): monitor.on_probe(step, probe_batch)
    if step % LOG_INTERVAL == 0: log(monitor.metrics())

Cost model. Every metric has an interval in optimizer steps (0 = off); on
other steps its hook does nothing. Values are kept as device tensors and
converted to Python floats in metrics() with one synchronisation; the only
other per-step synchronisation is the spike guard reading the largest GSS
(one scalar), when the guard is on. When the GSS is logged or the guard is
on, the GSS moving average is updated on every step (one fused norm pass over
the gradients), because a baseline sampled every N steps would miss spikes.

Gradients per micro-batch. The trainer calls on_micro_batch after each
backward, when .grad holds the sum over the micro-batches so far; the
micro-batch's own gradient is the difference from the previous call's copy.
Under DDP the last micro-batch's backward averages the gradients across
processes, so there the last micro-batch is not used: GSNR uses micro-batches
0..n-2, and the local (not yet averaged) gradient for direction consistency is
read after micro-batch n-2. Both therefore need GRAD_ACCUM_STEPS >= 2 (GSNR
>= 3 under DDP) and are silently not reported otherwise.

Pass the unwrapped model (not the DDP wrapper or torch.compile's module):
parameter names are the plain named_parameters() names, and the probes call
the GPT API forward(idx, targets=None, return_logits=False) -> (logits, loss),
attention_probs(idx) and
residual_stream(idx). Probe metrics a model cannot provide (no
attention_probs / residual_stream, or float inputs: not a language model)
are skipped. on_probe uses no collectives, so it may run on rank 0 only; the
other hooks are collective under DDP and must run on every rank.
"""

import numpy as np
import torch
import torch.distributed
import torch.nn as nn

from monitor import metrics as M
from monitor import spectral as S
from monitor.guard import Decision, SpikeGuard

# Interval settings, one per metric group (name -> Kconfig symbol).
INTERVALS = {
    "grad_norm": "MONITOR_GRAD_NORM_INTERVAL",
    "gss": "MONITOR_GSS_INTERVAL",
    "update_ratio": "MONITOR_UPDATE_RATIO_INTERVAL",
    "gsnr": "MONITOR_GSNR_INTERVAL",
    "ddp": "MONITOR_DDP_CONSISTENCY_INTERVAL",
    "weight_spectra": "MONITOR_WEIGHT_SPECTRA_INTERVAL",
    "collapse": "MONITOR_COLLAPSE_RESIDUAL_INTERVAL",
    "attn_entropy": "MONITOR_ATTN_ENTROPY_INTERVAL",
    "token_entropy": "MONITOR_TOKEN_ENTROPY_INTERVAL",
    "act_spectra": "MONITOR_ACT_SPECTRA_INTERVAL",
    "grad_spectra": "MONITOR_GRAD_SPECTRA_INTERVAL",
    "codec": "MONITOR_CODEC_INTERVAL",
    "zlib": "MONITOR_ZLIB_INTERVAL",
}
PROBE_METRICS = ("attn_entropy", "token_entropy", "act_spectra", "grad_spectra", "codec", "zlib")

SKETCH_DIM = 4096  # floats each DDP rank sends for direction consistency (cosine error ~ 1/64)
SKETCH_SEED = 0  # the same projection on every rank and every step
ACT_HEAD_K = 10  # "head" of an activation spectrum: its 10 leading modes
GRAD_HEAD_K = 1  # "head" of the per-sample gradient spectrum: its leading mode


def _setting(cfg, name, default):
    value = getattr(cfg, name, None)
    return default if value is None else value


class HealthMonitor:
    def __init__(self, cfg, model: nn.Module, optimizer=None, *, is_distributed: bool = False,
                 decode=None, grad_spectra_param: str = None):
        """cfg: typed settings (MONITOR_* symbols, GRAD_ACCUM_STEPS).

        decode: optional token ids -> str, used to give the zlib probe the
        text's bytes; without it the token ids themselves are compressed
        (as int32 bytes), a cruder proxy. grad_spectra_param: the parameter
        whose per-sample gradients are analysed; default the middle
        Linear/Conv weight in registration order, embeddings excluded.
        """
        self.model = model
        self.optimizer = optimizer
        self.is_distributed = is_distributed
        self.decode = decode
        enabled = bool(_setting(cfg, "MONITOR", False))
        self.every = {m: int(_setting(cfg, sym, 0)) if enabled else 0 for m, sym in INTERVALS.items()}
        self.grad_accum = int(_setting(cfg, "GRAD_ACCUM_STEPS", 1))

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # Per-tensor values are logged for weight matrices only: biases and norm gains
        # would double the number of series without adding a distinct signal.
        self.matrices = [i for i, p in enumerate(self.params) if p.dim() >= 2]
        self.grad_spectra_param = grad_spectra_param or self._default_spectra_param()

        self.guard = None
        if enabled and _setting(cfg, "MONITOR_SPIKE_GUARD", False):
            action = ("log" if _setting(cfg, "MONITOR_SPIKE_ACTION_LOG", False) else
                      "clip" if _setting(cfg, "MONITOR_SPIKE_ACTION_CLIP", False) else
                      "skip" if _setting(cfg, "MONITOR_SPIKE_ACTION_SKIP", False) else "log")
            self.guard = SpikeGuard(tau=float(_setting(cfg, "MONITOR_SPIKE_TAU", 10.0)), action=action,
                                    cluster_k=int(_setting(cfg, "MONITOR_SPIKE_CLUSTER_K", 5)),
                                    cluster_window=int(_setting(cfg, "MONITOR_SPIKE_CLUSTER_WINDOW", 100)))
        self.track_gss = self.guard is not None or self.every["gss"] > 0
        self.gss = M.GradSpikeScore(float(_setting(cfg, "MONITOR_GSS_EMA_BETA", 0.9)))

        self._pending = {}  # metric name -> 0-dim tensor or float, until metrics()
        self._spikes_since_log = 0
        self.last_spike = None  # {"max_gss", "param", "gss_global"} of the latest spike, for spike logs
        self._snapshot = None  # (step, parameter copies) for the update ratio
        self._gsnr = None  # (step, previous accumulated grads, sum of squares, count)
        self._loss_steps, self._loss_values = [], []  # collapse-residual history (host)
        self._loss_pending = []  # (step, 0-dim loss tensor) not yet copied to the host
        self._losses_since_fit = 0

    def _due(self, metric: str, step: int) -> bool:
        every = self.every[metric]
        return every > 0 and step % every == 0

    def _default_spectra_param(self):
        embeddings = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        by_id = {id(p): n for n, p in zip(self.names, self.params)}
        candidates = []
        for m in self.model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and id(m.weight) in by_id \
                    and id(m.weight) not in embeddings:
                candidates.append(by_id[id(m.weight)])
        return candidates[len(candidates) // 2] if candidates else None

    def _put(self, key, value):
        self._pending[key] = value.detach() if torch.is_tensor(value) else float(value)

    def _put_per_matrix(self, prefix, values):
        """values: (n_params,) tensor aligned with self.params; logs the matrices' entries."""
        for i, v in zip(self.matrices, values[self.matrices].unbind()):
            self._put(f"{prefix}/{self.names[i]}", v)

    # ------------------------------------------------------------------ hooks

    def on_micro_batch(self, step: int, micro_index: int):
        """After each micro-batch's backward: GSNR running sums, DDP direction consistency."""
        last = micro_index == self.grad_accum - 1
        if self._due("gsnr", step) and not (self.is_distributed and last):
            self._gsnr_accumulate(step)
        if self.is_distributed and self._due("ddp", step) and micro_index == self.grad_accum - 2 \
                and torch.distributed.get_world_size() > 1:
            # Inside DDP's no_sync the accumulated .grad is still this rank's own gradient.
            sketches = M.gather_gradient_sketches([p.grad for p in self.params], SKETCH_DIM, SKETCH_SEED)
            self._put("ddp/grad_cosine", M.direction_consistency(sketches))

    def _gsnr_accumulate(self, step):
        grads = [self.params[i].grad for i in self.matrices]
        current = [torch.zeros(self.params[i].shape, device=self.params[i].device) if g is None else g.float()
                   for i, g in zip(self.matrices, grads)]
        if self._gsnr is None or self._gsnr[0] != step:
            diffs = current  # first micro-batch: .grad was zero before it
            # float64 squares: the variance is later a difference of nearly equal sums
            self._gsnr = [step, None, [torch.zeros_like(c, dtype=torch.float64) for c in current], 0]
        else:
            diffs = torch._foreach_sub(current, self._gsnr[1])
        diffs = [d.double() for d in diffs]
        torch._foreach_addcmul_(self._gsnr[2], diffs, diffs)
        self._gsnr[1] = [c.clone() for c in current]
        self._gsnr[3] += 1

    def _gsnr_finish(self, step):
        state, self._gsnr = self._gsnr, None
        if state is None or state[0] != step or state[3] < 2:
            return
        _, sum_g, sum_g2, n = state
        values = [M.gsnr_from_sums(s, s2, n) for s, s2 in zip(sum_g, sum_g2)]
        for i, v in zip(self.matrices, values):
            self._put(f"gsnr/{self.names[i]}", v)
        if values:
            self._put("gsnr/mean", torch.stack(values).nanmean())

    def before_step(self, step: int) -> Decision:
        """Once gradients are final (after DDP sync and unscaling), before optimizer.step().

        Returns the spike guard's Decision. For action "clip" the spiking
        gradients have already been scaled in place; for "skip" the trainer
        must not call optimizer.step(); for rollback it reloads the last
        checkpoint and then calls on_rollback().
        """
        self._gsnr_finish(step)
        if self._due("update_ratio", step):
            self._snapshot = (step, [p.detach().clone() for p in self.params])
        log_norms = self._due("grad_norm", step)
        if not (log_norms or self.track_gss):
            return Decision()

        grads = [p.grad for p in self.params]
        norms = M.per_tensor_grad_norms(grads)
        total = torch.linalg.vector_norm(norms)
        if log_norms:
            self._put("grad_norm/global", total)
            self._put_per_matrix("grad_norm", norms)
        if not self.track_gss:
            return Decision()

        gss, gss_global = self.gss.score(norms, total)
        if self._due("gss", step):
            self._put("gss/global", gss_global)
            self._put("gss/max", gss.max())
            self._put_per_matrix("gss", gss)
            elementwise = self._elementwise_gss_max()
            if elementwise is not None:
                self._put("gss/elementwise_max", elementwise)

        decision = Decision()
        if self.guard is not None:
            # the guard's one host sync: the largest score, where it is, and the global score
            top, where, top_global = torch.stack([gss.max(), gss.argmax().float(), gss_global]).tolist()
            decision = self.guard.observe(step, top)
            if decision.spike:
                self._spikes_since_log += 1
                self.last_spike = {"max_gss": top, "param": self.names[int(where)], "gss_global": top_global}
            if decision.action == "clip":
                norms = norms * M.spike_clip_(grads, gss, self.guard.tau)
                total = torch.linalg.vector_norm(norms)
        if decision.action != "skip":  # a blocked spike must not raise the baseline
            self.gss.accept(norms, total)
        return decision

    def _elementwise_gss_max(self):
        """Largest |g| / (sqrt(v_hat) + eps) over all parameters that have Adam moments."""
        if self.optimizer is None:
            return None
        best = []
        for group in self.optimizer.param_groups:
            betas, eps = group.get("betas"), group.get("eps", 1e-8)
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                v = state.get("exp_avg_sq")
                if p.grad is None or v is None:
                    continue
                g = p.grad
                if v.shape != g.shape:
                    # AdamWSpam's sparse momentum keeps compact 1-D moments for a subset of
                    # the elements; it says which through moment_index(p).
                    index = self.optimizer.moment_index(p) if hasattr(self.optimizer, "moment_index") else None
                    if index is None or index.numel() != v.numel():
                        continue
                    g = g.reshape(-1)[index].reshape(v.shape)
                step = state.get("step")
                step = float(step) if step is not None else None
                best.append(M.elementwise_gss_max(g, v, eps, step, betas[1] if betas else None))
        return torch.stack(best).max() if best else None

    def after_step(self, step: int, loss):
        """After optimizer.step() (also on a skipped step): update ratios, loss
        history and collapse residual, loss dispersion (DDP), weight spectra.
        loss: this step's training loss, the mean over its micro-batches
        (tensor or float; a tensor is not read until a fit needs it)."""
        if self._snapshot is not None and self._snapshot[0] == step:
            per_tensor, total = M.update_ratios(self._snapshot[1], [p.detach() for p in self.params])
            self._put("update_ratio/global", total)
            self._put_per_matrix("update_ratio", per_tensor)
        self._snapshot = None

        if self.every["collapse"] > 0:
            self._loss_pending.append((step, loss.detach().float() if torch.is_tensor(loss) else float(loss)))
            self._losses_since_fit += 1
            if self._due("collapse", step):
                self._flush_losses()
                fit = M.collapse_residual(self._loss_steps, self._loss_values, tail=self._losses_since_fit)
                self._losses_since_fit = 0
                if fit is not None:
                    self._put("collapse/residual", fit["residual"])
                    self._put("collapse/relative", fit["relative"])
                    for k in ("a", "b", "c"):
                        self._put(f"collapse/{k}", fit[k])
            elif len(self._loss_pending) >= 1000:  # bound the device-side backlog
                self._flush_losses()

        if self.is_distributed and self._due("ddp", step):
            self._put("ddp/loss_std", M.loss_dispersion(M.gather_losses(loss)))

        if self._due("weight_spectra", step):
            self._weight_spectra()

    def _flush_losses(self):
        if not self._loss_pending:
            return
        steps, values = zip(*self._loss_pending)
        tensors = [v for v in values if torch.is_tensor(v)]
        host = iter(torch.stack(tensors).tolist()) if tensors else iter(())
        self._loss_steps.extend(steps)
        self._loss_values.extend(next(host) if torch.is_tensor(v) else v for v in values)
        self._loss_pending = []

    @torch.no_grad()
    def _weight_spectra(self):
        for name, p in zip(self.names, self.params):
            self._put(f"param_std/{name}", M.param_std(p))
            if p.dim() < 2:
                continue
            sv = M.singular_values(p)
            self._put(f"singular_entropy/{name}", M.singular_entropy(sv))
            self._put(f"spectral_radius/{name}", M.spectral_radius(sv))
            alpha, _, _ = M.powerlaw_alpha((sv.double() ** 2).cpu().numpy())
            self._put(f"alpha/{name}", alpha)

    # ----------------------------------------------------------------- probes

    def wants_probe(self, step: int) -> bool:
        """Whether on_probe would compute anything at this step (so the probe batch can be skipped)."""
        return any(self._due(m, step) for m in PROBE_METRICS)

    def on_probe(self, step: int, probe_batch):
        """Probe metrics on a held-out batch, each at its own interval.

        probe_batch: (x, y) token ids as for training, or one (B, T+1) tensor
        that is split into x = batch[:, :-1], y = batch[:, 1:]. Runs in eval
        mode without gradients (the per-sample gradients use torch.func and
        leave .grad alone) and restores the model's mode.
        """
        due = [m for m in PROBE_METRICS if self._due(m, step)]
        if not due:
            return
        if torch.is_tensor(probe_batch):
            probe_batch = (probe_batch[:, :-1], probe_batch[:, 1:])
        x, y = (t.contiguous() for t in probe_batch)
        is_lm = not x.is_floating_point()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if "attn_entropy" in due and hasattr(self.model, "attention_probs"):
                    for layer, probs in enumerate(self.model.attention_probs(x)):
                        per_head = M.attention_entropy(probs)
                        self._put(f"attn_entropy/L{layer}", per_head.mean())
                        for head, h in enumerate(per_head.unbind()):
                            self._put(f"attn_entropy/L{layer}.H{head}", h)
                if "act_spectra" in due and hasattr(self.model, "residual_stream"):
                    for layer, acts in enumerate(self.model.residual_stream(x)):
                        eigs = S.activation_covariance_spectrum(acts)
                        self._put(f"act_spectrum/L{layer}/top{ACT_HEAD_K}_mass", S.head_mass(eigs, ACT_HEAD_K))
                        self._put(f"act_spectrum/L{layer}/tail_exponent", S.tail_exponent(eigs))
                if is_lm and "token_entropy" in due:
                    self._put("token_entropy", M.token_entropy(M._lm_logits(self.model, x)))
                if is_lm and "codec" in due and x.size(1) >= 4:
                    half = x.size(1) // 2
                    # Context for row k: the first half of another probe row (same corpus, other text).
                    scores = M.codec_score(self.model, x[:, half:], x.roll(1, dims=0)[:, :half])
                    for k, v in scores.items():
                        self._put(f"codec/{k}", v)
                if is_lm and "zlib" in due:
                    z = M.zlib_perplexity_ratio(self.model, x, [self._sample_bytes(row) for row in x])
                    self._put("zlib/ratio_mean", float(np.mean(z["ratio"])))
                    self._put("zlib/ratio_min", float(np.min(z["ratio"])))
                    self._put("zlib/log_ppl_mean", float(np.mean(z["log_ppl"])))
                    self._put("zlib/bits_per_byte_mean", float(np.mean(z["zlib"])))
            if "grad_spectra" in due and self.grad_spectra_param is not None:
                loss_fn = None if is_lm else S.cross_entropy_loss
                grads = S.per_sample_grads(self.model, self.grad_spectra_param, x, y, loss_fn)
                summary = S.spectrum_summary(S.gradient_spectrum(grads), GRAD_HEAD_K)
                self._put(f"grad_spectrum/top{GRAD_HEAD_K}_mass", summary["top_k_mass"])
                self._put("grad_spectrum/effective_rank", summary["effective_rank"])
                self._put("grad_spectrum/sigma_max", summary["sigma_max"])
        finally:
            self.model.train(was_training)

    def _sample_bytes(self, row: torch.Tensor) -> bytes:
        ids = row.tolist()
        if self.decode is not None:
            return self.decode(ids).encode("utf-8")
        return np.asarray(ids, dtype=np.int32).tobytes()

    # ------------------------------------------------------------ reporting

    def metrics(self) -> dict:
        """Every value measured since the last call, as Python floats (the latest
        value when a metric ran more than once). One host synchronisation."""
        pending, self._pending = self._pending, {}
        out = {k: v for k, v in pending.items() if not torch.is_tensor(v)}
        by_device = {}
        for k, v in pending.items():
            if torch.is_tensor(v):
                by_device.setdefault(v.device, []).append(k)
        for keys in by_device.values():  # one device-to-host copy per device
            out.update(zip(keys, torch.stack([pending[k].float() for k in keys]).tolist()))
        if self.guard is not None:
            out["guard/spikes"] = float(self._spikes_since_log)
            out["guard/total_spikes"] = float(self.guard.total_spikes)
            out["guard/total_rollbacks"] = float(self.guard.total_rollbacks)
            self._spikes_since_log = 0
        return out

    # ---------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        self._flush_losses()
        return {"gss": self.gss.state_dict(), "guard": self.guard.state_dict() if self.guard else None,
                "loss_steps": list(self._loss_steps), "loss_values": list(self._loss_values),
                "losses_since_fit": self._losses_since_fit}

    def load_state_dict(self, state: dict):
        """Resume: restore the GSS baseline, the spike guard and the loss history."""
        self.on_rollback(state)
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])

    def on_rollback(self, state: dict):
        """After a rollback to a checkpoint: take its GSS baseline (from before the
        spike cluster) and loss history, but keep the guard's live state (its window
        was just emptied and its counters include this rollback)."""
        self.gss.load_state_dict(state["gss"], device=self.params[0].device if self.params else None)
        self._loss_steps, self._loss_values = list(state["loss_steps"]), list(state["loss_values"])
        self._losses_since_fit = state.get("losses_since_fit", 0)
        self._loss_pending, self._snapshot, self._gsnr = [], None, None

