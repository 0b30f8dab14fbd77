"""`make compare`: train several configurations side by side and show what changed and what it did.

    python -m scripts.compare gpt2-tiny gpt2-tiny-adamw+clip1 [--seeds 3] [--max-iters N]
                              [--jobs 2] [--out runs/compare] [--set NAME=VALUE ...]
    python -m scripts.compare --preset spikes

A configuration is a defconfig, optionally followed by fragments merged in
order (later assignments win): `gpt2-tiny+spam-paper+spikes` is
defconfigs/gpt2-tiny, then defconfigs/fragments/spam-paper.config, then
defconfigs/fragments/spikes.config. Every (configuration, seed) trains in its
own process and run folder, OUT/<configuration>/seed<k>/, whose .config is built
with the ordinary config tool (defconfig + fragments, setconfig, settings), so a
run of the comparison is exactly a run a user could have started by hand.

Finished runs are reused and unfinished ones resume from their checkpoint, so an
interrupted comparison is continued by running the same command again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

DEFCONFIG_DIR = Path("defconfigs")
FRAGMENT_DIR = DEFCONFIG_DIR / "fragments"
DEFAULT_OUT = Path("runs/compare")

# The trainer, as `make train` runs it; tests replace it with a stand-in to exercise failures.
TRAIN_COMMAND = [sys.executable, "-m", "train"]
KCONFIG_COMMAND = [sys.executable, "-m", "scripts.kconfig"]

# Metrics of one run (and, aggregated over seeds, of one configuration), in table order.
METRICS = ("final_val_loss", "best_val_loss", "final_val_accuracy", "best_val_accuracy", "spikes",
           "clipped_fraction", "resets", "skipped_steps", "throughput", "peak_rss_mb", "wall_s")


@dataclass(frozen=True)
class Preset:
    configs: tuple[str, ...]
    seeds: int
    max_iters: int
    out: Path
    sets: tuple[str, ...] = ()
    jobs: int = 1
    about: str = ""


# `make compare-spikes`. MAX_ITERS is sized so that 8 configs x 3 seeds fit in about
# 45 minutes on 2 CPU cores with JOBS=2 (measurement in docs/compare.md); the fixed
# spike steps of defconfigs/fragments/spikes.config are placed for this length.
PRESETS = {
    "spikes": Preset(
        configs=tuple(c + s for s in ("", "+spikes")
                      for c in ("gpt2-tiny-adamw", "gpt2-tiny-adamw+clip1", "gpt2-tiny", "gpt2-tiny+spam-paper")),
        seeds=3, max_iters=200, out=Path("runs/compare-spikes"), jobs=2,
        sets=(
            # the health monitor's spike detector as a pure observer: log spikes, never roll back
            # (a cluster of K spikes in a window of 100 steps can not exceed K = 100)
            "MONITOR_SPIKE_GUARD=y", "MONITOR_SPIKE_CLUSTER_K=100",
            # a run this short needs denser curves than gpt2-tiny's every-100-steps evaluation
            "EVAL_INTERVAL=20", "EVAL_BATCHES=5", "LOG_INTERVAL=5",
        ),
        about="gpt2-tiny on Shakespeare: AdamW, AdamW + global-norm clip 1.0, AdamWSpam (seed "
              "defaults), AdamWSpam (paper values), each without and with injected 1000x gradient "
              "spikes (+spikes)."),
}


class CompareError(Exception):
    """A user error: bad configuration name, invalid setting. The message is one line."""


# --------------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Entry:
    """One configuration of the comparison: a defconfig and the fragments merged onto it."""
    name: str
    defconfig: Path
    fragments: tuple[Path, ...]


_NAME_PART = re.compile(r"^[A-Za-z0-9._-]+$")


def parse_entry(name: str) -> Entry:
    """"gpt2-tiny+spam-paper" -> defconfigs/gpt2-tiny + defconfigs/fragments/spam-paper.config."""
    parts = name.split("+")
    if not all(_NAME_PART.match(p) for p in parts):
        raise CompareError(f"{name!r} is not a configuration name (<defconfig>[+<fragment>...])")
    defconfig = DEFCONFIG_DIR / parts[0]
    if not defconfig.is_file():
        known = sorted(p.name for p in DEFCONFIG_DIR.iterdir() if p.is_file()) if DEFCONFIG_DIR.is_dir() else []
        raise CompareError(f"{name}: no defconfig {defconfig} (available: {', '.join(known) or 'none'})")
    fragments = []
    for part in parts[1:]:
        path = FRAGMENT_DIR / f"{part}.config"
        if not path.is_file():
            known = sorted(p.stem for p in FRAGMENT_DIR.glob("*.config"))
            raise CompareError(f"{name}: no fragment {path} (available: {', '.join(known) or 'none'})")
        fragments.append(path)
    return Entry(name, defconfig, tuple(fragments))


def kconfig(args: list[str], config_path: Path) -> str:
    """Run the config tool on `config_path`; its one-line error becomes a CompareError."""
    env = dict(os.environ, KCONFIG_CONFIG=str(config_path))
    proc = subprocess.run(KCONFIG_COMMAND + args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise CompareError(lines[-1] if lines else f"config tool failed: {' '.join(args)}")
    return proc.stdout


def build_config(entry: Entry, config_path: Path, assignments: list[str]) -> None:
    """defconfig (+ fragments, in order), then the validated setter for `assignments`."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    fragment_args = [arg for f in entry.fragments for arg in ("--fragment", str(f))]
    kconfig(["defconfig", str(entry.defconfig), *fragment_args], config_path)
    if assignments:
        kconfig(["setconfig", *assignments], config_path)


