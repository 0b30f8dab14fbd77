"""Loss-spike signal for the spike guard: this step's loss above mean + k sigma of a window.

Production trainers watch the loss beside the gradient norm (OLMo-core skips
a step whose loss exceeds mean + 6 sigma of the previous 128). The window is
a ring buffer on the loss's device and every operation is a tensor op, so
checking and recording cost no host synchronisation; the guard reads the
verdict in the one synchronisation it already makes per step.
"""

import torch


class LossSpikeWindow:
    """The last `window` finite training losses and the spike test against them.

    check(loss) -> (spike, threshold), 0-dim tensors, no state change:
    threshold = mean + sigma * std (unbiased) of the window; spike = the
    window is full (armed only then: a handful of early losses says nothing
    about their spread) and loss is finite and above the threshold.
    record(loss) appends a finite loss; a NaN or inf loss never enters the
    window (the ring position does not move), so one bad step cannot poison
    the statistics of the next `window` steps.
    """

    def __init__(self, window: int, sigma: float):
        if window < 2:
            raise ValueError(f"loss-spike window must hold at least 2 losses, got {window}")
        if not sigma > 0:
            raise ValueError(f"loss-spike sigma must be > 0, got {sigma}")
        self.window, self.sigma = int(window), float(sigma)
        self.values = None  # (window,) float32 ring buffer on the loss's device
        self.count = None  # 0-dim int64: finite losses recorded so far

    def _init(self, loss):
        if self.values is None:
            self.values = torch.zeros(self.window, device=loss.device)
            self.count = torch.zeros((), dtype=torch.int64, device=loss.device)

    def check(self, loss: torch.Tensor):
        loss = loss.detach().float()
        self._init(loss)
        threshold = self.values.mean() + self.sigma * self.values.std()
        spike = (self.count >= self.window) & torch.isfinite(loss) & (loss > threshold)
        return spike, threshold

    def record(self, loss: torch.Tensor):
        loss = loss.detach().float()
        self._init(loss)
        finite = torch.isfinite(loss)
        pos = (self.count % self.window).reshape(1)
        kept = self.values.gather(0, pos)
        self.values.scatter_(0, pos, torch.where(finite, loss.reshape(1), kept))
        self.count += finite.long()

    def state_dict(self) -> dict:
        return {"values": self.values, "count": self.count}

    def load_state_dict(self, state: dict, device=None):
        self.values = None if state["values"] is None else state["values"].clone().to(device)
        self.count = None if state["count"] is None else state["count"].clone().to(device)
