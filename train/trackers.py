"""Experiment trackers: optional copies of the run's metrics in trackio or Weights & Biases.

metrics.jsonl stays the record of a run; a tracker receives every record RunLog
writes there (as "<split>/<metric>" at the record's step), and the run's
settings -- every symbol of its .config with its typed value -- as the run's
configuration, so a dashboard can group and filter runs by symbol. The
packages are optional extras (pyproject.toml): a tracker enabled without its
package stops the run at start with the command that installs it.

The calls are the packages' documented module-level API:
    trackio.init(project=, name=, config=, resume="allow"); trackio.log(dict, step=); trackio.finish()
    wandb.init(project=, name=, config=, mode="offline"|"online", dir=); wandb.log(dict, step=); wandb.finish()
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path


class TrackerUnavailable(SystemExit):
    """A tracker is enabled but its package is not installed; the message says what to install."""


def _import(package: str, symbol: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise TrackerUnavailable(f"error: {symbol}=y needs the {package} package, which is not installed: "
                                 f"pip install -e '.[{package}]' (or set {symbol}=n)") from None


def scalars(split: str, metrics: dict) -> dict:
    """The numbers of one metrics record as "<split>/<name>" (booleans, text and non-finite values left out)."""
    return {f"{split}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class ModuleTracker:
    """A tracker package used through its module-level init / log / finish."""

    def __init__(self, module, init_kwargs: dict):
        self.module = module
        self.module.init(**init_kwargs)
        self._open = True

    def log(self, step: int, split: str, metrics: dict) -> None:
        values = scalars(split, metrics)
        if values and self._open:
            self.module.log(values, step=step)

    def close(self) -> None:
        if self._open:
            self._open = False
            self.module.finish()


def build_trackers(cfg, run_dir: Path) -> list[ModuleTracker]:
    """The trackers the settings enable (none by default), each started with the run's settings
    as its configuration. TrackerUnavailable when an enabled tracker's package is missing."""
    wanted = []
    if cfg.TRACKER_TRACKIO:
        wanted.append(("trackio", "TRACKER_TRACKIO"))
    if cfg.TRACKER_WANDB:
        wanted.append(("wandb", "TRACKER_WANDB"))
    if not wanted:
        return []
    modules = [(_import(package, symbol), package) for package, symbol in wanted]  # all missing ones first
    config = dict(cfg.as_dict())
    name = Path(run_dir).name or "run"
    trackers = []
    for module, package in modules:
        if package == "trackio":
            kwargs = dict(project=cfg.TRACKER_PROJECT, name=name, config=config, resume="allow")
        else:
            mode = "online" if cfg.TRACKER_WANDB_ONLINE and not cfg.TRACKER_WANDB_OFFLINE else "offline"
            kwargs = dict(project=cfg.TRACKER_PROJECT, name=name, config=config, mode=mode, dir=str(run_dir))
        trackers.append(ModuleTracker(module, kwargs))
    return trackers
