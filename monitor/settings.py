"""What the health monitor reads from the typed settings (generated/settings.py).

Every value is read as cfg.NAME with no fallback: a symbol missing from the
settings raises, so a misspelt or forgotten symbol fails loudly instead of
turning a metric silently off. The only values that may be absent (None)
are those Kconfig itself hides: the probe metrics are declared for language
models only (inside `if MODEL_GPT2`), and the spike guard's settings exist
only when the guard is on.
"""

from monitor.guard import SpikeGuard
from monitor.loss_spike import LossSpikeWindow

# Interval settings, one per metric group (name -> Kconfig symbol).
INTERVALS = {
    "grad_norm": "MONITOR_GRAD_NORM_INTERVAL",
    "gss": "MONITOR_GSS_INTERVAL",
    "gss_elementwise": "MONITOR_GSS_ELEMENTWISE_INTERVAL",
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


def read_intervals(cfg) -> dict:
    """{metric group: interval in optimizer steps, 0 = off}. MONITOR=n turns every group off."""
    if not cfg.MONITOR:
        return {metric: 0 for metric in INTERVALS}
    language_model = cfg.MODEL_GPT2
    every = {}
    for metric, symbol in INTERVALS.items():
        value = getattr(cfg, symbol)  # no default: a missing symbol raises AttributeError
        if value is None and metric in PROBE_METRICS and not language_model:
            value = 0  # declared for language models only; Kconfig gives it no value here
        if type(value) is not int or value < 0:
            raise ValueError(f"settings: {symbol}={value!r} is not an interval (an integer >= 0)")
        every[metric] = value
    return every


def build_guard(cfg):
    """(SpikeGuard, LossSpikeWindow or None), or (None, None) when the guard is off."""
    if not (cfg.MONITOR and cfg.MONITOR_SPIKE_GUARD):
        return None, None
    action = ("log" if cfg.MONITOR_SPIKE_ACTION_LOG else "clip" if cfg.MONITOR_SPIKE_ACTION_CLIP
              else "skip" if cfg.MONITOR_SPIKE_ACTION_SKIP else None)
    signals = (("gss",) if cfg.MONITOR_GUARD_SIGNAL_GSS else ("loss",) if cfg.MONITOR_GUARD_SIGNAL_LOSS
               else ("gss", "loss") if cfg.MONITOR_GUARD_SIGNAL_BOTH else None)
    if action is None or signals is None:
        raise ValueError("settings: the spike guard is on but no MONITOR_SPIKE_ACTION_* or "
                         "MONITOR_GUARD_SIGNAL_* choice is set (regenerate the settings)")
    guard = SpikeGuard(tau=cfg.MONITOR_SPIKE_TAU, action=action, cluster_k=cfg.MONITOR_SPIKE_CLUSTER_K,
                       cluster_window=cfg.MONITOR_SPIKE_CLUSTER_WINDOW, signals=signals)
    window = None
    if "loss" in signals:
        window = LossSpikeWindow(cfg.MONITOR_LOSS_SPIKE_WINDOW, cfg.MONITOR_LOSS_SPIKE_SIGMA)
    return guard, window
