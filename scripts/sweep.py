"""`make sweep`: train every combination of a few settings and say which one wins.

    python -m scripts.sweep gpt2-tiny "LR=3e-4,1e-3,3e-3" "SPAM_THETA=50,5000" [--seeds 3]
                            [--max-iters N] [--jobs 2] [--out runs/sweep] [--set NAME=VALUE ...]

Each argument after the configuration sweeps one symbol, over a list
(`LR=3e-4,1e-3,3e-3`) or a range `start:stop:count` (`LR=1e-4:1e-2:5`: log-spaced
for a real-valued symbol whose range spans a decade or more, linear otherwise;
integer symbols are rounded and duplicates dropped). The sweep trains the
Cartesian product, every combination with every seed, through the runner of
`make compare`: each run in OUT/<configuration>/<SYM=value,...>/seed<k>/, finished
runs reused, unfinished ones resumed. Every value and every combination is
checked by the strict config loader before anything trains.

The comparison report (comparison.md) covers every combination; sweep.md adds,
per swept symbol, final val loss against the symbol's value (mean ± std over
seeds) and names the best combination.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from scripts import compare
from scripts.runs import CompareError, parse_entry

DEFAULT_OUT = Path("runs/sweep")
WHERE = "SWEEP"  # how errors name the sweep specification, as `<setconfig>` names setconfig's


@dataclass(frozen=True)
class Axis:
    """One swept symbol and its values, as the config tool spells them."""
    symbol: str
    values: tuple[str, ...]


def _config_error(problem: str, symbol: str | None = None, valid: str | None = None):
    from scripts.kconfig.strict import ConfigError
    return ConfigError(WHERE, problem, symbol=symbol, valid=valid)


def _number(symbol: str, text: str, valid: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _config_error(f"{text!r} is not a number", symbol, valid) from None
    if not math.isfinite(value):
        raise _config_error(f"{text!r} is not a finite number", symbol, valid)
    return value


def format_value(x: float) -> str:
    """A real value as setconfig takes it, short: 0.001, 0.000316228, 5000."""
    from scripts.kconfig.schema import format_number
    return format_number(float(f"{x:.6g}"))


def expand_range(symbol: str, spec: str, kind: str) -> list[str]:
    """"start:stop:count" of an "int" or "float" symbol -> its values, both ends included.

    Floats: log-spaced when start and stop are positive and stop/start (or
    start/stop) is at least 10, linear otherwise. Ints: linear, rounded half up,
    duplicates dropped in order.
    """
    valid = "start:stop:count, e.g. 1e-4:1e-2:5 (count >= 1)"
    parts = spec.split(":")
    if len(parts) != 3:
        raise _config_error(f"{spec!r} is not a range", symbol, valid)
    start, stop = _number(symbol, parts[0], valid), _number(symbol, parts[1], valid)
    if not re.fullmatch(r"[1-9][0-9]*", parts[2]):
        raise _config_error(f"{parts[2]!r} is not a count", symbol, valid)
    count = int(parts[2])
    if count == 1:
        points = [start]
    elif kind == "float" and start > 0 and stop > 0 and max(start, stop) / min(start, stop) >= 10:
        lo, hi = math.log10(start), math.log10(stop)
        points = [10 ** (lo + (hi - lo) * i / (count - 1)) for i in range(count)]
    else:
        points = [start + (stop - start) * i / (count - 1) for i in range(count)]
    if kind == "int":
        out: list[str] = []
        for p in points:
            text = str(math.floor(p + 0.5))
            if text not in out:
                out.append(text)
        return out
    values = [format_value(p) for p in points]
    return list(dict.fromkeys(values))


def symbol_kind(kconf, symbol: str) -> str:
    """"int", "float" or "other" (bool, choice member, string): what a range may span."""
    import kconfiglib
    from scripts.kconfig.schema import FLOAT_RANGES
    sym = kconf.syms.get(symbol)
    if sym is None or sym.nodes == []:
        return "other"  # unknown symbols are refused by the validation with the loader's message
    if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX):
        return "int"
    return "float" if symbol in FLOAT_RANGES else "other"


def parse_axes(specs: list[str], kconf) -> list[Axis]:
    """["LR=3e-4,1e-3", "SPAM_THETA=50:5000:3"] -> Axes (no validation of the values yet)."""
    axes: list[Axis] = []
    for spec in (s for arg in specs for s in arg.split()):
        symbol, sep, body = spec.partition("=")
        if symbol.startswith("CONFIG_"):
            symbol = symbol[len("CONFIG_"):]
        if not sep or not symbol or not body:
            raise _config_error(f"{spec!r} is not a sweep of one symbol", valid="NAME=v1,v2,... or NAME=start:stop:count")
        if any(a.symbol == symbol for a in axes):
            raise _config_error("swept twice", symbol, "one NAME=... per symbol")
        kind = symbol_kind(kconf, symbol)
        if kind != "other" and ":" in body:
            values = expand_range(symbol, body, kind)
        else:
            values = [v for v in body.split(",")]
            if any(v == "" for v in values):
                raise _config_error(f"{body!r} has an empty value", symbol, "comma-separated values")
            values = list(dict.fromkeys(values))
        axes.append(Axis(symbol, tuple(values)))
    if not axes:
        raise _config_error("nothing to sweep", valid='NAME=v1,v2 ..., e.g. SWEEP="LR=3e-4,1e-3,3e-3"')
    return axes


def combinations(axes: list[Axis]) -> list[tuple[str, ...]]:
    """The Cartesian product as assignments: (("LR=3e-4", "SPAM_THETA=50"), ...), first axis slowest."""
    return [tuple(f"{a.symbol}={v}" for a, v in zip(axes, values))
            for values in itertools.product(*(a.values for a in axes))]


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


def label_of(assignments) -> str:
    """The run folder name of one combination: LR=0.001,SPAM_THETA=50."""
    return _UNSAFE.sub("_", ",".join(assignments))


def validate(kconf, configuration: str, axes: list[Axis], common: list[str]) -> None:
    """Every value on its own, then every combination on top of the configuration, with
    the strict loader (as `make setconfig` checks): ConfigError naming SWEEP and the symbol."""
    from scripts.kconfig.strict import ConfigError, command_line_layer, load, read_layer
    for axis in axes:
        for value in axis.values:
            try:
                command_line_layer(kconf, [f"{axis.symbol}={value}"], where=WHERE)
            except ConfigError as e:
                raise _config_error(e.problem, e.symbol, e.valid) from None
    entry = parse_entry(configuration)
    base = [read_layer(kconf, str(entry.defconfig))] + [read_layer(kconf, str(f)) for f in entry.fragments]
    for combo in combinations(axes):
        try:
            layer = command_line_layer(kconf, [*common, *combo], where=WHERE)
            load(kconf, [*base, layer], check_from=len(base))
        except ConfigError as e:
            problem = e.problem if e.where == WHERE else f"{e.where}: {e.problem}"
            raise _config_error(f"{problem} (with {' '.join(combo)})", e.symbol, e.valid) from None


# --------------------------------------------------------------------------- the sweep's report

def numeric(values) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def summarize(axes: list[Axis], configuration: str, result: dict) -> dict:
    """Per combination: its values and final val loss over seeds; the best combination."""
    by_name = {c["name"]: c for c in result["configs"]}
    rows = []
    for combo in combinations(axes):
        c = by_name.get(f"{configuration}/{label_of(combo)}")
        agg = c["metrics"]["final_val_loss"] if c else None
        rows.append({"assignments": list(combo),
                     "values": {a.symbol: s.partition("=")[2] for a, s in zip(axes, combo)},
                     "final_val_loss": agg})
    scored = [r for r in rows if r["final_val_loss"] is not None]
    best = min(scored, key=lambda r: r["final_val_loss"]["mean"]) if scored else None
    return {"configuration": configuration, "axes": [{"symbol": a.symbol, "values": list(a.values)} for a in axes],
            "rows": rows, "best": best}


def _loss_text(agg: dict | None) -> str:
    if agg is None:
        return "n/a"
    return f"{agg['mean']:.4f}" + (f" ± {agg['std']:.4f}" if agg["n"] > 1 else "") + f" (n={agg['n']})"


def sweep_markdown(summary: dict, plots: list[Path]) -> str:
    axes = summary["axes"]
    lines = [f"# Sweep of {', '.join(a['symbol'] for a in axes)} on `{summary['configuration']}`", ""]
    best = summary["best"]
    if best is None:
        lines += ["No combination finished, so there is no best setting yet.", ""]
    else:
        lines += [f"**Best setting: `{' '.join(best['assignments'])}`**, final val loss "
                  f"{_loss_text(best['final_val_loss'])} (lowest mean over seeds).", ""]
    header = [a["symbol"] for a in axes] + ["final val loss (mean ± std)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary["rows"]:
        mark = " **(best)**" if r is best else ""
        lines.append("| " + " | ".join(r["values"][a["symbol"]] for a in axes)
                     + f" | {_loss_text(r['final_val_loss'])}{mark} |")
    lines += ["", "Every run, its diffconfig and its curves: [comparison.md](comparison.md).", ""]
    if plots:
        lines += ["## Final val loss against each swept setting", "",
                  "Mean over seeds, error bars ± sample standard deviation; one line per value of "
                  "the other swept settings.", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def plot_axis(summary: dict, symbol: str, path: Path) -> Path | None:
    """Final val loss against `symbol`'s value: one line per combination of the other symbols."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis_values = next(a["values"] for a in summary["axes"] if a["symbol"] == symbol)
    xs = numeric(axis_values)
    positions = xs if xs is not None else list(range(len(axis_values)))
    others = [a["symbol"] for a in summary["axes"] if a["symbol"] != symbol]
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in summary["rows"]:
        agg = r["final_val_loss"]
        if agg is None:
            continue
        key = ", ".join(f"{s}={r['values'][s]}" for s in others) or symbol
        x = positions[axis_values.index(r["values"][symbol])]
        series.setdefault(key, []).append((x, agg["mean"], agg["std"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, points in series.items():
        points.sort()
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                    marker="o", capsize=3, label=key)
    if xs is not None and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    if xs is None:
        ax.set_xticks(positions, axis_values)
    ax.set_xlabel(symbol)
    ax.set_ylabel("final val loss")
    ax.set_title(f"{summary['configuration']}: final val loss vs {symbol}")
    from scripts.compare_plots import save_figure
    return save_figure(fig, ax, path)


def write_sweep_report(out: Path, summary: dict) -> list[Path]:
    plots = [p for a in summary["axes"]
             if (p := plot_axis(summary, a["symbol"], out / f"sweep_{a['symbol']}.png")) is not None]
    compare._write_atomic(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    compare._write_atomic(out / "sweep.md", sweep_markdown(summary, plots))
    return plots


# --------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.sweep", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("configuration", help="<defconfig>[+<fragment>...], e.g. gpt2-tiny")
    p.add_argument("sweep", nargs="+", help='NAME=v1,v2,... or NAME=start:stop:count (several per argument, '
                   'separated by blanks)')
    p.add_argument("--seeds", type=int, default=1, help="seeds per combination: 1..N (default 1)")
    p.add_argument("--max-iters", type=int, help="MAX_ITERS for every run (and MAX_EPOCHS=0)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, each with cores/JOBS torch threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"sweep folder (default {DEFAULT_OUT})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="setting applied to every run (validated by setconfig); repeatable")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from scripts.kconfig.strict import ConfigError, open_kconfig
    args = parse_args(argv)

    def say(msg: str) -> None:
        print(f"sweep: {msg}", flush=True)

    try:
        if args.seeds < 1 or args.jobs < 1:
            raise CompareError("SEEDS and JOBS must be at least 1")
        entry = parse_entry(args.configuration)
        common = compare.overrides(args.max_iters, args.sets)
        kconf = open_kconfig()
        axes = parse_axes(args.sweep, kconf)
        validate(kconf, entry.name, axes, common)
    except (CompareError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    specs = [(f"{entry.name}/{label_of(combo)}", combo, seed)
             for combo in combinations(axes) for seed in range(1, args.seeds + 1)]
    swept = "; ".join(a.symbol + " over " + ", ".join(a.values) for a in axes)
    about = f"Sweep of {swept} on `{entry.name}` (sweep.md names the best setting)."
    rc = compare.compare_jobs(specs, out=args.out, parallel=args.jobs, common=common, about=about, say=say,
                              what="setting")
    if rc == 2:
        return rc
    result = json.loads((args.out / "comparison.json").read_text(encoding="utf-8"))
    summary = summarize(axes, entry.name, result)
    plots = write_sweep_report(args.out, summary)
    best = summary["best"]
    say(f"wrote {args.out / 'sweep.md'} and {len(plots)} plot{'s' * (len(plots) != 1)}; best setting: "
        + (f"{' '.join(best['assignments'])} (final val loss {_loss_text(best['final_val_loss'])})"
           if best else "none (no run finished)"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
