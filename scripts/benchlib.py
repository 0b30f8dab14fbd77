"""Benchmark harness: section registry, interleaved A/B timing, machine info, reports.

A benchmark here is a ratio measured in one process: the baseline and the
candidate run in alternation (A B, B A, A B, ...), several repetitions, and the
figure is the median of the per-repetition ratios. Load from other processes
then slows both sides of a pair alike, so a noisy machine still gives a fair
comparison, and the alternating order cancels warm-cache and drift effects
that always favour whichever runs second.

Sections register themselves with @section and return rows
{figure, value, unit, target, ok, detail}. run() selects sections (--only),
runs them, writes bench_results/bench-<timestamp>.{json,md} and
bench_results/latest.{json,md}, and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "bench_results"


# --------------------------------------------------------------------- rows

_OPS = {"<=": ("≤", lambda v, t: v <= t), "<": ("<", lambda v, t: v < t),
        ">=": ("≥", lambda v, t: v >= t), ">": (">", lambda v, t: v > t)}


def row(figure: str, value, unit: str = "", target: tuple | None = None, detail: str = "") -> dict:
    """One result line. target: (op, limit) with op in <=, <, >=, >; ok is then
    whether value meets it (None when there is no target or no value)."""
    ok, target_text = None, ""
    if target is not None:
        op, limit = target
        symbol, test = _OPS[op]
        target_text = f"{symbol} {_with_unit(f'{limit:g}', unit)}"
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            ok = bool(test(value, limit))
    return {"figure": figure, "value": value, "unit": unit, "target": target_text, "ok": ok,
            "detail": detail}


class Skipped(Exception):
    """A section that cannot run on this machine (e.g. no CUDA device)."""


class Pending(Exception):
    """A section whose dependency (a module another part of the project provides) is missing."""


# ----------------------------------------------------------------- sections

@dataclass
class Context:
    """What a section gets: the repetition counts and a logger."""
    quick: bool = False
    repeats: int = 7
    warmup: int = 2
    threads: int = 1
    log: Callable[[str], None] = print


@dataclass
class Section:
    name: str
    title: str
    fn: Callable[[Context], list]
    needs_cuda: bool = False
    optional: bool = False  # long: runs only when named with --only, not in the default suite


SECTIONS: dict[str, Section] = {}  # registration order is run order


def section(name: str, title: str, needs_cuda: bool = False, optional: bool = False):
    """Decorator: register fn(ctx) -> list of rows as a benchmark section
    (optional: left out of the default suite, run with --only NAME)."""
    def register(fn):
        if name in SECTIONS:
            raise ValueError(f"benchmark section {name!r} registered twice")
        SECTIONS[name] = Section(name, title, fn, needs_cuda, optional)
        return fn
    return register


def select_sections(only: list[str] | None, registry: dict[str, Section] | None = None) -> list[Section]:
    """The sections to run, in registration order; only=None or [] means all but
    the optional ones. Names may be given comma-separated. An unknown name is a
    ValueError."""
    registry = SECTIONS if registry is None else registry
    if not only:
        return [s for s in registry.values() if not s.optional]
    wanted = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in registry]
    if unknown:
        raise ValueError(f"unknown benchmark section {', '.join(unknown)}; "
                         f"known: {', '.join(registry)}")
    return [s for s in registry.values() if s.name in wanted]


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def run_section(sec: Section, ctx: Context, has_cuda: bool | None = None) -> dict:
    """Run one section; a skip, a missing dependency or an error becomes a status
    and one explanatory row instead of ending the whole suite."""
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    t0 = time.perf_counter()
    try:
        if sec.needs_cuda and not has_cuda:
            raise Skipped("no CUDA device")
        rows, status = list(sec.fn(ctx)), "ok"
    except Skipped as e:
        rows, status = [row(sec.title, None, detail=f"skipped: {e}")], "skipped"
    except Pending as e:
        rows, status = [row(sec.title, None, detail=f"pending: {e}")], "pending"
    except Exception as e:  # noqa: BLE001 - reported in the table, the suite goes on
        rows, status = [row(sec.title, None, detail=f"error: {type(e).__name__}: {e}")], "error"
    return {"name": sec.name, "title": sec.title, "status": status,
            "seconds": round(time.perf_counter() - t0, 2), "rows": rows}


# ------------------------------------------------------------------- timing

@dataclass
class Timing:
    """Per-repetition seconds of A (baseline) and B (candidate), and their summary."""
    a: list = field(default_factory=list)
    b: list = field(default_factory=list)

    @property
    def a_median(self) -> float:
        return statistics.median(self.a)

    @property
    def b_median(self) -> float:
        return statistics.median(self.b)

    @property
    def ratio(self) -> float:
        """Median over repetitions of B/A: each pair ran back to back, under the same load."""
        return statistics.median(b / a for a, b in zip(self.a, self.b))

    @property
    def ratio_quartiles(self) -> tuple:
        """25th and 75th percentile of the per-pair ratios: how noisy the machine was."""
        ratios = sorted(b / a for a, b in zip(self.a, self.b))
        if len(ratios) < 2:
            return ratios[0], ratios[0]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return q1, q3

    @property
    def ratio_of_medians(self) -> float:
        return self.b_median / self.a_median

    def as_dict(self) -> dict:
        return {"a_median_s": self.a_median, "b_median_s": self.b_median, "ratio": self.ratio,
                "ratio_of_medians": self.ratio_of_medians, "ratio_quartiles": list(self.ratio_quartiles),
                "a_s": self.a, "b_s": self.b}


def time_interleaved(fa: Callable[[], object], fb: Callable[[], object], repeats: int, warmup: int = 1,
                     number: int = 1, timer: Callable[[], float] = time.perf_counter,
                     sync: Callable[[], object] | None = None) -> Timing:
    """Time fa (baseline) and fb (candidate) alternately.

    warmup pairs are run and discarded (allocator, caches, lazy init). Then
    `repeats` pairs are timed, A first on even repetitions and B first on odd
    ones. Each sample is the mean over `number` back-to-back calls. sync (e.g.
    torch.cuda.synchronize) is called before each clock read so that queued
    device work is counted where it belongs.
    """
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError("time_interleaved needs repeats >= 1, number >= 1, warmup >= 0")

    def once(f):
        if sync is not None:
            sync()
        t0 = timer()
        for _ in range(number):
            f()
        if sync is not None:
            sync()
        return (timer() - t0) / number

    for _ in range(warmup):
        fa()
        fb()
    result = Timing()
    for i in range(repeats):
        if i % 2 == 0:
            result.a.append(once(fa))
            result.b.append(once(fb))
        else:
            result.b.append(once(fb))
            result.a.append(once(fa))
    return result


def time_repeated(f: Callable[[], object], repeats: int, warmup: int = 1, number: int = 1,
                  timer: Callable[[], float] = time.perf_counter,
                  sync: Callable[[], object] | None = None) -> list:
    """Seconds per call of f, one sample per repetition (each the mean of `number` calls)."""
    timing = time_interleaved(f, lambda: None, repeats, warmup, number, timer, sync)
    return timing.a


# ------------------------------------------------------------- machine info

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import torch
    info = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "git_commit": _git_commit(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_devices"] = torch.cuda.device_count()
        info["cuda_version"] = torch.version.cuda
    return info


def default_threads() -> int:
    """Threads for torch: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------ reports

