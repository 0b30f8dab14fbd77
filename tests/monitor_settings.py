"""The one way the monitor's unit tests get settings: complete typed settings from Kconfig.

monitor_cfg() loads a preset (defconfigs/gpt2-tiny by default) and NAME=VALUE
overrides through the project's strict loader (scripts.kconfig.strict), as
`make defconfig && make setconfig` would, and returns the same Settings
object the trainer reads. Every symbol has its Kconfig default unless
overridden, and a misspelt or unknown symbol, a bad value or an override
that would not take effect raises ConfigError: a test cannot silently run
with a setting the monitor never sees.
"""
from __future__ import annotations

import functools
from pathlib import Path

from scripts.kconfig.settings import Settings
from scripts.kconfig.strict import command_line_layer, load, open_kconfig, read_layer, typed_values

REPO = Path(__file__).resolve().parents[1]
INTERVAL_SYMBOLS = (
    "MONITOR_GRAD_NORM_INTERVAL", "MONITOR_GSS_INTERVAL", "MONITOR_GSS_ELEMENTWISE_INTERVAL",
    "MONITOR_UPDATE_RATIO_INTERVAL",
    "MONITOR_GSNR_INTERVAL", "MONITOR_DDP_CONSISTENCY_INTERVAL", "MONITOR_WEIGHT_SPECTRA_INTERVAL",
    "MONITOR_COLLAPSE_RESIDUAL_INTERVAL", "MONITOR_ATTN_ENTROPY_INTERVAL", "MONITOR_TOKEN_ENTROPY_INTERVAL",
    "MONITOR_ACT_SPECTRA_INTERVAL", "MONITOR_GRAD_SPECTRA_INTERVAL", "MONITOR_CODEC_INTERVAL",
    "MONITOR_ZLIB_INTERVAL")


@functools.lru_cache(maxsize=1)
def _kconfig():
    return open_kconfig(str(REPO))


def _text(value) -> str:
    if isinstance(value, bool):
        return "y" if value else "n"
    return str(value)


def settings_from(preset: str = "gpt2-tiny", **overrides) -> Settings:
    """Typed settings of defconfigs/<preset> plus overrides (NAME=value; bools as True/False)."""
    kconf = _kconfig()
    layers = [read_layer(kconf, str(REPO / "defconfigs" / preset))]
    if overrides:
        layers.append(command_line_layer(kconf, [f"{k}={_text(v)}" for k, v in overrides.items()],
                                         where="<test>"))
    load(kconf, layers)
    return Settings(typed_values(kconf), source=f"<{preset} + test overrides>")


def monitor_cfg(preset: str = "gpt2-tiny", quiet: bool = True, **overrides) -> Settings:
    """settings_from(), with every monitor interval 0 first when quiet (so a test switches on
    only the metrics it names). Short names get the MONITOR_ prefix: GSNR_INTERVAL=1."""
    values = {sym: 0 for sym in INTERVAL_SYMBOLS} if quiet else {}
    for name, value in overrides.items():
        known = name.startswith(("MONITOR", "GRAD_ACCUM_STEPS", "MODEL_", "OPTIM_", "GPT2_", "BETA"))
        values[name if known else f"MONITOR_{name}"] = value
    if values.get("MONITOR") is False:  # the monitor's symbols vanish with it
        values = {k: v for k, v in values.items() if not (k.startswith("MONITOR_") and k in INTERVAL_SYMBOLS)}
    return settings_from(preset, **values)
