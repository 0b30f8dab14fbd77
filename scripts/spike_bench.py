"""`make compare-spikes`: which spike-handling method wins where.

    python -m scripts.spike_bench [--seeds 3] [--jobs 2] [--out runs/compare-spikes]
                                  [--only METHOD ...] [--scenarios NAME ...] [--no-lr] [--gates]
                                  [--preset gpt-bytes|gpt2-tiny] [--lr LR]

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

--preset gpt2-tiny runs the same grid on the GPT-2 BPE model (the gpt2-tiny
presets: 4 layers, 128 wide, GPT-2's 50257-token vocabulary) to check that
the byte-level results carry over to a real subword tokenizer. --lr runs the
scenarios at another peak LR (MIN_LR follows at LR/10) than the presets' 1e-3,
e.g. at the LR the sweep found best; the LR sweep is then left out.

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

# name -> (configuration, the method's own settings). The presets clip the global
# gradient norm at 1.0 (what this benchmark found best); the methods that are
# measured without it say GRAD_CLIP=0.0.
NO_CLIP = ("GRAD_CLIP=0.0",)
SPAM_SEED = ("SPAM_INTERVAL=200", "SPAM_WARMUP_STEPS=20")
METHODS = {
    "AdamW": ("gpt-bytes-adamw", NO_CLIP),
    "AdamW + clip 1.0": ("gpt-bytes-adamw+clip1", ()),
    "AdamW + ZClip": ("gpt-bytes-adamw+zclip", ()),
    "AdamW + skip-step": ("gpt-bytes-adamw+skip-step", NO_CLIP),
    "SPAM (seed)": ("gpt-bytes", (*NO_CLIP, *SPAM_SEED)),
    "SPAM (paper)": ("gpt-bytes+spam-paper", (*NO_CLIP, "SPAM_INTERVAL=100", "SPAM_WARMUP_STEPS=30")),
    "Stable-SPAM": ("gpt-bytes-adamw+stable-spam", (*NO_CLIP, "STABLE_SPAM_INTERVAL=200")),
    # a combination, not a published method: SPAM's element-wise clip and resets with
    # ZClip in front for whole-gradient spikes (docs/spike-experiment.md says why)
    "SPAM (seed) + ZClip": ("gpt-bytes+zclip", SPAM_SEED),
}
# Combinations measured after the main grid (--only NAME): not in the default run, which
# must stay under an hour on 2 cores. SPAM + clip 1.0 is what the presets now train with.
EXTRA_METHODS = {
    "SPAM (seed) + clip 1.0": ("gpt-bytes+clip1", SPAM_SEED),
}
# The z-gate's statistics (SPAM_GATE_*), measured on the scenarios where the gate matters
GATE_METHODS = {
    "SPAM (seed), published window": ("gpt-bytes+gate-window", (*NO_CLIP, *SPAM_SEED)),
    "SPAM (seed), median/MAD": ("gpt-bytes+gate-mad", (*NO_CLIP, *SPAM_SEED)),
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

# --preset: the model the grid runs on. The method table names the byte-level
# presets; another model swaps the leading "gpt-bytes" of each configuration.
# init_loss: the loss of an untrained model, ln(vocabulary).
PRESETS = {
    "gpt-bytes": {"prefix": "gpt-bytes", "init_loss": math.log(257), "unit": "nats per byte",
                  "about": "gpt-bytes (4 layers, 128 wide, bytes of Shakespeare)", "plot_top": 3.0},
    "gpt2-tiny": {"prefix": "gpt2-tiny", "init_loss": math.log(50257), "unit": "nats per token",
                  "about": "gpt2-tiny (4 layers, 128 wide, GPT-2 BPE tokens of Shakespeare)", "plot_top": 8.0},
}


def on_preset(configuration: str, preset: str) -> str:
    """The configuration `configuration` (written for gpt-bytes) on the model of `preset`."""
    assert configuration.startswith("gpt-bytes"), configuration
    return PRESETS[preset]["prefix"] + configuration[len("gpt-bytes"):]

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


def _lr_sets(lr: str) -> tuple:
    return (f"LR={lr}", f"MIN_LR={float(lr) / 10:g}")


def plan(methods, scenarios, seeds: int, lr_sweep: bool, preset: str = "gpt-bytes",
         lr: str = BASE_LR) -> list[tuple[str, tuple, int, dict]]:
    """(job name, settings, seed, what it measures) for every run of the benchmark; the
    scenario runs at peak LR `lr` (the sweep only at the presets' own LR)."""
    specs = []
    for method, (configuration, sets) in methods.items():
        configuration = on_preset(configuration, preset)
        chosen = [s for s in scenarios if s in GATE_SCENARIOS] if method in GATE_METHODS else scenarios
        scenario_sets = sets if lr == BASE_LR else (*sets, *_lr_sets(lr))
        for scenario in chosen:
            for seed in range(1, seeds + 1):
                specs.append((job_name(configuration, scenario), scenario_sets, seed,
                              {"method": method, "scenario": scenario, "lr": lr}))
        if lr_sweep and lr == BASE_LR and method not in GATE_METHODS:
            for swept in LRS:
                if swept == BASE_LR:
                    continue
                specs.append((f"{configuration}/lr{swept}", (*sets, *_lr_sets(swept)), 1,
                              {"method": method, "scenario": "none", "lr": swept, "sweep": True}))
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


def summarise(specs, out: Path, init_loss: float = PRESETS["gpt-bytes"]["init_loss"]) -> dict:
    """Per (method, scenario): final val loss (mean, std, n), damage against the same
    method and seed without injection, spikes seen, steps acted on; per (method, LR):
    final val loss; per method: Wortsman et al.'s LR sensitivity."""
    runs, swept = {}, {}
    for name, _, seed, what in specs:
        figures = run_figures(out / name / f"seed{seed}")
        if what.get("sweep"):
            swept[(what["method"], what["lr"])] = figures
        else:
            runs[(what["method"], what["scenario"], seed)] = figures
    cells = {}
    for (method, scenario, seed), fig in runs.items():
        cell = cells.setdefault((method, scenario), {"loss": [], "damage": [], "spikes": [], "acted": [],
                                                     "curves": [], "classes": []})
        if fig is None:
            continue
        cell["loss"].append(fig["final_val_loss"])
        clean = runs.get((method, "none", seed))
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
    if swept:  # the sweep's point at the presets' LR is the scenario run without injection, seed 1
        for method in dict.fromkeys(m for m, _ in swept):  # in the order of the plan
            by_lr = {lr: fig["final_val_loss"] for (m, lr), fig in swept.items() if m == method and fig}
            base = runs.get((method, "none", 1))
            if base is not None:
                by_lr[BASE_LR] = base["final_val_loss"]
            lr_curves[method] = {lr: by_lr[lr] for lr in LRS if lr in by_lr}
    return {"table": table, "lr": lr_curves, "sensitivity": lr_sensitivity(lr_curves, init_loss),
            "curves": {f"{m} | {s}": c["curves"] for (m, s), c in cells.items()}}


def lr_sensitivity(lr_curves: dict, init_loss: float = PRESETS["gpt-bytes"]["init_loss"]) -> dict:
    """Per method: the mean over the swept LRs of min(final loss, initial loss) minus the
    method's best final loss over those LRs (Wortsman et al., 2023): 0 when every LR
    does as well as the best one; larger when the method needs its LR tuned. Wortsman et
    al. cap a diverged run's loss at the loss at initialisation (`init_loss`), so one
    divergence cannot dominate the mean."""
    out = {}
    for method, by_lr in lr_curves.items():
        losses = [min(v, init_loss) if v is not None else init_loss for v in by_lr.values()]
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


def markdown(result: dict, methods: list[str], scenarios: list[str], seeds: int, wall_s: float,
             preset: str = "gpt-bytes", lr: str = BASE_LR) -> str:
    t = result["table"]
    lines = ["# Spike benchmark", "",
             f"{PRESETS[preset]['about']}, {STEPS} steps at peak LR {lr}, {seeds} seeds per cell; "
             f"`make compare-spikes`{f' ({wall_s / 60:.0f} min)' if wall_s is not None else ''}. Final validation loss in {PRESETS[preset]['unit']}, mean ± "
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


def plots(result: dict, methods: list[str], scenarios: list[str], out: Path,
          preset: str = "gpt-bytes") -> list[Path]:
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
        ax.set(title=f"validation loss, scenario: {scenario}", xlabel="step", ylabel=PRESETS[preset]["unit"])
        ax.set_ylim(top=PRESETS[preset]["plot_top"])
        ax.legend(fontsize=7)
        path = out / f"spike-curves-{scenario.replace(' ', '-')}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    if result["lr"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, by_lr in result["lr"].items():
            lrs = [lr for lr in LRS if by_lr.get(lr) is not None]
            ax.plot([float(lr) for lr in lrs], [min(by_lr[lr], PRESETS[preset]["init_loss"]) for lr in lrs], marker="o", label=m)
        ax.set(xscale="log", title="LR sensitivity: final val loss (no injection)", xlabel="peak LR",
               ylabel=PRESETS[preset]["unit"])
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
    p.add_argument("--preset", choices=list(PRESETS), default="gpt-bytes",
                   help="the model the grid runs on (default gpt-bytes)")
    p.add_argument("--lr", default=BASE_LR, help=f"peak LR of the scenario runs (default the presets' {BASE_LR}); "
                   "another value leaves out the LR sweep")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables and plots from the runs already in OUT; train nothing")
    p.add_argument("--gates", action="store_true", help="also the z-gate's published-window and median/MAD "
                   "statistics (SPAM_GATE_*), on the scenarios where the gate matters")
    args = p.parse_args(argv)
    everything = {**METHODS, **GATE_METHODS, **EXTRA_METHODS}
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
    try:
        if not 0 < float(args.lr) <= 1:
            raise ValueError
    except ValueError:
        print(f"error: --lr {args.lr!r} is not a learning rate in (0, 1]", file=sys.stderr)
        return 2
    specs = plan(methods, scenarios, args.seeds, lr_sweep=not args.no_lr, preset=args.preset, lr=args.lr)

    started = time.perf_counter()
    status = 0
    if not args.report_only:
        from scripts.compare import compare_jobs
        status = compare_jobs([(n, s, seed) for n, s, seed, _ in specs], out=args.out, parallel=args.jobs,
                              common=list(COMMON), what="method x scenario",
                              about="The spike benchmark (scripts/spike_bench.py): see spike-benchmark.md.")
    args.out.mkdir(parents=True, exist_ok=True)
    result = summarise(specs, args.out, PRESETS[args.preset]["init_loss"])
    names = list(methods)
    written = plots(result, names, scenarios, args.out, args.preset)
    wall_s = None if args.report_only else time.perf_counter() - started
    text = markdown(result, names, scenarios, args.seeds, wall_s, args.preset, args.lr)
    (args.out / "spike-benchmark.md").write_text(text)
    (args.out / "spike-benchmark.json").write_text(json.dumps(
        {k: v for k, v in result.items() if k != "curves"}, indent=1, default=str) + "\n")
    print(f"wrote {args.out / 'spike-benchmark.md'}, spike-benchmark.json and {len(written)} plots")
    return status


if __name__ == "__main__":
    sys.exit(main())
