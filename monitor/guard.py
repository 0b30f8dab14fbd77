"""Spike guard: the Gradient Spike Score manual's automated intervention (section 4.1).

1. Detect: a step is a spike when a watched signal fires: its max GSS
   exceeds tau (signal "gss"), or its loss exceeds mean + k sigma of the
   recent losses (signal "loss", see loss_spike.LossSpikeWindow), or either.
2. Block: on a spike, the configured action is returned: "log" (only count
   it), "clip" (scale the spiking gradients down to GSS = tau, see
   metrics.spike_clip_) or "skip" (drop the update).
3. Reset: when spikes cluster, i.e. MORE than cluster_k spikes fall within the
   last cluster_window steps, the decision asks for a rollback (reload the
   last checkpoint, reset the optimizer's moments, re-warm the learning
   rate). The window is then emptied, so one cluster triggers one rollback.

A pure state machine on Python numbers: it never touches tensors, so the
trainer and the tests drive it with plain step sequences.
"""

from collections import deque
from dataclasses import dataclass

ACTIONS = ("log", "clip", "skip")
SIGNALS = ("gss", "loss")


@dataclass(frozen=True)
class Decision:
    spike: bool = False  # max GSS > tau at this step
    action: str = "none"  # what to do with this step's gradients: "none" or one of ACTIONS
    rollback: bool = False  # too many spikes recently: reload the last checkpoint
    signals: tuple = ()  # which signals fired: a subset of SIGNALS, in that order


class SpikeGuard:
    def __init__(self, tau: float = 10.0, action: str = "log", cluster_k: int = 5, cluster_window: int = 100,
                 signals=("gss",)):
        if not signals or any(s not in SIGNALS for s in signals):
            raise ValueError(f"spike guard signals must be a non-empty subset of {', '.join(SIGNALS)}; got {signals}")
        self.signals = tuple(s for s in SIGNALS if s in signals)
        if action not in ACTIONS:
            raise ValueError(f"spike guard action must be one of {', '.join(ACTIONS)}; got '{action}'")
        if not tau > 0:
            raise ValueError(f"spike threshold tau must be > 0, got {tau}")
        if cluster_k < 0 or cluster_window < 1:
            raise ValueError("spike cluster needs cluster_k >= 0 and cluster_window >= 1")
        self.tau = float(tau)
        self.action = action
        self.cluster_k = cluster_k
        self.cluster_window = cluster_window
        self.spike_steps = deque()  # steps of the spikes still inside the window
        self.total_spikes = 0
        self.total_rollbacks = 0

    def observe(self, step: int, max_gss: float, loss_spike: bool = False) -> Decision:
        """Judge one optimizer step from its largest GSS (a NaN score is never a spike) and the
        loss signal's verdict; only the signals this guard watches count.

        The window covers steps step - cluster_window + 1 .. step (this one included).
        """
        while self.spike_steps and self.spike_steps[0] <= step - self.cluster_window:
            self.spike_steps.popleft()
        fired = tuple(s for s, hit in (("gss", max_gss > self.tau), ("loss", bool(loss_spike)))
                      if hit and s in self.signals)
        if not fired:
            return Decision()
        self.total_spikes += 1
        self.spike_steps.append(step)
        rollback = len(self.spike_steps) > self.cluster_k
        if rollback:
            self.total_rollbacks += 1
            self.spike_steps.clear()
        return Decision(spike=True, action=self.action, rollback=rollback, signals=fired)

    def state_dict(self) -> dict:
        return {"spike_steps": list(self.spike_steps), "total_spikes": self.total_spikes,
                "total_rollbacks": self.total_rollbacks}

    def load_state_dict(self, state: dict):
        self.spike_steps = deque(state["spike_steps"])
        self.total_spikes = state["total_spikes"]
        self.total_rollbacks = state["total_rollbacks"]
