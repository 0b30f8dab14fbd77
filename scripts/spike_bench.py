"""`make compare-spikes`: which spike-handling method wins where.

    python -m scripts.spike_bench [--seeds 3] [--jobs 2] [--out runs/compare-spikes]
                                  [--only METHOD ...] [--scenarios NAME ...] [--no-lr] [--gates]

The byte-level GPT (the gpt-bytes preset at nanoGPT's CPU shape: 4 layers,
128 wide, 64-byte context, batch 12) trains 600 steps per run, once per
(method, scenario, seed):

- methods: AdamW; AdamW + global-norm clip 1.0; AdamW + ZClip; AdamW +
  skip-step; AdamWSpam at the seed's values; AdamWSpam at the paper's values;
  Stable-SPAM; the combination AdamWSpam (seed) + ZClip; with --gates also
  AdamWSpam (seed) with the gate's other two statistics (18 runs more);
- scenarios: none; the whole gradient x1000; 8 token-embedding rows x1000;
  one attention layer x1000; data outliers (a batch of one repeated byte), at
  steps 120, 260, 330 (70 steps after 260: inside the z-gate's window) and
  470, plus the uniform scenarios' random spikes (probability 0.005);
- and an LR sweep without injection (Wortsman et al.'s LR sensitivity) over
  3e-4 ... 1e-2 (33x), one seed per method and LR.

Reset intervals and post-reset warmups are scaled by 1/5 for the 600-step
runs (seed 1000/100 -> 200/20, paper 500/150 -> 100/30, Stable-SPAM 1000 ->
200), so that resets and warmups happen 3 to 6 times in every run.

Every run is an ordinary run of `make compare` (scripts/runs.py): finished
runs are reused and interrupted ones resume, so the same command continues an
interrupted benchmark. The tables, plots and JSON go to OUT/spike-benchmark.*.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("runs/compare-spikes")
STEPS = 600

# name -> (configuration, the method's own settings)
METHODS = {
    "AdamW": ("gpt-bytes-adamw", ()),
    "AdamW + clip 1.0": ("gpt-bytes-adamw+clip1", ()),
    "AdamW + ZClip": ("gpt-bytes-adamw+zclip", ()),
    "AdamW + skip-step": ("gpt-bytes-adamw+skip-step", ()),
    "SPAM (seed)": ("gpt-bytes", ("SPAM_INTERVAL=200", "SPAM_WARMUP_STEPS=20")),
    "SPAM (paper)": ("gpt-bytes+spam-paper", ("SPAM_INTERVAL=100", "SPAM_WARMUP_STEPS=30")),
    "Stable-SPAM": ("gpt-bytes-adamw+stable-spam", ("STABLE_SPAM_INTERVAL=200",)),
    # a combination, not a published method: SPAM's element-wise clip and resets with
    # ZClip in front for whole-gradient spikes (docs/spike-experiment.md says why)
    "SPAM (seed) + ZClip": ("gpt-bytes+zclip", ("SPAM_INTERVAL=200", "SPAM_WARMUP_STEPS=20")),
}
# The z-gate's statistics (SPAM_GATE_*), measured on the scenarios where the gate matters
GATE_METHODS = {
    "SPAM (seed), published window": ("gpt-bytes+gate-window", ("SPAM_INTERVAL=200", "SPAM_WARMUP_STEPS=20")),
    "SPAM (seed), median/MAD": ("gpt-bytes+gate-mad", ("SPAM_INTERVAL=200", "SPAM_WARMUP_STEPS=20")),
}
GATE_SCENARIOS = ("none", "uniform x1000", "embedding rows x1000")

# name -> fragment merged after the method's (empty: no injection)
SCENARIOS = {
    "none": "",
    "uniform x1000": "spikes",
    "embedding rows x1000": "spikes-rows",
    "one layer x1000": "spikes-layer",
    "data outliers": "outliers",
}
LRS = ("3e-4", "1e-3", "3e-3", "5e-3", "1e-2")
BASE_LR = "1e-3"  # the preset's: the scenario runs at seed 1 are the sweep's 1e-3 point

COMMON = (
    f"MAX_ITERS={STEPS}", "MAX_EPOCHS=0", "GPT2_BLOCK_SIZE=64", "BATCH_SIZE=12",
    "EVAL_INTERVAL=50", "EVAL_BATCHES=10", "LOG_INTERVAL=1", "CKPT_INTERVAL=0", "SAMPLE_TOKENS=32",
    "TENSORBOARD=n",
    # the health monitor's spike detector as a neutral observer: log, never act
    # (a cluster of 100 spikes in 100 steps cannot happen)
    "MONITOR_SPIKE_GUARD=y", "MONITOR_SPIKE_ACTION_LOG=y", "MONITOR_SPIKE_CLUSTER_K=100",
)


def job_name(configuration: str, scenario: str) -> str:
    fragment = SCENARIOS[scenario]
    return configuration + (f"+{fragment}" if fragment else "")


def plan(methods, scenarios, seeds: int, lr_sweep: bool) -> list[tuple[str, tuple, int, dict]]:
    """(job name, settings, seed, what it measures) for every run of the benchmark."""
    specs = []
    for method, (configuration, sets) in methods.items():
        chosen = [s for s in scenarios if s in GATE_SCENARIOS] if method in GATE_METHODS else scenarios
        for scenario in chosen:
            for seed in range(1, seeds + 1):
                specs.append((job_name(configuration, scenario), sets, seed,
                              {"method": method, "scenario": scenario, "lr": BASE_LR}))
        if lr_sweep and method in METHODS:
            for lr in LRS:
                if lr == BASE_LR:
                    continue
                lr_sets = (*sets, f"LR={lr}", f"MIN_LR={float(lr) / 10:g}")
                specs.append((f"{configuration}/lr{lr}", lr_sets, 1, {"method": method, "scenario": "none", "lr": lr}))
    return specs


# --------------------------------------------------------------------------- what a run did

def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_figures(run_dir: Path) -> dict | None:
    """Final val loss, its curve, spikes the monitor saw, and the steps the method acted on."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    records = _records(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    val = {r["step"]: r["val_loss"] for r in records if r.get("split") == "val"}
    last = train[-1] if train else {}
    acted = None
    if "clip/clipped_total" in last:
        acted = last["clip/clipped_total"]
    elif "skip_step/skipped_total" in last:
        acted = last["skip_step/skipped_total"]
    elif any("spam/clipped_count" in r for r in train):  # SPAM and Stable-SPAM: steps with a clipped element
        acted = sum(1 for r in train if r.get("spam/clipped_count", 0) > 0)
    classes = {}
    for key in ("embedding", "attention", "mlp", "other"):
        values = [r[f"spam/clipped_fraction/{key}"] for r in train if f"spam/clipped_fraction/{key}" in r]
        if values:
            classes[key] = statistics.fmean(values)
    spikes = summary.get("spikes")
    if spikes is None and (run_dir / "spikes.jsonl").is_file():
        spikes = sum(1 for line in (run_dir / "spikes.jsonl").read_text().splitlines()
                     if line.strip() and json.loads(line).get("event") == "spike")
    final = summary.get("val_loss")
    return {"final_val_loss": final if final is not None and math.isfinite(final) else None,
            "val_curve": val, "spikes_seen": spikes, "acted_steps": acted,
            "clipped_fraction_by_class": classes, "wall_s": summary.get("wall_s")}


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def summarise(specs, out: Path) -> dict:
    """Per (method, scenario): final val loss (mean, std, n), damage against the same
    method and seed without injection, spikes seen, steps acted on; per (method, LR):
    final val loss; per method: Wortsman et al.'s LR sensitivity."""
    runs = {}
    for name, _, seed, what in specs:
        runs[(what["method"], what["scenario"], what["lr"], seed)] = run_figures(out / name / f"seed{seed}")
    cells = {}
    for (method, scenario, lr, seed), fig in runs.items():
        if lr != BASE_LR:
            continue
        cell = cells.setdefault((method, scenario), {"loss": [], "damage": [], "spikes": [], "acted": [],
                                                     "curves": [], "classes": []})
        if fig is None:
            continue
        cell["loss"].append(fig["final_val_loss"])
        clean = runs.get((method, "none", BASE_LR, seed))
        if clean and fig["final_val_loss"] is not None and clean["final_val_loss"] is not None:
            cell["damage"].append(fig["final_val_loss"] - clean["final_val_loss"])
        cell["spikes"].append(fig["spikes_seen"])
        cell["acted"].append(fig["acted_steps"])
        cell["curves"].append(fig["val_curve"])
        cell["classes"].append(fig["clipped_fraction_by_class"])
    table = {f"{m} | {s}": {"loss": _mean_std(c["loss"]), "damage": _mean_std(c["damage"]),
                            "spikes": _mean_std(c["spikes"]), "acted": _mean_std(c["acted"]),
                            "clipped_by_class": {k: statistics.fmean(d[k] for d in c["classes"] if k in d)
                                                 for k in {k for d in c["classes"] for k in d}}}
             for (m, s), c in cells.items()}
    lr_curves = {}
    for (method, scenario, lr, seed), fig in runs.items():
        if scenario == "none" and seed == 1 and method in METHODS and fig is not None:
            lr_curves.setdefault(method, {})[lr] = fig["final_val_loss"]
    return {"table": table, "lr": lr_curves, "sensitivity": lr_sensitivity(lr_curves),
            "curves": {f"{m} | {s}": c["curves"] for (m, s), c in cells.items()}}


