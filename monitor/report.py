"""`make report RUN=<dir>`: the training-health report of a run folder.

    python -m monitor.report RUN_DIR [--out DIR]

Reads the run folder the trainer wrote (settings.py, metrics.jsonl,
spikes.jsonl, summary.json) and writes <RUN_DIR>/report/report.md with one PNG
per section: what ran, the loss, gradient norms, the Gradient Spike Score
with the spike and rollback steps marked, update/weight ratios, entropies,
weight and activation spectra, SPAM telemetry and the loss-curve probes,
then a diagnosis in words (monitor/diagnosis.py). A section whose metrics
were not logged says so in one line. The folder is built next to its final
place and renamed into it, so a crash never leaves half a report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from data.cache import replace_dir
from monitor import diagnosis as D
from monitor.report_plots import Panel, render_panels

REPORT_DIR = "report"
SPIKE_TABLE_ROWS = 20
# Probe metrics that exist for language models only (monitor/Kconfig: inside "if MODEL_GPT2")
LM_PROBE_SETTINGS = ("MONITOR_ATTN_ENTROPY_INTERVAL", "MONITOR_TOKEN_ENTROPY_INTERVAL", "MONITOR_ACT_SPECTRA_INTERVAL",
                     "MONITOR_GRAD_SPECTRA_INTERVAL", "MONITOR_CODEC_INTERVAL", "MONITOR_ZLIB_INTERVAL")


# ------------------------------------------------------------------ reading


def read_jsonl(path: Path) -> list[dict] | None:
    """The records of a .jsonl file, None if it does not exist. A line that does not parse
    (the last one of a run still being written) is skipped."""
    if not path.is_file():
        return None
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def series_from_records(records: list[dict]) -> dict:
    """{metric: (steps, values)} from metrics.jsonl records, in the order metrics first appear
    (for per-parameter metrics: model order). None (a non-finite value) becomes NaN; a step
    logged twice keeps its last value."""
    by_name: dict[str, dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if key in ("step", "split") or isinstance(value, bool):
                continue
            if value is None or isinstance(value, (int, float)):
                by_name.setdefault(key, {})[step] = math.nan if value is None else float(value)
    series = {}
    for key, points in by_name.items():
        steps = np.array(sorted(points), dtype=np.int64)
        series[key] = (steps, np.array([points[s] for s in steps], dtype=float))
    return series


@dataclasses.dataclass
class Run:
    folder: Path
    series: dict
    spikes: list | None  # spikes.jsonl records; None when the file does not exist
    summary: dict | None
    settings: dict | None
    settings_note: str = ""

    @property
    def spike_steps(self) -> list[int]:
        return sorted({int(e["step"]) for e in self.spikes or [] if e.get("event") == "spike"})

    @property
    def rollback_steps(self) -> list[int]:
        return sorted({int(e["step"]) for e in self.spikes or [] if e.get("event") == "rollback"})


def load_run(folder) -> Run:
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: run folder {folder} does not exist")
    records = read_jsonl(folder / "metrics.jsonl")
    if records is None:
        raise SystemExit(f"error: {folder} has no metrics.jsonl: not a run folder, or the run has not "
                         "logged anything yet")
    summary = None
    if (folder / "summary.json").is_file():
        try:
            summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            summary = None
    settings, note = None, ""
    if (folder / "settings.py").is_file():
        from scripts.kconfig.settings import SettingsError, load_settings
        try:
            settings = load_settings(folder / "settings.py", check_fresh=False).as_dict()
        except SettingsError as e:
            note = f"settings.py unreadable: {e}"
    else:
        note = "no settings.py in the run folder"
    return Run(folder, series_from_records(records), read_jsonl(folder / "spikes.jsonl"), summary,
               settings, note)


# ------------------------------------------------------------------- header


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def describe_model(s: dict) -> str:
    if s.get("MODEL_GPT2"):
        size = next((n for n in ("TINY", "124M", "350M", "774M", "1558M", "CUSTOM") if s.get(f"GPT2_{n}")), "")
        return (f"GPT-2 {size.lower()} ({s.get('GPT2_N_LAYER')} layers, {s.get('GPT2_N_HEAD')} heads, "
                f"width {s.get('GPT2_N_EMBD')}, context {s.get('GPT2_BLOCK_SIZE')})")
    for depth in ("18", "50"):
        if s.get(f"MODEL_RESNET{depth}"):
            return f"ResNet-{depth} (base width {s.get('RESNET_BASE_WIDTH')})"
    return "unknown"


def describe_optimizer(s: dict) -> str:
    lr = f"lr {_fmt(s.get('LR'))}, warmup {s.get('LR_WARMUP_ITERS')} steps" + \
         (f", cosine to {_fmt(s.get('MIN_LR'))}" if s.get("LR_COSINE") else "")
    if s.get("OPTIM_SGD"):
        text = f"SGD (momentum {_fmt(s.get('SGD_MOMENTUM'))}{', Nesterov' if s.get('SGD_NESTEROV') else ''}), {lr}"
    else:
        adam = f"betas ({_fmt(s.get('BETA1'))}, {_fmt(s.get('BETA2'))}), weight decay {_fmt(s.get('WEIGHT_DECAY'))}"
        if s.get("OPTIM_ADAMW_SPAM"):
            reset = f"momentum reset every {s.get('SPAM_INTERVAL')} steps" if s.get("SPAM_PERIODIC_RESET") \
                else "no periodic reset"
            clip = f"spike clipping theta {_fmt(s.get('SPAM_THETA'))}" if s.get("SPAM_ENABLE_CLIP") \
                else "no spike clipping"
            text = f"AdamW-SPAM ({clip}, {reset}), {adam}, {lr}"
        else:
            text = f"AdamW, {adam}, {lr}"
    if s.get("GRAD_CLIP"):
        text += f", gradient clipping at norm {_fmt(s.get('GRAD_CLIP'))}"
    return text


def describe_dataset(s: dict) -> str:
    names = {"DATA_SHAKESPEARE": "Shakespeare", "DATA_FINEWEB_EDU": "FineWeb-Edu",
             "DATA_OPENWEBTEXT": "OpenWebText", "DATA_DIGITS": "Digits (scikit-learn 8x8)",
             "DATA_CIFAR10": "CIFAR-10", "DATA_CIFAR100": "CIFAR-100"}
    name = next((label for sym, label in names.items() if s.get(sym)), "unknown")
    return f"{name} (data folder {s.get('DATA_DIR')})"


def header(run: Run) -> list[str]:
    s, summary, series = run.settings or {}, run.summary or {}, run.series
    rows = [("Run folder", f"`{run.folder}`")]
    if run.settings is not None:
        units = "sequences" if s.get("MODEL_GPT2") else "images"
        rows += [("Model", describe_model(s)), ("Optimizer", describe_optimizer(s)),
                 ("Dataset", describe_dataset(s)),
                 ("Batch", f"{s.get('BATCH_SIZE')} {units} x {s.get('GRAD_ACCUM_STEPS')} accumulation step(s) "
                           "per process"),
                 ("Seed", str(s.get("SEED")))]
        monitor = "off"
        if s.get("MONITOR"):
            guard = "spike guard off"
            if s.get("MONITOR_SPIKE_GUARD"):
                action = next((a for a in ("LOG", "CLIP", "SKIP") if s.get(f"MONITOR_SPIKE_ACTION_{a}")), "?")
                guard = f"spike guard on (tau {_fmt(s.get('MONITOR_SPIKE_TAU'))}, action {action.lower()})"
            monitor = f"on, {guard}"
        rows.append(("Health monitor", monitor))
        if s.get("FAULT_INJECTION"):
            rows.append(("Fault injection", f"ON: gradient spikes at steps '{s.get('FAULT_SPIKE_STEPS')}' "
                                            f"(probability {_fmt(s.get('FAULT_SPIKE_PROB'))}, factor "
                                            f"{_fmt(s.get('FAULT_SPIKE_FACTOR'))}), data outliers at "
                                            f"'{s.get('FAULT_OUTLIER_STEPS')}'"))
    else:
        rows.append(("Settings", run.settings_note))
    last_step = max((int(st[-1]) for st, _ in series.values() if len(st)), default=0)
    if summary:
        rows.append(("Steps", f"{summary.get('steps', last_step)} of {summary.get('total_iters', '?')}"))
    else:
        rows.append(("Steps", f"{last_step} logged (no summary.json: the run is unfinished or was stopped)"))
    final = {k: summary[k] for k in ("val_loss", "val_ppl", "val_accuracy") if k in summary}
    if not final:
        final = {k: series[k][1][-1] for k in ("val_loss", "val_ppl", "val_accuracy") if k in series}
    rows.append(("Final validation", ", ".join(f"{k} {_fmt(float(v))}" for k, v in final.items()) or "none logged"))
    if "loss" in series:
        rows.append(("Final training loss", _fmt(float(series["loss"][1][-1]))))
    if run.spikes is not None:
        rows.append(("Spikes / rollbacks (spikes.jsonl)", f"{len(run.spike_steps)} / {len(run.rollback_steps)}"))
    if "wall_s" in summary:
        rows.append(("Wall time", f"{summary['wall_s']:.0f} s"))
    for unit in ("tokens_per_s", "images_per_s"):
        if unit in series:
            rows.append(("Throughput (median)", f"{np.nanmedian(series[unit][1]):,.0f} {unit.replace('_per_s', '')}/s"))
    lines = [f"# Training-health report: {run.folder.name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if summary.get("sample"):
        sample = summary["sample"][:400].replace("```", "'''")
        lines += ["", "Text sample at the end of training:", "", "```", sample, "```"]
    return lines


# -------------------------------------------------------------------- plots


@dataclasses.dataclass
class Section:
    title: str
    text: str
    png: str
    panels: list = dataclasses.field(default_factory=list)


def short_name(name: str) -> str:
    """transformer.h.0.attn.c_attn.weight -> h.0.attn.c_attn (legends stay readable)."""
    name = re.sub(r"^(transformer|_orig_mod|module)\.", "", name)
    return re.sub(r"\.weight$", "", name)


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def family(series: dict, prefix: str, exclude=(), rename=short_name) -> dict:
    """{label: (steps, values)} of prefix/<name> metrics, in model order."""
    out = {}
    for key, value in series.items():
        if key.startswith(prefix + "/"):
            name = key[len(prefix) + 1:]
            if name not in exclude:
                out[rename(name)] = value
    return out


def pick(series: dict, *keys, labels=None) -> dict:
    labels = labels or keys
    return {label: series[k] for k, label in zip(keys, labels) if k in series}


# ----------------------------------------------------------------- sections


def sections(run: Run) -> list[Section]:
    s = run.series

    def per_matrix(prefix, exclude=()):
        return family(s, prefix, exclude)

    ratio_bold = ("global",)
    out = [
        Section("Loss and learning rate",
                "Training loss (mean over the logging interval) and validation loss; the learning rate as "
                "applied (schedule, and re-warmup after a rollback).", "loss.png", [
                    Panel("loss", pick(s, "loss", "val_loss", labels=("train", "val")), None,
                          ylabel="loss (nats)", markers=True),
                    Panel("validation accuracy", pick(s, "val_accuracy", labels=("val",)), None,
                          ylabel="accuracy"),
                    Panel("learning rate", pick(s, "lr"), None, ylabel="lr")]),
        Section("Gradient norm",
                "Global L2 norm of the gradient. Healthy: stable or slowly decreasing after the first "
                "fluctuations; sudden spikes point at bad data or overflow, values near zero at vanishing "
                "gradients (seed 002).", "grad_norm.png", [
                    Panel("global gradient norm", pick(s, "grad_norm/global", "grad_norm",
                                                       labels=("monitor", "trainer")),
                          None, ylabel="||g||", logy=True, markers=True),
                    Panel("per weight matrix", per_matrix("grad_norm", ("global",)),
                          "MONITOR_GRAD_NORM_INTERVAL=0", ylabel="||g||", logy=True)]),
        Section("Gradient Spike Score (GSS)",
                "GSS = ||g_t|| / EMA(||g||) (seed 000): 1 is business as usual. Above 2 for many points: "
                "momentum pollution; a transient spike far above 10: a data outlier. Red dotted lines: spike "
                "steps from spikes.jsonl; black dashed: rollbacks. Second panel: the element-wise score "
                "|g| / sqrt(v) against Adam's second moment per parameter class, maximum (solid) and p99.9 "
                "(dashed, 1 element in 1000 above it). Healthy ranges differ by class: attention, MLP and other "
                "dense weights stay at a few units (max above "
                f"{D.ELEM_GSS_DENSE_MAX:g} is an element-wise spike); the embedding's maximum is 1e2-1e5 on every "
                "step in a healthy run, because rows of tokens not seen for many steps have v near 0 "
                "(|g| / eps: the rare-token effect), so judge it by its p99.9 (tens; alarm above "
                f"{D.ELEM_GSS_EMBEDDING_P999:g}). GPT-2 ties the output head to the token embedding: that one "
                "tensor is the 'embedding' class, and 'head' appears only for an untied head (ResNet's fc).",
                "gss.png", [
                    Panel("GSS", pick(s, "gss/global", "gss/max", "gss/elementwise_max",
                                      labels=("global", "max over tensors", "max element-wise (vs Adam v)")),
                          "MONITOR_GSS_INTERVAL=0", ylabel="GSS", logy=True, markers=True,
                          hlines=((D.GSS_PERSISTENT, f"{D.GSS_PERSISTENT:g}: momentum pollution if persistent"),
                                  (D.GSS_SPIKE, f"{D.GSS_SPIKE:g}: spike"))),
                    Panel("element-wise GSS per parameter class (solid: max, dashed: p99.9)",
                          family(s, "gss_elem", rename=lambda name: name.replace("/", " ")),
                          "MONITOR_GSS_ELEMENTWISE_INTERVAL=0", ylabel="|g| / sqrt(v)",
                          logy=True, markers=True, dashed=" p999",
                          hlines=((D.ELEM_GSS_DENSE_MAX, f"{D.ELEM_GSS_DENSE_MAX:g}: dense-class alarm"),
                                  (D.ELEM_GSS_EMBEDDING_P999,
                                   f"{D.ELEM_GSS_EMBEDDING_P999:g}: embedding p99.9 alarm")))]),
        Section("Update-to-weight ratio",
                "||w_after - w_before|| / ||w_before|| per weight matrix over one optimizer step (the step "
                "taken). Healthy about 1e-3 (shaded 1e-4..1e-2); above 1e-2 the learning rate is too high, "
                "below 1e-4 optimisation stagnates (seed 002).", "update_ratio.png", [
                    Panel("update/weight ratio", {**per_matrix("update_ratio", ("global",)),
                                                  **pick(s, "update_ratio/global", labels=ratio_bold)},
                          "MONITOR_UPDATE_RATIO_INTERVAL=0", ylabel="ratio", logy=True,
                          band=(D.UPDATE_RATIO_LOW, D.UPDATE_RATIO_HIGH), bold=ratio_bold,
                          hlines=((D.UPDATE_RATIO_LOW, "1e-4: stagnation"),
                                  (D.UPDATE_RATIO_HIGH, "1e-2: LR too high")))]),
        Section("Gradient signal-to-noise and cross-process consistency",
                "GSNR = E[g]^2 / Var(g) per weight matrix, across the micro-batches of a step (gsnr_micro) or, "
                "without gradient accumulation, across the examples of the probe batch (gsnr_examples); low in "
                "deep layers hints at residual or normalisation problems. Under DDP every process evaluates the "
                "same probe batch: the cosine between their gradients of it is 1 and the spread of their losses "
                "exactly 0 while the replicas agree.", "gsnr.png", [
                    Panel("GSNR", {**per_matrix("gsnr_micro", ("mean",)), **per_matrix("gsnr_examples", ("mean",)),
                                   **pick(s, "gsnr_micro/mean", "gsnr_examples/mean",
                                          labels=("mean (micro-batches)", "mean (examples)"))},
                          "MONITOR_GSNR_INTERVAL=0", ylabel="GSNR", logy=True,
                          bold=("mean (micro-batches)", "mean (examples)")),
                    Panel("direction consistency (DDP)", pick(s, "ddp/grad_cosine", labels=("cosine",)),
                          "single process or MONITOR_DDP_CONSISTENCY_INTERVAL=0", ylabel="cosine",
                          hlines=((D.DIRECTION_CONSISTENCY_LOW, "low"),)),
                    Panel("loss dispersion (DDP)", pick(s, "ddp/loss_std", labels=("std",)),
                          "single process or MONITOR_DDP_CONSISTENCY_INTERVAL=0", ylabel="loss std")]),
        Section("Attention-head and token entropy",
                "Attention entropy per layer (mean over heads, nats) should fall as heads learn to focus; stuck "
                "high = nothing captured, near 0 = collapse/overfitting. Token entropy: the uncertainty of the "
                "next-token distribution on the probe batch.", "entropy.png", [
                    Panel("attention entropy per layer", {k: v for k, v in per_matrix("attn_entropy").items()
                                                          if ".H" not in k},
                          "MONITOR_ATTN_ENTROPY_INTERVAL=0", ylabel="nats",
                          hlines=((D.ATTN_ENTROPY_COLLAPSE, "collapse"),)),
                    Panel("token entropy", pick(s, "monitor/token_entropy", labels=("probe batch",)),
                          "MONITOR_TOKEN_ENTROPY_INTERVAL=0", ylabel="nats")]),
        Section("Heavy-tail alpha",
                "Power-law exponent alpha of each weight matrix's eigenvalue spectrum (HT-SR): smaller = "
                "stronger correlations, a better-trained layer; above about 6 = under-trained.", "alpha.png", [
                    Panel("alpha per weight matrix", per_matrix("alpha"), "MONITOR_WEIGHT_SPECTRA_INTERVAL=0",
                          ylabel="alpha", hlines=((D.ALPHA_UNDERTRAINED, "under-trained"),))]),
        Section("Singular entropy and spectral radius",
                "Singular entropy of each weight matrix (a sharp decline = rank collapse) and its largest "
                "singular value (growth without bound risks activation explosion).", "weight_spectra.png", [
                    Panel("singular entropy", per_matrix("singular_entropy"), "MONITOR_WEIGHT_SPECTRA_INTERVAL=0",
                          ylabel="nats"),
                    Panel("spectral radius", per_matrix("spectral_radius"), "MONITOR_WEIGHT_SPECTRA_INTERVAL=0",
                          ylabel="sigma_max", logy=True)]),
        Section("Activation spectra",
                "Eigenvalues of the covariance of the residual stream after each block on the probe batch "
                "(seed 004): the head (variance share of the top modes) and the tail's power-law exponent. "
                "The early tail forecasts token efficiency; head movement marks learning-dynamics changes.",
                "act_spectra.png", [
                    Panel(f"top-{_act_head_k(s)} mass per block (share of variance in the leading modes)",
                          family(s, "act_spectrum", rename=_act_label("mass")),
                          "MONITOR_ACT_SPECTRA_INTERVAL=0", ylabel="variance share"),
                    Panel("tail exponent per block", family(s, "act_spectrum", rename=_act_label("tail_exponent")),
                          "MONITOR_ACT_SPECTRA_INTERVAL=0", ylabel="exponent")]),
        Section("Per-sample gradient spectrum",
                "Singular values of the per-sample gradients of one middle weight matrix (seed 004): energy "
                "share of the leading mode (samples agree on a direction), effective rank, largest value.",
                "grad_spectrum.png", [
                    Panel("leading-mode energy share", {k: v for k, v in per_matrix("grad_spectrum").items()
                                                        if k.endswith("_mass")},
                          "MONITOR_GRAD_SPECTRA_INTERVAL=0", ylabel="share"),
                    Panel("effective rank", pick(s, "grad_spectrum/effective_rank", labels=("effective rank",)),
                          "MONITOR_GRAD_SPECTRA_INTERVAL=0", ylabel="rank"),
                    Panel("largest singular value", pick(s, "grad_spectrum/sigma_max", labels=("sigma_max",)),
                          "MONITOR_GRAD_SPECTRA_INTERVAL=0", ylabel="sigma", logy=True)]),
        Section("SPAM optimizer telemetry",
                "AdamW-SPAM: share of gradient elements clipped as spikes, momentum resets, and the learning-rate "
                "scale of the warmup after each reset.", "spam.png", [
                    Panel("clipped fraction", pick(s, "spam/clipped_fraction", labels=("clipped",)),
                          "optimizer is not AdamW-SPAM", ylabel="fraction"),
                    Panel("momentum resets and warmup scale", pick(s, "spam/reset", "spam/warmup_scale",
                                                                   labels=("reset", "warmup scale")),
                          "optimizer is not AdamW-SPAM", ylabel="value"),
                    Panel("gradient-norm z-score", pick(s, "spam/zscore", labels=("z-score",)),
                          "optimizer is not AdamW-SPAM", ylabel="z")]),
        Section("Loss-curve health and memorisation probes",
                "Collapse residual: how far the losses lie above a power-law fit of the run's own curve "
                "(positive = worse than trend). CoDeC: loss drop from in-context examples (near 0 = possible "
                "contamination). zlib: log-perplexity / zlib entropy per probe sequence (low = memorisation "
                "candidate).", "loss_health.png", [
                    Panel("collapse residual (relative)", pick(s, "collapse/relative", labels=("relative",)),
                          "MONITOR_COLLAPSE_RESIDUAL_INTERVAL=0, or fewer than 10 losses yet",
                          ylabel="fraction of trend",
                          hlines=((D.COLLAPSE_RELATIVE_HIGH, "high"),)),
                    Panel("CoDeC score", pick(s, "codec/score", labels=("score",)), "MONITOR_CODEC_INTERVAL=0",
                          ylabel="nats/token", hlines=((D.CODEC_NEAR_ZERO, "near zero"),)),
                    Panel("zlib ratio", pick(s, "zlib/ratio_mean", "zlib/ratio_min", labels=("mean", "min")),
                          "MONITOR_ZLIB_INTERVAL=0", ylabel="ratio")]),
    ]
    return out


def _act_head_k(series: dict) -> str:
    """k of the act_spectrum/L<i>/top<k>_mass metrics ("k" when none are logged)."""
    for key in series:
        m = re.fullmatch(r"act_spectrum/[^/]+/top(\d+)_mass", key)
        if m:
            return m.group(1)
    return "k"


def _act_label(kind: str):
    """Renamer for act_spectrum/<layer>/<metric>: "L3" when the metric is of this kind ("mass"
    matches top<k>_mass), else "" (render_section drops unnamed lines)."""
    def rename(name):
        layer, _, metric = name.partition("/")
        return layer if metric == kind or (kind == "mass" and metric.endswith("_mass")) else ""
    return rename


def render_section(section: Section, out_dir: Path, run: Run) -> list[str]:
    """The section's markdown; its PNG is written when some panel has data."""
    lines = [f"## {section.title}", "", section.text, ""]
    not_lm = run.settings is not None and not run.settings.get("MODEL_GPT2")
    panels, off, lm_only = [], {}, []  # panels to draw; titles of the empty ones -> their setting
    for panel in section.panels:
        # unnamed series are the ones a renamer dropped; all-NaN ones have nothing to draw
        data = {k: v for k, v in panel.lines.items() if k and np.isfinite(v[1]).any()}
        if data:
            panels.append(dataclasses.replace(panel, lines=data))
        elif panel.off and not_lm and panel.off.split("=")[0] in LM_PROBE_SETTINGS:
            lm_only.append(panel.title)
        elif panel.off:
            off[panel.title] = panel.off
    if not panels:
        why = [f"metric off ({'; '.join(dict.fromkeys(off.values()))})"] if off else []
        why += ["not measured: a probe of GPT-2 runs only"] if lm_only else []
        return [f"## {section.title}", "", f"*No data: {', '.join(why) or 'nothing logged'}.*", ""]
    lines += [f"- *{title}: no data (metric off: {setting}).*" for title, setting in off.items()]
    lines += [f"- *{title}: not measured (a probe of GPT-2 runs only).*" for title in lm_only]
    render_panels(panels, out_dir / section.png, run.spike_steps, run.rollback_steps)
    if lines[-1] != "":
        lines.append("")
    return lines + [f"![{section.title}]({section.png})", ""]


