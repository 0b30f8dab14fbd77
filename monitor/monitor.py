"""HealthMonitor: runs the health metrics and the spike guard inside a training loop.

Where the trainer calls it, per optimizer step:

    for micro_index in range(GRAD_ACCUM_STEPS):
        loss = family.loss(model, batch) / GRAD_ACCUM_STEPS; loss.backward()
        monitor.on_micro_batch(step, micro_index)      # micro-batch GSNR sums
    (DDP gradient sync, GradScaler.unscale_, grad_norm = global norm, computed once)
    decision = monitor.before_step(step, loss=step_loss, grad_norm=grad_norm)
    if decision.rollback: reload checkpoint, reset moments, warm up the LR,
                          monitor.on_rollback(checkpoint["monitor"])
    elif decision.action != "skip": optimizer.step()   # "clip" was already applied
    monitor.after_step(step, step_loss)                # update ratios, loss history
    if monitor.wants_probe(step, main): monitor.on_probe(step, probe_batch, main)
    if step % LOG_INTERVAL == 0: log(monitor.metrics())

Cost model. Every metric has an interval in optimizer steps (0 = off); on
other steps its hook does nothing. Values are kept as device tensors and
converted to Python floats in metrics() with one synchronisation; the only
other per-step synchronisation is the spike guard reading its verdict (a few
scalars: the largest GSS and, with the loss signal, the loss test), when the
guard is on, plus one more read on spike steps only (which tensors carried
the spike). When the GSS is logged or the guard is on, the GSS moving
average is updated on every step (one fused norm pass over the gradients),
because a baseline sampled every N steps would miss spikes. The global
gradient norm is the trainer's (grad_norm=), not computed again.

GSNR has two estimates, named apart: gsnr_micro/... across the micro-batches
of a step (the trainer calls on_micro_batch after each backward, when .grad
holds the sum so far; the micro-batch's own gradient is the difference from
the previous call's copy; under DDP the last micro-batch is already averaged
across processes and is not used), when at least 2 micro-batches are usable;
otherwise gsnr_examples/... across the examples of the probe batch
(per-example gradients, monitor.probe_grads), in on_probe.

Cross-process consistency (DDP): at its interval every process evaluates
the same probe batch in on_probe (a collective: every rank must call it);
the spread of their losses is exactly 0 while the replicas agree, and the
cosine of their gradients of that batch is 1.

Sharded models (FSDP2: every parameter a DTensor, each rank holding a block
of rows): every metric reduces over the ranks (monitor.sharded) so that all
ranks hold, and the guard decides on, what one process would: per-tensor
gradient norms and the step's mean loss come from one packed all-reduce per
step (no extra host read), the element-wise GSS max and p99.9 from one
all-gather of candidates at its interval (exact), update ratios and
parameter std from float64 sums, the weight spectra from each matrix
gathered whole at their interval, and the probe metrics from an unsharded
replica that exists only during on_probe (build_unsharded=). GSNR is taken
over the probe's examples (FSDP shows no micro-batch gradients) and the
cross-process check does not run (there are no replicas to compare). In
any distributed run the guard's loss signal and the collapse residual read
the loss averaged over the ranks.

Pass the unwrapped model (not the DDP wrapper or torch.compile's module):
parameter names are the plain named_parameters() names, and the probes use
the GPT API (transformer, lm_head, attention_probs(idx), residual_stream(idx);
probe_grads.lm_logits). Probe metrics a model cannot provide (no
attention_probs / residual_stream, or float inputs: not a language model)
are skipped.
"""

import numpy as np
import torch
import torch.distributed
import torch.nn as nn

from monitor import metrics as M
from monitor import probe_grads as PG
from monitor import sharded as SH
from monitor import spectral as S
from monitor.guard import Decision
from monitor.param_classes import parameter_classes
from monitor.settings import INTERVALS, PROBE_METRICS, build_guard, read_intervals  # noqa: F401 (re-exported)

