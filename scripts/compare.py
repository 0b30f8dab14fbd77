"""`make compare`: train several configurations side by side and show what changed and what it did.

    python -m scripts.compare gpt2-tiny gpt2-tiny-adamw+clip1 [--seeds 3] [--max-iters N]
                              [--jobs 2] [--out runs/compare] [--set NAME=VALUE ...]

A configuration is a defconfig, optionally followed by fragments merged in
order (later assignments win): `gpt2-tiny+spam-paper+spikes` is
defconfigs/gpt2-tiny, then defconfigs/fragments/spam-paper.config, then
defconfigs/fragments/spikes.config. Every (configuration, seed) trains in its
own process and run folder, OUT/<configuration>/seed<k>/, whose .config is built
with the ordinary config tool (defconfig + fragments, setconfig, settings), so a
run of the comparison is exactly a run a user could have started by hand.

Finished runs are reused and unfinished ones resume from their checkpoint, so an
interrupted comparison is continued by running the same command again.

The runs are trained by scripts/runs.py, which `make sweep` and `make
check-presets` share; compare_jobs() is the whole comparison of a list of
(name, settings overrides, seed) jobs, for tools that build their own grid.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("runs/compare")

# The trainer, as `make train` runs it; tests replace it with a stand-in to exercise failures.
TRAIN_COMMAND = [sys.executable, "-m", "train"]

# Metrics of one run (and, aggregated over seeds, of one configuration), in table order.
METRICS = ("final_val_loss", "best_val_loss", "final_val_accuracy", "best_val_accuracy", "spikes",
           "clipped_fraction", "resets", "skipped_steps", "throughput", "peak_rss_mb", "wall_s")


# The runner (scripts/runs.py) is shared with `make sweep` and `make check-presets`;
# its names are re-exported here, where the comparison's callers and tests know them.
from scripts.runs import (CompareError, Entry, Job, build_config, kconfig, last_error_line,  # noqa: E402,F401
                          parse_entry, plan_jobs, read_jsonl_records, run_is_finished, run_jobs)


def overrides(max_iters: int | None, sets: list[str]) -> list[str]:
    """Assignments applied to every configuration: --max-iters, then --set (later wins)."""
    out = []
    if max_iters is not None:
        # A config that trains by epochs would otherwise stop at whichever comes first.
        out += [f"MAX_ITERS={max_iters}", "MAX_EPOCHS=0"]
    return out + list(sets)


def diffconfigs(configs: list[tuple[str, Entry, tuple[str, ...]]], out: Path, common: list[str],
                seed: int) -> list[dict]:
    """Each configuration (name, entry, its own settings) against the first, in the kernel's
    diffconfig format.

    Compared on reference configs (OUT/<name>/.config) that share OUT_DIR and
    SEED, which every run sets for itself: a diff should show what the
    configurations change, not where their runs live. Building them checks every
    configuration before anything trains.
    """
    paths = []
    for name, entry, sets in configs:
        path = out / name / ".config"
        try:
            build_config(entry, path, [*common, *sets, f"OUT_DIR={out}", f"SEED={seed}"])
        except CompareError as e:
            raise CompareError(f"{name}: {e}") from None
        paths.append(path)
    return [{"base": configs[0][0], "config": c[0],
             "diff": kconfig(["diffconfig", str(paths[0]), str(p)], paths[0]).rstrip("\n")}
            for c, p in zip(configs[1:], paths[1:])]


def configurations(jobs: list[Job]) -> list[tuple[str, Entry, tuple[str, ...]]]:
    """The distinct (name, entry, settings) of `jobs`, in order of first appearance."""
    seen: dict[str, tuple[str, Entry, tuple[str, ...]]] = {}
    for job in jobs:
        seen.setdefault(job.name, (job.name, job.entry, job.sets))
    return list(seen.values())


# --------------------------------------------------------------------------- metrics

read_jsonl = read_jsonl_records  # a line cut short by a killed run is skipped


def _finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def run_metrics(run_dir: Path, cfg) -> dict:
    """What one run did, from its summary.json, metrics.jsonl and spikes.jsonl.

    `cfg` is the run's settings: resets are counted from them (telemetry is only
    sampled every LOG_INTERVAL steps, so counting logged resets would miss some).
    None means "does not apply" (e.g. clipped fraction of a non-SPAM optimizer).
    """
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    steps = int(summary.get("steps", 0))
    spam = bool(getattr(cfg, "OPTIM_ADAMW_SPAM", False))
    unit = "tokens" if getattr(cfg, "MODEL_GPT2", False) else "images"

    def final_and_best(key: str, best) -> tuple[float | None, float | None]:
        series = _finite(r.get(key) for r in val)
        final = summary.get(key)
        final = float(final) if isinstance(final, (int, float)) else (series[-1] if series else None)
        return final, (best(series) if series else None)

    m = {}
    m["final_val_loss"], m["best_val_loss"] = final_and_best("val_loss", min)
    m["final_val_accuracy"], m["best_val_accuracy"] = final_and_best("val_accuracy", max)
    if "spikes" in summary:
        spikes = summary["spikes"]
        m["spikes"] = len(spikes) if isinstance(spikes, list) else spikes
    elif (run_dir / "spikes.jsonl").is_file():
        m["spikes"] = sum(1 for r in read_jsonl(run_dir / "spikes.jsonl") if r.get("event") != "rollback")
    else:
        m["spikes"] = None
    clipped = _finite(r.get("spam/clipped_fraction") for r in train)
    m["clipped_fraction"] = statistics.fmean(clipped) if spam and clipped else None
    if not spam:
        m["resets"] = None
    elif getattr(cfg, "SPAM_PERIODIC_RESET", False):
        m["resets"] = steps // cfg.SPAM_INTERVAL
    else:
        m["resets"] = 0
    m["skipped_steps"] = summary.get("nonfinite_total")
    rates = _finite(r.get(f"{unit}_per_s") for r in train)
    m["throughput"] = statistics.median(rates) if rates else None
    m["peak_rss_mb"] = summary.get("peak_rss_mb")
    m["wall_s"] = summary.get("wall_s")
    m["steps"] = steps
    m["throughput_unit"] = f"{unit}/s"
    return m


def run_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} for the plots."""
    curves: dict[str, dict[int, float]] = {"val_loss": {}, "val_accuracy": {}, "loss": {}, "grad_norm": {}}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        keys = ("val_loss", "val_accuracy") if r.get("split") == "val" else ("loss", "grad_norm")
        for key in keys:
            if key in r and "step" in r:
                curves[key][int(r["step"])] = r[key]
    return curves