def spike_table(run: Run) -> list[str]:
    lines = ["## Spike log (spikes.jsonl)", ""]
    if run.spikes is None:
        return lines + ["*No spikes.jsonl: the spike guard was off (MONITOR_SPIKE_GUARD) or never fired.*", ""]
    events = run.spikes
    if not events:
        return lines + ["*spikes.jsonl is empty.*", ""]
    lines += [f"{len(run.spike_steps)} spike(s), {len(run.rollback_steps)} rollback(s). "
              "`make data-filter RUN=<run>` writes the corpus without the documents of the spike batches.", "",
              "| step | event | action | signal | max GSS | tensors (GSS) | samples |",
              "|---|---|---|---|---|---|---|"]
    for e in events[:SPIKE_TABLE_ROWS]:
        if e.get("event") == "rollback":
            lines.append(f"| {e.get('step')} | rollback | to step {e.get('to_step')} | | | | |")
            continue
        gss = e.get("max_gss", e.get("gss"))
        samples = e.get("samples") or []
        names = [str(x.get("doc", x.get("index", "?"))) for x in samples]
        shown = ", ".join(dict.fromkeys(names[:8])) + (f" (+{len(names) - 8})" if len(names) > 8 else "")
        tensors = e.get("tensors")  # the top tensors by GSS (older records: the one largest)
        where = (", ".join(f"{short_name(str(t['param']))} ({_fmt(float(t['gss']))})" for t in tensors) if tensors
                 else short_name(str(e.get("param", e.get("layer", "")))))
        size = _fmt(float(gss)) if gss is not None else ""
        signal = "+".join(e.get("signals") or ["gss"])
        if "loss" in signal and e.get("loss") is not None:
            signal += f" (loss {_fmt(float(e['loss']))} > {_fmt(float(e['loss_threshold']))})"
        lines.append(f"| {e.get('step')} | spike | {e.get('action', '')} | {signal} | {size} | {where} | {shown} |")
    if len(events) > SPIKE_TABLE_ROWS:
        lines.append(f"\n({len(events) - SPIKE_TABLE_ROWS} more records in spikes.jsonl)")
    return lines + [""]


