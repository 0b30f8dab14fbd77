"""The report's plots: one figure per section, one panel per metric family (matplotlib, Agg)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

LEGEND_MAX = 12  # more lines than this: colour by model order instead of a legend


@dataclasses.dataclass
class Panel:
    title: str
    lines: dict  # label -> (steps, values)
    off: str | None  # the setting that turns the metric on (None: say nothing when absent)
    ylabel: str = ""
    logy: bool = False
    hlines: tuple = ()  # (y, label) reference levels
    band: tuple | None = None  # (low, high): the healthy range, shaded
    markers: bool = False  # spike and rollback steps as vertical lines
    bold: tuple = ()  # labels drawn thick (summaries such as the global value)
    dashed: str = ""  # labels ending with this are dashed, in the colour of their group (label minus last word)


def render_panels(panels: list, path: Path, spike_steps, rollback_steps) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 3.3 * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, height), squeeze=False)
    # fixed margins: tight_layout would measure every tick label, which costs more than the plot
    fig.subplots_adjust(left=0.09, right=0.98, top=1 - 0.35 / height, bottom=0.5 / height, hspace=0.45)
    for ax, panel in zip(axes[:, 0], panels):
        many = len(panel.lines) - len(panel.bold) > LEGEND_MAX
        colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(panel.lines), 1)))
        for i, (label, (steps, values)) in enumerate(panel.lines.items()):
            if label in panel.bold:
                ax.plot(steps, values, color="black", linewidth=2.0, label=label, zorder=3)
            elif panel.dashed:
                groups = sorted({name.rsplit(" ", 1)[0] for name in panel.lines})
                group = groups.index(label.rsplit(" ", 1)[0])
                ax.plot(steps, values, color=plt.cm.tab10(group % 10), linewidth=1.3, label=label,
                        linestyle="--" if label.endswith(panel.dashed) else "-",
                        marker="." if len(steps) < 30 else None)
            else:
                ax.plot(steps, values, color=colours[i] if many else None, linewidth=0.9 if many else 1.3,
                        label=None if many else label, marker="." if len(steps) < 30 else None)
        if panel.band:
            ax.axhspan(*panel.band, color="green", alpha=0.08, label="healthy range")
        for y, label in panel.hlines:
            ax.axhline(y, color="grey", linestyle="--", linewidth=1.0)
            ax.annotate(label, (0.005, y), xycoords=("axes fraction", "data"), fontsize=7, color="dimgrey",
                        va="bottom")
        if panel.markers:
            if spike_steps:
                ax.vlines(spike_steps, 0, 1, transform=ax.get_xaxis_transform(), colors="red", linestyles=":",
                          linewidth=1.0, alpha=0.7, label="spike (spikes.jsonl)")
            if rollback_steps:
                ax.vlines(rollback_steps, 0, 1, transform=ax.get_xaxis_transform(), colors="black",
                          linestyles="--", linewidth=1.2, label="rollback")
        if panel.logy:
            ax.set_yscale("log")
        ax.set_title(panel.title + (f"  ({len(panel.lines)} series; colour = model order, dark first)"
                                    if many else ""), fontsize=10)
        ax.set_ylabel(panel.ylabel)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="best", ncol=2 if len(handles) > 6 else 1)
    fig.savefig(path, dpi=90)
    plt.close(fig)