def overrides(max_iters: int | None, sets: list[str]) -> list[str]:
    """Assignments applied to every configuration: --max-iters, then --set (later wins)."""
    out = []
    if max_iters is not None:
        # A config that trains by epochs would otherwise stop at whichever comes first.
        out += [f"MAX_ITERS={max_iters}", "MAX_EPOCHS=0"]
    return out + list(sets)


def diffconfigs(entries: list[Entry], out: Path, common: list[str], seed: int) -> list[dict]:
    """Each configuration against the first, in the kernel's diffconfig format.

    Compared on reference configs (OUT/<config>/.config) that share OUT_DIR and
    SEED, which every run sets for itself: a diff should show what the
    configurations change, not where their runs live.
    """
    paths = []
    for entry in entries:
        path = out / entry.name / ".config"
        try:
            build_config(entry, path, [*common, f"OUT_DIR={out}", f"SEED={seed}"])
        except CompareError as e:
            raise CompareError(f"{entry.name}: {e}") from None
        paths.append(path)
    return [{"base": entries[0].name, "config": e.name,
             "diff": kconfig(["diffconfig", str(paths[0]), str(p)], paths[0]).rstrip("\n")}
            for e, p in zip(entries[1:], paths[1:])]


# --------------------------------------------------------------------------- running

@dataclass
class Job:
    entry: Entry
    seed: int
    run_dir: Path
    number: int  # 1-based, for progress lines
    status: str = "pending"  # done | reused | failed | interrupted | not started | pending
    error: str = ""
    seconds: float = 0.0
    resumed: bool = False

    @property
    def label(self) -> str:
        return f"{self.entry.name} seed{self.seed}"


def run_is_finished(run_dir: Path) -> bool:
    """summary.json says every step ran, with the .config we just built (not an older one)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if summary.get("steps") is None or summary.get("steps") != summary.get("total_iters"):
        return False
    kept = run_dir / "config"  # the trainer's copy of the .config it ran with
    return not kept.is_file() or kept.read_bytes() == (run_dir / ".config").read_bytes()


_TQDM_BAR = re.compile(r"\d+/\d+ \[[^\]]*\]\s*$")


def last_error_line(stderr_tail: str) -> str:
    """The last line of a run's stderr that is not a progress bar."""
    for line in reversed(re.split(r"[\r\n]+", stderr_tail)):
        line = line.strip()
        if line and not _TQDM_BAR.search(line):
            return line
    return "no error message (see train.log)"