def diagnosis_lines(run: Run) -> tuple[list[str], int]:
    results = D.diagnose(run.series, run.spikes)
    findings = [f for fs in results.values() if fs for f in fs]
    lines = ["## Diagnosis", "",
             "The healthy/anomaly rules of the indicator table (seed 002) and the GSS manual (seed 000), "
             "applied to the logged series; thresholds are the constants in monitor/diagnosis.py.", ""]
    if findings:
        warnings = sum(f.severity == "warning" for f in findings)
        lines.append(f"**{warnings} warning(s), {len(findings) - warnings} note(s).**")
        lines.append("")
        lines += [f"- **{f.severity}** ({f.rule}): {f.message}" for f in findings]
    else:
        lines.append("**No anomaly found** by the rules that had data.")
    healthy = [D.RULES[r][0] for r, fs in results.items() if fs == []]
    unchecked = [f"{D.RULES[r][0]} ({D.RULES[r][1]})" for r, fs in results.items() if fs is None]
    lines.append("")
    if healthy:
        lines.append("Checked, healthy: " + "; ".join(healthy) + ".")
        lines.append("")
    if unchecked:
        lines.append("Not checked (no data: metric off, or too few points yet): " + "; ".join(unchecked) + ".")
        lines.append("")
    return lines, len(findings)


# ------------------------------------------------------------------- output


def write_report(run_dir, out_dir=None) -> tuple[Path, int]:
    """Write the report; returns (path of report.md, number of findings)."""
    run = load_run(run_dir)
    final = Path(out_dir) if out_dir else run.folder / REPORT_DIR
    if final.exists() and not (final / "report.md").is_file() and any(final.iterdir()):
        raise SystemExit(f"error: {final} exists and is not a report folder; choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        lines = header(run) + [""]
        for section in sections(run):
            lines += render_section(section, work, run)
        lines += spike_table(run)
        diag, count = diagnosis_lines(run)
        lines += diag
        (work / "report.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
        os.chmod(work, 0o755)  # mkdtemp makes it private; a report is an ordinary folder
        replace_dir(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final / "report.md", count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitor.report",
                                     description="Write the training-health report of a run folder.")
    parser.add_argument("run_dir", help="the run folder (OUT_DIR of the run)")
    parser.add_argument("--out", help="report folder (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    path, count = write_report(args.run_dir, args.out)
    plots = len(list(path.parent.glob("*.png")))
    print(f"report: {path} ({plots} plots, {count} finding(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
