"""
The spike-step gate of AdamWSpam (shared/seeds/001, SPAM_SPIKE_THRESHOLD):
element-wise clipping acts only on steps whose global gradient norm is an
outlier against the norms of the previous `window` steps.

Three statistics (Kconfig SPAM_GATE_*):
- "window" (the seed's, as published): z = (norm - mean) / std, sample std,
  over every previous norm. A detected spike enters the window as it is, so a
  1000x spike inflates the std for `window` steps and later spikes pass.
- "exclude": the same z, but a detected spike enters the window at the bound
  it was judged against, mean + threshold * std (as ZClip does), not at its
  own value: the statistics stay those of ordinary steps, yet a genuine,
  lasting rise of the gradient scale still pulls the mean up step by step
  (leaving spikes out entirely would freeze the window and clip forever).
- "mad": z = (norm - median) / (1.4826 * MAD), the median absolute deviation
  scaled to a normal std. Robust by construction (half the window must be
  spikes to move it), so norms enter as they are.

For all three: the gate arms only once the window holds `min_history` valid
norms (z = 0 before), a non-finite norm never enters the window (its slot
holds NaN, which every statistic skips) and is never a spike, and x / 0 (a
flat window and a larger norm) is a huge z while 0 / 0 is z = 0.

Everything stays on the norms' device: the position in the ring buffer is a
host integer (one slot per step() call), validity is a NaN mask, and the
decision is a 0-dim bool tensor, so the caller never synchronises.
"""

import math

import torch

GATE_STATISTICS = ("window", "exclude", "mad")
# MAD of a normal distribution times this is its standard deviation
MAD_TO_STD = 1.4826


class SpikeGate:
    """Ring buffer of global gradient norms and the z-score of the next one."""

    def __init__(self, threshold, window, statistic="exclude", min_history=10):
        if not threshold > 0:
            raise ValueError(f"AdamWSpam: the spike gate needs SPAM_SPIKE_THRESHOLD > 0, got {threshold}")
        if statistic not in GATE_STATISTICS:
            raise ValueError(f"AdamWSpam: gate statistic must be one of {GATE_STATISTICS}, got {statistic!r}")
        if window < 2:
            raise ValueError(f"AdamWSpam: zscore_window (SPAM_ZSCORE_WINDOW) must be >= 2, got {window}")
        if not 2 <= min_history <= window:
            raise ValueError(f"AdamWSpam: gate_min_history (SPAM_GATE_MIN_HISTORY) must be in [2, "
                             f"SPAM_ZSCORE_WINDOW={window}], got {min_history}")
        self.threshold = float(threshold)
        self.window = int(window)
        self.statistic = statistic
        self.min_history = int(min_history)
        self.history = None  # created at the first norm, in its dtype and on its device
        self.count = 0       # slots written so far (one per observed step)

    def observe(self, norm):
        """This step's norm -> (z, spike): 0-dim tensors, z of the norm's dtype, spike bool.

        The norm is judged against the window before it, then enters it.
        """
        if self.history is None:
            self.history = torch.full((self.window,), math.nan, dtype=norm.dtype, device=norm.device)
        history = self.history
        # NaN for a non-finite norm: it is then no value in the window, and
        # its own z is NaN, which counts as 0 below (never a spike)
        stored = norm.to(history.dtype).nan_to_num(nan=math.nan, posinf=math.nan, neginf=math.nan)
        n = min(self.count, self.window)
        if n >= self.min_history:  # fewer slots than that cannot hold enough valid norms
            previous = history[:n]
            valid = ~torch.isnan(previous)
            valid_count = valid.sum()
            if self.statistic == "mad":
                center = torch.nanquantile(previous, 0.5)
                spread = MAD_TO_STD * torch.nanquantile((previous - center).abs(), 0.5)
            else:
                center, spread = _masked_mean_std(previous, valid, valid_count, n)
            # 0/0 (flat window, same norm) is no spike; x/0 is a huge z
            z = ((stored - center) / spread).nan_to_num(nan=0.0)
            z = torch.where(valid_count >= self.min_history, z, 0.0)  # armed?
            spike = z > self.threshold  # the threshold is > 0
            if self.statistic == "exclude":
                stored = torch.where(spike, center + self.threshold * spread, stored)
        else:
            z = torch.zeros((), dtype=history.dtype, device=history.device)
            spike = torch.zeros((), dtype=torch.bool, device=history.device)
        history[self.count % self.window] = stored
        self.count += 1
        return z, spike

    # ------------------------------------------------------------ checkpoint

    def state_dict(self):
        history = self.history
        return dict(norm_history=history.clone() if history is not None else torch.empty(0),
                    norm_count=self.count)

    def load_state_dict(self, state, device):
        self.count = int(state["norm_count"])
        history = state["norm_history"]
        if history.numel() == 0:
            self.history = None
            return
        if history.numel() != self.window:
            raise ValueError(f"optimizer checkpoint has a z-score window of {history.numel()} steps, "
                             f"this optimizer {self.window} (SPAM_ZSCORE_WINDOW)")
        self.history = history.to(device, copy=True)


def _masked_mean_std(previous, valid, valid_count, n):
    """Mean and sample std of the valid entries of `previous` (n slots).

    Written so that with every slot valid both are bit for bit
    previous.mean() and previous.std() (the published gate): the invalid
    slots are filled with zeros (for the mean) and with the mean (for the
    std, where they then add nothing to the squared deviations), and the
    results are rescaled by factors that are then exactly 1.
    """
    count = valid_count.to(previous.dtype)
    mean = torch.where(valid, previous, 0.0).mean() * (n / count)
    std = torch.where(valid, previous, mean).std() * ((n - 1) / (count - 1)).sqrt()
    return mean, std
