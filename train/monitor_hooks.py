"""The health monitor inside the training loop: step numbering, spike records, rollback warmup.

monitor.HealthMonitor measures; this adapter adds what only the trainer knows:
the batch's sample identities for spikes.jsonl (so `make data-filter` can drop
the offending documents), the held-out probe batch, and the short learning-rate
warmup after a spike-cluster rollback (MONITOR_ROLLBACK_WARMUP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepDecision:
    skip: bool = False
    rollback: bool = False
    clipped: bool = False  # the guard scaled spiking gradients in place: the trainer's grad_norm is stale


def build_monitor(cfg, model, optimizer, family, info, runlog, probe_on_all_ranks=False):
    if not cfg.MONITOR:
        return None
    return TrainerMonitor(cfg, model, optimizer, family, info, runlog, probe_on_all_ranks)


class TrainerMonitor:
    def __init__(self, cfg, model, optimizer, family, info, runlog, probe_on_all_ranks=False):
        from monitor.monitor import HealthMonitor
        encoding = getattr(family, "encoding", None)
        # build_unsharded: under FSDP the probe metrics run on an unsharded replica of the model
        self.health = HealthMonitor(cfg, model, optimizer, is_distributed=info.enabled,
                                    decode=encoding.decode if encoding is not None else None,
                                    build_unsharded=family.build_model)
        self.family, self.info, self.runlog = family, info, runlog
        self.rollback_warmup = cfg.MONITOR_ROLLBACK_WARMUP
        self.warmup_from = None  # step of the last rollback, while its warmup runs
        self.spikes = 0
        self.rollbacks = 0
        self._probe = None
        # Probe metrics are rank-0 work, except under FSDP where every rank joins the gathering
        # of the weights for them. The cross-process check (DDP) is due on every rank at its interval:
        # all ranks evaluate the same probe batch (family.probe_batch is a fixed, seeded
        # held-out batch, identical on every rank), so their losses and gradients compare.
        self.probe_main = info.is_main or probe_on_all_ranks

    # step numbers: the trainer passes 1-based optimizer steps throughout

    def on_micro_batch(self, step: int, micro: int) -> None:
        self.health.on_micro_batch(step + 1, micro)

    def before_step(self, step: int, micro_sample_ids: list[torch.Tensor], loss: torch.Tensor | None = None,
                    grad_norm: torch.Tensor | None = None) -> StepDecision:
        """loss: the step's mean training loss, grad_norm: the global norm of the unscaled gradients
        (0-dim tensors, not read here); the monitor uses the trainer's norm instead of its own."""
        decision = self.health.before_step(step, loss=loss, grad_norm=grad_norm)
        if decision.spike:
            self.spikes += 1
            self._record_spike(step, decision, torch.cat(micro_sample_ids))
        if decision.rollback:
            self.rollbacks += 1
        return StepDecision(skip=decision.action == "skip", rollback=decision.rollback,
                            clipped=decision.action == "clip")

    def _record_spike(self, step, decision, sample_ids) -> None:
        spike = getattr(self.health, "last_spike", None) or {}
        record = {"step": step, "event": "spike", "action": decision.action, **spike}
        if self.info.enabled:
            # every rank saw different samples: gather all identities on rank 0
            gathered = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, sample_ids.cpu())
            sample_ids = torch.cat(gathered)
        record["samples"] = self.family.describe_sample(sample_ids)
        self.runlog.event("spikes.jsonl", record)

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        self.health.after_step(step, loss)

    def on_probe(self, step: int, wrapped_model) -> None:
        """Call on every rank after each step (collective when the DDP check is due)."""
        if not self.health.wants_probe(step, main=self.probe_main):
            return
        if self._probe is None:
            device = next(self.health.model.parameters()).device
            batch = self.family.probe_batch(device)
            self._probe = (batch.inputs, batch.targets)
        self.health.on_probe(step, self._probe, main=self.probe_main)

    def metrics(self) -> dict:
        return {f"monitor/{k}" if "/" not in k else k: v for k, v in self.health.metrics().items()}

    # rollback (seed 000, section 4.1): the trainer restores weights and momentum

    def rolled_back(self, step: int, checkpoint_state: dict | None) -> None:
        if checkpoint_state is not None and "monitor" in checkpoint_state:
            self.health.on_rollback(checkpoint_state["monitor"]["health"])
        self.warmup_from = step

    def lr_factor(self, step: int) -> float:
        """Linear warmup over MONITOR_ROLLBACK_WARMUP steps after a rollback, else 1."""
        if self.warmup_from is None or self.rollback_warmup == 0:
            return 1.0
        t = step - self.warmup_from
        if t >= self.rollback_warmup:
            self.warmup_from = None
            return 1.0
        return t / self.rollback_warmup

    def state_dict(self) -> dict:
        return {"health": self.health.state_dict(), "warmup_from": self.warmup_from,
                "spikes": self.spikes, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.health.load_state_dict(state["health"])
        self.warmup_from = state["warmup_from"]
        self.spikes, self.rollbacks = state["spikes"], state["rollbacks"]

    def summary(self) -> dict:
        return {"spikes": self.spikes, "rollbacks": self.rollbacks}