# Loss of the untrained model on bytes: ln(257). Wortsman et al. cap a diverged run's
# loss at the loss at initialisation, so one divergence cannot dominate the mean.
INIT_LOSS = math.log(257)


def lr_sensitivity(lr_curves: dict) -> dict:
    """Per method: the mean over the swept LRs of min(final loss, initial loss) minus the
    method's best final loss over those LRs (Wortsman et al., 2023): 0 when every LR
    does as well as the best one; larger when the method needs its LR tuned."""
    out = {}
    for method, by_lr in lr_curves.items():
        losses = [min(v, INIT_LOSS) if v is not None else INIT_LOSS for v in by_lr.values()]
        if len(losses) == len(LRS):
            out[method] = statistics.fmean(losses) - min(losses)
    return out


# --------------------------------------------------------------------------- report

def _fmt(cell, digits=3, signed=False):
    if cell is None:
        return "n/a"
    mean, std, n = cell
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:{sign}.{digits}f}"


def markdown(result: dict, methods: list[str], scenarios: list[str], seeds: int, wall_s: float) -> str:
    t = result["table"]
    lines = ["# Spike benchmark", "",
             f"gpt-bytes (4 layers, 128 wide, bytes of Shakespeare), {STEPS} steps, {seeds} seeds per cell; "
             f"`make compare-spikes` ({wall_s / 60:.0f} min). Final validation loss in nats per byte, mean ± "
             "std over seeds; damage = final val loss minus the same method's and seed's run without "
             "injection.", "", "## Final validation loss", "",
             "| method | " + " | ".join(scenarios) + " |", "|---|" + "---:|" * len(scenarios)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(t.get(f"{m} | {s}", {}).get("loss")) for s in scenarios) + " |")
    hit = [s for s in scenarios if s != "none"]
    lines += ["", "## Damage (final val loss minus the same method without injection)", "",
              "| method | " + " | ".join(hit) + " |", "|---|" + "---:|" * len(hit)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(t.get(f"{m} | {s}", {}).get("damage"), signed=True)
                                              for s in hit) + " |")
    lines += ["", "## Spikes the monitor saw (GSS > tau) / steps the method acted on", "",
              "Acted: steps clipped (clip 1.0, ZClip), skipped (skip-step), or with at least one clipped "
              "element (SPAM, Stable-SPAM).", "",
              "| method | " + " | ".join(scenarios) + " |", "|---|" + "---:|" * len(scenarios)]
    for m in methods:
        cells = []
        for s in scenarios:
            c = t.get(f"{m} | {s}", {})
            cells.append(f"{_fmt(c.get('spikes'), 1)} / {_fmt(c.get('acted'), 1)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    spam_rows = [(m, t.get(f"{m} | none", {}).get("clipped_by_class")) for m in methods]
    spam_rows = [(m, c) for m, c in spam_rows if c]
    if spam_rows:
        classes = sorted({k for _, c in spam_rows for k in c})
        lines += ["", "## Fraction of elements clipped per step, by parameter class (no injection)", "",
                  "| method | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for m, c in spam_rows:
            lines.append(f"| {m} | " + " | ".join(f"{c[k]:.2e}" if k in c else "n/a" for k in classes) + " |")
    if result["lr"]:
        lines += ["", "## LR sensitivity (no injection, seed 1)", "",
                  "| method | " + " | ".join(f"LR {lr}" for lr in LRS) + " | sensitivity |",
                  "|---|" + "---:|" * (len(LRS) + 1)]
        for m, by_lr in result["lr"].items():
            row = [f"{by_lr[lr]:.3f}" if by_lr.get(lr) is not None else "n/a" for lr in LRS]
            sens = result["sensitivity"].get(m)
            lines.append(f"| {m} | " + " | ".join(row) + f" | {sens:.3f} |" if sens is not None else
                         f"| {m} | " + " | ".join(row) + " | n/a |")
    return "\n".join(lines) + "\n"


def plots(result: dict, methods: list[str], scenarios: list[str], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for scenario in scenarios:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            curves = [c for c in result["curves"].get(f"{m} | {scenario}", []) if c]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], label=m)
        ax.set(title=f"validation loss, scenario: {scenario}", xlabel="step", ylabel="nats per byte")
        ax.set_ylim(top=3.0)
        ax.legend(fontsize=7)
        path = out / f"spike-curves-{scenario.replace(' ', '-')}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    if result["lr"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, by_lr in result["lr"].items():
            lrs = [lr for lr in LRS if by_lr.get(lr) is not None]
            ax.plot([float(lr) for lr in lrs], [min(by_lr[lr], INIT_LOSS) for lr in lrs], marker="o", label=m)
        ax.set(xscale="log", title="LR sensitivity: final val loss (no injection)", xlabel="peak LR",
               ylabel="nats per byte")
        ax.legend(fontsize=7)
        path = out / "spike-lr-sensitivity.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.spike_bench", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--only", nargs="+", metavar="METHOD", help="a subset of the methods (names as in the tables)")
    p.add_argument("--scenarios", nargs="+", metavar="NAME", help="a subset of the scenarios")
    p.add_argument("--no-lr", action="store_true", help="leave out the LR sweep")
    p.add_argument("--gates", action="store_true", help="also the z-gate's published-window and median/MAD "
                   "statistics (SPAM_GATE_*), on the scenarios where the gate matters")
    args = p.parse_args(argv)
    everything = {**METHODS, **GATE_METHODS}
    unknown = [m for m in (args.only or []) if m not in everything]
    unknown += [s for s in (args.scenarios or []) if s not in SCENARIOS]
    if unknown:
        print(f"error: unknown method or scenario {unknown[0]!r} (methods: {', '.join(everything)}; "
              f"scenarios: {', '.join(SCENARIOS)})", file=sys.stderr)
        return 2
    default = {**METHODS, **(GATE_METHODS if args.gates else {})}
    methods = {m: everything[m] for m in (args.only or default)}
    scenarios = list(args.scenarios or SCENARIOS)
    if "none" not in scenarios:
        scenarios.insert(0, "none")  # damage is measured against it
    specs = plan(methods, scenarios, args.seeds, lr_sweep=not args.no_lr)

    from scripts.compare import compare_jobs
    started = time.perf_counter()
    status = compare_jobs([(n, s, seed) for n, s, seed, _ in specs], out=args.out, parallel=args.jobs,
                          common=list(COMMON), what="method x scenario",
                          about="The spike benchmark (scripts/spike_bench.py): see spike-benchmark.md.")
    result = summarise(specs, args.out)
    names = list(methods)
    written = plots(result, names, scenarios, args.out)
    text = markdown(result, names, scenarios, args.seeds, time.perf_counter() - started)
    (args.out / "spike-benchmark.md").write_text(text)
    (args.out / "spike-benchmark.json").write_text(json.dumps(
        {k: v for k, v in result.items() if k != "curves"}, indent=1, default=str) + "\n")
    print(f"wrote {args.out / 'spike-benchmark.md'}, spike-benchmark.json and {len(written)} plots")
    return status


if __name__ == "__main__":
    sys.exit(main())