def format_value(value, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = str(value)
    elif isinstance(value, float) and math.isnan(value):
        text = "nan"
    elif abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif isinstance(value, int):
        text = str(value)
    elif unit == "×":
        text = f"{value:.3f}"  # ratios are compared against targets such as 1.02: show the third digit
    else:
        text = f"{value:#.3g}".rstrip(".")  # keep trailing zeros: 1.00×, not 1×
    return _with_unit(text, unit)


def _with_unit(text: str, unit: str) -> str:
    if not unit:
        return text
    return f"{text}{unit}" if unit in ("×", "%") else f"{text} {unit}"


def format_table(rows: list[dict]) -> str:
    """Markdown table of result rows."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| Figure | Value | Target | OK | Detail |", "|---|---:|---|:---:|---|"]
    for r in rows:
        ok = {True: "yes", False: "**no**", None: ""}[r["ok"]]
        lines.append(f"| {cell(r['figure'])} | {cell(format_value(r['value'], r['unit']))} | "
                     f"{cell(r['target'])} | {ok} | {cell(r['detail'])} |")
    return "\n".join(lines)


def format_report(results: dict) -> str:
    m = results["machine"]
    head = [f"# Benchmarks ({results['timestamp']})", "",
            f"- command: `{results['command']}`" + (" (quick)" if results["quick"] else ""),
            f"- machine: {m['cpu_model']}, {m['usable_cores']} usable of {m['logical_cores']} logical cores, "
            f"{m.get('memory_gib')} GiB" + (f", GPU {m['cuda_device']}" if m.get("cuda_device") else ""),
            f"- torch {m['torch']}, {results['threads']} torch threads (fixed for the whole run), "
            f"Python {m['python']}",
            f"- load average at start / end: {_fmt_load(m.get('loadavg_start'))} / "
            f"{_fmt_load(m.get('loadavg_end'))}",
            f"- ratios: baseline and candidate interleaved, median of the per-pair ratios; "
            f"{results['repeats']} pairs after {results['warmup']} warm-up pairs unless a row says otherwise",
            ""]
    rows = [r for s in results["sections"] for r in s["rows"]]
    return "\n".join(head) + "\n" + format_table(rows) + "\n"


def _fmt_load(load) -> str:
    return "n/a" if not load else " ".join(f"{x:.2f}" for x in load)


def write_results(results: dict, out_dir: Path) -> list[Path]:
    """bench-<timestamp>.{json,md} and latest.{json,md}; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = results["timestamp"].replace(":", "").replace("-", "")
    text_json = json.dumps(results, indent=2, default=_json_default) + "\n"
    text_md = format_report(results)
    paths = []
    for stem in (f"bench-{stamp}", "latest"):
        for suffix, text in ((".json", text_json), (".md", text_md)):
            path = out_dir / f"{stem}{suffix}"
            tmp = path.with_suffix(suffix + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            paths.append(path)
    return paths


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)


# --------------------------------------------------------------------- main

def build_parser(prog: str = "python -m scripts.bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run the benchmark suite and write bench_results/.")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this section (repeatable, or comma-separated); see --list")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (checks the suite runs, not its numbers)")
    p.add_argument("--repeats", type=int, help="timed pairs per ratio (default 7, quick 3)")
    p.add_argument("--threads", type=int, help="torch threads for the whole run (default: usable cores)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="results folder (default bench_results/)")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    return p


def main(argv=None, registry: dict[str, Section] | None = None, out=print, has_cuda: bool | None = None) -> int:
    registry = SECTIONS if registry is None else registry
    args = build_parser().parse_args(argv)
    if args.list:
        for s in registry.values():
            out(f"{s.name:14s} {s.title}" + ("  (CUDA only)" if s.needs_cuda else "")
                + (f"  (optional: --only {s.name})" if s.optional else ""))
        return 0
    try:
        chosen = select_sections(args.only, registry)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    ctx = Context(quick=args.quick, repeats=repeats, warmup=warmup, threads=threads,
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    machine = machine_info()
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    results = {"timestamp": time.strftime("%Y-%m-%dT%H-%M-%S"),
               "command": " ".join(["python -m scripts.bench"] + list(argv if argv is not None else sys.argv[1:])),
               "quick": args.quick, "threads": threads, "repeats": repeats, "warmup": warmup,
               "machine": machine, "sections": []}
    t0 = time.perf_counter()
    for sec in chosen:
        ctx.log(f"[bench] {sec.name}: {sec.title} ...")
        result = run_section(sec, ctx, has_cuda)
        ctx.log(f"[bench] {sec.name}: {result['status']} in {result['seconds']:.1f} s")
        results["sections"].append(result)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    paths = write_results(results, args.out)
    out(format_report(results))
    out(f"wrote {paths[0].parent}/ ({', '.join(p.name for p in paths)}) in {results['total_seconds']} s")
    return 1 if any(s["status"] == "error" for s in results["sections"]) else 0