class Runner:
    """Runs jobs, JOBS at a time, each trainer in its own session so that Ctrl-C reaches
    only us; we then ask every running trainer to checkpoint and stop (one SIGTERM)."""

    def __init__(self, jobs: int, common: list[str], say):
        self.jobs = jobs
        self.common = common
        self.say = say
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max(1, cores // jobs)
        self.stopping = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.total = 0

    def _tag(self, job: Job) -> str:
        return f"[{job.number}/{self.total}] {job.label}"

    def run_all(self, todo: list[Job]) -> None:
        self.total = len(todo)
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        futures = {pool.submit(self._run_guarded, job) for job in todo}
        try:
            while futures:
                _, futures = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
        except KeyboardInterrupt:
            self.stopping.set()
            self.say("interrupted: asking the running trainers to checkpoint and stop "
                     "(run the same command again to resume)")
            with self._lock:
                for proc in self._procs:
                    proc.send_signal(signal.SIGTERM)
            pool.shutdown(wait=True, cancel_futures=True)
            for job in todo:
                if job.status == "pending":
                    job.status = "not started"
            raise
        pool.shutdown(wait=True)

    def _run_guarded(self, job: Job) -> None:
        try:
            self._run_one(job)
        except Exception as e:  # e.g. a full disk: report it with the run, keep the others going
            job.status, job.error = "failed", f"{type(e).__name__}: {e}"
            self.say(f"{self._tag(job)}: FAILED: {job.error}")

    def _run_one(self, job: Job) -> None:
        if self.stopping.is_set():
            job.status = "not started"
            return
        t0 = time.perf_counter()
        run_dir = job.run_dir
        try:
            build_config(job.entry, run_dir / ".config",
                         [f"OUT_DIR={run_dir}", f"SEED={job.seed}", *self.common])
            kconfig(["settings", str(run_dir / "settings.py")], run_dir / ".config")
        except CompareError as e:
            job.status, job.error = "failed", str(e)
            self.say(f"{self._tag(job)}: FAILED to configure: {e}")
            return
        if self.stopping.is_set():
            job.status = "not started"
            return
        if run_is_finished(run_dir):
            job.status = "reused"
            self.say(f"{self._tag(job)}: skipped (done)")
            return
        ckpts = run_dir / "checkpoints"
        job.resumed = ckpts.is_dir() and any(ckpts.glob("ckpt_*.pt"))
        self.say(f"{self._tag(job)}: started{' (resuming from checkpoint)' if job.resumed else ''}"
                 f" -> {run_dir}/train.log")
        rc, tail = self._train(run_dir)
        job.seconds = time.perf_counter() - t0
        if rc == 0 and run_is_finished(run_dir):
            job.status = "done"
            self.say(f"{self._tag(job)}: finished in {job.seconds:.1f} s")
        elif self.stopping.is_set():
            job.status = "interrupted"
            self.say(f"{self._tag(job)}: stopped after {job.seconds:.1f} s (checkpoint kept)")
        else:
            job.status = "failed"
            job.error = last_error_line(tail) if rc != 0 else "trainer exited without finishing its run"
            kept = run_dir / "config"
            if kept.is_file() and kept.read_bytes() != (run_dir / ".config").read_bytes():
                job.error += " (for a comparison: OUT=<another folder>, or delete this run folder)"
            self.say(f"{self._tag(job)}: FAILED after {job.seconds:.1f} s: {job.error}")

    def _train(self, run_dir: Path) -> tuple[int, str]:
        """Trainer stdout and stderr (its tqdm bar) go to train.log; returns (exit code, stderr tail)."""
        threads = str(self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        with open(run_dir / "train.log", "ab", buffering=0) as log:
            log.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"{' '.join(TRAIN_COMMAND[1:])} --settings {run_dir / 'settings.py'}\n".encode())
            proc = subprocess.Popen([*TRAIN_COMMAND, "--settings", str(run_dir / "settings.py")],
                                    stdout=log, stderr=subprocess.PIPE, env=env, start_new_session=True)
            with self._lock:
                self._procs.add(proc)
            if self.stopping.is_set():  # Ctrl-C came while we were starting it
                proc.send_signal(signal.SIGTERM)
            tail = b""
            while chunk := proc.stderr.read1(65536):
                log.write(chunk)
                tail = (tail + chunk)[-8192:]
            rc = proc.wait()
            with self._lock:
                self._procs.discard(proc)
        return rc, tail.decode("utf-8", "replace")


# --------------------------------------------------------------------------- metrics

def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed run
    return records


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


def write_comparison(out: Path, entries: list[Entry], jobs: list[Job], diffs: list[dict], *,
                     seeds: list[int], common: list[str], about: str = "") -> dict:
    """comparison.json, comparison.md and the plots, from whatever runs finished."""
    from scripts.kconfig.settings import load_settings
    from scripts.compare_plots import write_plots

    configs = []
    curves: dict[str, dict[str, list]] = {k: {} for k in ("val_loss", "val_accuracy", "loss", "grad_norm")}
    for entry in entries:
        runs, per_metric, family, unit = [], {k: [] for k in METRICS}, None, None
        for job in (j for j in jobs if j.entry == entry):
            run = {"config": entry.name, "seed": job.seed, "run_dir": str(job.run_dir), "status": job.status,
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
                    curves[key].setdefault(entry.name, []).append(series)
            runs.append(run)
        configs.append({
            "name": entry.name, "defconfig": str(entry.defconfig), "fragments": [str(f) for f in entry.fragments],
            "family": family, "throughput_unit": unit, "seeds": [j.seed for j in jobs if j.entry == entry],
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
    p.add_argument("--preset", choices=sorted(PRESETS), help="a ready-made comparison (its configurations, "
                   "seeds, MAX_ITERS and folder; the other options still override)")
    p.add_argument("--seeds", type=int, help="seeds per configuration: 1..N (default 1; preset: its own)")
    p.add_argument("--max-iters", type=int, help="MAX_ITERS for every configuration (and MAX_EPOCHS=0)")
    p.add_argument("--jobs", type=int, help="runs in parallel, each with cores/JOBS torch threads "
                   "(default 1; preset: its own)")
    p.add_argument("--out", type=Path, help=f"comparison folder (default {DEFAULT_OUT}; preset: its own)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="setting applied to every configuration (validated by setconfig); repeatable")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset] if args.preset else None
    names = [n for arg in args.configs for n in re.split(r"[\s,]+", arg) if n]
    if preset and not names:
        names = list(preset.configs)
    seeds = args.seeds if args.seeds is not None else (preset.seeds if preset else 1)
    max_iters = args.max_iters if args.max_iters is not None else (preset.max_iters if preset else None)
    out = args.out or (preset.out if preset else DEFAULT_OUT)
    jobs = args.jobs if args.jobs is not None else (preset.jobs if preset else 1)
    sets = [*(preset.sets if preset else ()), *args.sets]

    def say(msg: str) -> None:
        print(f"compare: {msg}", flush=True)

    try:
        if not names:
            raise CompareError("no configurations given (e.g. make compare DEFCONFIGS=\"gpt2-tiny "
                               "gpt2-tiny-adamw\", or --preset spikes)")
        if len(set(names)) != len(names):
            raise CompareError(f"a configuration is listed twice: {' '.join(names)}")
        if seeds < 1 or jobs < 1:
            raise CompareError("SEEDS and JOBS must be at least 1")
        if any("=" not in s for s in sets):
            raise CompareError(f"--set takes NAME=VALUE, got {next(s for s in sets if '=' not in s)!r}")
        entries = [parse_entry(n) for n in names]
        common = overrides(max_iters, sets)
        # Build every reference config first: a bad name or setting stops us before any training.
        diffs = diffconfigs(entries, out, common, seed=1)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    seed_list = list(range(1, seeds + 1))
    todo = [Job(e, s, out / e.name / f"seed{s}", i)
            for i, (e, s) in enumerate(((e, s) for e in entries for s in seed_list), 1)]
    runner = Runner(jobs, common, say)
    say(f"{_count(len(todo), 'run')} ({_count(len(entries), 'config')} x {_count(seeds, 'seed')}), "
        f"{jobs} at a time with {_count(runner.threads, 'torch thread')} each -> {out}")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    t0 = time.perf_counter()
    try:
        runner.run_all(todo)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)

    result = write_comparison(out, entries, todo, diffs, seeds=seed_list, common=common,
                              about=preset.about if preset and not args.configs else "")
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


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