SKETCH_DIM = 4096  # floats each DDP rank sends for direction consistency (cosine error ~ 1/64)
SKETCH_SEED = 0  # the same projection on every rank and every step
ACT_HEAD_K = 10  # "head" of an activation spectrum: its 10 leading modes
GRAD_HEAD_K = 1  # "head" of the per-sample gradient spectrum: its leading mode
SPIKE_TOP_TENSORS = 3  # tensors named per spike in spikes.jsonl
# The per-example GSNR holds B copies of each gradient it covers. Matrices above this many elements
# (in practice the token embedding / tied output head of a BPE vocabulary: 6.4M elements in gpt2-tiny,
# 38.6M in GPT-2 124M) are left out of it: on gpt2-tiny they would cost about 2 training steps per
# GSNR interval against about 0.6 for all the other matrices together. A byte-level vocabulary's
# embedding is small and covered.
GSNR_EXAMPLES_MAX_ELEMENTS = 1 << 22


class HealthMonitor:
    def __init__(self, cfg, model: nn.Module, optimizer=None, *, is_distributed: bool = False,
                 decode=None, grad_spectra_param: str = None, build_unsharded=None):
        """cfg: typed settings (MONITOR_* symbols, GRAD_ACCUM_STEPS).

        decode: optional token ids -> str, used to give the zlib probe the
        text's bytes; without it the token ids themselves are compressed
        (as int32 bytes), a cruder proxy. grad_spectra_param: the parameter
        whose per-sample gradients are analysed; default the middle
        Linear/Conv weight in registration order, embeddings excluded.
        build_unsharded: for a model sharded with FSDP2 and probe metrics on,
        a function that builds the same architecture unsharded (the probes
        run on such a replica holding the gathered weights).
        """
        self.model = model
        self.optimizer = optimizer
        self.is_distributed = is_distributed
        self.decode = decode
        self.build_unsharded = build_unsharded
        self.every = read_intervals(cfg)
        self.grad_accum = cfg.GRAD_ACCUM_STEPS
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # FSDP2: parameters are DTensors, each rank holding a block (see monitor.sharded)
        self.shard_group = SH.shard_group([p for _, p in named])
        self.sharded = self.shard_group is not None
        # micro-batches whose own gradient is visible: under DDP the last one is averaged;
        # under FSDP none (the micro-batches of a step accumulate unsharded inside FSDP and
        # only their reduce-scattered sum reaches .grad), so GSNR is taken over examples
        usable = 0 if self.sharded else self.grad_accum - (1 if is_distributed else 0)
        self.gsnr_estimate = "micro" if usable >= 2 else "examples"
        if self.gsnr_estimate == "examples" and self.every["gsnr"] > 0 and cfg.MODEL_GPT2 \
                and cfg.MONITOR_PROBE_BATCH < 2:
            raise ValueError(f"settings: MONITOR_GSNR_INTERVAL={self.every['gsnr']} with GRAD_ACCUM_STEPS="
                             f"{self.grad_accum} estimates GSNR over the probe batch's examples, which needs "
                             f"MONITOR_PROBE_BATCH >= 2 (it is {cfg.MONITOR_PROBE_BATCH})")

        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # Per-tensor values are logged for weight matrices only: biases and norm gains
        # would double the number of series without adding a distinct signal.
        self.matrices = [i for i, p in enumerate(self.params) if p.dim() >= 2]
        self.grad_spectra_param = grad_spectra_param or self._default_spectra_param()
        classes = parameter_classes(model)
        self.param_class = {id(p): classes[n] for n, p in named}

        self.guard, self.loss_window = build_guard(cfg)
        self.track_gss = self.guard is not None or self.every["gss"] > 0
        self.gss = M.GradSpikeScore(cfg.MONITOR_GSS_EMA_BETA) if cfg.MONITOR else None

        self._pending = {}  # metric name -> 0-dim tensor or float, until metrics()
        self._spikes_since_log = 0
        self.last_spike = None  # what spikes.jsonl records about the latest spike (signals, tensors, ...)
        self._snapshot = None  # (step, parameter copies) for the update ratio
        self._gsnr = None  # (step, previous accumulated grads, sum of squares, count)
        self._loss_steps, self._loss_values = [], []  # collapse-residual history (host)
        self._loss_pending = []  # (step, 0-dim loss tensor) not yet copied to the host
        self._losses_since_fit = 0
        self._mean_loss = None  # (step, the step's loss averaged over the ranks), distributed runs
        probes_on = any(self.every[m] > 0 for m in PROBE_METRICS) or (
            self.gsnr_estimate == "examples" and self.every["gsnr"] > 0)
        if self.sharded and probes_on and build_unsharded is None:
            raise ValueError("the probe metrics of a sharded (FSDP2) model need build_unsharded=")

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
        """After each micro-batch's backward: the micro-batch GSNR running sums."""
        last = micro_index == self.grad_accum - 1
        if self.gsnr_estimate == "micro" and self._due("gsnr", step) and not (self.is_distributed and last):
            self._gsnr_accumulate(step)

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
        self._put_gsnr("gsnr_micro", [M.gsnr_from_sums(s, s2, n) for s, s2 in zip(sum_g, sum_g2)])

    def _put_gsnr(self, prefix, values, indices=None):
        """values: one 0-dim GSNR per weight matrix, in the order of indices (default self.matrices)."""
        for i, v in zip(self.matrices if indices is None else indices, values):
            self._put(f"{prefix}/{self.names[i]}", v)
        if values:
            self._put(f"{prefix}/mean", torch.stack(values).nanmean())

    def before_step(self, step: int, loss=None, grad_norm=None) -> Decision:
        """Once gradients are final (after DDP sync and unscaling), before optimizer.step().

        loss: the step's mean training loss (0-dim tensor), needed by the
        guard's loss signal. grad_norm: the global L2 norm of all gradients
        (0-dim tensor) as the trainer computed it; None computes it here.
        Returns the spike guard's Decision. For action "clip" the spiking
        gradients have already been scaled in place; for "skip" the trainer
        must not call optimizer.step(); for rollback it reloads the last
        checkpoint and then calls on_rollback().
        """
        self._gsnr_finish(step)
        if self._due("update_ratio", step):
            self._snapshot = (step, [SH.local(p).detach().clone() for p in self.params])
        log_norms = self._due("grad_norm", step)
        if self._due("gss_elementwise", step):
            self._put_elementwise_gss()
        grads = [p.grad for p in self.params]
        norms, loss = self._norms_and_loss(step, grads, loss, log_norms or self.track_gss)
        if norms is None:
            return Decision()
        total = torch.linalg.vector_norm(norms) if grad_norm is None else grad_norm.detach().float()
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
        if self.guard is None:
            self.gss.accept(norms, total)
            return Decision()
        decision, loss_fired = self._judge(step, gss, gss_global, norms, loss)
        if decision.action == "clip":  # on the local blocks: every rank scales its own
            blocks = [None if g is None else SH.local(g) for g in grads]
            norms = norms * M.spike_clip_(blocks, gss, self.guard.tau)
            total = torch.linalg.vector_norm(norms)
        if decision.action != "skip":  # a blocked spike must not raise the baseline
            self.gss.accept(norms, total)
        if self.loss_window is not None and decision.action != "skip" and not loss_fired:
            self.loss_window.record(loss)  # a loss spike stays out of the window it is judged by
        return decision

    def _norms_and_loss(self, step, grads, loss, want_norms):
        """(per-tensor gradient norms (n,) or None when not wanted, the loss to judge).

        Every rank must judge the same numbers: in a distributed run the loss is the mean
        over the ranks (what one process training the whole batch sees), kept for the
        collapse-residual history too. Under FSDP the norms come from the ranks' blocks and
        the loss rides in the same packed all-reduce; under DDP the gradients are already
        the same everywhere and the loss costs one scalar all-reduce, only when the guard's
        loss signal or the collapse residual reads it.
        """
        wants_loss = loss is not None and (self.loss_window is not None or self.every["collapse"] > 0)
        local_loss = loss if wants_loss and self.is_distributed else None
        norms = None
        if want_norms and self.sharded:
            norms, mean = SH.grad_norms_and_loss(grads, local_loss, self.shard_group, self._device())
        else:
            if want_norms:
                norms = M.per_tensor_grad_norms(grads)
            mean = None
            if local_loss is not None:
                mean = local_loss.detach().float().clone()
                torch.distributed.all_reduce(mean, group=self.shard_group)
                mean /= torch.distributed.get_world_size(self.shard_group)
        if mean is not None:
            self._mean_loss = (step, mean)
            loss = mean
        return norms, loss

    def _judge(self, step, gss, gss_global, norms, loss):
        """The guard's verdict, from one host read of its signals; (Decision, loss signal fired)."""
        signals = [gss.max(), gss.argmax().float(), gss_global.float()]
        if self.loss_window is not None:
            if loss is None:
                raise ValueError("the spike guard watches the loss: pass before_step(step, loss=step_loss)")
            loss_spike, threshold = self.loss_window.check(loss)
            signals += [loss_spike.float(), loss.detach().float(), threshold]
        host = torch.stack(signals).tolist()  # the guard's one host sync per step
        top, where, top_global = host[:3]
        loss_fired = bool(host[3]) if self.loss_window is not None else False
        decision = self.guard.observe(step, top, loss_spike=loss_fired)
        if decision.spike:
            self._spikes_since_log += 1
            self.last_spike = {"signals": list(decision.signals), "max_gss": top,
                               "param": self.names[int(where)], "gss_global": top_global,
                               "tensors": self._spike_tensors(gss, norms)}
            if self.loss_window is not None:
                self.last_spike.update(loss=host[4], loss_threshold=host[5])
        return decision, loss_fired

    def _spike_tensors(self, gss, norms):
        """The tensors that carried a spike: the largest per-tensor GSS, i.e. gradient norm over
        that tensor's own running typical norm. Read on spike steps only (one host sync)."""
        k = min(SPIKE_TOP_TENSORS, gss.numel())
        scores, index = gss.topk(k)
        rows = torch.stack([scores, index.float(), norms[index].float()]).T.tolist()
        return [{"param": self.names[int(i)], "gss": s, "grad_norm": n} for s, i, n in rows]

    def _put_elementwise_gss(self):
        """|g| / (sqrt(v_hat) + eps) against the optimizer's second moment: the maximum over all
        parameters, and per parameter class the maximum and the p99.9 (metrics.upper_quantile)."""
        per_class, sizes = {}, {}
        for p, ratios in self._elementwise_gss_ratios():
            cls = self.param_class.get(id(p), "other")
            per_class.setdefault(cls, []).append(ratios)
            sizes[cls] = sizes.get(cls, 0) + p.numel()  # the whole tensor's size, also when sharded
        if self.sharded and per_class:  # this rank holds blocks: max and p99.9 over all ranks
            summary = SH.upper_quantiles(per_class, sizes, self.shard_group, M.TOP_FRACTION)
        else:
            summary = {cls: (torch.stack([r.max() for r in parts]).max(), M.upper_quantile_of_parts(parts))
                       for cls, parts in per_class.items()}
        maxima = []
        for cls, (top, quantile) in summary.items():
            maxima.append(top)
            self._put(f"gss_elem/{cls}/max", top)
            self._put(f"gss_elem/{cls}/p999", quantile)
        if maxima:
            self._put("gss/elementwise_max", torch.stack(maxima).max())

    def _elementwise_gss_ratios(self):
        """(parameter, ratios) for every parameter that has a gradient and Adam moments."""
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            betas, eps = group.get("betas"), group.get("eps", 1e-8)
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                v = state.get("exp_avg_sq")
                if p.grad is None or v is None:
                    continue
                g, v = SH.local(p.grad), SH.local(v)  # FSDP: this rank's block (moments are per block)
                if v.shape != g.shape:
                    # AdamWSpam's sparse momentum keeps compact 1-D moments for a subset of
                    # the elements; it says which through moment_index(p).
                    index = self.optimizer.moment_index(p) if hasattr(self.optimizer, "moment_index") else None
                    if index is None or index.numel() != v.numel():
                        continue
                    g = g.reshape(-1)[index].reshape(v.shape)
                step = state.get("step")
                step = float(step) if step is not None else None
                yield p, M.elementwise_gss_ratios(g, v, eps, step, betas[1] if betas else None)

    def after_step(self, step: int, loss):
        """After optimizer.step() (also on a skipped step): update ratios, loss
        history and collapse residual, weight spectra.
        loss: this step's training loss, the mean over its micro-batches
        (tensor or float; a tensor is not read until a fit needs it)."""
        if self._snapshot is not None and self._snapshot[0] == step:
            after = [SH.local(p).detach() for p in self.params]
            if self.sharded:
                per_tensor, total = SH.update_ratios(self._snapshot[1], after, self.shard_group)
            else:
                per_tensor, total = M.update_ratios(self._snapshot[1], after)
            self._put("update_ratio/global", total)
            self._put_per_matrix("update_ratio", per_tensor)
        self._snapshot = None

        if self.every["collapse"] > 0:
            if self._mean_loss is not None and self._mean_loss[0] == step:
                loss = self._mean_loss[1]  # distributed: the mean over the ranks (before_step)
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
        stds = SH.param_stds(self.params, self.shard_group) if self.sharded else None
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            self._put(f"param_std/{name}", stds[i] if self.sharded else M.param_std(p))
            if p.dim() < 2:
                continue
            # FSDP: gather this one matrix whole (every rank, a collective), then drop it
            sv = M.singular_values(p.full_tensor() if SH.is_sharded(p) else p)
            self._put(f"singular_entropy/{name}", M.singular_entropy(sv))
            self._put(f"spectral_radius/{name}", M.spectral_radius(sv))
            alpha, _, _ = M.powerlaw_alpha((sv.double() ** 2).cpu().numpy())
            self._put(f"alpha/{name}", alpha)

    # ----------------------------------------------------------------- probes

    def _probe_due(self, step: int, main: bool) -> list:
        """The probe work due at this step on this process (main: the process that logs)."""
        due = [m for m in PROBE_METRICS if main and self._due(m, step)]
        if main and self.gsnr_estimate == "examples" and self._due("gsnr", step):
            due.append("gsnr_examples")
        if self.is_distributed and not self.sharded and self._due("ddp", step):
            due.append("ddp")  # a collective: due on every process (FSDP has no replicas to compare)
        return due

    def wants_probe(self, step: int, main: bool = True) -> bool:
        """Whether on_probe would compute anything at this step (so the probe batch can be skipped).

        Under DDP call it on every process with main=True on the one that logs:
        the cross-process check is due on all of them at its interval."""
        return bool(self._probe_due(step, main))

    def on_probe(self, step: int, probe_batch, main: bool = True):
        """Probe metrics on a held-out batch, each at its own interval.

        probe_batch: (x, y) token ids as for training, or one (B, T+1) tensor
        that is split into x = batch[:, :-1], y = batch[:, 1:]; every process
        must pass the same batch. Runs in eval mode (the gradients use
        torch.func and leave .grad alone) and restores the model's mode.
        main: this process logs; the others (DDP) only join the collective
        cross-process check, which must run on every process at its interval.
        A sharded (FSDP2) model: call it with main=True on every process; each
        gathers the weights into an unsharded replica (a collective) and runs
        the probes on it, then drops it.
        """
        due = self._probe_due(step, main)
        if not due:
            return
        if torch.is_tensor(probe_batch):
            probe_batch = (probe_batch[:, :-1], probe_batch[:, 1:])
        x, y = (t.contiguous() for t in probe_batch)
        is_lm = not x.is_floating_point()
        model = SH.unsharded_replica(self.model, self.build_unsharded) if self.sharded else self.model
        was_training = model.training
        model.eval()
        try:
            if "ddp" in due:
                self._cross_process_check(x, y)
            if "gsnr_examples" in due:
                covered = [i for i in self.matrices if self.params[i].numel() <= GSNR_EXAMPLES_MAX_ELEMENTS]
                names = [self.names[i] for i in covered]
                grads = PG.per_example_grads(model, names, x, y)
                self._put_gsnr("gsnr_examples", [PG.gsnr_from_examples(grads[n]) for n in names], covered)
            with torch.no_grad():
                if "attn_entropy" in due and hasattr(model, "attention_probs"):
                    for layer, probs in enumerate(model.attention_probs(x)):
                        per_head = M.attention_entropy(probs)
                        self._put(f"attn_entropy/L{layer}", per_head.mean())
                        for head, h in enumerate(per_head.unbind()):
                            self._put(f"attn_entropy/L{layer}.H{head}", h)
                if "act_spectra" in due and hasattr(model, "residual_stream"):
                    for layer, acts in enumerate(model.residual_stream(x)):
                        eigs = S.activation_covariance_spectrum(acts)
                        self._put(f"act_spectrum/L{layer}/top{ACT_HEAD_K}_mass", S.head_mass(eigs, ACT_HEAD_K))
                        self._put(f"act_spectrum/L{layer}/tail_exponent", S.tail_exponent(eigs))
                if is_lm and "token_entropy" in due:
                    self._put("token_entropy", M.token_entropy(M._lm_logits(model, x)))
                if is_lm and "codec" in due and x.size(1) >= 4:
                    half = x.size(1) // 2
                    # Context for row k: the first half of another probe row (same corpus, other text).
                    scores = M.codec_score(model, x[:, half:], x.roll(1, dims=0)[:, :half])
                    for k, v in scores.items():
                        self._put(f"codec/{k}", v)
                if is_lm and "zlib" in due:
                    z = M.zlib_perplexity_ratio(model, x, [self._sample_bytes(row) for row in x])
                    self._put("zlib/ratio_mean", float(np.mean(z["ratio"])))
                    self._put("zlib/ratio_min", float(np.min(z["ratio"])))
                    self._put("zlib/log_ppl_mean", float(np.mean(z["log_ppl"])))
                    self._put("zlib/bits_per_byte_mean", float(np.mean(z["zlib"])))
            if "grad_spectra" in due and self.grad_spectra_param is not None:
                loss_fn = None if is_lm else S.cross_entropy_loss
                grads = S.per_sample_grads(model, self.grad_spectra_param, x, y, loss_fn)
                summary = S.spectrum_summary(S.gradient_spectrum(grads), GRAD_HEAD_K)
                self._put(f"grad_spectrum/top{GRAD_HEAD_K}_mass", summary["top_k_mass"])
                self._put("grad_spectrum/effective_rank", summary["effective_rank"])
                self._put("grad_spectrum/sigma_max", summary["sigma_max"])
        finally:
            model.train(was_training)

    def _cross_process_check(self, x, y):
        """Every process evaluates the same probe batch with its own weights: the population std
        of their losses (exactly 0 when the replicas agree) and the mean pairwise cosine of their
        gradients of that batch (1 when they agree), through a CountSketch of SKETCH_DIM numbers."""
        loss, grads = PG.probe_loss_and_grads(self.model, x, y)
        sketches = M.gather_gradient_sketches(grads, SKETCH_DIM, SKETCH_SEED)
        self._put("ddp/grad_cosine", M.direction_consistency(sketches))
        self._put("ddp/loss_std", M.loss_dispersion(M.gather_losses(loss)))

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
        return {"gss": self.gss.state_dict() if self.gss is not None else None,
                "guard": self.guard.state_dict() if self.guard else None,
                "loss_window": self.loss_window.state_dict() if self.loss_window is not None else None,
                "loss_steps": list(self._loss_steps), "loss_values": list(self._loss_values),
                "losses_since_fit": self._losses_since_fit}

    def load_state_dict(self, state: dict):
        """Resume: restore the GSS baseline, the spike guard and the loss history."""
        self.on_rollback(state)
        if self.guard is not None and state["guard"] is not None:
            self.guard.load_state_dict(state["guard"])
        if self.loss_window is not None and state["loss_window"] is not None:
            self.loss_window.load_state_dict(state["loss_window"], device=self._device())

    def _device(self):
        return self.params[0].device if self.params else None

    def on_rollback(self, state: dict):
        """After a rollback to a checkpoint: take its GSS baseline (from before the
        spike cluster) and loss history, but keep the guard's live state (its window
        was just emptied and its counters include this rollback)."""
        if self.gss is not None and state["gss"] is not None:
            self.gss.load_state_dict(state["gss"], device=self._device())
        self._loss_steps, self._loss_values = list(state["loss_steps"]), list(state["loss_values"])
        self._losses_since_fit = state["losses_since_fit"]
        self._loss_pending, self._snapshot, self._gsnr, self._mean_loss = [], None, None, None