def aggregate(values: list) -> dict | None:
    """Mean and sample standard deviation over seeds; None when no seed has the metric."""
    vals = _finite(values)
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals), "values": vals}


# --------------------------------------------------------------------------- the report

COLUMNS = (  # (metric, header, format of one number)
    ("final_val_loss", "final val loss", "{:.4f}"),
    ("best_val_loss", "best val loss", "{:.4f}"),
    ("final_val_accuracy", "final val acc", "{:.2%}"),
    ("best_val_accuracy", "best val acc", "{:.2%}"),
    ("spikes", "spikes detected", "{:.1f}"),
    ("clipped_fraction", "clipped elements", "{:.3g}"),
    ("resets", "resets", "{:.0f}"),
    ("skipped_steps", "skipped steps", "{:.1f}"),
    ("throughput", "throughput", "{:,.0f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:,.0f}"),
    ("wall_s", "wall time (s)", "{:,.1f}"),
)
assert [c[0] for c in COLUMNS] == list(METRICS)


def format_cell(agg: dict | None, fmt: str) -> str:
    if agg is None:
        return "n/a"
    values = agg["values"]
    if len(set(values)) == 1:  # one seed, or seeds that agree (counts often do): no "± 0"
        v = values[0]
        return f"{v:.0f}" if fmt == "{:.1f}" and float(v).is_integer() else fmt.format(v)
    return f"{fmt.format(agg['mean'])} ± {fmt.format(agg['std'])}"


