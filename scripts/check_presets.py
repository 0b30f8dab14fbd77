"""`make check-presets`: the regression gate for configurations.

    python -m scripts.check_presets [NAME ...] [--baselines baselines] [--jobs N]
    python -m scripts.check_presets --update [NAME ...] [--set NAME=VALUE ...]

Every baseline baselines/<name>.json names a preset, the settings that shrink it
to a short CPU run (MAX_ITERS, evaluation; the model is kept), a seed, a
tolerance, and what that run measured: the training loss at every logged step
and the final validation loss. The gate trains each preset exactly so, on the
CPU with one torch thread per run (deterministic), through the runner of
`make compare`, and compares. It is one-sided: a run worse than its baseline
beyond the tolerance at any logged step, or in final val loss, fails the gate
(exit status 1, one line per failure naming the baseline, the step and both
values); a better run passes, and the gate says so (refresh the baseline with
`make update-baselines` to lock the improvement in).

`--update` trains the same runs and rewrites the baselines from them, on
purpose: after a change that is meant to change the numbers. `--update NAME`
with a preset that has no baseline yet creates one with the default
short-run settings, plus --set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from scripts.runs import CompareError, available_cores, parse_entry, plan_jobs, read_jsonl_records, run_jobs

DEFAULT_BASELINES = Path("baselines")
DEFAULT_OUT = Path("runs/check-presets")
DEFAULT_SEED = 1
DEFAULT_TOLERANCE = 0.02  # relative: CPUs and BLAS builds differ in the last bits, and that grows with steps

# A new baseline's run: short, CPU, fp32, nothing written that the gate does not read.
# The model and the optimizer settings stay the preset's.
DEFAULT_OVERRIDES = ("MAX_ITERS=16", "MAX_EPOCHS=0", "LOG_INTERVAL=2", "EVAL_INTERVAL=16", "EVAL_BATCHES=4",
                     "CKPT_INTERVAL=0", "TENSORBOARD=n", "DEVICE_CPU=y", "DTYPE_FP32=y", "COMPILE=n")


class GateError(Exception):
    """A baseline that cannot be used (missing, malformed): one line."""


@dataclass
class Baseline:
    name: str  # the file's stem
    path: Path
    preset: str  # a configuration name: <defconfig>[+<fragment>...]
    overrides: list[str]
    seed: int
    tolerance: float
    loss: dict[int, float] = field(default_factory=dict)  # training loss at each logged step
    final_val_loss: float | None = None
    about: str = ""

    def to_json(self) -> dict:
        return {"preset": self.preset, "about": self.about, "overrides": self.overrides, "seed": self.seed,
                "tolerance": {"relative": self.tolerance},
                "loss": {str(s): v for s, v in sorted(self.loss.items())},
                "final_val_loss": self.final_val_loss,
                "recorded_with": _environment()}


def _environment() -> dict:
    import torch
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": 1}


def load_baseline(path: Path) -> Baseline:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GateError(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise GateError(f"{path}: not JSON ({e})") from None
    try:
        tolerance = float(data.get("tolerance", {}).get("relative", DEFAULT_TOLERANCE))
        loss = {int(s): float(v) for s, v in data.get("loss", {}).items()}
        final = data.get("final_val_loss")
        baseline = Baseline(path.stem, path, str(data["preset"]), [str(s) for s in data.get("overrides", [])],
                            int(data.get("seed", DEFAULT_SEED)), tolerance, loss,
                            None if final is None else float(final), str(data.get("about", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise GateError(f"{path}: malformed baseline ({type(e).__name__}: {e}); "
                        "fields: preset, overrides, seed, tolerance.relative, loss, final_val_loss") from None
    if not 0 <= tolerance < 1:
        raise GateError(f"{path}: tolerance.relative {tolerance} is not in [0, 1)")
    return baseline


def new_baseline(path: Path, preset: str, sets: list[str]) -> Baseline:
    """A baseline to be recorded: the default short-run settings, then `sets` (same symbol: `sets` wins)."""
    merged = {s.partition("=")[0]: s for s in DEFAULT_OVERRIDES}
    merged.update({s.partition("=")[0]: s for s in sets})
    return Baseline(path.stem, path, preset, list(merged.values()), DEFAULT_SEED, DEFAULT_TOLERANCE,
                    about=f"{preset}, shortened for the regression gate (make check-presets)")


# --------------------------------------------------------------------------- comparing

@dataclass
class Finding:
    baseline: str
    what: str  # "step 10 training loss" | "final val loss"
    step: int | None
    expected: float | None
    measured: float | None
    verdict: str  # ok | worse | better | missing

    def line(self, tolerance: float) -> str:
        exp = "none" if self.expected is None else f"{self.expected:.4f}"
        got = "none" if self.measured is None else f"{self.measured:.4f}"
        if self.verdict == "missing":
            return f"{self.baseline}: {self.what}: no value measured (baseline {exp})"
        rel = _relative(self.expected, self.measured)
        return (f"{self.baseline}: {self.what}: {got} vs baseline {exp} ({rel:+.2%}, "
                f"tolerance {tolerance:.0%}, {self.verdict})")


def _relative(expected, measured) -> float:
    if expected is None or measured is None or not math.isfinite(measured):
        return math.inf
    return (measured - expected) / max(abs(expected), 1e-12)


def verdict(expected: float, measured: float | None, tolerance: float) -> str:
    """One-sided: "worse" above expected by more than tolerance x |expected|, "better" as far below."""
    if measured is None:
        return "missing"
    if not math.isfinite(measured):
        return "worse"
    margin = tolerance * abs(expected)
    if measured > expected + margin:
        return "worse"
    if measured < expected - margin:
        return "better"
    return "ok"


def compare_run(baseline: Baseline, loss: dict[int, float], final_val_loss: float | None) -> list[Finding]:
    findings = []
    for step, expected in sorted(baseline.loss.items()):
        measured = loss.get(step)
        findings.append(Finding(baseline.name, f"step {step} training loss", step, expected, measured,
                                verdict(expected, measured, baseline.tolerance)))
    if baseline.final_val_loss is not None:
        findings.append(Finding(baseline.name, "final val loss", None, baseline.final_val_loss, final_val_loss,
                                verdict(baseline.final_val_loss, final_val_loss, baseline.tolerance)))
    return findings


def measured(run_dir: Path) -> tuple[dict[int, float], float | None]:
    """(training loss by logged step, final val loss) of a finished run."""
    loss = {int(r["step"]): (math.nan if r.get("loss") is None else float(r["loss"]))
            for r in read_jsonl_records(run_dir / "metrics.jsonl") if r.get("split") == "train" and "loss" in r}
    try:
        final = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("val_loss")
    except (OSError, ValueError):
        final = None
    return loss, (None if final is None else float(final))


def markdown_table(rows: list[tuple[Baseline, list[Finding], str]]) -> str:
    """The comparison as a markdown table, for $GITHUB_STEP_SUMMARY."""
    lines = ["## Preset regression gate (`make check-presets`)", "",
             "| baseline | preset | result | worst step (measured vs baseline) | final val loss (measured vs baseline) |",
             "|---|---|---|---|---|"]
    for baseline, findings, status in rows:
        steps = [f for f in findings if f.step is not None and f.measured is not None]
        worst = max(steps, key=lambda f: _relative(f.expected, f.measured), default=None)
        worst_text = (f"step {worst.step}: {worst.measured:.4f} vs {worst.expected:.4f} "
                      f"({_relative(worst.expected, worst.measured):+.2%})" if worst else "n/a")
        final = next((f for f in findings if f.step is None), None)
        final_text = (f"{final.measured:.4f} vs {final.expected:.4f} ({_relative(final.expected, final.measured):+.2%})"
                      if final and final.measured is not None else "n/a")
        lines.append(f"| `{baseline.name}` | `{baseline.preset}` | {status} | {worst_text} | {final_text} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.check_presets", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("names", nargs="*", help="baselines (default: every baselines/*.json); with --update, "
                   "a preset without a baseline gets a new one")
    p.add_argument("--update", action="store_true", help="rewrite the baselines from this code's runs")
    p.add_argument("--baselines", type=Path, default=DEFAULT_BASELINES, help="baseline folder")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"run folder, emptied first (default {DEFAULT_OUT})")
    p.add_argument("--jobs", type=int, help="runs in parallel, one torch thread each (default: the cores)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="with --update, for a new baseline: a setting of its short run (repeatable)")
    return p.parse_args(argv)


def select(args) -> list[Baseline]:
    names = [n for arg in args.names for n in arg.split()]
    if not names:
        paths = sorted(args.baselines.glob("*.json"))
        if not paths:
            raise GateError(f"{args.baselines}: no baselines (*.json); record one with "
                            "make update-baselines PRESETS=<preset>")
        return [load_baseline(p) for p in paths]
    out = []
    for name in names:
        path = args.baselines / f"{name}.json"
        if path.is_file():
            out.append(load_baseline(path))
        elif args.update:
            parse_entry(name)  # a new baseline needs a real preset
            out.append(new_baseline(path, name, args.sets))
        else:
            raise GateError(f"{path}: no such baseline (make update-baselines PRESETS={name} records one)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)

    def say(msg: str) -> None:
        print(f"check-presets: {msg}", flush=True)

    try:
        baselines = select(args)
        if args.sets and not args.update:
            raise GateError("--set applies to --update (new baselines) only; edit the baseline's overrides instead")
        specs = [(b.preset, tuple(b.overrides), b.seed) for b in baselines]
        if len({s[0] for s in specs}) != len(specs):
            # one run folder per preset and seed: two baselines of one preset get distinct labels
            specs = [(f"{b.preset}/{b.name}", tuple(b.overrides), b.seed) for b in baselines]
        if args.out.exists():
            shutil.rmtree(args.out)  # never reuse a run: the code may have changed since
        jobs = plan_jobs(specs, args.out)
    except (GateError, CompareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    parallel = args.jobs or max(1, min(len(jobs), available_cores()))
    say(f"{len(jobs)} preset run{'s' * (len(jobs) != 1)}, {parallel} at a time, 1 torch thread each -> {args.out}")
    t0 = time.perf_counter()
    interrupted = run_jobs(jobs, parallel=parallel, say=say, threads=1)
    if interrupted:
        say("interrupted")
        return 130

    failures, rows = [], []
    for baseline, job in zip(baselines, jobs):
        if job.status not in ("done", "reused"):
            failures.append(f"{baseline.name}: the run {job.status}: {job.error} (see {job.run_dir}/train.log)")
            rows.append((baseline, [], f"run {job.status}"))
            continue
        loss, final = measured(job.run_dir)
        if args.update:
            bad = [s for s, v in loss.items() if not math.isfinite(v)]
            if bad or final is None or not math.isfinite(final) or not loss:
                failures.append(f"{baseline.name}: not recording a run with no or non-finite losses "
                                f"(steps {bad[:5]}, final val loss {final})")
                continue
            baseline.loss, baseline.final_val_loss = loss, final
            args.baselines.mkdir(parents=True, exist_ok=True)
            tmp = baseline.path.with_name(baseline.path.name + ".tmp")
            tmp.write_text(json.dumps(baseline.to_json(), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, baseline.path)
            say(f"{baseline.name}: recorded {len(loss)} logged steps, final val loss {final:.4f} -> {baseline.path}")
            rows.append((baseline, compare_run(baseline, loss, final), "recorded"))
            continue
        findings = compare_run(baseline, loss, final)
        worse = [f for f in findings if f.verdict in ("worse", "missing")]
        better = [f for f in findings if f.verdict == "better"]
        failures += [f.line(baseline.tolerance) for f in worse]
        if worse:
            status = f"**worse** ({len(worse)} of {len(findings)} values)"
        elif better:
            status = f"passed, better ({len(better)} of {len(findings)} values)"
            say(f"{baseline.name}: better than its baseline beyond the tolerance ({better[0].line(baseline.tolerance)}"
                f"{', ...' if len(better) > 1 else ''}); `make update-baselines` records it")
        else:
            status = "passed"
        rows.append((baseline, findings, status))
        say(f"{baseline.name}: {status.replace('**', '')}")

    table = markdown_table(rows)
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        with open(summary_path, "a", encoding="utf-8") as f:
            f.write(table + "\n")
    seconds = time.perf_counter() - t0
    if failures:
        for line in failures:
            print(f"check-presets: FAILED: {line}", file=sys.stderr)
        return 1
    say(f"{'recorded' if args.update else 'all passed'}: {', '.join(b.name for b in baselines)} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
