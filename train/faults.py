"""Fault injection (FAULT_* settings): gradient spikes and corrupted batches.

Both are pure functions of (SEED, step), so a rerun, a resumed run and every
DDP rank inject the same faults at the same steps.
"""
from __future__ import annotations

import os
import signal

import torch


def parse_steps(text: str | None) -> frozenset[int]:
    """"100, 250" -> {100, 250}; validation (integers >= 1) is done by the config checker."""
    if not text:
        return frozenset()
    return frozenset(int(part) for part in text.replace(" ", "").split(",") if part)


def _generator(seed: int, step: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))
    return g


class FaultInjector:
    def __init__(self, cfg):
        self.enabled = bool(cfg.FAULT_INJECTION)
        self.seed = cfg.SEED
        if not self.enabled:
            return
        self.spike_steps = parse_steps(cfg.FAULT_SPIKE_STEPS)
        self.spike_prob = cfg.FAULT_SPIKE_PROB
        self.spike_factor = cfg.FAULT_SPIKE_FACTOR
        self.outlier_steps = parse_steps(cfg.FAULT_OUTLIER_STEPS)
        self.nan_steps = parse_steps(cfg.FAULT_NAN_STEPS)
        self.kill_step = cfg.FAULT_KILL_STEP
        self.kill_rank = cfg.FAULT_KILL_RANK

    def kill_if_due(self, step: int, rank: int) -> None:
        """SIGKILL this process at FAULT_KILL_STEP on rank FAULT_KILL_RANK: a crash, not an exit."""
        if self.enabled and self.kill_step and step == self.kill_step and rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def poison_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """NaN loss on the listed steps (its gradients become NaN too)."""
        if not self.enabled or step not in self.nan_steps:
            return loss
        return loss * float("nan")

    def is_spike_step(self, step: int) -> bool:
        """`step` is the 1-based optimizer step being computed."""
        if not self.enabled:
            return False
        if step in self.spike_steps:
            return True
        return self.spike_prob > 0 and bool(torch.rand((), generator=_generator(self.seed, step, 1))
                                            < self.spike_prob)

    def inject_gradient_spike(self, step: int, params) -> bool:
        if not self.is_spike_step(step):
            return False
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, self.spike_factor)
        return True

    def corrupt_batch(self, step: int, batch):
        """Replace the batch of an outlier step with garbage of the same shape."""
        if not self.enabled or step not in self.outlier_steps:
            return batch
        g = _generator(self.seed, step, 2)
        x = batch.inputs
        if x.dtype == torch.long:  # token ids
            garbage = torch.randint(0, 50257, x.shape, generator=g)
            targets = torch.randint(0, 50257, x.shape, generator=g)
        else:  # images, already normalised
            garbage = torch.rand(x.shape, generator=g) * 6 - 3
            targets = batch.targets
        return type(batch)(garbage.to(x.dtype), targets, batch.sample_ids)