def markdown_report(result: dict) -> str:
    configs = result["configs"]
    lines = [f"# Comparison: {', '.join(c['name'] for c in configs)}", ""]
    if result.get("about"):
        lines += [result["about"], ""]
    lines += [f"Seeds: {', '.join(map(str, result['seeds']))}. Settings applied to every configuration: "
              f"{', '.join(f'`{s}`' for s in result['overrides']) or 'none'}.", ""]
    lines += ["## What changed", "",
              "Each configuration against the first (`diffconfig`; OUT_DIR and SEED, which every run "
              "sets for itself, left out):", ""]
    if not result["diffconfig"]:
        lines += ["(only one configuration)", ""]
    for d in result["diffconfig"]:
        lines += [f"`{d['base']}` -> `{d['config']}`:", "", "```", d["diff"] or "(no differences)", "```", ""]

    # val accuracy columns only when an image model is compared
    columns = [c for c in COLUMNS if "accuracy" not in c[0] or any(x["family"] == "resnet" for x in configs)]
    units = sorted({c["throughput_unit"] for c in configs if c["throughput_unit"]})
    header = ["config", "runs"] + [units[0] if h == "throughput" and len(units) == 1 else h
                                   for _, h, _ in columns]
    lines += ["## What it did", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in configs:
        runs = f"{c['runs_ok']}/{len(c['runs'])}"
        if c["runs_failed"]:
            runs += f" ({c['runs_failed']} failed)"
        cells = [f"`{c['name']}`", runs] + [format_cell(c["metrics"][key], fmt) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["",
              "Mean ± sample standard deviation over the seeds that finished. Final/best val: the last "
              "evaluation and the best one of each run. Spikes detected: the health monitor's count "
              "(summary.json, else spikes.jsonl; n/a when it was not recording spikes). Clipped elements: "
              "mean of AdamWSpam's sampled `spam/clipped_fraction` (n/a for other optimizers). Resets: "
              "computed exactly from the settings, floor(steps / SPAM_INTERVAL) when SPAM_PERIODIC_RESET "
              "(telemetry is sampled every LOG_INTERVAL steps and would miss resets). Skipped steps: "
              "non-finite steps not applied. Throughput: median of the logged rates. Peak RSS and wall "
              "time: from summary.json (wall time of the whole run, across resumes).", ""]
    failed = [r for c in configs for r in c["runs"] if r["status"] not in ("done", "reused")]
    if failed:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- `{r['config']}` seed {r['seed']} ({r['run_dir']}): **{r['status']}**"
                  f"{': ' + r['error'] if r['error'] else ''}" for r in failed]
        lines.append("")
    if result["plots"]:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in result["plots"]] + [""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_comparison(out: Path, jobs: list[Job], diffs: list[dict], *,
                     seeds: list[int], common: list[str], about: str = "") -> dict:
    """comparison.json, comparison.md and the plots, from whatever runs finished.

    One configuration per distinct job name, in order; its seeds are the jobs of that name."""
    from scripts.kconfig.settings import load_settings
    from scripts.compare_plots import write_plots

    configs = []
    curves: dict[str, dict[str, list]] = {k: {} for k in ("val_loss", "val_accuracy", "loss", "grad_norm")}
    for name, entry, sets in configurations(jobs):
        mine = [j for j in jobs if j.name == name]
        runs, per_metric, family, unit = [], {k: [] for k in METRICS}, None, None
        for job in mine:
            run = {"config": name, "seed": job.seed, "run_dir": str(job.run_dir), "status": job.status,
                   "error": job.error, "metrics": None}
            if job.status in ("done", "reused"):
                cfg = load_settings(job.run_dir / "settings.py", check_fresh=False)
                family = "gpt2" if cfg.MODEL_GPT2 else "resnet"
                m = run_metrics(job.run_dir, cfg)
                unit = m["throughput_unit"]
                run["metrics"] = m
                for k in METRICS:
                    per_metric[k].append(m[k])
                for key, series in run_curves(job.run_dir).items():
                    curves[key].setdefault(name, []).append(series)
            runs.append(run)
        configs.append({
            "name": name, "defconfig": str(entry.defconfig), "fragments": [str(f) for f in entry.fragments],
            "sets": list(sets), "family": family, "throughput_unit": unit, "seeds": [j.seed for j in mine],
            "runs_ok": sum(r["status"] in ("done", "reused") for r in runs),
            "runs_failed": sum(r["status"] == "failed" for r in runs),
            "metrics": {k: aggregate(v) for k, v in per_metric.items()},
            "runs": runs,
        })
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(curves, out)
    result = {"out": str(out), "about": about, "seeds": seeds, "overrides": common, "metrics": list(METRICS),
              "diffconfig": diffs, "configs": configs, "plots": [str(p) for p in plots]}
    _write_atomic(out / "comparison.json", json.dumps(result, indent=2) + "\n")
    _write_atomic(out / "comparison.md", markdown_report(result))
    return result


# --------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.compare", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("configs", nargs="*", help="configurations: <defconfig>[+<fragment>...]")
    p.add_argument("--seeds", type=int, help="seeds per configuration: 1..N (default 1)")
    p.add_argument("--max-iters", type=int, help="MAX_ITERS for every configuration (and MAX_EPOCHS=0)")
    p.add_argument("--jobs", type=int, help="runs in parallel, each with cores/JOBS torch threads "
                   "(default 1)")
    p.add_argument("--out", type=Path, help=f"comparison folder (default {DEFAULT_OUT})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="setting applied to every configuration (validated by setconfig); repeatable")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n for arg in args.configs for n in re.split(r"[\s,]+", arg) if n]
    seeds = args.seeds if args.seeds is not None else 1
    out = args.out or DEFAULT_OUT
    jobs = args.jobs if args.jobs is not None else 1
    sets = list(args.sets)

    def say(msg: str) -> None:
        print(f"compare: {msg}", flush=True)

    try:
        if not names:
            raise CompareError("no configurations given (e.g. make compare DEFCONFIGS=\"gpt2-tiny "
                               "gpt2-tiny-adamw\")")
        if len(set(names)) != len(names):
            raise CompareError(f"a configuration is listed twice: {' '.join(names)}")
        if seeds < 1 or jobs < 1:
            raise CompareError("SEEDS and JOBS must be at least 1")
        if any("=" not in s for s in sets):
            raise CompareError(f"--set takes NAME=VALUE, got {next(s for s in sets if '=' not in s)!r}")
        common = overrides(args.max_iters, sets)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    specs = [(n, (), s) for n in names for s in range(1, seeds + 1)]
    return compare_jobs(specs, out=out, parallel=jobs, common=common, say=say)


def compare_jobs(specs, *, out: Path, parallel: int = 1, common=(), about: str = "", say=print,
                 threads: int | None = None, what: str = "config") -> int:
    """The comparison of `specs`, (name, overrides, seed) jobs (see scripts/runs.py): check
    every configuration (one line and exit status 2 on the first bad one, before anything
    trains), train them `parallel` at a time, and write the report. Returns the exit status:
    0, 1 when a run failed, 130 when interrupted."""
    common = list(common)
    try:
        todo = plan_jobs(specs, out)
        diffs = diffconfigs(configurations(todo), out, common, seed=1)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_configs = len(configurations(todo))
    seed_list = sorted({j.seed for j in todo})
    threads = threads or max(1, _cores() // parallel)
    say(f"{_count(len(todo), 'run')} ({_count(n_configs, what)} x {_count(len(seed_list), 'seed')}), "
        f"{parallel} at a time with {_count(threads, 'torch thread')} each -> {out}")
    t0 = time.perf_counter()
    interrupted = run_jobs(todo, parallel=parallel, common=common, say=say, threads=threads,
                           train_command=TRAIN_COMMAND)
    result = write_comparison(out, todo, diffs, seeds=seed_list, common=common, about=about)
    failed = [j for j in todo if j.status == "failed"]
    say(f"wrote {out / 'comparison.md'}, comparison.json and {len(result['plots'])} plots "
        f"({time.perf_counter() - t0:.0f} s)")
    if interrupted:
        say("interrupted; run the same command again to resume")
        return 130
    if failed:
        say(f"{len(failed)} of {len(todo)} runs failed: " + ", ".join(j.label for j in failed))
        return 1
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cores() -> int:
    from scripts.runs import available_cores
    return available_cores()


if __name__ == "__main__":
    sys.exit(main())
