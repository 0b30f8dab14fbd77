"""Plots for `make compare`: one curve per configuration, mean over seeds with a ± std band.

Kept apart from scripts/compare.py so the comparison logic can be read (and
tested) without matplotlib. Always the Agg backend: comparisons run on
headless machines and in CI.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def mean_std_curve(runs: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' {step: value} curves -> (steps, mean, std) on the steps every seed logged.

    Seeds of one configuration log at the same steps; an interrupted seed has
    fewer, and the band must not mix a different number of seeds at the end.
    Non-finite values (a diverged run) stay NaN rather than being dropped. std is
    the sample standard deviation (0 for a single seed).
    """
    runs = [r for r in runs if r]
    if not runs:
        empty = np.zeros(0)
        return empty.astype(int), empty, empty
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    values = np.array([[r[s] if r[s] is not None else np.nan for s in steps] for r in runs], dtype=float)
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
    return np.array(steps, dtype=int), mean, std


def plot_curves(curves: dict[str, list[dict[int, float]]], *, title: str, ylabel: str, path: Path,
                logy: bool = False) -> Path | None:
    """One line per configuration (mean over seeds) and a shaded ± std band; None if nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = False
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in curves.items():
        steps, mean, std = mean_std_curve(runs)
        if len(steps) == 0:
            continue
        seeds = len([r for r in runs if r])
        line, = ax.plot(steps, mean, label=f"{name} (n={seeds})", linewidth=1.5)
        if seeds > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    return save_figure(fig, ax, path)


def save_figure(fig, ax, path):
    """The comparison plots' common finish: grid, legend, tight layout, PNG at 110 dpi."""
    import matplotlib.pyplot as plt
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# (file name, metrics key, title, y label, log scale)
PLOTS = (
    ("val_loss.png", "val_loss", "Validation loss (mean ± std over seeds)", "val loss", False),
    ("val_accuracy.png", "val_accuracy", "Validation top-1 accuracy (mean ± std over seeds)", "val accuracy", False),
    ("train_loss.png", "loss", "Training loss (mean ± std over seeds)", "train loss", False),
    ("grad_norm.png", "grad_norm", "Global gradient norm before clipping (mean ± std over seeds)", "grad norm",
     True),
)


def write_plots(curves: dict[str, dict[str, list[dict[int, float]]]], out_dir: Path) -> list[Path]:
    """curves[metric][config] = one {step: value} dict per seed. Returns the PNGs written."""
    written = []
    for filename, key, title, ylabel, logy in PLOTS:
        by_config = curves.get(key, {})
        if not any(any(r for r in runs) for runs in by_config.values()):
            continue
        path = plot_curves(by_config, title=title, ylabel=ylabel, path=Path(out_dir) / filename, logy=logy)
        if path is not None:
            written.append(path)
    return written
